"""The `scanside` command as a user runs it: a real subprocess."""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pydicom.data import get_testdata_file

from scanside.agent.schema.events import parse_event

from .factory import series_files


def _run_agent(tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "SCANSIDE_SERIES__QUIET_PERIOD_S": "1", "SCANSIDE_WATCH__SETTLE_S": "0.2",
           "SCANSIDE_INGEST__QUARANTINE_AFTER_S": "0.5", "PYTHONUNBUFFERED": "1",
           "SCANSIDE_PROTOCOL__ENABLED": "false", "SCANSIDE_ANALYSIS__IMAGE_LABEL": "false", "SCANSIDE_ANALYSIS__TRIAGE": "false"}
    return subprocess.Popen([sys.executable, "-m", "scanside.agent.cli", "run", "--watch", str(tmp_path / "export"),
                             "--state-dir", str(tmp_path / "state"), "--api-port", "0", *extra],
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
    out = subprocess.run([sys.executable, "-m", "scanside.agent.cli", "run", "--watch", str(tmp_path), "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "series.quiet_period_s" in out.stderr


def test_catch_up_reads_a_dicomdir_folder(tmp_path):
    """Files already in the folder at start are ingested; the DICOMDIR is used as an index, not quarantined."""
    src = Path(get_testdata_file("DICOMDIR")).parent
    shutil.copytree(src, tmp_path / "export", ignore=shutil.ignore_patterns("README*", "*.txt", "DICOMDIR-*"))
    out = subprocess.run([sys.executable, "-m", "scanside.agent.cli", "scan", str(tmp_path / "export"), "--json"],
                         capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "SCANSIDE_PROTOCOL__ENABLED": "false"})  # no prostate exam: no PI-RADS check
    report = json.loads(out.stdout)
    n_images = sum(s["n_images"] for s in report["series"])
    from scanside.agent.intake.ingest import dicomdir_files

    indexed = dicomdir_files(str(tmp_path / "export" / "DICOMDIR"))
    assert len(indexed) == 31 and n_images == len(indexed)
    assert report["quarantined"] == []


def test_demo_line_for_a_triage_result_names_zone_and_gland_volume():
    from scanside.agent.cli.demo import describe
    from scanside.agent.schema.events import LesionFinding, TriageResult

    finding = LesionFinding.model_construct(center_lps_mm=(30.2, 11.0, 19.4), long_axis_mm=8.2, short_axis_mm=6.9, zone="PZ")
    event = TriageResult.model_construct(type="triage_result", probability=0.84, recommendation="DCE_ADVISED",
                                         findings=[finding], gland_volume_ml=41.6)
    finding.likelihood = 0.9
    line = describe(event)
    # issue 21 (7): words, not "(30, 11, 19) mm LPS" (the coordinates stay in the JSON event)
    assert "lesion 8 x 7 mm in the peripheral zone" in line and "gland 42 ml" in line and "0.84" in line
    assert "LPS" not in line and "30" not in line and "DCE advised" in line and "DCE_ADVISED" not in line
    event = TriageResult.model_construct(type="triage_result", probability=0.1, recommendation="BPMRI_SUFFICIENT",
                                         findings=[], gland_volume_ml=None)
    assert "no lesion found" in describe(event) and "gland" not in describe(event)


# ------------------------------------------------------------------------------ issue 21: start-up, config, scan
def _cli(*args: str, env: dict | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scanside.agent.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)


def _one_line_refusal(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 3, (out.returncode, out.stderr)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("scanside: cannot start: ") and all(w in lines[0] for w in words), lines[0]


def test_start_up_failures_are_one_line_without_traceback(tmp_path):
    state = str(tmp_path / "state")
    # a mistyped watch folder is refused, not created and watched in silence
    missing = tmp_path / "exprot"
    _one_line_refusal(_cli("run", "--watch", str(missing), "--state-dir", state), str(missing), "--create-watch")
    assert not missing.exists()
    # the watch path is a file
    (tmp_path / "a-file").write_text("x")
    _one_line_refusal(_cli("run", "--watch", str(tmp_path / "a-file"), "--state-dir", state), "is a file")
    (tmp_path / "export").mkdir()
    # the state folder is a file
    _one_line_refusal(_cli("run", "--watch", str(tmp_path / "export"), "--state-dir", str(tmp_path / "a-file")), "state folder")
    # the API port is taken
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _one_line_refusal(_cli("run", "--watch", str(tmp_path / "export"), "--state-dir", state, "--api-port", str(port)),
                          f"127.0.0.1:{port}", "--api-port")
        # ... and the C-STORE port
        _one_line_refusal(_cli("run", "--watch", str(tmp_path / "export"), "--state-dir", state, "--no-api",
                               env={"SCANSIDE_CSTORE__ENABLED": "true", "SCANSIDE_CSTORE__HOST": "127.0.0.1",
                                    "SCANSIDE_CSTORE__PORT": str(port)}), "C-STORE", str(port))


def test_unwritable_state_folder_is_one_line(tmp_path, request):
    """As an unprivileged user (root writes anywhere: the test drops to nobody with setpriv)."""
    if os.geteuid() == 0:
        request.getfixturevalue("nobody_can_run_the_agent")
    base = Path(tempfile.mkdtemp(prefix="scanside-perm-"))
    try:
        base.chmod(0o755)
        (base / "export").mkdir(mode=0o755)
        state = base / "state"
        state.mkdir(mode=0o755)
        args = [sys.executable, "-m", "scanside.agent.cli", "run", "--watch", str(base / "export"), "--state-dir", str(state), "--no-api"]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: cannot make a folder unwritable")
            args = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *args]
        else:
            state.chmod(0o555)
        out = subprocess.run(args, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        _one_line_refusal(out, "state folder", "not writable")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_create_watch_flag_and_the_ready_line_at_the_default_log_level(tmp_path):
    watch = tmp_path / "new" / "export"
    proc = subprocess.Popen([sys.executable, "-m", "scanside.agent.cli", "run", "--watch", str(watch), "--create-watch",
                             "--state-dir", str(tmp_path / "state"), "--no-api"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SCANSIDE_ANALYSIS__IMAGE_LABEL": "false", "SCANSIDE_ANALYSIS__TRIAGE": "false"})
    try:
        line = ""
        end = time.monotonic() + 60
        while time.monotonic() < end and "ready" not in line:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
        assert line.strip() == f"scanside: watching {watch} (inotify), state {tmp_path / 'state'}, no API, ready", line
        assert watch.is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_precedence_command_line_over_environment_over_file(tmp_path, monkeypatch):
    from scanside.agent.runtime.config import load_config

    cfg = tmp_path / "site.toml"
    cfg.write_text('[watch]\nfolder = "/from/file"\nsettle_s = 2.5\n[series]\nquiet_period_s = 7\n')
    assert load_config(cfg).watch.folder == Path("/from/file")
    monkeypatch.setenv("SCANSIDE_WATCH__FOLDER", "/from/env")
    monkeypatch.setenv("SCANSIDE_SERIES__QUIET_PERIOD_S", "9")
    c = load_config(cfg)
    assert (c.watch.folder, c.watch.settle_s, c.series.quiet_period_s) == (Path("/from/env"), 2.5, 9.0)
    c = load_config(cfg, **{"watch.folder": "/from/cli"})
    # the command line wins for its key; the file's other keys in that section and the environment stay
    assert (c.watch.folder, c.watch.settle_s, c.series.quiet_period_s) == (Path("/from/cli"), 2.5, 9.0)


def test_unknown_environment_names_are_refused_like_unknown_toml_keys(tmp_path):
    (tmp_path / "export").mkdir()
    base = ("run", "--watch", str(tmp_path / "export"), "--state-dir", str(tmp_path / "state"), "--no-api")
    for name, hint in (("SCANSIDE_WACH__FOLDER", "SCANSIDE_WATCH__FOLDER"), ("SCANSIDE_SERIES__QUIET_PERIOD", "SCANSIDE_SERIES__QUIET_PERIOD_S"),
                       ("SCANSIDE_WATCH_POLLING", "SCANSIDE_WATCH__POLLING"), ("SCANSIDE_DICOM_OUTPUT__SEND__HOSTNAME", "SEND__HOST")):
        out = _cli(*base, env={name: "1"})
        assert out.returncode == 2 and name in out.stderr and hint in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    toml = tmp_path / "typo.toml"
    toml.write_text("[wach]\nfolder = '/x'\n")
    out = _cli("config", "check", "--config", str(toml))
    assert out.returncode == 2 and "wach" in out.stderr
    # the tools' own variables are not configuration and pass
    out = _cli("config", "check", env={"SCANSIDE_MODELS_DIR": str(tmp_path), "SCANSIDE_SERIES__QUIET_PERIOD_S": "4"})
    assert out.returncode == 0, out.stderr


def test_scan_exit_codes(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"f{i}.dcm").write_bytes(b"not dicom" * 50)
    out = _cli("scan", str(junk))
    assert out.returncode == 4 and out.stdout.count("quarantined") == 3 and "no image" in out.stderr
    assert "reading files: 100% 3/3" in out.stderr  # progress, as plain lines (stderr is no terminal here)
    quiet = _cli("--quiet", "scan", str(junk))
    assert quiet.returncode == 4 and "reading files" not in quiet.stderr
    exam = tmp_path / "exam"
    series_files(exam, 3, images_in_acquisition=3)  # one T2W series: the mpMRI profile misses DWI, ADC, DCE
    out = _cli("scan", str(exam), "--json")
    assert out.returncode == 5, out.stderr
    assert any(d["severity"] == "critical" for d in json.loads(out.stdout)["deviations"])
    out = _cli("scan", str(exam), env={"SCANSIDE_PROTOCOL__ENABLED": "false"})
    assert out.returncode == 0, out.stderr
    # technologist words on screen: no label codes, no tag numbers
    assert " T2W " in out.stdout and "T2WI_nan" not in out.stdout
    assert not re.search(r"\([0-9A-F]{4},[0-9A-F]{4}\)", out.stdout)


def test_demo_counts_series_as_the_exam_completed_line_does():
    """Issue 21 (7): "10/10 series" next to "exam completed: 9 series" was parts against series."""
    from scanside.agent.cli.demo import describe, series_counts
    from scanside.agent.schema.events import ExamCompleted

    completed = {"1.2.3", "1.2.4#b50", "1.2.4#b1400", "1.2.4#adc", "1.2.5"}
    line = series_counts(completed, 3, 5)
    assert line.startswith("3/3 series completed (5/5 labelled parts")
    done = describe(ExamCompleted(key="k", study_uid="1.2", reason="quiet_period", n_series=3, n_deviations=0))
    assert ": 3 series," in done
