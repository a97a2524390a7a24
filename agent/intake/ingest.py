"""Files into the pipeline: decide when a file is complete, retry what is not readable yet,
quarantine what never becomes readable. One worker thread does the parsing and the database writes,
so the watcher thread only ever enqueues a path."""
from __future__ import annotations

import errno
import hashlib
import heapq
import logging
import os
import re
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from scanside.agent.runtime.config import AgentConfig
from scanside.agent.dicom.header import HEADER_SLACK_BYTES, HeaderError
from scanside.agent.runtime.health import WriteReporter
from scanside.agent.runtime.lifecycle import Worker, WorkerThread
from scanside.agent.intake.pipeline import Pipeline, file_ref

log = logging.getLogger(__name__)

STATE_RETRY_S = 1.0  # wait before retrying a file the state database could not record
# the agent's own resources ran out (descriptors, memory): the file is not at fault, so it is never
# quarantined for this; it waits (backoff up to RESOURCE_RETRY_MAX_S) and /readyz says why meanwhile
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
RESOURCE_RETRY_MAX_S = 10.0
# what a name-level error says about the entry itself: it will not change by waiting
PERMANENT_ERRNOS = {errno.ELOOP: "symlink_loop", errno.ENAMETOOLONG: "name_too_long", errno.ENXIO: "not_regular_file",
                    errno.ENODEV: "not_regular_file", errno.EISDIR: "not_regular_file"}
DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
_QUOTED_PATH = re.compile(r"""(['"])/[^'"]*\1""")


class Refused(Exception):
    """An entry that is not a file the agent will open (FIFO, device, symlink out of the watched
    folders, symlink loop...): skipped for good with a reason, never copied to quarantine."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def redact(text: str, *paths: str) -> str:
    """An error text without file paths: OSError texts quote the path, and export folder names can hold
    patient names (the file is named by its file_ref wherever a path would be)."""
    for path in paths:
        if path:
            text = text.replace(path, "<file>")
    return _QUOTED_PATH.sub("'<file>'", text)


def errno_text(exc: BaseException) -> str:
    """'PermissionError (Permission denied)': an exception described without its path."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__} ({exc.strerror or os.strerror(exc.errno)})"
    return type(exc).__name__


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def admit(path: str, roots: Iterable[str]) -> os.stat_result:
    """Check, without blocking, that path is a regular file the agent may open: lstat first (a symlink
    must resolve inside one of roots), then a non-blocking open of what it names and fstat of what was
    opened (a FIFO swapped in after the lstat would otherwise hang open()). Raises Refused for an entry
    that will never be an image, OSError for the rest (FileNotFoundError: gone)."""
    st = os.lstat(path)
    real = path
    if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(path)  # resolves names only, opens nothing
        if not _inside(real, roots):
            raise Refused("symlink_outside", "a symbolic link to something outside the watched folders")
        st = os.stat(real)  # ELOOP for a loop
    if not stat.S_ISREG(st.st_mode):
        raise Refused("not_regular_file", f"a {_kind(st.st_mode)}, not a regular file")
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        opened = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(opened.st_mode):
        raise Refused("not_regular_file", f"a {_kind(opened.st_mode)}, not a regular file")
    return opened


def text_safe(path: str) -> bool:
    """Whether a path can be stored as text (SQLite, JSON): a Latin-1 folder name from a Windows share
    decodes to surrogates that UTF-8 cannot carry."""
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


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
    resource_since: Optional[float] = None  # first attempt that failed for lack of descriptors/memory


def is_ignored(path: str, config: AgentConfig) -> bool:
    name = os.path.basename(path)
    if not name or name.startswith("."):
        return True
    return any(name.endswith(sfx) for sfx in config.watch.ignore_suffixes)


class Ingestor(Worker):
    name = "ingest"

    def __init__(self, config: AgentConfig, pipeline: Pipeline, clock=time.monotonic,
                 health: Optional[WriteReporter] = None):
        self.config = config
        self.pipeline = pipeline
        self.clock = clock
        self._pending: dict[str, Pending] = {}
        self._heap: list[tuple[float, str]] = []
        self._cv = threading.Condition()
        self.worker = WorkerThread("scanside-ingest", self._run, wake=self._wake)
        self.last_loop = time.time()  # for the watchdog / readiness: the last loop that did not fail
        self.problem: Optional[str] = None  # readiness: why ingestion is held back now (resources ran out)
        self.health = health  # state write failures: /readyz "writes" and one ERROR per episode
        self._exclude = [str(p.resolve()) for p in (config.state.dir, config.quarantine_path)]
        self._include: list[str] = []  # folders inside an excluded one that are ingested all the same
        # a symlink is followed only to a file inside one of these (the export folder, C-STORE folder)
        self._roots: list[str] = [os.path.realpath(config.watch.folder)] if config.watch.folder is not None else []
        # text stand-ins for names UTF-8 cannot carry (see text_safe): symlinks in the state folder
        self._aliases = Path(config.state.dir) / "aliases"
        # files found by catch_up() not yet handled: quiet periods wait for them (time the agent was
        # down is not quiet on the scanner's side: an exam must not end before its backlog is read)
        self._catchup: set[str] = set()
        self._finished: Optional[list[Pending]] = None  # entries done in the batch not yet committed
        self._recorded = False  # the batch recorded a file (so the state database is writable once it commits)

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
        self._roots.append(os.path.realpath(folder))

    def catch_up(self, root: Path) -> int:
        """Queue what is already in the folder (after a restart, or files written while down)."""
        n = 0
        if os.path.realpath(root) not in self._roots:
            self._roots.append(os.path.realpath(root))
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
    def heartbeat(self) -> float:
        return self.last_loop

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
                if not self._catchup:
                    self.pipeline.tick()
                self.last_loop = time.time()  # a loop that keeps failing is a stall (healthy() false)
            except Exception as exc:  # never let one bad moment kill ingestion; state is transactional
                log.error("ingest loop error: %s", redact(f"{type(exc).__name__}: {exc}"),
                          exc_info=self.config.privacy.include_file_paths)
                time.sleep(0.5)
            wait = self._next_wait()
            with self._cv:
                if not stop.is_set():
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
        """Process every file that is due now, in batches (one state transaction each); returns how
        many were handled."""
        handled = 0
        while True:
            n, more = self._step_batch()
            handled += n
            if not more:
                return handled

    def _pop_due(self) -> Optional[Pending]:
        with self._cv:
            while self._heap and self._heap[0][0] <= self.clock():
                due, path = heapq.heappop(self._heap)
                p = self._pending.get(path)
                if p is not None and p.due <= due + 1e-9:
                    return p
                # else a stale heap entry
        return None

    def _step_batch(self) -> tuple[int, bool]:
        """Handle due entries in one state transaction ([ingest] batch_max_files, batch_max_ms): one commit
        for many files. Entries finished inside are forgotten only after the commit; if the database
        refuses it, every one of them keeps its place and is tried again. (handled, maybe more due)"""
        limit = self.config.ingest.batch_max_files
        deadline = time.monotonic() + self.config.ingest.batch_max_ms / 1000.0
        self._finished = []
        self._recorded = False
        handled = 0
        exhausted = False  # nothing more is due now
        p: Optional[Pending] = None
        try:
            with self.pipeline.batch():
                while handled < limit and time.monotonic() < deadline:
                    p = self._pop_due()
                    if p is None:
                        exhausted = True
                        break
                    self._handle_entry(p)
                    handled += 1
                    p = None
                    self.last_loop = time.time()  # a long catch-up is progress, not a stall
        except sqlite3.Error as exc:
            # the state database (or its disk) refuses writes, e.g. disk full: the files are not bad, so
            # they keep their place and are tried again; nothing is marked or quarantined
            if self.health is not None:  # one ERROR per episode (scanside.agent.runtime.health), /readyz false meanwhile
                self.health.failed("state", self.config.state.dir, f"state not writable ({exc.__class__.__name__}: {exc})",
                                   consequence="file kept for retry")
            else:
                log.error("state not writable (%s: %s); file kept for retry", exc.__class__.__name__, exc)
            for q in self._finished + ([p] if p is not None else []):
                self._reschedule(q, self.clock() + STATE_RETRY_S)
            return handled, False
        finally:
            finished, self._finished = self._finished, None
        for q in finished:
            self._forget(q)
        if self.health is not None and self._recorded:
            self.health.ok("state")  # the state database recorded them
        return handled, not exhausted

    def _handle_entry(self, p: Pending) -> None:
        """One entry: its own errors retry it or set it aside; state errors go to the batch."""
        try:
            try:
                self._handle(p)
            except sqlite3.Error:
                raise
            except UnicodeEncodeError:  # only a path SQLite cannot store; aliases prevent it
                self._give_up(p, "unstorable_name", "a name the state database cannot store")
            except Exception as exc:  # any other per-entry error: this entry waits, the others go on
                self._entry_error(p, exc)
        except sqlite3.Error:
            raise
        except Exception as exc:  # setting it aside failed as well (a bug): it must not stay stuck
            log.error("entry %s dropped until the next start: %s", file_ref(p.path), redact(f"{type(exc).__name__}: {exc}"),
                      exc_info=self.config.privacy.include_file_paths)
            self._forget(p)

    def _handle(self, p: Pending) -> None:
        now = self.clock()
        try:
            st = admit(p.path, self._roots)
        except FileNotFoundError:
            self._forget(p)  # moved away or a temp file renamed: its new name has its own event
            return
        except NotADirectoryError:
            self._forget(p)  # a parent folder was replaced by a file: nothing to read here
            return
        except Refused as refused:
            self._give_up(p, refused.reason, refused.detail)
            return
        if (st.st_size, st.st_mtime) != (p.size, p.mtime):
            p.size, p.mtime, p.changed_at = st.st_size, st.st_mtime, now
            if not p.closed and self.config.watch.settle_s > 0:
                self._reschedule(p, now + self.config.watch.settle_s)  # still being written?
                return
        if st.st_size > self.max_file_bytes:  # before any parsing: a 1 GiB sparse file would take the worker for minutes
            self._give_up(p, "oversized", f"{st.st_size} bytes, more than any image the agent accepts ({self.max_file_bytes})",
                          quarantine=True)
            return
        path = p.path if text_safe(p.path) else self._alias(p.path)
        outcome = self.pipeline.process_file(path)
        if outcome.status == "error" and outcome.error is not None:
            cause = outcome.error.__cause__
            if isinstance(cause, OSError) and cause.errno in RESOURCE_ERRNOS | DENIED_ERRNOS:
                raise cause  # our descriptors ran out (not the file's fault) or access is denied: _entry_error
        if p.resource_since is not None:
            self._resources_ok(p)
        if outcome.status != "error":
            self._recorded = True  # the state database took it: health says so once the batch commits
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
            self.pipeline.quarantine(path, err)
            self._forget(p)
        else:
            delay = delays[min(p.attempts - 1, len(delays) - 1)] if delays else 1.0
            if p.attempts > len(delays):
                delay = max(delay, wait_needed - unchanged_for)
            log.debug("retrying file %s in %.1fs (%s)", file_ref(path), delay, redact(str(err), p.path))
            self._reschedule(p, now + delay)

    @property
    def max_file_bytes(self) -> int:
        """No image file is larger than its pixel cap plus a header's slack; anything larger is refused unread."""
        return self.config.ingest.max_image_bytes + HEADER_SLACK_BYTES

    def _alias(self, path: str) -> str:
        """A UTF-8 name for a file whose own name is not (Latin-1 on a Windows share): a symlink in the
        state folder, named by a hash of the raw name, so that the database, the events and the volume
        reader all handle an ordinary path. admit() has checked the target."""
        raw = os.fsencode(path)
        alias = self._aliases / f"{hashlib.sha1(raw).hexdigest()[:24]}.dcm"
        try:
            if os.readlink(alias) == raw:
                return str(alias)
            os.unlink(alias)
        except FileNotFoundError:
            pass
        self._aliases.mkdir(parents=True, exist_ok=True)
        os.symlink(raw, os.fsencode(str(alias)))
        return str(alias)

    def _entry_error(self, p: Pending, exc: Exception) -> None:
        """Classify an error one entry raised: our resources (wait, never quarantine), the entry's own
        lasting state (skip with a reason), permission (retry, then quarantine without a copy), anything
        else (retry, then quarantine): the worker always goes on with the next entry."""
        now = self.clock()
        ref = file_ref(p.path)
        code = exc.errno if isinstance(exc, OSError) else None
        if code in RESOURCE_ERRNOS:
            if p.resource_since is None:
                p.resource_since = now
            elif now - p.resource_since > self.config.ingest.resource_retry_max_s:
                # the bound: set aside unrecorded (not done), so the next start's catch-up takes it again
                log.error("ingest: file %s set aside after %.0f s without resources (%s); the next start retries it",
                          ref, now - p.resource_since, errno_text(exc))
                self._forget(p)
                return
            if self.problem is None:
                self.problem = f"out of resources: {errno_text(exc)}"
                log.error("ingest: %s; files wait and are retried (none is quarantined for this)", self.problem)
            p.attempts += 1
            self._reschedule(p, now + min(RESOURCE_RETRY_MAX_S, 0.5 * 2 ** min(p.attempts, 8)))
            return
        if code in PERMANENT_ERRNOS:
            self._give_up(p, PERMANENT_ERRNOS[code], errno_text(exc))
            return
        p.attempts += 1
        reason = "permission_denied" if code in DENIED_ERRNOS else "unreadable"
        delays = self.config.ingest.retry_delays_s
        if p.attempts > len(delays):
            self._give_up(p, reason, errno_text(exc), quarantine=True)
            return
        log.warning("file %s not handled (%s); retrying", ref, errno_text(exc),
                    exc_info=exc if self.config.privacy.include_file_paths else None)
        self._reschedule(p, now + delays[min(p.attempts - 1, len(delays) - 1)])

    def _resources_ok(self, p: Pending) -> None:
        p.resource_since = None
        if self.problem is not None:
            log.info("ingest: resources available again")
            self.problem = None

    def _give_up(self, p: Pending, reason: str, detail: str, quarantine: bool = False) -> None:
        """Done with an entry for good: quarantined (an image-like file that cannot be taken: an event, a
        reason file, a copy when it is safe to make) or refused (not a file at all: recorded, logged, counted)."""
        err = HeaderError(reason, detail)
        if quarantine:
            self.pipeline.quarantine(p.path, err)
        else:
            self.pipeline.refuse(p.path, err)
        self._forget(p)

    def _reschedule(self, p: Pending, due: float) -> None:
        with self._cv:
            p.due = due
            heapq.heappush(self._heap, (due, p.path))

    def _forget(self, p: Pending) -> None:
        if self._finished is not None:  # inside a batch: once it commits (_step_batch)
            self._finished.append(p)
            return
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
        log.warning("DICOMDIR %s unreadable (%s)", file_ref(path), redact(f"{type(exc).__name__}: {exc}", path))
        return []


def walk(root: Path, recursive: bool = True) -> Iterable[str]:
    if not recursive:
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.is_file():
                yield entry.path
        return
    def unreadable(exc: OSError) -> None:  # a folder that cannot be listed: say so, walk on
        log.warning("folder %s not listed (%s)", file_ref(exc.filename or ""), errno_text(exc))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)
