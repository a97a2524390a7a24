"""No PHI out of the agent: a `scanside run` subprocess (debug logging, stdout events, JSONL, API,
webhook to a local receiver, image models on) ingests a simulated exam with faults that raise alerts
(b1000_high, truncated_file); every output it produces is searched for the simulator's patient name,
ID, birth date and accession number (also in DICOM PN / date spellings, case-insensitively): none may
appear. The one opt-in (privacy.include_file_paths) is shown to put file paths into events."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from scanside.simulator.scanner import simulate_exam, stream_exam
from tests.agent.test_webhook import Receiver
from tests.agent._live import waiter

SIM_PREFIX = "SIMULATED"  # the simulator's fixed first name part, shared by every simulated patient


def phi_needles(truth) -> list[str]:
    """Every spelling of the identifiers that would identify the patient."""
    name = truth.patient_name
    parts = [p for p in re.split(r"[\^= ]+", name) if p and p.upper() != SIM_PREFIX]
    needles = {name, name.replace("^", " "), name.replace("^", ", "), truth.patient_id, truth.accession_number,
               truth.patient_birth_date, *[p for p in parts if len(p) >= 4]}
    bd = truth.patient_birth_date
    if len(bd) == 8:
        needles |= {f"{bd[:4]}-{bd[4:6]}-{bd[6:]}", f"{bd[6:]}.{bd[4:6]}.{bd[:4]}", f"{bd[4:6]}/{bd[6:]}/{bd[:4]}"}
    return sorted(n.lower() for n in needles)


def find_phi(outputs: dict[str, str], needles: list[str]) -> list[str]:
    hits = []
    for where, text in outputs.items():
        low = text.lower()
        hits += [f"{needle!r} in {where}" for needle in needles if needle in low]
    return hits


_wait = waiter(60.0, step=0.2)


def wait_for_console(proc: subprocess.Popen, stderr: Path, timeout: float = 120) -> str:
    """The API URL a `scanside run` subprocess prints on its stderr once it has started."""
    url = None

    def started() -> bool:
        nonlocal url
        m = re.search(r"console (http://\S+)/console", stderr.read_text())
        url = m.group(1) if m else None
        assert proc.poll() is None, stderr.read_text()[-3000:]
        return url is not None

    assert _wait(started, timeout), "agent did not start"
    return url  # type: ignore[return-value]


def follow_sse(url: str, chunks: list[str], stop: threading.Event) -> None:
    """Read /v1/events from the start into chunks, in a daemon thread, until stop is set."""
    def sse() -> None:
        with httpx.stream("GET", f"{url}/v1/events", params={"after": 0}, timeout=None) as r:
            for chunk in r.iter_text():
                chunks.append(chunk)
                if stop.is_set():
                    return
    threading.Thread(target=sse, daemon=True).start()


def _events(jsonl: Path) -> list[dict]:
    if not jsonl.exists():
        return []
    return [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def faulty_exam(tmp_path_factory):
    out = tmp_path_factory.mktemp("phi-exam")
    return out, simulate_exam("siemens", out, 5, faults=["b1000_high", "truncated_file"])


def test_needles_are_found_when_present():
    """The search itself can fail: an identifier in any spelling is caught."""
    class T:
        patient_name, patient_id, patient_birth_date, accession_number = "SIMULATED^DOE^JANE", "PID1", "19700102", "ACC9"
    needles = phi_needles(T)
    assert find_phi({"log": "name=Doe Jane"}, needles) and find_phi({"x": '"born": "1970-01-02"'}, needles)
    assert find_phi({"x": "jane"}, needles) and find_phi({"x": "acc9"}, needles)
    assert not find_phi({"x": "SIMULATED exam, series 3"}, needles)


def test_no_phi_in_any_output(tmp_path, faulty_exam):
    src, truth = faulty_exam
    needles = phi_needles(truth)
    export, state = tmp_path / "export", tmp_path / "state"
    export.mkdir()
    receiver = Receiver()
    cfg = tmp_path / "scanside.toml"
    cfg.write_text(f"""
[watch]
settle_s = 0.2
[series]
quiet_period_s = 1.5
incomplete_grace_s = 3.0
[ingest]
quarantine_after_s = 0.5
retry_delays_s = [0.2, 0.3]
[output]
stdout = true
[protocol]
exam_quiet_period_s = 600
[webhook]
url = "{receiver.url}"
backoff_initial_s = 0.2
""")
    stdout_f, stderr_f = open(tmp_path / "stdout.txt", "w+"), open(tmp_path / "stderr.txt", "w+")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scanside.agent.cli", "--log-level", "debug", "run", "--config", str(cfg),
                             "--watch", str(export), "--state-dir", str(state), "--api-port", "0"],
                            stdout=stdout_f, stderr=stderr_f, env=env, cwd=Path(__file__).resolve().parents[2])
    outputs: dict[str, str] = {}
    sse_chunks: list[str] = []
    sse_stop = threading.Event()
    try:
        url = wait_for_console(proc, tmp_path / "stderr.txt")
        follow_sse(url, sse_chunks, sse_stop)

        stream_exam(src, export, rate=0, ground_truth=truth)
        jsonl = state / "events.jsonl"
        n_parts = sum(len(s.parts) for s in truth.series)
        assert _wait(lambda: sum(e["type"] == "series_completed" for e in _events(jsonl)) >= n_parts, 120)
        r = httpx.post(f"{url}/v1/exams/{truth.study_uid}/done", timeout=30)
        outputs["POST done"] = r.text
        assert r.status_code == 200, r.text
        assert _wait(lambda: "exam_completed" in {e["type"] for e in _events(jsonl)}, 60)
        # the image model labels every completed series (and triage runs when its inputs are there)
        assert _wait(lambda: sum(e["type"] == "series_classified" for e in _events(jsonl))
                     >= sum(e["type"] == "series_completed" for e in _events(jsonl)), 120)
        time.sleep(2.0)  # late events (classification of the last series) and webhook deliveries
        types = {e["type"] for e in _events(jsonl)}
        # the faults did raise alerts, so alert texts are among what is searched
        assert {"file_quarantined", "protocol_deviation", "series_classified"} <= types, types

        client = httpx.Client(base_url=url, timeout=30)
        for path in ["/healthz", "/readyz", "/metrics", "/v1/exams", "/v1/exams/current", f"/v1/exams/{truth.study_uid}",
                     "/v1/alerts", "/v1/alerts?open=true", f"/v1/alerts?study_uid={truth.study_uid}", "/console",
                     ]:
            resp = client.get(path)
            assert resp.status_code in (200, 503), (path, resp.status_code)
            outputs[f"GET {path}"] = resp.text
        alerts = client.get("/v1/alerts").json()
        assert alerts, "the faults should have raised alerts"
        ack = client.post(f"/v1/alerts/{alerts[0]['alert_id']}/ack", json={"by": "tech1"})
        outputs["POST ack"] = ack.text
        assert ack.status_code == 200
        assert _wait(lambda: receiver.accepted() and len({r["headers"].get("Idempotency-Key") for r in receiver.accepted()})
                     >= len(_events(jsonl)), 30)
        sse_stop.set()
        time.sleep(1.5)  # SSE heartbeat / last event ends the stream reader
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        receiver.stop()
    stdout_f.seek(0)
    stderr_f.seek(0)
    outputs["stdout"], outputs["stderr"] = stdout_f.read(), stderr_f.read()
    outputs["events.jsonl"] = (state / "events.jsonl").read_text()
    outputs["sse"] = "".join(sse_chunks)
    for i, req in enumerate(receiver.requests):
        outputs[f"webhook {i} headers"] = json.dumps(req["headers"])
        outputs[f"webhook {i} body"] = req["body"].decode("utf-8", "replace")
    reason_files = list((state / "quarantine").glob("*.reason.json"))
    assert reason_files, "the truncated file should be quarantined"
    for f in reason_files:
        outputs[f"quarantine {f.name}"] = f.read_text()

    assert "DEBUG" in outputs["stderr"], "debug logging was on"
    assert outputs["stdout"].count("\n") == len(_events(state / "events.jsonl"))
    assert "event: series_completed" in outputs["sse"]
    assert receiver.requests and outputs["GET /metrics"].startswith("#")
    assert find_phi(outputs, needles) == []


def test_include_file_paths_opt_in_puts_paths_in_events(tmp_path):
    """privacy.include_file_paths is the only switch: off (default) no path, on the quarantine event
    and the quarantine reason file carry the original path (an export folder name can be a patient's
    name). (There is no switch that puts patient names into events.)"""
    from scanside.agent.runtime.config import load_config
    from scanside.agent.service.daemon import Agent

    results = {}
    for on in (False, True):
        root = tmp_path / str(on)
        export = root / "export" / "EXPORT_FOLDER_NAME"
        export.mkdir(parents=True)
        agent = Agent(load_config(**{
            "watch.folder": str(root / "export"), "state.dir": str(root / "state"), "output.stdout": False,
            "watch.settle_s": 0.1, "ingest.quarantine_after_s": 0.2, "ingest.retry_delays_s": [0.1],
            "analysis.image_label": False, "analysis.triage": False, "privacy.include_file_paths": on})).start()
        try:
            bad = export / "IM_0001.dcm"
            bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x001.2")  # a truncated header
            assert _wait(lambda: any(e.type == "file_quarantined" for e in agent.store.events_after(0, limit=100)), 30)
            (ev,) = [e for e in agent.store.events_after(0, limit=100) if e.type == "file_quarantined"]
            jsonl = agent.config.jsonl_path
            assert _wait(lambda: jsonl.exists() and "file_quarantined" in jsonl.read_text(), 10)
            (reason,) = agent.config.quarantine_path.glob("*.reason.json")
            results[on] = (ev.path, jsonl.read_text(), reason.read_text())
        finally:
            agent.stop()
    assert results[False][0] is None and "EXPORT_FOLDER_NAME" not in results[False][1]
    assert results[True][0] == str(export / "IM_0001.dcm") and "EXPORT_FOLDER_NAME" in results[True][1]
    # the quarantine reason file follows the same switch: by default the file is named by its ref only
    off, on_ = json.loads(results[False][2]), json.loads(results[True][2])
    assert "EXPORT_FOLDER_NAME" not in results[False][2] and "original_path" not in off and off["file_ref"]
    assert on_["original_path"] == str(tmp_path / "True" / "export" / "EXPORT_FOLDER_NAME" / "IM_0001.dcm")
