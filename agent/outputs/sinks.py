"""Event outputs. Each sink reads the event log from its own persisted cursor, so an event decided
before a crash is delivered after the restart, and one delivered is not delivered again
(the JSONL log checks its last line; stdout is at-least-once, de-duplicated by the event key)."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

from scanside.agent.outputs.retry import Backoff, RetryLater
from scanside.agent.runtime.health import WriteReporter
from scanside.agent.runtime.lifecycle import Worker, WorkerThread
from scanside.agent.schema.events import Event

__all__ = ["CallbackSink", "JsonlSink", "RetryLater", "Sink", "SinkRunner", "StdoutSink"]
from scanside.agent.state.database import StateStore

log = logging.getLogger(__name__)


class Sink:
    name = "sink"
    failed_attempts = 0  # failed deliveries since start (scanside_delivery_failures_total); outputs count theirs
    dead_lettered = 0  # events given up on (scanside.agent.outputs.retry)

    def outbox_depth(self) -> Optional[int]:
        """Events not yet delivered, when the sink keeps its own count (None: the runner's cursor tells)."""
        return None

    def deliver(self, event: Event) -> None:
        raise NotImplementedError

    def interrupt(self) -> None:
        """Stopping: end a delivery in flight now (a network sink); later deliveries may RetryLater."""

    def close(self) -> None:
        pass


class StdoutSink(Sink):
    name = "stdout"

    def __init__(self, stream: Optional[TextIO] = None):
        self.stream = stream

    def deliver(self, event: Event) -> None:
        stream = self.stream or sys.stdout
        stream.write(event.model_dump_json() + "\n")
        stream.flush()


class JsonlSink(Sink):
    """Append-only event log, fsynced per event; exactly once across crashes and full disks.

    Each line goes out with os-level writes on an O_APPEND descriptor. A write (or fsync) that fails
    (disk full, read-only, I/O error) is cut back off with ftruncate to the size before it, so no
    partial line stays, and RetryLater makes the runner deliver the same event again later. A torn
    last line left by a crash mid-write is cut off when the log is opened (its event is re-delivered:
    the cursor had not moved)."""

    name = "jsonl"

    def __init__(self, path: Path, health: Optional[WriteReporter] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.health = health  # a failed write makes /readyz false until one succeeds
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        _cut_torn_tail(self._fd, self.path)
        self._last_key = _last_key(self.path)
        # scanside.agent.outputs.retry's backoff, unbounded: the event log is the record, never a dead letter
        self._backoff = Backoff(0.5, 10.0, jitter=0.0)
        self.failed_attempts = 0

    def deliver(self, event: Event) -> None:
        if self._last_key is not None:
            # after a crash between the write and the cursor update the event is already there
            if event.key == self._last_key:
                self._last_key = None
                return
            self._last_key = None
        data = (event.model_dump_json() + "\n").encode("utf-8")
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, size)  # no partial line: the retry writes the whole line again
            except OSError as cut:  # pragma: no cover - the file system refuses even that
                log.error("cannot cut the partial line off %s: %s", self.path, cut)
            self.failed_attempts += 1
            delay = self._backoff.next()
            if self.health is not None:
                self.health.failed("events", self.path.parent, exc, consequence="events are kept in the state database and retried")
            else:
                log.warning("event log %s not written (%s); retrying in %.1f s", self.path, exc, delay)
            raise RetryLater(f"event log not written: {exc}", delay) from exc
        self._backoff.reset()
        if self.health is not None:
            self.health.ok("events")

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


def _cut_torn_tail(fd: int, path: Path) -> None:
    """A log that does not end in a newline ends in a line a crash tore: cut it off."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with open(path, "rb") as fp:
        pos = size
        while pos > 0:
            step = min(65536, pos)
            fp.seek(pos - step)
            chunk = fp.read(step)
            if pos == size and chunk.endswith(b"\n"):
                return
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = pos - step + nl + 1
                break
            pos -= step
        else:
            keep = 0
    log.warning("event log %s ended in a torn line (%d bytes): cut off, its event is delivered again", path, size - keep)
    os.ftruncate(fd, keep)


def _last_key(path: Path) -> Optional[str]:
    try:
        with open(path, "rb") as fp:
            fp.seek(0, os.SEEK_END)
            size = fp.tell()
            fp.seek(max(0, size - 65536))
            lines = fp.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)["key"]
        except (ValueError, KeyError):
            continue
    return None


class CallbackSink(Sink):
    """In-process subscribers (embedding API, tests)."""

    def __init__(self, name: str, fn: Callable[[Event], None]):
        self.name = name
        self.fn = fn

    def deliver(self, event: Event) -> None:
        self.fn(event)


class SinkRunner(Worker):
    """Delivers new events to every sink from its cursor; a failing sink retries with backoff and
    does not hold the others back."""

    def __init__(self, store: StateStore, sinks: list[Sink], wakeup: threading.Condition, persistent: bool = True,
                 name: str = "sinks"):
        self.name = name  # the supervisor's name for this runner (scanside.agent.runtime.lifecycle)
        self.store = store
        self.sinks = sinks
        self.wakeup = wakeup
        self.persistent = persistent
        self._mem_cursors: dict[str, int] = {}
        self.worker = WorkerThread(f"scanside-{name}", self._run, wake=self._wake)
        self._pumping = threading.Lock()
        self._backoff: dict[str, float] = {}  # sink -> monotonic time before which it is not pumped
        self._unexpected: dict[str, Backoff] = {}  # sink -> backoff after failures it did not classify
        self.idle_wait_s = 0.5  # also the granularity of a sink's retry delay

    def add(self, sink: Sink, from_now: bool = False) -> None:
        if from_now:
            self._mem_cursors[sink.name] = self.store.last_event_seq()
        self.sinks.append(sink)

    def cursor(self, sink: Sink) -> int:
        if self.persistent and not isinstance(sink, CallbackSink):
            return self.store.cursor(sink.name)
        return self._mem_cursors.get(sink.name, 0)

    def _set_cursor(self, sink: Sink, seq: int) -> None:
        if self.persistent and not isinstance(sink, CallbackSink):
            self.store.set_cursor(sink.name, seq)
        else:
            self._mem_cursors[sink.name] = seq

    def pump(self, timeout: float = -1) -> Optional[int]:
        """Deliver what each sink has not had yet; one pump at a time (the worker's and stop's last one), so an
        event is never delivered twice from one cursor. None: another pump held on past ``timeout`` seconds."""
        if not self._pumping.acquire(timeout=timeout):
            return None
        try:
            return self._pump()
        finally:
            self._pumping.release()

    def _pump(self) -> int:
        delivered = 0
        for sink in list(self.sinks):
            if self._backoff.get(sink.name, 0) > time.monotonic():
                continue
            try:
                for event in self.store.events_after(self.cursor(sink)):
                    sink.deliver(event)
                    self._set_cursor(sink, event.seq or 0)
                    delivered += 1
                self._backoff.pop(sink.name, None)
                self._unexpected.pop(sink.name, None)
            except RetryLater as exc:  # the sink logged it and chose the delay (scanside.agent.outputs.retry)
                self._backoff[sink.name] = time.monotonic() + exc.retry_after_s
            except Exception as exc:  # a failure the sink did not classify: a bug, said at ERROR, retried slower
                delay = self._unexpected.setdefault(sink.name, Backoff(2.0, 60.0, jitter=0.0)).next()
                log.error("sink %s failed: %s; retrying in %.0f s", sink.name, f"{type(exc).__name__}: {exc}", delay)
                self._backoff[sink.name] = time.monotonic() + delay
        return delivered

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.pump()
            with self.wakeup:
                if not stop.is_set():
                    self.wakeup.wait(timeout=self.idle_wait_s)

    def _wake(self) -> None:
        for sink in self.sinks:  # a receiver trickling its answer must not hold the agent's stop
            sink.interrupt()
        with self.wakeup:
            self.wakeup.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        # the last pump waits for one the worker may still be in (a loaded machine, a slow sink): never two at once
        if self.pump(timeout) is None:
            log.warning("outputs %s still delivering after %.0f s: their last events go out after the restart", self.name, timeout)
        for sink in self.sinks:
            sink.close()
