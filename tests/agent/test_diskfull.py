"""Disk full on a small tmpfs the test mounts (root, as on CI; skipped with the reason otherwise):
the state folder fills up mid-exam, /readyz goes false, the agent logs a clear error and marks no file
bad; the database passes PRAGMA integrity_check; when space returns the files that arrived meanwhile
are ingested and their series complete. A full quarantine folder: the bad file's event is still
recorded, the failure is logged, no partial copy is left behind, and quarantining works again once
there is space."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from scanside.agent.runtime.config import load_config
from scanside.agent.service.daemon import Agent
from tests.agent.factory import series_files
from tests.agent._live import waiter


@contextmanager
def small_fs(where: Path, size: str = "16m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a filler file until the file system is full (unbuffered: nothing left to flush on close)."""
    filler = folder / f"filler-{uuid.uuid4().hex}"
    with open(filler, "wb", buffering=0) as fp:
        try:
            while fp.write(b"\0" * 65536):
                pass
        except OSError:
            pass
    try:  # the last bytes too
        with open(folder / f"filler-{uuid.uuid4().hex}", "wb", buffering=0) as fp:
            while fp.write(b"\0" * 512):
                pass
    except OSError:
        pass
    assert shutil.disk_usage(folder).free < 65536
    return filler


_wait = waiter(60.0, step=0.1)


def _config(tmp_path: Path, state: Path, **kw):
    return load_config(**{
        "watch.folder": str(tmp_path / "export"), "state.dir": str(state), "output.stdout": False,
        "watch.settle_s": 0.1, "series.quiet_period_s": 1.0, "series.incomplete_grace_s": 2.0,
        "ingest.quarantine_after_s": 0.3, "ingest.retry_delays_s": [0.1, 0.2],
        "analysis.image_label": False, "analysis.triage": False,
        "api.enabled": True, "api.port": 0, "readiness.min_free_disk_bytes": 1024 * 1024, **kw})


def _arrive(staged: list[Path], export: Path) -> None:
    for f in staged:
        dest = export / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)


def test_state_disk_full_then_space_returns(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    (tmp_path / "export").mkdir()
    first = series_files(tmp_path / "stage" / "s1", 20, images_in_acquisition=20, rows=64, cols=64)
    study = first and __import__("pydicom").dcmread(first[0]).StudyInstanceUID
    second = series_files(tmp_path / "stage" / "s2", 4, images_in_acquisition=4, rows=64, cols=64,
                          study_uid=study, description="ep2d_diff_b50", te=60.0)
    with small_fs(tmp_path / "statefs") as state:
        agent = Agent(_config(tmp_path, state / "scanside")).start()
        try:
            api = httpx.Client(base_url=agent.api_url, timeout=30)
            assert api.get("/readyz").status_code == 200
            _arrive(first, tmp_path / "export")
            assert _wait(lambda: agent.store.file_counts().get("ingested") == len(first))
            filler = fill(state)
            r = api.get("/readyz")
            assert r.status_code == 503 and r.json()["ready"] is False
            assert r.json()["checks"]["disk"]["ok"] is False
            # one file system, both folders on it named (the event log lives in the state folder here)
            detail = r.json()["checks"]["disk"]["detail"]
            assert detail.count("bytes free") == 1 and f"state {state / 'scanside'}" in detail and "events " in detail, detail
            # the exam goes on while the disk is full
            _arrive(second, tmp_path / "export")
            assert _wait(lambda: "state not writable" in caplog.text or "disk is full" in caplog.text, 30), caplog.text[-2000:]
            time.sleep(8.0)  # full for a while: every file event for the new files has been tried and failed
            counts = agent.store.file_counts()
            assert counts.get("ingested", 0) < len(first) + len(second)
            # retried every second, said once: one ERROR for the episode, and /readyz names the folder
            said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cannot write the state database")]
            assert len(said) == 1 and str(state / "scanside") in said[0], said
            assert agent.write_health.failing()["state"].attempts >= 3
            writes = api.get("/readyz").json()["checks"]["writes"]
            assert writes["ok"] is False and f"state {state / 'scanside'}: state not writable" in writes["detail"], writes
            assert not counts.get("quarantined"), "a full disk must not make good files 'bad'"
            # space returns
            filler.unlink()
            for f in state.glob("filler-*"):
                f.unlink()
            assert _wait(lambda: api.get("/readyz").status_code == 200, 30)
            assert _wait(lambda: agent.store.file_counts().get("ingested") == len(first) + len(second), 60), \
                agent.store.file_counts()
            assert _wait(lambda: sum(e.type == "series_completed" for e in agent.store.events_after(0, limit=1000)) == 2, 30)
            jsonl = agent.config.jsonl_path
            assert _wait(lambda: jsonl.read_text().count("\"type\":\"series_completed\"") == 2, 30), jsonl.read_text()[-3000:]
            events = agent.store.events_after(0, limit=1000)
        finally:
            agent.stop()
        db = sqlite3.connect(str(agent.config.db_path))
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()
        lines = [json.loads(x) for x in agent.config.jsonl_path.read_text().splitlines()]  # every line whole JSON
        assert [x["key"] for x in lines] == [e.key for e in events]
        assert {e.series.n_instances for e in events if e.type == "series_completed"} == {len(first), len(second)}


def test_quarantine_disk_full_then_space_returns(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    export = tmp_path / "export"
    (export / "a").mkdir(parents=True)
    with small_fs(tmp_path / "qfs", size="2m") as qdir:
        agent = Agent(_config(tmp_path, tmp_path / "state", **{"ingest.quarantine_dir": str(qdir)})).start()
        try:
            api = httpx.Client(base_url=agent.api_url, timeout=30)
            assert api.get("/readyz").status_code == 200
            filler = fill(qdir)
            bad = export / "a" / "IM_BAD1.dcm"
            bad.write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300_000))  # a header that never parses
            quarantined = lambda: [e for e in agent.store.events_after(0, limit=100) if e.type == "file_quarantined"]  # noqa: E731
            assert _wait(lambda: len(quarantined()) == 1, 30)
            assert _wait(lambda: "could not quarantine" in caplog.text, 10)
            assert f"cannot write the quarantine copy to {qdir}: No space left on device" in caplog.text
            # no partial copy or reason file is left behind
            assert sorted(p.name for p in qdir.iterdir() if not p.name.startswith("filler-")) == []
            assert bad.exists()  # copy mode: the export folder is untouched
            # not ready: the quarantine's file system is below the threshold and its last write failed
            r = api.get("/readyz")
            assert r.status_code == 503, r.text
            checks = r.json()["checks"]
            assert checks["disk"]["ok"] is False and f"quarantine {qdir}" in checks["disk"]["detail"], checks
            assert "state " not in checks["disk"]["detail"]  # the state folder's file system has room
            assert checks["writes"]["ok"] is False and f"quarantine {qdir}: No space left on device" in checks["writes"]["detail"]
            metrics = api.get("/metrics").text
            assert 'scanside_write_failing{target="quarantine"} 1.0' in metrics
            assert 'scanside_write_failures_total{target="quarantine"} 1.0' in metrics
            filler.unlink()
            for f in qdir.glob("filler-*"):
                f.unlink()
            # space is back, but the last quarantine failed: still not ready until one succeeds
            r = api.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["disk"]["ok"] is True, r.text
            bad2 = export / "a" / "IM_BAD2.dcm"
            bad2.write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300_000))
            assert _wait(lambda: len(quarantined()) == 2, 30)
            assert _wait(lambda: len(list(qdir.glob("*.reason.json"))) == 1, 10)
            r = api.get("/readyz")
            assert r.status_code == 200, r.text
            assert 'scanside_write_failing{target="quarantine"} 0.0' in api.get("/metrics").text
        finally:
            agent.stop()
        (copy,) = qdir.glob("*.dcm")
        assert copy.read_bytes() == bad2.read_bytes()


# ------------------------------------------------------------------------------------------ output folder
needs_models = pytest.mark.skipif(
    not all(any(m.name == n for m in __import__("scanside.engines.store", fromlist=["ModelStore"]).ModelStore().list())
            for n in ("cspca-reference",)),
    reason="the shipped csPCa model is not in engines/models")


@pytest.fixture(scope="module")
def bpmri_exam(tmp_path_factory):
    from scanside.simulator.scanner import simulate_exam

    out = tmp_path_factory.mktemp("bpmri")
    return out, simulate_exam("siemens", out, seed=21, profile="prostate-bpmri", cspca=True)


def _whole_lines(path: Path) -> list[dict]:
    raw = path.read_bytes() if path.exists() else b""
    assert raw == b"" or raw.endswith(b"\n"), f"partial last line in {path.name}: {raw[-120:]!r}"
    return [json.loads(x) for x in raw.decode().splitlines()]  # every line parses


def _outputs(folder: Path) -> tuple[list[Path], list[Path]]:
    """(hidden/temp leftovers, finished .dcm files) under the DICOM output folder."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    return [p for p in files if p.name.startswith(".") or not p.name.endswith(".dcm")], \
        [p for p in files if not p.name.startswith(".") and p.name.endswith(".dcm")]


@needs_models
def test_output_disk_full_then_space_returns(tmp_path, caplog, bpmri_exam):
    """The event log and the DICOM output on a small tmpfs that fills up during the exam: /readyz 503
    naming the folders, one ERROR per target, no partial line or object; when space returns the SR and
    the SEG are written once and the log holds every event once."""
    import pydicom

    from tests.agent import _live

    caplog.set_level(logging.INFO)
    src, truth = bpmri_exam
    (tmp_path / "export").mkdir()
    with small_fs(tmp_path / "outfs", size="16m") as outfs:
        jsonl, dicom = outfs / "events.jsonl", outfs / "dicom"
        agent = Agent(_config(tmp_path, tmp_path / "state", **{
            "output.jsonl": str(jsonl), "dicom_output.folder": str(dicom), "analysis.triage": True,
            "shadow.enabled": False,  # the triage goes into the SR and SEG only once it leaves shadow mode
            "gland.model": "prostate-zones-reference",  # a phantom exam: TAPS, when imported, finds no gland
            "series.quiet_period_s": 1.0, "protocol.exam_quiet_period_s": 600.0})).start()
        try:
            api = httpx.Client(base_url=agent.api_url, timeout=30)
            assert api.get("/readyz").status_code == 200
            _live.stream_in_background(src, agent, truth)
            assert _wait(lambda: len(_whole_lines(jsonl)) >= 1, 60)
            filler = fill(outfs)  # the exam goes on: more series, classification, triage
            n_parts = sum(len(s.parts) for s in truth.series)
            assert _wait(lambda: agent.store.event_counts().get("series_completed", 0) >= n_parts
                         and agent.store.event_counts().get("triage_result", 0) >= 1, 120), agent.store.event_counts()
            assert _wait(lambda: _live.settled(agent), 60)
            # the technologist ends the exam: the SR and SEG are due now, on a full disk
            assert api.post(f"/v1/exams/{truth.study_uid}/done").status_code == 200
            assert _wait(lambda: agent.write_health.is_failing("dicom_output") and agent.write_health.is_failing("events"), 30), \
                agent.write_health.failing()
            r = api.get("/readyz")
            assert r.status_code == 503, r.text
            checks = r.json()["checks"]
            assert checks["disk"]["ok"] is False and f"events {outfs}" in checks["disk"]["detail"] \
                and f"dicom_output {dicom}" in checks["disk"]["detail"], checks["disk"]
            assert f"dicom_output {dicom}: No space left on device" in checks["writes"]["detail"], checks["writes"]
            time.sleep(4.0)  # several retries while full
            assert agent.write_health.failing()["dicom_output"].attempts >= 2
            assert agent.write_health.failing()["events"].attempts >= 2
            errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
            assert sum(m.startswith(f"cannot write the DICOM output to {dicom}: No space left on device") for m in errors) == 1, errors
            assert sum(m.startswith(f"cannot write the event log to {outfs}: No space left on device") for m in errors) == 1, errors
            leftovers, written = _outputs(dicom)
            assert leftovers == [] and written == [], (leftovers, written)  # no partial object
            logged = _whole_lines(jsonl)  # no partial line
            assert len(logged) < agent.store.last_event_seq()
            metrics = api.get("/metrics").text
            assert 'scanside_write_failing{target="dicom_output"} 1.0' in metrics
            assert 'scanside_disk_free_bytes{folder="dicom_output"}' in metrics
            # space returns
            filler.unlink()
            for f in outfs.glob("filler-*"):
                f.unlink()
            assert _wait(lambda: api.get("/readyz").status_code == 200, 30), api.get("/readyz").text
            assert _wait(lambda: len(_outputs(dicom)[1]) >= 2, 30), _outputs(dicom)
            assert _wait(lambda: len(_whole_lines(jsonl)) == agent.store.last_event_seq(), 30)
            time.sleep(1.0)
            events = agent.store.events_after(0, limit=100_000)
        finally:
            agent.stop()
        leftovers, written = _outputs(dicom)
        keys = [x["key"] for x in _whole_lines(jsonl)]
        modalities = sorted(pydicom.dcmread(p).Modality for p in written)  # whole, readable objects
    assert keys == [e.key for e in events] and len(set(keys)) == len(keys)
    assert leftovers == []
    assert modalities == ["SEG", "SR"], written
    assert agent.dicom_output.written == sorted(written, key=lambda p: 0 if p.name.startswith("SR_") else 1)
    assert any(f"the DICOM output is written to {dicom} again" in rec.getMessage() for rec in caplog.records)
