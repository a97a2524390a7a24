"""Event outputs. Each sink reads the event log from its own persisted cursor, so an event decided
before a crash is delivered after the restart, and one delivered is not delivered again
(the JSONL log checks its last line; stdout is at-least-once, de-duplicated by the event key)."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, TextIO

from agent.events import Event
from agent.state import StateStore

log = logging.getLogger(__name__)


class RetryLater(Exception):
    """Raised by a sink for a transient failure: the runner retries the same event after retry_after_s."""

    def __init__(self, reason: str, retry_after_s: float):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class Sink:
    name = "sink"

    def deliver(self, event: Event) -> None:
        raise NotImplementedError

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
    """Append-only event log, fsynced per batch; exactly once across crashes."""

    name = "jsonl"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._last_key = _last_key(self.path)
        self._fp = open(self.path, "a", encoding="utf-8")

    def deliver(self, event: Event) -> None:
        if self._last_key is not None:
            # after a crash between the write and the cursor update the event is already there
            if event.key == self._last_key:
                self._last_key = None
                return
            self._last_key = None
        self._fp.write(event.model_dump_json() + "\n")
        self._fp.flush()
        os.fsync(self._fp.fileno())

    def close(self) -> None:
        self._fp.close()


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


class SinkRunner:
    """Delivers new events to every sink from its cursor; a failing sink retries with backoff and
    does not hold the others back."""

    def __init__(self, store: StateStore, sinks: list[Sink], wakeup: threading.Condition, persistent: bool = True):
        self.store = store
        self.sinks = sinks
        self.wakeup = wakeup
        self.persistent = persistent
        self._mem_cursors: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._backoff: dict[str, float] = {}
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

    def pump(self) -> int:
        delivered = 0
        import time

        for sink in list(self.sinks):
            if self._backoff.get(sink.name, 0) > time.monotonic():
                continue
            try:
                for event in self.store.events_after(self.cursor(sink)):
                    sink.deliver(event)
                    self._set_cursor(sink, event.seq or 0)
                    delivered += 1
                self._backoff.pop(sink.name, None)
            except RetryLater as exc:  # the sink logged it and chose the delay
                self._backoff[sink.name] = time.monotonic() + exc.retry_after_s
            except Exception as exc:
                log.warning("sink %s failed: %s", sink.name, exc)
                self._backoff[sink.name] = time.monotonic() + 2.0
        return delivered

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scanside-sinks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.pump()
            with self.wakeup:
                self.wakeup.wait(timeout=self.idle_wait_s)

    def stop(self) -> None:
        self._stop.set()
        with self.wakeup:
            self.wakeup.notify_all()
        if self._thread:
            self._thread.join(timeout=10)
        self.pump()
        for sink in self.sinks:
            sink.close()
