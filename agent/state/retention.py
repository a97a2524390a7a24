"""Retention: an appliance runs for years on one disk, so what the agent writes is bounded.

Each folder it writes (received C-STORE objects, SR/SEG outputs, likelihood maps, quarantine) has an
age and a size limit, and the events and files tables an age and a row limit ([retention] in the
configuration). A pass deletes what is past its age, then the oldest until the size fits.

Nothing not yet delivered is deleted. The *horizon* is the earliest of: the first event some
output (webhook, DICOM, event log, analysis) has not delivered yet, and the first image of a series
or exam still open. Files written at or after the horizon, and events after the slowest output's
cursor, are kept whatever the limits say (a receiver that is down for a week makes the disk fill
rather than lose what it has not had yet; the bytes metric shows it).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from scanside.agent.runtime.config import AgentConfig, FolderRetention, TableRetention
from scanside.agent.runtime.lifecycle import Worker, WorkerThread
from scanside.agent.state.database import StateStore

log = logging.getLogger(__name__)

DAY_S = 86400.0
HORIZON_MARGIN_S = 60.0  # clock steps and files being renamed into place: keep a minute more
DELETE_BATCH = 5000  # rows per transaction: a pass never holds the ingest writer back for long


@dataclass
class FolderUsage:
    """One folder after the last pass (bytes/files) and since start (deleted_*)."""

    bytes: int = 0
    files: int = 0
    deleted_files: int = 0
    deleted_bytes: int = 0
    over_limit: bool = False  # still over max_bytes after the pass: what is left is undelivered


@dataclass
class TableUsage:
    rows: int = 0
    deleted_rows: int = 0


@dataclass
class _Entry:
    path: str
    size: int
    mtime: float


@dataclass
class Retention(Worker):
    name = "retention"  # a plain class attribute (no annotation): not a dataclass field
    config: AgentConfig
    store: StateStore
    sinks: list[str]  # the outputs whose cursors hold events (and the files they need) back
    clock: Callable[[], float] = time.time
    folders: dict[str, FolderUsage] = field(default_factory=dict)
    tables: dict[str, TableUsage] = field(default_factory=dict)
    last_run: Optional[float] = None
    pass_seconds: dict[str, float] = field(default_factory=dict)  # the last pass, per folder / table

    def __post_init__(self) -> None:
        for name in self.targets():
            self.folders[name] = FolderUsage()
        for name in ("events", "files", "exams"):
            self.tables[name] = TableUsage()
        self.worker = WorkerThread("scanside-retention", self._run)

    def targets(self) -> dict[str, tuple[Path, FolderRetention, bool]]:
        """name -> (folder, limits, whether files there can be waiting for delivery)."""
        r = self.config.retention
        out = {
            "received": (self.config.cstore_path, r.received, True),
            "maps": (self.config.state.dir / "maps", r.maps, True),
            "quarantine": (self.config.quarantine_path, r.quarantine, False),
        }
        if self.config.dicom_output.folder is not None:
            out["outputs"] = (Path(self.config.dicom_output.folder), r.outputs, True)
        return out

    # ------------------------------------------------------------------ what must stay
    def slowest_cursor(self) -> int:
        """The last event every output has delivered."""
        last = self.store.last_event_seq()
        return min([self.store.cursor(s) for s in self.sinks], default=last)

    def horizon(self) -> float:
        """Files written at or after this time are kept (see the module docstring)."""
        times = [self.clock()]
        row = self.store.first_event_after(self.slowest_cursor())
        if row is not None:
            times.append(row)
        oldest_open = self.store.oldest_open_activity()
        if oldest_open is not None:
            times.append(oldest_open)
        return min(times) - HORIZON_MARGIN_S

    # ------------------------------------------------------------------ a pass
    def run_once(self) -> None:
        now = self.clock()
        t0 = time.perf_counter()
        horizon = self.horizon()
        phases = {"horizon": time.perf_counter() - t0}
        for name, (folder, limits, deliverable) in self.targets().items():
            t0 = time.perf_counter()
            self._prune_folder(name, folder, limits, now, horizon if deliverable else now - HORIZON_MARGIN_S)
            phases[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._prune_events(self.config.retention.events, now)
        phases["events"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._prune_files(self.config.retention.files, now, horizon)
        phases["files"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._prune_exams(self.config.retention.exams, now)
        phases["exams"] = time.perf_counter() - t0
        self.pass_seconds = phases
        self.last_run = now

    def _prune_folder(self, name: str, folder: Path, limits: FolderRetention, now: float, keep_from: float) -> None:
        usage = self.folders[name]
        entries = sorted(_files(folder), key=lambda e: e.mtime)
        total = sum(e.size for e in entries)
        cutoff = now - limits.max_age_days * DAY_S if limits.max_age_days is not None else None
        kept: list[_Entry] = []
        for e in entries:  # oldest first: past its age, or the oldest while the folder is over its size
            over_size = limits.max_bytes is not None and total > limits.max_bytes
            expired = cutoff is not None and e.mtime < cutoff
            if (expired or over_size) and e.mtime < keep_from and _unlink(e.path):
                total -= e.size
                usage.deleted_files += 1
                usage.deleted_bytes += e.size
            else:
                kept.append(e)
        _remove_empty_dirs(folder)
        usage.bytes, usage.files = total, len(kept)
        usage.over_limit = limits.max_bytes is not None and total > limits.max_bytes
        if usage.over_limit:
            log.warning("retention: %s holds %d bytes, limit %d: the rest is not delivered yet", name, total, limits.max_bytes)

    def _prune_events(self, limits: TableRetention, now: float) -> None:
        """Events delivered to every output, past their age or the oldest past the row limit."""
        usage = self.tables["events"]
        upto = self.slowest_cursor()
        if limits.max_age_days is not None:
            usage.deleted_rows += self.store.delete_events(upto, before=now - limits.max_age_days * DAY_S, batch=DELETE_BATCH)
        if limits.max_rows is not None:
            excess = self.store.count_events() - limits.max_rows
            if excess > 0:
                usage.deleted_rows += self.store.delete_events(min(upto, self.store.nth_event_seq(excess)), batch=DELETE_BATCH)
        usage.rows = self.store.count_events()

    def _prune_exams(self, limits: TableRetention, now: float) -> None:
        """The exam read model: only exams whose events are gone from the log (delivered and pruned)."""
        usage = self.tables["exams"]
        before = now - limits.max_age_days * DAY_S if limits.max_age_days is not None else None
        if before is not None or limits.max_rows is not None:
            with self.store.transaction():
                usage.deleted_rows += self.store.read_model.prune_exams(before, limits.max_rows, batch=DELETE_BATCH)
        usage.rows = self.store.read_model.count_exams()

    def _prune_files(self, limits: TableRetention, now: float, horizon: float) -> None:
        """Rows of the files and instances tables of series complete before the horizon. A files row
        goes only once its file is gone (deleted here, or by the scanner): a row for a file still in
        the export folder is what stops a restart from ingesting it again as new."""
        usage = self.tables["files"]
        cutoffs = [horizon]
        if limits.max_age_days is not None:
            cutoffs.append(now - limits.max_age_days * DAY_S)
        deleted = self.store.delete_old_instances(min(cutoffs), batch=DELETE_BATCH) if limits.max_age_days is not None else 0
        deleted += self.store.delete_file_rows(min(cutoffs), gone=lambda p: not os.path.lexists(p), batch=DELETE_BATCH) \
            if limits.max_age_days is not None else 0
        if limits.max_rows is not None:
            excess = self.store.count_files() - limits.max_rows
            if excess > 0:
                deleted += self.store.delete_file_rows(horizon, gone=lambda p: not os.path.lexists(p), batch=DELETE_BATCH,
                                                       limit=excess)
        usage.deleted_rows += deleted
        usage.rows = self.store.count_files()

    # ------------------------------------------------------------------ thread
    def _run(self, stop: threading.Event) -> None:
        wait = min(60.0, self.config.retention.interval_s)  # first pass soon after start
        while not stop.wait(wait):
            try:
                self.run_once()
            except Exception:  # a full disk or a locked database: try again next time
                log.exception("retention pass failed")
            wait = self.config.retention.interval_s


def _files(folder: Path) -> list[_Entry]:
    out: list[_Entry] = []
    stack = [str(folder)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:  # not there (yet), or unreadable: nothing to count
            continue
        with it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        out.append(_Entry(entry.path, st.st_size, st.st_mtime))
                except OSError:
                    continue
    return out


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("retention: could not delete a file (%s)", exc.__class__.__name__)
        return False


def _remove_empty_dirs(folder: Path) -> None:
    for dirpath, _dirnames, _filenames in os.walk(folder, topdown=False):
        if dirpath != str(folder):
            try:
                os.rmdir(dirpath)  # only succeeds when empty (its children were visited first)
            except OSError:
                pass
