"""Files into the pipeline: decide when a file is complete, retry what is not readable yet,
quarantine what never becomes readable. One worker thread does the parsing and the database writes,
so the watcher thread only ever enqueues a path."""
from __future__ import annotations

import heapq
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from agent.config import AgentConfig
from agent.header import HeaderError
from agent.pipeline import Pipeline

log = logging.getLogger(__name__)

STATE_RETRY_S = 1.0  # wait before retrying a file the state database could not record


@dataclass
class Pending:
    path: str
    due: float
    closed: bool = False  # a close-after-write or rename told us the writer is done
    size: int = -1
    mtime: float = -1.0
    changed_at: float = 0.0  # when size/mtime last changed
    attempts: int = 0
    last_error: Optional[HeaderError] = None


def is_ignored(path: str, config: AgentConfig) -> bool:
    name = os.path.basename(path)
    if not name or name.startswith("."):
        return True
    return any(name.endswith(sfx) for sfx in config.watch.ignore_suffixes)


class Ingestor:
    def __init__(self, config: AgentConfig, pipeline: Pipeline, clock=time.monotonic):
        self.config = config
        self.pipeline = pipeline
        self.clock = clock
        self._pending: dict[str, Pending] = {}
        self._heap: list[tuple[float, str]] = []
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.last_loop = time.time()  # for the watchdog / readiness
        self.health = None  # agent.health.WriteHealth, set by the agent: state write failures
        self._exclude = [str(p.resolve()) for p in (config.state.dir, config.quarantine_path)]
        self._include: list[str] = []  # folders inside an excluded one that are ingested all the same
        # files found by catch_up() not yet handled: quiet periods wait for them (time the agent was
        # down is not quiet on the scanner's side: an exam must not end before its backlog is read)
        self._catchup: set[str] = set()

    # ------------------------------------------------------------------ intake (any thread)
    def notify(self, path: str, closed: bool = False) -> None:
        path = os.path.abspath(path)
        if is_ignored(path, self.config):
            return
        if any(path.startswith(x + os.sep) for x in self._exclude) and not any(path.startswith(x + os.sep) for x in self._include):
            return
        now = self.clock()
        due = now if closed else now + self.config.watch.settle_s
        with self._cv:
            p = self._pending.get(path)
            if p is None:
                p = self._pending[path] = Pending(path=path, due=due, closed=closed, changed_at=now)
            else:
                p.closed = p.closed or closed
                p.due = min(p.due, due) if closed else max(p.due, due)
            heapq.heappush(self._heap, (p.due, path))
            self._cv.notify()

    def include(self, folder: Path) -> None:
        """Ingest files under folder even inside the state folder (the C-STORE receive folder lives there)."""
        self._include.append(str(Path(folder).resolve()))

    def catch_up(self, root: Path) -> int:
        """Queue what is already in the folder (after a restart, or files written while down)."""
        n = 0
        for path in walk(root, self.config.watch.recursive):
            self.notify(path, closed=False)
            with self._cv:
                if os.path.abspath(path) in self._pending:
                    self._catchup.add(os.path.abspath(path))
            n += 1
            if os.path.basename(path).upper() == "DICOMDIR":
                for ref in dicomdir_files(path):
                    self.notify(ref, closed=False)
                    n += 1
        log.info("catch-up queued %d files", n)
        return n

    @property
    def backlog(self) -> int:
        with self._cv:
            return len(self._pending)

    # ------------------------------------------------------------------ worker
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scanside-ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread:
            self._thread.join(timeout=10)

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last_loop = time.time()
            try:
                self.step()
                if not self._catchup:
                    self.pipeline.tick()
            except Exception:  # never let one bad moment kill ingestion; state is transactional
                log.exception("ingest loop error")
                time.sleep(0.5)
            wait = self._next_wait()
            with self._cv:
                if not self._stop.is_set():
                    self._cv.wait(timeout=wait)

    def _next_wait(self) -> float:
        waits = [1.0]
        with self._cv:
            if self._heap:
                waits.append(self._heap[0][0] - self.clock())
        due = self.pipeline.next_due_in()
        if due is not None:
            waits.append(due + 0.01)
        return max(0.005, min(waits))

    def step(self) -> int:
        """Process every file that is due now; returns how many were handled."""
        handled = 0
        while True:
            with self._cv:
                if not self._heap or self._heap[0][0] > self.clock():
                    return handled
                due, path = heapq.heappop(self._heap)
                p = self._pending.get(path)
                if p is None or p.due > due + 1e-9:
                    continue  # stale heap entry
            try:
                self._handle(p)
            except sqlite3.Error as exc:
                # the state database (or its disk) refuses writes, e.g. disk full: the file is not
                # bad, so it keeps its place and is tried again; nothing is marked or quarantined
                if self.health is not None:  # one ERROR per episode (agent.health), /readyz false meanwhile
                    self.health.failed("state", self.config.state.dir, f"state not writable ({exc.__class__.__name__}: {exc})",
                                       consequence="file kept for retry")
                else:
                    log.error("state not writable (%s: %s); file kept for retry", exc.__class__.__name__, exc)
                self._reschedule(p, self.clock() + STATE_RETRY_S)
                return handled
            handled += 1
            self.last_loop = time.time()  # a long catch-up is progress, not a stall

    def _handle(self, p: Pending) -> None:
        now = self.clock()
        try:
            st = os.stat(p.path)
        except FileNotFoundError:
            self._forget(p)  # moved away or a temp file renamed: its new name has its own event
            return
        if (st.st_size, st.st_mtime) != (p.size, p.mtime):
            p.size, p.mtime, p.changed_at = st.st_size, st.st_mtime, now
            if not p.closed and self.config.watch.settle_s > 0:
                self._reschedule(p, now + self.config.watch.settle_s)  # still being written?
                return
        outcome = self.pipeline.process_file(p.path)
        if self.health is not None and outcome.status != "error":
            self.health.ok("state")  # the state database recorded it
        if outcome.status != "error":
            self._forget(p)
            return
        err = outcome.error
        assert err is not None
        p.attempts += 1
        p.last_error = err
        p.closed = False  # after a failure, only stability tells us the writer is done
        unchanged_for = now - p.changed_at
        wait_needed = self.config.ingest.quarantine_after_s if err.retryable else self.config.watch.settle_s
        delays = self.config.ingest.retry_delays_s
        if err.reason == "vanished":
            self._forget(p)
        elif p.attempts > len(delays) and unchanged_for >= wait_needed:
            self.pipeline.quarantine(p.path, err)
            self._forget(p)
        else:
            delay = delays[min(p.attempts - 1, len(delays) - 1)] if delays else 1.0
            if p.attempts > len(delays):
                delay = max(delay, wait_needed - unchanged_for)
            log.debug("retrying file in %.1fs (%s)", delay, err)
            self._reschedule(p, now + delay)

    def _reschedule(self, p: Pending, due: float) -> None:
        with self._cv:
            p.due = due
            heapq.heappush(self._heap, (due, p.path))

    def _forget(self, p: Pending) -> None:
        with self._cv:
            if self._pending.get(p.path) is p:
                del self._pending[p.path]
            self._catchup.discard(p.path)

    def drain(self, timeout: float = 30.0) -> bool:
        """Run the worker's job in the caller's thread until nothing is pending (tests, one-shot scans)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.step()
            self.pipeline.tick()
            if not self.backlog:
                return True
            time.sleep(min(0.05, max(0.0, self._next_wait())))
        return False


def dicomdir_files(path: str) -> list[str]:
    """The image files a DICOMDIR indexes (they may sit outside a non-recursive watch)."""
    from pydicom import dcmread
    from pydicom.fileset import FileSet

    try:
        fs = FileSet(dcmread(path))
        return [os.fspath(inst.path) for inst in fs]
    except Exception as exc:  # a broken index is not fatal: the folder walk still finds the files
        log.warning("DICOMDIR unreadable (%s): %s", exc.__class__.__name__, exc)
        return []


def walk(root: Path, recursive: bool = True) -> Iterable[str]:
    if not recursive:
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.is_file():
                yield entry.path
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)
