"""A running agent with its HTTP API on a free loopback port, fed by the virtual scanner (API, metrics
and console tests). Simulated exams are rendered once per test session and reused."""
from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from scanside.agent.runtime.config import load_config
from scanside.agent.service.daemon import Agent
from scanside.simulator.model import GroundTruth
from scanside.simulator.scanner import simulate_exam, stream_exam

_EXAMS: dict[tuple, tuple[Path, GroundTruth]] = {}


def exam(tmp_path_factory: Any, vendor: str = "siemens", seed: int = 5, faults: tuple[str, ...] = ("truncated_file",),
         **kw: Any) -> tuple[Path, GroundTruth]:
    key = (vendor, seed, faults, tuple(sorted(kw.items())))
    if key not in _EXAMS:
        out = tmp_path_factory.mktemp(f"exam-{vendor}-{seed}")
        _EXAMS[key] = (out, simulate_exam(vendor, out, seed, faults=list(faults), **kw))
    return _EXAMS[key]


def config(root: Path, **kw: Any):
    return load_config(**{
        "watch.folder": str(root / "export"), "state.dir": str(root / "state"), "output.stdout": False,
        "watch.settle_s": 0.2, "series.quiet_period_s": 1.5, "series.incomplete_grace_s": 3.0,
        "ingest.quarantine_after_s": 0.5, "ingest.retry_delays_s": [0.2, 0.3],
        "api.enabled": True, "api.port": 0, "api.sse_heartbeat_s": 1.0, **kw})


def start(root: Path, **kw: Any) -> Agent:
    return Agent(config(root, **kw)).start()


def expected_parts(truth: GroundTruth) -> int:
    return sum(len(s.parts) for s in truth.series)


def completed_parts(agent: Agent) -> int:
    return len({e.series.series_id for e in agent.store.events_after(0, limit=100_000) if e.type == "series_completed"})


def settled(agent: Agent, quiet_s: float = 0.5) -> bool:
    """The image models (scanside.agent.analysis.analysis, their own cursor) have caught up with the event log and it has
    stayed still for quiet_s: nothing more will arrive unless something new happens."""
    def caught_up() -> bool:
        return agent.store.cursor("analysis") >= agent.store.last_event_seq()

    if not caught_up():
        return False
    seq = agent.store.last_event_seq()
    time.sleep(quiet_s)
    return caught_up() and agent.store.last_event_seq() == seq


def wait(predicate: Callable[[], Any], timeout: float = 90.0, step: float = 0.1) -> Any:
    """Poll until the predicate gives something truthy (returned) or the timeout passes (None)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


def waiter(timeout: float, step: float = 0.1) -> Callable[..., Any]:
    """`wait` with a test module's own default timeout and polling step."""

    def _wait(predicate: Callable[[], Any], timeout: float = timeout, step: float = step) -> Any:
        return wait(predicate, timeout, step)

    return _wait


def stream_in_background(src: Path, agent: Agent, truth: GroundTruth, rate: float = 0,
                         stop: Optional[threading.Event] = None, **kw: Any) -> threading.Thread:
    t = threading.Thread(target=stream_exam, args=(src, Path(agent.config.watch.folder)),  # type: ignore[arg-type]
                         kwargs={"rate": rate, "ground_truth": truth, "stop_event": stop, **kw}, daemon=True)
    t.start()
    return t


def identifiers(truth: GroundTruth) -> list[str]:
    """Every identifier that must never appear in metrics, logs or alerts."""
    ids = [truth.study_uid, truth.patient_name, truth.patient_id, truth.patient_birth_date, truth.accession_number]
    ids += [s.series_uid for s in truth.series]
    ids += [p for p in truth.patient_name.replace("^", " ").split() if len(p) > 3]
    return [i for i in ids if i]


def free_port() -> int:
    """A TCP port free on loopback now (tests never use the agent's default 8686)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 20 s: for the real servers a test starts (Prometheus, Orthanc)."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
