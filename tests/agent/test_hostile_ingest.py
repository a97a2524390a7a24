"""Hostile and odd entries in the export folder (issue 20, findings 1, 2, 3, 6, 8, 10): the ingest worker
never stops for one entry, opens only regular files inside the watched folders, and a good series
beside them still completes. Real files, FIFOs, device nodes and symlinks, the real watcher."""
from __future__ import annotations

import json
import os
import resource
import sqlite3
import stat

import pytest

from scanside.agent.service.api import readiness
from scanside.agent.intake.ingest import admit, Refused
from scanside.agent.intake.quarantine import Quarantine

from .factory import series_files
from .test_ingest import running  # noqa: F401  (fixture: a real agent on tmp_path/export)
from tests.agent._live import waiter

_wait = waiter(20.0, step=0.05)


def _good_series(folder, n=3):
    """n images without an expected count: the series completes only when the quiet period runs
    (pipeline.tick), which a stuck entry used to prevent."""
    return series_files(folder, n)


def _completed(agent) -> int:
    return agent.store.event_counts().get("series_completed", 0)


def _odd_entries(export, outside):
    """Every odd entry the issue lists, made for real."""
    raw = os.fsencode(str(export)) + b"/M\xdcLLER^HANS"  # Latin-1 folder name from a Windows share
    os.mkdir(raw)
    latin = series_files(__import__("pathlib").Path(os.fsdecode(raw)), 2, images_in_acquisition=2)
    os.symlink("loop.dcm", export / "loop.dcm")  # a link to itself
    os.mkfifo(export / "pipe.dcm")
    os.symlink(export / "pipe.dcm", export / "to_pipe.dcm")
    os.symlink("/dev/zero", export / "zero.dcm")
    os.symlink("/etc/passwd", export / "passwd.dcm")
    if os.geteuid() == 0:  # a device node in the folder itself (mknod needs root)
        os.mknod(export / "null.dcm", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    with open(export / "sparse.dcm", "wb") as fp:  # 1 GiB, no blocks
        fp.truncate(1024**3)
    (outside / "secret.txt").write_text("outside")
    os.symlink(outside, export / "out_dir")  # a folder link: never walked, never followed
    return latin


@pytest.mark.timeout(120)
def test_odd_entries_present_at_start_never_stop_ingestion(tmp_path, running):
    export, outside = tmp_path / "export", tmp_path / "outside"
    export.mkdir()
    outside.mkdir()
    _odd_entries(export, outside)
    _good_series(export / "good")
    agent = running()
    # the good series completes by its quiet period, the Latin-1 series too: tick() kept running
    assert _wait(lambda: _completed(agent) == 2 and agent.ingestor.backlog == 0)
    counts = agent.store.file_counts()
    assert counts.get("ingested") == 5
    refused = {r["reason"].split(":")[0] for r in agent.store._q("SELECT reason FROM files WHERE status = 'refused'")}
    assert {"symlink_loop", "not_regular_file", "symlink_outside"} <= refused
    exposition = agent.metrics.exposition()
    exposition = exposition.decode() if isinstance(exposition, bytes) else exposition
    assert f'scanside_files_total{{outcome="refused"}} {float(counts["refused"])}' in exposition  # counted, by reason in the log
    # the sparse file was refused unread as larger than any image; nothing outside the folder was copied
    quarantined = [json.loads(p.read_text()) for p in agent.config.quarantine_path.glob("*.reason.json")]
    assert [q["reason"] for q in quarantined] == ["oversized"] and quarantined[0]["copied"] is False
    assert not list(agent.config.quarantine_path.glob("*.dcm"))
    assert agent.healthy()


@pytest.mark.timeout(120)
def test_odd_entries_arriving_while_running(tmp_path, running):
    export, outside = tmp_path / "export", tmp_path / "outside"
    export.mkdir()
    outside.mkdir()
    agent = running()
    _odd_entries(export, outside)
    _good_series(export / "good")
    assert _wait(lambda: _completed(agent) == 2 and agent.ingestor.backlog == 0)
    assert agent.store.file_counts().get("ingested") == 5
    assert not list(agent.config.quarantine_path.glob("*.dcm"))
    # the FIFO was never opened for reading: a writer opening it without blocking finds no reader
    with pytest.raises(OSError):
        os.close(os.open(export / "pipe.dcm", os.O_WRONLY | os.O_NONBLOCK))
    assert agent.healthy()


def test_admit_checks_without_blocking(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.dcm").write_bytes(b"x")
    os.mkfifo(root / "fifo")
    os.symlink("/etc/hostname", root / "away")
    os.symlink(root / "ok.dcm", root / "inside")
    assert admit(str(root / "ok.dcm"), [str(root)]).st_size == 1
    assert admit(str(root / "inside"), [str(root)]).st_size == 1
    for name, reason in (("fifo", "not_regular_file"), ("away", "symlink_outside")):
        with pytest.raises(Refused) as err:
            admit(str(root / name), [str(root)])
        assert err.value.reason == reason


def test_quarantine_copies_only_bounded_regular_files(tmp_path):
    box = Quarantine(tmp_path / "q", max_copy_bytes=4096)
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/dev/zero", tmp_path / "zero")
    with open(tmp_path / "sparse", "wb") as fp:
        fp.truncate(64 * 1024**2)
    (tmp_path / "big").write_bytes(b"x" * 5000)
    (tmp_path / "small").write_bytes(b"y" * 100)
    box.max_copy_bytes = 128 * 1024**2
    assert box.put(str(tmp_path / "sparse"), "s", "oversized", "") is None and "sparse" in box.last_refusal
    box.max_copy_bytes = 4096
    for name in ("fifo", "zero", "big"):
        assert box.put(str(tmp_path / name), name, "r", "d") is None, name
        note = json.loads((tmp_path / "q" / f"{name}.reason.json").read_text())
        assert note["copied"] is False and note["not_copied"]
    copy = box.put(str(tmp_path / "small"), "small", "r", "d")
    assert copy is not None and copy.read_bytes() == b"y" * 100
    assert sorted(p.name for p in (tmp_path / "q").glob("*.dcm")) == ["small.dcm"]


@pytest.mark.timeout(120)
def test_descriptor_exhaustion_never_quarantines_good_images(tmp_path, running, caplog):
    """EMFILE is the agent's problem, not the file's: the file waits, /readyz says why, and it is
    ingested once descriptors are free again (finding 2)."""
    export = tmp_path / "export"
    export.mkdir()
    agent = running(**{"api.enabled": False})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    src = _good_series(tmp_path / "src")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 40, hard))
        for f in src:  # rename in: complete files, before descriptors run out
            os.link(f, export / f.name)
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        assert _wait(lambda: agent.ingestor.problem is not None)
        assert "Too many open files" in agent.ingestor.problem
        assert not readiness(agent).ready
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert _wait(lambda: agent.store.file_counts().get("ingested") == 3 and _completed(agent) == 1)
    assert "quarantined" not in agent.store.file_counts()
    assert agent.ingestor.problem is None
    # one ERROR for the episode, not one per attempt (47,102 lines in 16 s before)
    assert sum(r.levelno >= 40 and r.name.startswith("agent") for r in caplog.records) <= 3


@pytest.mark.timeout(120)
def test_a_stalled_worker_shows_in_readiness_and_stops_the_watchdog(tmp_path, running):
    """Another process holds the state database locked: the worker waits in SQLite, the loop stops
    coming round, healthy() (the watchdog's test) and /readyz say so; released, it recovers."""
    export = tmp_path / "export"
    export.mkdir()
    agent = running(**{"ingest.stall_after_s": 1.0})

    assert _wait(lambda: agent.healthy())
    locker = sqlite3.connect(agent.config.db_path, timeout=10, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        _good_series(export / "s", 1)
        assert _wait(lambda: not agent.healthy())
        r = readiness(agent)
        assert not r.ready and "stalled" in r.checks["watcher"].detail
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert _wait(lambda: agent.healthy() and agent.store.file_counts().get("ingested") == 1, timeout=60)


@pytest.mark.timeout(60)
def test_exam_end_never_parses_what_ingest_refused_to(tmp_path):
    """The exam-end check attributes quarantined files to series by their headers, inside the database
    transaction: a 1 GiB sparse file there used to be parsed (force=True) for minutes while every other
    thread waited on the database; a FIFO would block it for good."""
    from scanside.agent.protocol.checker import QuarantineIndex
    from scanside.agent.state.database import StateStore

    store = StateStore(tmp_path / "state.sqlite")
    with open(tmp_path / "sparse.dcm", "wb") as fp:
        fp.truncate(1024**3)
    os.mkfifo(tmp_path / "fifo.dcm")
    good = series_files(tmp_path / "s", 1)[0]
    raw = good.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[: len(raw) - 40])  # a header intact, pixels short
    with store.transaction():
        for name, reason in (("sparse.dcm", "oversized: big"), ("fifo.dcm", "truncated: x"), ("cut.dcm", "truncated: y")):
            store.record_file(str(tmp_path / name), 1, 1.0, "quarantined", reason=reason)
    from pydicom import dcmread

    study = dcmread(good, stop_before_pixels=True).StudyInstanceUID
    headers = QuarantineIndex(store, None).headers(study)
    assert [os.path.basename(h.path) for h in headers] == ["cut.dcm"]
    store.close()


@pytest.mark.timeout(30)
def test_read_header_never_blocks_on_a_fifo(tmp_path):
    """The ingest worker checks an entry before it opens it; a FIFO put in its place in between must
    not hang read_header either."""
    from scanside.agent.dicom.header import HeaderError, read_header

    os.mkfifo(tmp_path / "swapped.dcm")
    with pytest.raises(HeaderError):
        read_header(tmp_path / "swapped.dcm")
