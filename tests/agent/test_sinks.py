"""The JSONL event log on a failing disk: a failed write leaves no partial line (cut back with
ftruncate) and the runner delivers the same event again later; a torn last line left by a crash is cut
off on open; exactly once across a crash between the write and the cursor update; on a real full tmpfs
(root) the log holds every event once when space returns. WriteHealth logs one ERROR per episode."""
from __future__ import annotations

import errno
import json
import logging
import os
import threading

import pytest

from scanside.agent.schema.events import FileQuarantined
from scanside.agent.runtime.health import WriteHealth
from scanside.agent.outputs.sinks import JsonlSink, RetryLater, SinkRunner
from scanside.agent.state.database import StateStore
from tests.agent.test_diskfull import fill, small_fs


def _event(i: int, seq: int | None = None, pad: int = 0) -> FileQuarantined:
    return FileQuarantined(key=f"file_quarantined:ref{i}:1.0", file_ref=f"ref{i}", reason="truncated",
                           detail="x" * pad, seq=seq)


def _lines(path) -> list[dict]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "the log ends in a partial line"
    return [json.loads(x) for x in raw.decode().splitlines()]  # every line whole JSON


def test_failed_write_leaves_no_partial_line_and_is_retried(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    health = WriteHealth()
    sink = JsonlSink(tmp_path / "events.jsonl", health=health)
    sink.deliver(_event(1, 1))
    real_write = os.write
    calls = {"n": 0}

    def half_then_enospc(fd, data):
        # the first call writes half the line (as a full disk does), the next one fails
        calls["n"] += 1
        if calls["n"] % 2 == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_enospc)
    for _ in range(3):
        with pytest.raises(RetryLater):
            sink.deliver(_event(2, 2))
        assert [x["key"] for x in _lines(tmp_path / "events.jsonl")] == [_event(1).key]
    assert health.is_failing("events") and health.failures_total["events"] == 3
    monkeypatch.setattr(os, "write", real_write)
    sink.deliver(_event(2, 2))
    sink.close()
    assert [x["key"] for x in _lines(tmp_path / "events.jsonl")] == [_event(1).key, _event(2).key]
    assert not health.is_failing("events")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # one per failure episode, not per retry
    assert "cannot write the event log to" in errors[0].getMessage() and "No space left on device" in errors[0].getMessage()
    assert "written to" in caplog.text and "again" in caplog.text


def test_torn_tail_is_cut_on_open_and_exactly_once_across_a_crash(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    sink.deliver(_event(1, 1))
    sink.deliver(_event(2, 2))
    sink.close()
    # a crash after event 2 was written, before the cursor moved: it is delivered again, and skipped
    sink = JsonlSink(path)
    sink.deliver(_event(2, 2))
    sink.deliver(_event(3, 3))
    sink.close()
    assert [x["key"] for x in _lines(path)] == [_event(i).key for i in (1, 2, 3)]
    # a crash in the middle of writing event 4: a torn line without its newline
    with open(path, "ab") as fp:
        fp.write(_event(4, 4).model_dump_json().encode()[:25])
    sink = JsonlSink(path)
    sink.deliver(_event(4, 4))
    sink.close()
    assert [x["key"] for x in _lines(path)] == [_event(i).key for i in (1, 2, 3, 4)]


def test_write_health_one_error_per_episode(caplog):
    caplog.set_level(logging.INFO)
    h = WriteHealth()
    for _ in range(5):
        h.failed("dicom_output", "/out", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert h.is_failing("dicom_output") and h.failing()["dicom_output"].attempts == 5
    h.ok("dicom_output")
    h.ok("dicom_output")
    h.failed("dicom_output", "/out", OSError(errno.EROFS, os.strerror(errno.EROFS)))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["cannot write the DICOM output to /out: No space left on device; kept and retried",
                      "cannot write the DICOM output to /out: Read-only file system; kept and retried"]
    assert h.failures_total["dicom_output"] == 6 and h.failures_total["events"] == 0


def test_runner_on_a_full_tmpfs_delivers_every_event_once_when_space_returns(tmp_path):
    store = StateStore(tmp_path / "state.sqlite")  # the state is on a disk with room
    with small_fs(tmp_path / "logfs", size="1m") as logfs:
        health = WriteHealth()
        sink = JsonlSink(logfs / "events.jsonl", health=health)
        runner = SinkRunner(store, [sink], threading.Condition())
        for i in range(20):
            store.append_event(_event(i, pad=2000))
        assert runner.pump() == 20
        filler = fill(logfs)
        for i in range(20, 40):
            store.append_event(_event(i, pad=2000))
        assert runner.pump() == 0 and health.is_failing("events")
        assert store.cursor("jsonl") == 20
        _lines(logfs / "events.jsonl")  # whole lines only
        runner._backoff.clear()
        assert runner.pump() == 0  # still full: the same event fails again, nothing half-written
        filler.unlink()
        for f in logfs.glob("filler-*"):
            f.unlink()
        runner._backoff.clear()
        assert runner.pump() == 20 and not health.is_failing("events")
        runner.stop()
        keys = [x["key"] for x in _lines(logfs / "events.jsonl")]
    assert keys == [_event(i).key for i in range(40)]
    assert health.failures_total["events"] == 2
    store.close()
