"""One lifecycle for every thread-owning part of the agent (daemon / service layer).

- `Component`: what the supervisor needs of a part: a name, `start()`, `stop(timeout)`, `alive()`.
  A part with a loop may also report a heartbeat (`Heartbeat`: the time.time() of its last good loop).
- `WorkerThread`: the one daemon-thread helper the parts use instead of each writing its own
  thread / stop-event / join boilerplate.
- `Supervisor`: starts components in order (a failed start stops those already started, in
  reverse, and raises), stops them in reverse order, and says which are dead or stalled. `/readyz`
  and the systemd watchdog read that one view (`Supervisor.healthy()` / `problems()`).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT_S = 10.0


@runtime_checkable
class Component(Protocol):
    name: str

    def start(self) -> object: ...

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None: ...

    def alive(self) -> bool: ...


@runtime_checkable
class Heartbeat(Protocol):
    def heartbeat(self) -> float:
        """time.time() of the last loop that did its work (a loop that keeps failing does not beat)."""
        ...


class WorkerThread:
    """A named daemon thread running `body(stop)` until `stop` is set.

    `wake` (optional) is called after the stop flag is set, for a body waiting on something other than
    the flag (a condition variable): it lets the loop see the flag at once."""

    def __init__(self, name: str, body: Callable[[threading.Event], None], wake: Optional[Callable[[], None]] = None):
        self.name = name
        self.body = body
        self.wake = wake
        self.stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "WorkerThread":
        if self._thread is not None and self._thread.is_alive():
            return self
        self.stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        # what the body's own loop does not catch ends the thread: threading.excepthook logs it (scanside.agent.outputs.redact
        # installs one that keeps paths out), alive() turns false, and the Supervisor reports the worker dead
        self.body(self.stopping)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        self.stopping.set()
        if self.wake is not None:
            self.wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=timeout)
            if thread.is_alive():
                log.warning("worker %s did not stop within %.0f s", self.name, timeout)

    def alive(self) -> bool:
        return bool(self._thread is not None and self._thread.is_alive())

    @property
    def started(self) -> bool:
        return self._thread is not None


class Worker:
    """Base for a component that owns one WorkerThread (`self.worker`): start / stop / alive delegate to it."""

    name = "worker"
    worker: WorkerThread

    def start(self) -> "Worker":
        self.worker.start()
        return self

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        self.worker.stop(timeout)

    def alive(self) -> bool:
        return self.worker.alive()


class Step:
    """A start-up step with no thread of its own, run in its place in the start order (the catch-up
    scan between the watcher's start and the ingest worker's). Always alive."""

    def __init__(self, name: str, run: Callable[[], object]):
        self.name = name
        self.run = run

    def start(self) -> "Step":
        self.run()
        return self

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        pass

    def alive(self) -> bool:
        return True


@dataclass
class ComponentStatus:
    name: str
    alive: bool
    stalled: bool
    detail: str

    @property
    def ok(self) -> bool:
        return self.alive and not self.stalled


@dataclass
class _Entry:
    component: Component
    stall_after_s: Optional[float]
    started: bool = False


class Supervisor:
    """Starts, stops and watches the agent's components; the one source of 'is every part running'."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._entries: list[_Entry] = []
        self._lock = threading.Lock()
        self.clock = clock

    def add(self, component: Component, stall_after_s: Optional[float] = None) -> Component:
        """Register a component (start order = registration order). With stall_after_s, a component
        that reports a heartbeat counts as stalled when its last beat is older than that."""
        if not isinstance(component, Component):
            raise TypeError(f"{component!r} is not a Component (name, start, stop, alive)")
        with self._lock:
            if any(e.component.name == component.name for e in self._entries):
                raise ValueError(f"a component named {component.name!r} is already supervised")
            self._entries.append(_Entry(component, stall_after_s))
        return component

    @property
    def names(self) -> list[str]:
        return [e.component.name for e in self._entries]

    def start(self) -> "Supervisor":
        for entry in self._entries:
            if entry.started:
                continue
            try:
                entry.component.start()
            except BaseException:
                log.error("component %s failed to start; stopping the ones started before it", entry.component.name)
                self.stop()
                raise
            entry.started = True
            log.debug("started %s", entry.component.name)
        return self

    def start_one(self, component: Component, stall_after_s: Optional[float] = None) -> Component:
        """Start one more component beside the running ones (an API server asked for later). A failed
        start raises and leaves the others running; a stopped component of the same name is replaced."""
        component.start()
        with self._lock:
            self._entries = [e for e in self._entries if e.component.name != component.name]
            self._entries.append(_Entry(component, stall_after_s, started=True))
        return component

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Stop every started component in reverse start order; one that fails to stop does not keep
        the others running."""
        for entry in reversed(self._entries):
            if not entry.started:
                continue
            entry.started = False
            try:
                entry.component.stop(timeout)
            except Exception:
                log.exception("component %s failed to stop cleanly", entry.component.name)

    def status(self) -> list[ComponentStatus]:
        out = []
        now = self.clock()
        for entry in list(self._entries):
            if not entry.started:
                continue
            c = entry.component
            try:
                alive = bool(c.alive())
            except Exception as exc:  # a failing liveness check is a dead component
                out.append(ComponentStatus(c.name, False, False, f"liveness check failed: {type(exc).__name__}"))
                continue
            stalled, detail = False, "running" if alive else "stopped"
            if alive and entry.stall_after_s is not None and isinstance(c, Heartbeat):
                quiet = now - c.heartbeat()
                if quiet > entry.stall_after_s:
                    stalled, detail = True, f"stalled (no loop for {quiet:.0f} s, limit {entry.stall_after_s:.0f} s)"
            out.append(ComponentStatus(c.name, alive, stalled, detail))
        return out

    def problems(self) -> list[ComponentStatus]:
        """The started components that are dead or stalled."""
        return [s for s in self.status() if not s.ok]

    def healthy(self) -> bool:
        return not self.problems()

    def describe_problems(self) -> str:
        return "; ".join(f"{s.name} {s.detail}" for s in self.problems())
