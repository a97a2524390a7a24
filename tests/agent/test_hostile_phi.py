"""No path or patient identifier in any output on the error paths (issue 20, finding 7). A `scanside run`
subprocess, as an unprivileged user (as under systemd), watches an export folder whose folder and file
names carry a patient's name, ID and birth date, as Windows shares do, beside hostile entries that make
every error path speak: a file it may not read, a folder it may list but not enter, a truncated file,
garbage, a FIFO, a symlink loop, a link to /etc/passwd, a Latin-1 name, a file pydicom warns about.
stdout, the log (debug, with tracebacks), the JSONL log, SSE, the webhook, the API and the quarantine
reason files are searched for every spelling of the identifiers."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.agent._live import waiter
from tests.agent.test_phi import find_phi, follow_sse, wait_for_console
from tests.agent.test_webhook import Receiver

from .factory import mr_dataset, write

REPO = Path(__file__).resolve().parents[2]
NAME, PID, BIRTH = "DOE^JANE", "PID-8675309", "19700102"
FOLDER = f"{NAME}_{BIRTH}"
NEEDLES = sorted({NAME.lower(), "doe jane", "jane", PID.lower(), BIRTH, "1970-01-02", FOLDER.lower(), "ller^hans"})
NOBODY = 65534
_wait = waiter(90.0, step=0.2)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="runs the agent as another user (needs root and setpriv)")


def _image(path: Path, series: str, study: str, i: int = 1) -> Path:
    ds = mr_dataset(series, study, instance=i, position=(0.0, 0.0, 3.0 * i))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PID, BIRTH
    return write(ds, path)


def hostile_export(export: Path) -> str:
    """The export tree; returns the good series' study UID."""
    home = export / FOLDER
    study, series = generate_uid(), generate_uid()
    for i in range(3):
        _image(home / f"{PID}_IM{i + 1}.dcm", series, study, i + 1)
    raw = _image(home / "raw.tmp", generate_uid(), study).read_bytes()
    (home / "raw.tmp").unlink()
    (home / f"{PID}_truncated.dcm").write_bytes(raw[: len(raw) // 2])
    (home / f"{PID}_garbage.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(2000))
    secret = home / f"{PID}_secret.dcm"
    secret.write_bytes(raw)
    os.chmod(secret, 0o600)  # root's: the agent may not read it
    locked = home / f"locked_{NAME}"
    _image(locked / "IM1.dcm", generate_uid(), study)
    os.chmod(locked, 0o744)  # listed, not entered
    os.mkfifo(home / f"{PID}_pipe.dcm")
    os.symlink(f"{PID}_loop.dcm", home / f"{PID}_loop.dcm")
    os.symlink("/etc/passwd", home / f"{PID}_passwd.dcm")
    latin = os.fsencode(str(home)) + b"/M\xdcLLER^HANS.dcm"
    with open(latin, "wb") as fp:
        fp.write(raw)
    # an undefined-length sequence cut short: pydicom warns "... in file <path>"
    seq = raw[:132 + 200] + b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\x08\x00\x50\x11UI\x04\x001.2\x00"
    (home / f"{PID}_warn.dcm").write_bytes(seq)
    return study


@pytest.mark.timeout(300)
def test_no_identifier_on_any_error_path(nobody_can_run_the_agent):
    root = Path(tempfile.mkdtemp(prefix="scanside-phi-", dir="/tmp"))
    os.chmod(root, 0o755)
    export, state = root / "export", root / "state"
    study = hostile_export(export)
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    for dirpath, dirs, _ in os.walk(export):
        for d in dirs:
            if not d.startswith("locked_"):
                os.chmod(os.path.join(dirpath, d), 0o755)
    os.chmod(export, 0o755)
    receiver = Receiver()
    out, err = open(root / "stdout.txt", "w+"), open(root / "stderr.txt", "w+")
    settings = {"WATCH__SETTLE_S": "0.2", "SERIES__QUIET_PERIOD_S": "1.5", "INGEST__QUARANTINE_AFTER_S": "0.5",
                "INGEST__RETRY_DELAYS_S": "[0.2, 0.3]", "PROTOCOL__ENABLED": "false", "ANALYSIS__IMAGE_LABEL": "false",
                "ANALYSIS__TRIAGE": "false", "WEBHOOK__URL": receiver.url, "WEBHOOK__BACKOFF_INITIAL_S": "0.2"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "HOME": "/nonexistent",
           **{f"SCANSIDE_{k}": v for k, v in settings.items()}}
    proc = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-m",
                             "scanside.agent.cli", "--log-level", "debug", "run", "--watch", str(export),
                             "--state-dir", str(state), "--api-port", "0"], stdout=out, stderr=err, env=env, cwd=str(REPO))
    outputs: dict[str, str] = {}
    sse_chunks: list[str] = []
    jsonl = state / "events.jsonl"
    try:
        url = wait_for_console(proc, root / "stderr.txt")
        follow_sse(url, sse_chunks, threading.Event())

        def events() -> list[dict]:
            return [json.loads(x) for x in jsonl.read_text().splitlines()] if jsonl.exists() else []

        def settled() -> bool:
            quarantined = [e["reason"] for e in events() if e["type"] == "file_quarantined"]
            # the locked folder's file and the root-only file; the truncated, garbage and warned-about files
            return quarantined.count("permission_denied") == 2 and len(quarantined) >= 5 and \
                sum(e["type"] == "series_completed" for e in events()) >= 2  # the good one and the Latin-1 one

        assert _wait(settled), [(e["type"], e.get("reason")) for e in events()]
        client = httpx.Client(base_url=url, timeout=30)
        for path in ("/readyz", "/metrics", "/v1/exams", f"/v1/exams/{study}", "/v1/alerts"):
            outputs[f"GET {path}"] = client.get(path).text
        # a source the agent may not read is the file's problem: the quarantine folder is not blamed
        assert json.loads(outputs["GET /readyz"])["checks"]["writes"]["ok"] is True, outputs["GET /readyz"]
        assert _wait(lambda: len(receiver.accepted()) >= len(events()), 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            receiver.stop()
    out.seek(0)
    err.seek(0)
    outputs["stdout"], outputs["stderr"] = out.read(), err.read()
    outputs["events.jsonl"], outputs["sse"] = jsonl.read_text(), "".join(sse_chunks)
    for i, req in enumerate(receiver.requests):
        outputs[f"webhook {i}"] = json.dumps(req["headers"]) + req["body"].decode("utf-8", "replace")
    for f in (state / "quarantine").glob("*.reason.json"):
        outputs[f"quarantine {f.name}"] = f.read_text()
    # the error paths did speak: refusals, a denied read, pydicom's warning
    assert "refused entry" in outputs["stderr"] and "permission" in outputs["events.jsonl"].lower()
    assert "DEBUG" in outputs["stderr"] and "<export path>" in outputs["stderr"]
    assert find_phi(outputs, NEEDLES) == []
    # the one start-up line names the folder the operator configured (scanside.agent.cli.ready_line, issue 21);
    # nothing below it, and no other line, may
    said = "".join(outputs.values()).replace(f"scanside: watching {export} (", "scanside: watching <configured> (")
    assert str(export) not in said
    shutil.rmtree(root, ignore_errors=True)
