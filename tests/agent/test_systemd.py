"""systemd integration: the unit passes `systemd-analyze verify` and scores <= 2.5 in
`systemd-analyze security`; `scanside run` talks sd_notify on a real AF_UNIX datagram socket bound
here (READY=1, WATCHDOG=1 at about WATCHDOG_USEC/2, no pings while the ingest loop is stalled,
STOPPING=1 on SIGTERM); the agent's workload runs under the unit's seccomp rules."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scanside.agent.service.systemd import Notifier, Watchdog

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "scanside.service"
SCANSIDE = Path(sys.executable).with_name("scanside")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def local_unit(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this venv's scanside (verify checks the binary exists)."""
    text = UNIT.read_text().replace("/opt/scanside/venv/bin/scanside", str(SCANSIDE))
    path = tmp_path / "scanside.service"
    path.write_text(text)
    return path


@needs_analyze
def test_unit_verifies(tmp_path):
    out = subprocess.run(["systemd-analyze", "verify", str(local_unit(tmp_path))], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "scanside.service" not in out.stderr  # no warnings about our unit either


def test_unit_documentation_is_a_file_the_install_creates():
    """Issue 21 (12): every file:// Documentation= of the unit is a destination in the README's install
    steps, and its source exists in the repository."""
    docs = re.findall(r"file://(\S+)", next(ln for ln in UNIT.read_text().splitlines() if ln.startswith("Documentation=")))
    assert docs
    readme = (ROOT / "systemd" / "README.md").read_text()
    for dest in docs:
        (step,) = [ln for ln in readme.splitlines() if ln.rstrip().split("#")[0].strip().endswith(dest)]
        source = step.split("#")[0].split()[-2]
        assert (ROOT / source).is_file(), step


@needs_analyze
def test_unit_has_required_settings_and_security_score(tmp_path):
    text = UNIT.read_text()
    for setting in ("Type=notify", "WatchdogSec=", "StateDirectory=scanside", "ReadOnlyPaths=", "ProtectSystem=strict",
                    "NoNewPrivileges=yes", "DevicePolicy=closed", "DeviceAllow=char-nvidia-frontend rw"):
        assert re.search(rf"^{re.escape(setting)}", text, re.M), setting
    assert not re.search(r"^PrivateDevices=", text, re.M)  # it would hide /dev/nvidia*
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(local_unit(tmp_path))],
                         capture_output=True, text=True)
    m = re.search(r"Overall exposure level for scanside\.service: ([0-9.]+)", out.stdout)
    assert m, out.stdout[-2000:] + out.stderr
    assert float(m.group(1)) <= 2.5


@needs_analyze
@pytest.mark.skipif(not list(Path("/usr/lib/python3/dist-packages").glob("seccomp*.so")),
                    reason="python3-seccomp not installed (make setup installs it)")
def test_agent_workload_runs_under_the_units_seccomp_rules(tmp_path):
    from pydicom.data import get_testdata_file

    from tests.engines._tiny import build_tiny_onnx

    model = build_tiny_onnx(tmp_path / "tiny.onnx")
    dicom = get_testdata_file("MR_small_jp2klossless.dcm")
    out = subprocess.run([sys.executable, "-m", "tests.agent._sandbox", str(model), dicom, str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok ")
    assert "Operation not permitted" not in out.stderr  # nothing the agent uses is refused


# ---------------------------------------------------------------------------------------- notify socket
class NotifySocket:
    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[tuple[float, str]] = []

    def wait_for(self, pred, timeout: float) -> tuple[float, str]:
        """Next message (after those already seen) matching pred, within timeout."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching message; got {[m for _, m in self.messages[-10:]]}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            msg = (time.monotonic(), data.decode())
            self.messages.append(msg)
            if pred(msg[1]):
                return msg

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        end = time.monotonic() + seconds
        got = []
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got.append((time.monotonic(), self.sock.recv(4096).decode()))
            except socket.timeout:
                break
        self.messages += got
        return got

    def close(self) -> None:
        self.sock.close()


def test_notifier_abstract_socket_ready_status_extend_and_watchdog_pid():
    name = f"scanside-test-{os.getpid()}-{time.monotonic_ns()}"
    ns = NotifySocket("\0" + name)
    try:
        sd = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000"})
        assert sd.enabled and sd.watchdog_interval_s == pytest.approx(0.2)
        assert sd.ready("running")
        assert ns.wait_for(lambda m: True, 5)[1] == "READY=1\nSTATUS=running"
        # a long step: EXTEND_TIMEOUT_USEC now and again while it runs; the watchdog keeps pinging though unhealthy
        dog = Watchdog(sd, healthy=lambda: False).start()
        assert "STATUS=unhealthy" in ns.wait_for(lambda m: m.startswith("STATUS="), 5)[1]
        with sd.extend_timeout(0.6):
            got = ns.collect(1.0)
        ns.collect(0.05)  # drop a ping sent in the step's last moment, still in the socket
        after = ns.collect(0.8)  # long step over, still unhealthy, the watchdog still running: silence
        dog.stop()
        kinds = [m for _, m in got]
        assert kinds.count("EXTEND_TIMEOUT_USEC=600000") >= 2
        assert kinds.count("WATCHDOG=1") >= 2
        assert "WATCHDOG=1" not in [m for _, m in after]
        # WATCHDOG_PID naming another process: not ours to ping
        assert Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}).watchdog_usec is None
        assert not Notifier({}).ready()  # outside systemd: a no-op
    finally:
        ns.close()


def test_scanside_run_ready_watchdog_stall_and_stopping(tmp_path):
    address = str(tmp_path / "notify.sock")
    ns = NotifySocket(address)
    state = tmp_path / "state"
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000",
           "SCANSIDE_INGEST__STALL_AFTER_S": "2", "SCANSIDE_OUTPUT__STDOUT": "false", "SCANSIDE_API__PORT": "0"}
    (tmp_path / "export").mkdir()  # `scanside run` refuses a missing watch folder (issue 21)
    proc = subprocess.Popen([str(SCANSIDE), "run", "--watch", str(tmp_path / "export"), "--state-dir", str(state)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = None
    try:
        _t, ready = ns.wait_for(lambda m: "READY=1" in m, 60)
        assert ready.startswith("READY=1")
        pings = [t for t, m in [ns.wait_for(lambda m: m == "WATCHDOG=1", 5) for _ in range(5)]]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert 0.3 < sorted(gaps)[len(gaps) // 2] < 0.8  # about WATCHDOG_USEC / 2 = 0.5 s
        # stall the ingest loop for real: another process holds the state database's write lock
        # (as a backup tool or an operator's sqlite3 shell can); every loop round needs it
        lock = sqlite3.connect(str(state / "state.sqlite"), isolation_level=None, timeout=5)
        lock.execute("BEGIN IMMEDIATE")
        ns.wait_for(lambda m: m.startswith("STATUS=unhealthy"), 10)
        silent = ns.collect(2.5)  # longer than WATCHDOG_USEC: systemd would restart the agent now
        assert "WATCHDOG=1" not in [m for _, m in silent]
        assert proc.poll() is None
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        ns.wait_for(lambda m: m == "WATCHDOG=1", 10)  # the loop comes round again: pings resume
        proc.send_signal(signal.SIGTERM)
        _t, stopping = ns.wait_for(lambda m: "STOPPING=1" in m, 15)
        assert proc.wait(timeout=30) == 0
    finally:
        if lock is not None:
            lock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ns.close()
    assert "STOPPING=1" in stopping
