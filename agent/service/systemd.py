"""systemd service notifications (sd_notify) without a dependency: one datagram per message to the
AF_UNIX socket named by NOTIFY_SOCKET (a path, or '@name' for the abstract namespace).

- READY=1 once the agent has started (engines loaded), with a STATUS= line
- WATCHDOG=1 from a thread every WATCHDOG_USEC/2, only while `healthy()` says the main loop is alive:
  a stalled ingest loop stops the pings and systemd restarts the service after WatchdogSec
- EXTEND_TIMEOUT_USEC= while a declared long step runs (a first-run TensorRT build):
  `with extend_timeout(600): build()`; during such a step the watchdog keeps pinging
- STOPPING=1 on shutdown

Without NOTIFY_SOCKET (not under systemd) every call is a cheap no-op.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Optional

from scanside.agent.runtime.lifecycle import Worker, WorkerThread

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Optional[Mapping[str, str]] = None):
        env = os.environ if environ is None else environ
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_usec = _watchdog_usec(env)
        self._lock = threading.Lock()
        self._long_steps: dict[int, float] = {}  # id -> monotonic deadline of a declared long step
        self._next_id = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one message (newline-separated assignments). False when not under systemd or on error."""
        if self.address is None:
            return False
        payload = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall(payload)
            return True
        except OSError as exc:  # the manager went away or the socket is full: never fatal
            log.debug("sd_notify failed: %s", exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend(self, seconds: float) -> bool:
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    @property
    def watchdog_interval_s(self) -> Optional[float]:
        """How often to ping: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def in_long_step(self) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(deadline > now for deadline in self._long_steps.values())

    @contextmanager
    def extend_timeout(self, seconds: float, max_total_s: Optional[float] = None) -> Iterator[None]:
        """Declare a long step: EXTEND_TIMEOUT_USEC=seconds now and every seconds/2 while it runs (at most
        max_total_s in all), and keep the watchdog pinging through it."""
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        start = time.monotonic()
        limit = start + max_total_s if max_total_s else float("inf")
        with self._lock:
            step = self._next_id
            self._next_id += 1
            self._long_steps[step] = min(start + seconds, limit)

        def refresh(done: threading.Event) -> None:
            while not done.wait(seconds / 2):
                now = time.monotonic()
                if now >= limit:
                    return
                with self._lock:
                    self._long_steps[step] = min(now + seconds, limit)
                self.extend(seconds)

        self.extend(seconds)
        worker = WorkerThread("scanside-sd-extend", refresh).start()
        try:
            yield
        finally:
            worker.stop(timeout=5)
            with self._lock:
                self._long_steps.pop(step, None)


class Watchdog(Worker):
    """Pings WATCHDOG=1 every interval while healthy() (or a declared long step) says so; when
    unhealthy it sends a STATUS line instead, once per transition, and leaves the restart to systemd."""

    def __init__(self, notifier: Notifier, healthy: Callable[[], bool], interval_s: Optional[float] = None):
        self.notifier = notifier
        self.healthy = healthy
        self.interval_s = interval_s or notifier.watchdog_interval_s
        self.worker = WorkerThread("scanside-sd-watchdog", self._run)
        self.pings = 0

    name = "watchdog"

    def start(self) -> "Watchdog":
        if not self.notifier.enabled or not self.interval_s:
            return self  # no watchdog requested
        self.worker.start()
        return self

    def alive(self) -> bool:
        return self.worker.alive() or not self.worker.started  # not requested is not dead

    def _run(self, stop: threading.Event) -> None:
        assert self.interval_s
        was_ok = True
        while True:
            try:
                ok = bool(self.healthy()) or self.notifier.in_long_step()
            except Exception:  # a failing health check is an unhealthy agent
                log.exception("health check failed")
                ok = False
            if ok:
                self.notifier.watchdog()
                self.pings += 1
                if not was_ok:
                    self.notifier.status("running")
                    log.warning("agent healthy again; watchdog pings resumed")
            elif was_ok:
                self.notifier.status("unhealthy: ingest loop stalled or a component stopped")
                log.error("agent unhealthy: watchdog pings withheld")
            was_ok = ok
            if stop.wait(self.interval_s):
                return


_default: Optional[Notifier] = None


def notifier() -> Notifier:
    """The process-wide notifier (reads the environment once)."""
    global _default
    if _default is None:
        _default = Notifier()
    return _default


@contextmanager
def extend_timeout(seconds: float, max_total_s: Optional[float] = None) -> Iterator[None]:
    """`with extend_timeout(900): build_tensorrt_plan()` - a no-op outside systemd."""
    with notifier().extend_timeout(seconds, max_total_s):
        yield


def _socket_address(value: str) -> Optional[str]:
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract name; ignored", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> Optional[int]:
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None  # meant for another process (e.g. our parent)
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec if usec > 0 else None
