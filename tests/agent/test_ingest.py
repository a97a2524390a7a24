"""Bad input never crashes and loses nothing: retry while a file may be being written, then
quarantine with a reason; the export folder is otherwise untouched. Uses the real watcher."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest
from pydicom.uid import generate_uid

from scanside.agent.runtime.config import load_config
from scanside.agent.service.daemon import Agent

from .factory import mr_dataset, series_files, write
from tests.agent._live import waiter


def _config(tmp_path, **kw):
    base = {
        "watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"),
        "watch.settle_s": 0.2, "ingest.retry_delays_s": [0.1, 0.2], "ingest.quarantine_after_s": 0.6,
        "series.quiet_period_s": 1.0, "output.stdout": False,
        "protocol.enabled": False,  # ingest alone: the factory's minimal series are not PI-RADS series
    }
    base.update(kw)
    return load_config(**base)


_wait = waiter(15.0, step=0.05)


@pytest.fixture
def running(tmp_path):
    agents = []

    def start(**kw):
        agent = Agent(_config(tmp_path, **kw)).start()
        agents.append(agent)
        return agent

    yield start
    for a in agents:
        a.stop()


def _snapshot(folder):
    return {p: (os.path.getsize(p), os.path.getmtime(p)) for p in (str(x) for x in folder.rglob("*")) if os.path.isfile(p)}


def test_bad_files_are_quarantined_with_reasons(tmp_path, running):
    export = tmp_path / "export"
    export.mkdir()
    agent = running()
    (export / "notes.bin").write_bytes(os.urandom(4000))  # not DICOM
    good = mr_dataset(generate_uid(), generate_uid(), images_in_acquisition=1)
    raw = write(good, tmp_path / "good.dcm").read_bytes()
    (export / "truncated.dcm").write_bytes(raw[:-50])  # pixel data cut short
    no_uid = mr_dataset(generate_uid(), generate_uid())
    del no_uid.SeriesInstanceUID
    write(no_uid, export / "no_uid.dcm")
    (export / "ok.dcm").write_bytes(raw)
    assert _wait(lambda: agent.store.file_counts().get("quarantined", 0) == 3 and agent.store.file_counts().get("ingested") == 1)
    reasons = {json.loads(p.read_text())["reason"] for p in agent.config.quarantine_path.glob("*.reason.json")}
    assert reasons == {"not_dicom", "truncated", "missing_uid"}
    assert len(list(agent.config.quarantine_path.glob("*.dcm"))) == 3
    # copy mode: the export folder still holds every file as it was
    assert sorted(p.name for p in export.iterdir()) == ["no_uid.dcm", "notes.bin", "ok.dcm", "truncated.dcm"]
    quarantine_events = [e for e in agent.store.events_after(0) if e.type == "file_quarantined"]
    assert len(quarantine_events) == 3 and all(e.path is None for e in quarantine_events)  # no paths by default
    # issue 21 (12): a refused file whose header is readable is shown with its exam; not-DICOM has none
    by_reason = {e.reason: e.study_uid for e in quarantine_events}
    assert by_reason == {"truncated": good.StudyInstanceUID, "missing_uid": no_uid.StudyInstanceUID, "not_dicom": None}


def test_slow_writer_is_waited_for_not_quarantined(tmp_path, running):
    """A file written in place over several seconds (SMB-style, with polling) is ingested once complete."""
    export = tmp_path / "export"
    export.mkdir()
    agent = running(**{"watch.polling": True, "watch.poll_interval_s": 0.1, "ingest.quarantine_after_s": 1.0})
    raw = write(mr_dataset(generate_uid(), generate_uid(), rows=64, cols=64, images_in_acquisition=1), tmp_path / "x.dcm").read_bytes()
    with open(export / "slow.dcm", "wb") as fp:
        for i in range(0, len(raw), 1024):
            fp.write(raw[i:i + 1024])
            fp.flush()
            time.sleep(0.12)  # ~1 s of writing with pauses shorter than the quarantine wait
    assert _wait(lambda: agent.store.file_counts().get("ingested") == 1)
    assert agent.store.file_counts().get("quarantined") is None


def test_move_mode_moves_bad_file_and_keeps_reason(tmp_path, running):
    export = tmp_path / "export"
    export.mkdir()
    agent = running(**{"ingest.quarantine_mode": "move"})
    (export / "junk.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(300))
    assert _wait(lambda: agent.store.file_counts().get("quarantined") == 1)
    assert not (export / "junk.dcm").exists()
    (moved,) = agent.config.quarantine_path.glob("*.dcm")
    assert moved.stat().st_size == 432


def test_rename_and_close_events_complete_series(tmp_path, running):
    export = tmp_path / "export"
    export.mkdir()
    agent = running()
    events = []
    agent.subscribe(events.append)
    src = series_files(tmp_path / "src", 3, images_in_acquisition=3)
    for i, f in enumerate(src):
        tmp = export / f".IM{i}.tmp"
        tmp.write_bytes(f.read_bytes())
        os.rename(tmp, export / f"IM{i}.dcm")
    assert _wait(lambda: any(e.type == "series_completed" for e in events))
    assert agent.store.file_counts() == {"ingested": 3}  # temp names were never parsed


def test_export_folder_is_never_written_in_copy_mode(tmp_path, running):
    export = tmp_path / "export"
    files = series_files(export / "s1", 3, images_in_acquisition=3)
    (export / "bad.dcm").write_bytes(b"nope" * 100)
    before = _snapshot(export)
    agent = running()
    assert _wait(lambda: agent.store.file_counts().get("ingested") == 3 and agent.store.file_counts().get("quarantined") == 1)
    assert _snapshot(export) == before and len(files) == 3


def test_restart_resumes_without_loss_or_duplicates(tmp_path):
    export = tmp_path / "export"
    src = series_files(tmp_path / "src", 6, images_in_acquisition=6)
    config = _config(tmp_path)
    agent = Agent(config).start()
    for f in src[:3]:
        (export / f.name).write_bytes(f.read_bytes())
    assert _wait(lambda: agent.store.file_counts().get("ingested") == 3)
    agent.stop()
    for f in src[3:]:  # arrive while the agent is down
        (export / f.name).write_bytes(f.read_bytes())
    agent = Agent(_config(tmp_path)).start()
    try:
        assert _wait(lambda: agent.store.event_counts().get("series_completed") == 1)
        time.sleep(0.5)
        assert agent.store.file_counts() == {"ingested": 6}
        counts = agent.store.event_counts()
        assert counts["series_completed"] == 1
        assert counts.get("series_classified", 0) <= 1  # the image model, when in the store, labels it once
    finally:
        agent.stop()
    lines = [json.loads(x) for x in config.jsonl_path.read_text().splitlines()]
    assert [x["type"] for x in lines if x["type"] != "series_classified"] == ["series_completed"]  # exactly once
    assert len(lines) == len({x["key"] for x in lines})


def test_parsing_happens_on_the_ingest_worker_not_the_watcher(tmp_path, running):
    export = tmp_path / "export"
    export.mkdir()
    agent = running()
    threads = []
    original = agent.pipeline.process_file

    def spy(path):
        threads.append(threading.current_thread().name)
        return original(path)

    agent.pipeline.process_file = spy
    for f in series_files(tmp_path / "src", 2, images_in_acquisition=2):
        (export / f.name).write_bytes(f.read_bytes())
    assert _wait(lambda: agent.store.file_counts().get("ingested") == 2)
    assert threads and set(threads) == {"scanside-ingest"}
