"""One lifecycle (scanside.agent.runtime.lifecycle): start in order, stop in reverse, a dead or stalled component is
seen by the supervisor, and through it by /readyz and the systemd watchdog's health test."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from scanside.agent.runtime.lifecycle import Component, Step, Supervisor, WorkerThread
from tests.agent import _live


class Recorder:
    """A component with a real worker thread that records its start and stop in a shared log."""

    def __init__(self, name: str, log: list[str], fail_start: bool = False):
        self.name = name
        self.log = log
        self.fail_start = fail_start
        self.beat = time.time()
        self.worker = WorkerThread(f"test-{name}", lambda stop: stop.wait())

    def start(self) -> "Recorder":
        if self.fail_start:
            raise RuntimeError(f"{self.name} cannot start")
        self.worker.start()
        self.log.append(f"start {self.name}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.worker.stop(timeout)
        self.log.append(f"stop {self.name}")

    def alive(self) -> bool:
        return self.worker.alive()

    def heartbeat(self) -> float:
        return self.beat


def test_components_start_in_order_and_stop_in_reverse():
    log: list[str] = []
    sup = Supervisor()
    parts = [Recorder(n, log) for n in ("store", "outputs", "watcher", "ingest")]
    for p in parts:
        assert isinstance(p, Component)
        sup.add(p)
    sup.add(Step("catch-up", lambda: log.append("start catch-up")))
    sup.start()
    assert log == ["start store", "start outputs", "start watcher", "start ingest", "start catch-up"]
    assert sup.healthy() and all(p.alive() for p in parts)
    log.clear()
    sup.stop()
    assert log == ["stop ingest", "stop watcher", "stop outputs", "stop store"]
    assert not any(p.alive() for p in parts)


def test_a_failed_start_stops_what_started_before_it_in_reverse():
    log: list[str] = []
    sup = Supervisor()
    for name in ("a", "b"):
        sup.add(Recorder(name, log))
    sup.add(Recorder("c", log, fail_start=True))
    sup.add(Recorder("d", log))
    with pytest.raises(RuntimeError, match="c cannot start"):
        sup.start()
    assert log == ["start a", "start b", "stop b", "stop a"]


def test_a_dead_worker_and_a_stalled_heartbeat_are_problems():
    now = [1000.0]
    sup = Supervisor(clock=lambda: now[0])
    log: list[str] = []
    ingest, retention = Recorder("ingest", log), Recorder("retention", log)
    ingest.beat = now[0]
    sup.add(ingest, stall_after_s=30)
    sup.add(retention)  # no stall limit: only liveness counts
    sup.start()
    try:
        assert sup.healthy()
        now[0] += 31  # the loop has not come round for 31 s
        (stalled,) = sup.problems()
        assert stalled.name == "ingest" and stalled.alive and stalled.stalled and "stalled" in stalled.detail
        ingest.beat = now[0]
        assert sup.healthy()
        retention.worker.stop()  # the thread ends: dead, not stalled
        (dead,) = sup.problems()
        assert dead.name == "retention" and not dead.alive and dead.detail == "stopped"
    finally:
        sup.stop()


def test_names_are_unique_and_components_typed():
    sup = Supervisor()
    sup.add(Step("x", lambda: None))
    with pytest.raises(ValueError, match="already supervised"):
        sup.add(Step("x", lambda: None))
    with pytest.raises(TypeError, match="not a Component"):
        sup.add(object())  # type: ignore[arg-type]


class Boom(BaseException):
    """Not an Exception: nothing in the sink runner's loop catches it, so its thread dies."""


@pytest.mark.timeout(120)
def test_a_component_that_dies_makes_readyz_fail_and_stops_the_watchdog(tmp_path, monkeypatch):
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the death is the point of the test
    agent = _live.start(tmp_path)
    try:
        url = agent.api_url
        assert httpx.get(f"{url}/readyz").status_code == 200 and agent.healthy()
        assert agent.supervisor.names[:2] == ["events", "analysis"] and "ingest" in agent.supervisor.names

        def die(_event):
            raise Boom()

        monkeypatch.setattr(agent.analyzer, "deliver", die)
        (tmp_path / "export" / "x.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)  # any event wakes it
        assert _live.wait(lambda: not agent.output_runners[-1].alive(), 30)
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503, r.text
        check = r.json()["checks"]["components"]
        assert check["ok"] is False and "analysis stopped" in check["detail"]
        assert not agent.healthy()  # the watchdog's test: pings stop, systemd restarts the agent
        assert httpx.get(f"{url}/healthz").status_code == 200  # alive, just not ready
    finally:
        monkeypatch.undo()  # stopping pumps the outputs once more, in this thread
        agent.stop()


def test_a_component_started_later_fails_alone_and_is_replaced_by_its_next_try():
    log: list[str] = []
    sup = Supervisor()
    sup.add(Recorder("ingest", log))
    sup.start()
    try:
        with pytest.raises(RuntimeError):
            sup.start_one(Recorder("api", log, fail_start=True))
        assert sup.names == ["ingest"] and sup.healthy()  # the running parts keep running
        api = sup.start_one(Recorder("api", log))
        assert sup.names == ["ingest", "api"] and api.alive()
        log.clear()
    finally:
        sup.stop()
    assert log == ["stop api", "stop ingest"]


@pytest.mark.timeout(60)
def test_start_api_on_a_taken_port_leaves_the_agent_running(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        agent = _live.start(tmp_path, **{"api.enabled": False, "api.port": taken.getsockname()[1]})
        try:
            with pytest.raises(RuntimeError, match="could not listen"):
                agent.start_api()
            assert agent.healthy() and agent.ingestor.alive()
            agent.config.api.port = 0
            url = agent.start_api()
            assert httpx.get(f"{url}/readyz").status_code == 200
        finally:
            agent.stop()
