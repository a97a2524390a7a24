"""The `scanside` command as a user runs it: a real subprocess."""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydicom.data import get_testdata_file

from agent.events import parse_event

from .factory import series_files


def _run_agent(tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "SCANSIDE_SERIES__QUIET_PERIOD_S": "1", "SCANSIDE_WATCH__SETTLE_S": "0.2",
           "SCANSIDE_INGEST__QUARANTINE_AFTER_S": "0.5", "PYTHONUNBUFFERED": "1",
           "SCANSIDE_PROTOCOL__ENABLED": "false", "SCANSIDE_ANALYSIS__IMAGE_LABEL": "false", "SCANSIDE_ANALYSIS__TRIAGE": "false"}
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--watch", str(tmp_path / "export"),
                             "--state-dir", str(tmp_path / "state"), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _read_events(proc: subprocess.Popen, n: int, timeout: float = 30.0) -> list:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    events = []
    end = time.monotonic() + timeout
    while len(events) < n and time.monotonic() < end:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line.strip():
            events.append(parse_event(line))
    return events


def test_run_prints_one_json_event_per_line_and_stops_on_sigterm(tmp_path):
    (tmp_path / "export").mkdir()
    proc = _run_agent(tmp_path)
    try:
        time.sleep(1.0)
        for f in series_files(tmp_path / "src", 3, images_in_acquisition=3):
            shutil.copy(f, tmp_path / "export" / f.name)
        (tmp_path / "export" / "junk.dcm").write_bytes(b"not dicom at all" * 20)
        # the factory series is no PI-RADS exam: keep the protocol checks and image models out of this test
        events = _read_events(proc, 2)
        assert sorted(e.type for e in events) == ["file_quarantined", "series_completed"]
        completed = next(e for e in events if e.type == "series_completed")
        assert completed.series.n_images == 3 and completed.series.label == "T2WI_nan"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
    assert rc == 0
    assert "FACTORY" not in (proc.stderr.read() or "")  # no patient name in the logs


def test_invalid_config_is_refused_naming_the_field(tmp_path):
    cfg = tmp_path / "site.toml"
    cfg.write_text('[series]\nquiet_period_s = "soon"\n')
    out = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--watch", str(tmp_path), "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "series.quiet_period_s" in out.stderr


def test_catch_up_reads_a_dicomdir_folder(tmp_path):
    """Files already in the folder at start are ingested; the DICOMDIR is used as an index, not quarantined."""
    src = Path(get_testdata_file("DICOMDIR")).parent
    shutil.copytree(src, tmp_path / "export", ignore=shutil.ignore_patterns("README*", "*.txt", "DICOMDIR-*"))
    out = subprocess.run([sys.executable, "-m", "agent.cli", "scan", str(tmp_path / "export"), "--json"],
                         capture_output=True, text=True, check=True, timeout=120)
    report = json.loads(out.stdout)
    n_images = sum(s["n_images"] for s in report["series"])
    from agent.ingest import dicomdir_files

    indexed = dicomdir_files(str(tmp_path / "export" / "DICOMDIR"))
    assert len(indexed) == 31 and n_images == len(indexed)
    assert report["quarantined"] == []


def test_demo_line_for_a_triage_result_names_zone_and_gland_volume():
    from agent.demo import describe
    from agent.events import LesionFinding, TriageResult

    finding = LesionFinding.model_construct(center_lps_mm=(30.2, 11.0, 19.4), long_axis_mm=8.2, short_axis_mm=6.9, zone="PZ")
    event = TriageResult.model_construct(type="triage_result", probability=0.84, recommendation="DCE_ADVISED",
                                         findings=[finding], gland_volume_ml=41.6)
    line = describe(event)
    assert "lesion at (30, 11, 19) mm LPS, 8 x 7 mm, PZ" in line and "gland 42 ml" in line and "0.84" in line
    event = TriageResult.model_construct(type="triage_result", probability=0.1, recommendation="BPMRI_SUFFICIENT",
                                         findings=[], gland_volume_ml=None)
    assert "no lesion found" in describe(event) and "gland" not in describe(event)
