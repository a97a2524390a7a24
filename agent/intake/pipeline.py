"""One file in, events out: parse the header, record the instance, advance series completion and
record the events it causes, all in one transaction. Everything downstream reads the event log."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from scanside.agent.runtime.config import AgentConfig
from scanside.agent.schema.events import EventBase, FileQuarantined
from scanside.agent.dicom.header import HeaderError, read_bounded_dataset, read_header
from scanside.agent.runtime.health import WriteReporter
from scanside.agent.intake.quarantine import Quarantine
from scanside.agent.state.exam import ExamTracker
from scanside.agent.protocol.checker import checker_from_config
from scanside.agent.intake.assembler import SeriesAssembler
from scanside.agent.state.database import StateStore

log = logging.getLogger(__name__)

def readable_study_uid(path: str) -> Optional[str]:
    """The Study Instance UID of a refused file whose header is readable (a truncated image, say), so
    that its quarantine is shown with its exam; None when even that much cannot be read."""
    try:
        ds = read_bounded_dataset(path, os.path.getsize(path), specific_tags=["StudyInstanceUID"])
        uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    except Exception:  # anything a broken file can raise: the event is recorded without it
        return None
    return uid if 0 < len(uid) <= 64 and all(c.isdigit() or c == "." for c in uid) else None


DONE_STATUSES = {"ingested", "duplicate", "quarantined", "ignored", "index", "refused"}
IGNORED_REASONS = {"no_pixel_data"}  # valid DICOM that is not an image (SR, presentation state): not an error


def file_ref(path: str) -> str:
    return hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()[:12]


def storable(path: str) -> str:
    """The path as text SQLite and JSON can hold (a Latin-1 name's undecodable bytes as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _size_mtime(path: str) -> tuple[Optional[int], Optional[float]]:
    try:
        st = os.lstat(path)  # never follows: a link's own record
        return st.st_size, st.st_mtime
    except OSError:
        return None, None


@dataclass
class Outcome:
    status: str  # ingested | duplicate | skipped | ignored | index | error | quarantined | refused
    error: Optional[HeaderError] = None
    events: int = 0


class Pipeline:
    def __init__(self, config: AgentConfig, store: StateStore, clock: Callable[[], float] = time.time,
                 health: Optional[WriteReporter] = None, gland_coverage: bool = False):
        """health: where quarantine copies report failed writes; gland_coverage: the gland model runs beside
        the checker (scanside.agent.analysis.model_store.gland_model_active): the analyzer then raises the slab-end deviations."""
        self.config = config
        self.store = store
        self.assembler = SeriesAssembler(store, config.series, clock)
        # protocol checks run on the events each transaction records, inside that transaction
        self.protocol = checker_from_config(config, store, gland_coverage=gland_coverage)
        self.exams = ExamTracker(store, self.protocol, config.protocol.exam_quiet_period_s)
        self.quarantine_box = Quarantine(config.quarantine_path, config.ingest.quarantine_mode,
                                         include_paths=config.privacy.include_file_paths,
                                         max_copy_bytes=config.ingest.quarantine_max_copy_bytes, health=health)
        self.new_events = threading.Condition()
        self.listeners: list[Callable[[str, Outcome], None]] = []  # metrics hook: (path, outcome)
        self._series_bytes: dict[str, int] = {}  # series_uid -> declared pixel bytes recorded (per-series cap)

    # ------------------------------------------------------------------ files
    @contextmanager
    def batch(self) -> Iterator[None]:
        """Record the files handled inside in one state transaction (the ingest worker's batch): one
        commit instead of one per file. A crash before the commit loses nothing: the files table has
        no row for those files, so the next start's catch-up reads them again, and the events they
        cause are recorded then, once (event keys are unique). Outputs woken meanwhile wait on the
        store's lock and read what the commit makes visible."""
        try:
            with self.store.transaction():
                yield
        except BaseException:
            self._series_bytes.clear()  # counted for files now rolled back: recount from the store
            raise

    def already_done(self, path: str, size: int, mtime: float) -> bool:
        row = self.store.file_status(path)
        return bool(row and row["status"] in DONE_STATUSES and row["size"] == size and abs((row["mtime"] or 0) - mtime) < 1e-6)

    def process_file(self, path: str) -> Outcome:
        """Ingest one complete-looking file. HeaderErrors come back in the outcome, never raised."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return Outcome("error", HeaderError("vanished", "file disappeared", retryable=False))
        if self.already_done(path, st.st_size, st.st_mtime):
            return Outcome("skipped")
        try:
            header = read_header(path, self.config.ingest.max_image_bytes)
            self._check_series_bytes(header)
        except HeaderError as err:
            if err.reason in IGNORED_REASONS or err.reason == "dicomdir":
                status = "index" if err.reason == "dicomdir" else "ignored"
                with self.store.transaction():
                    self.store.record_file(path, st.st_size, st.st_mtime, status, reason=err.reason)
                return self._notify(path, Outcome(status, err))
            return self._notify(path, Outcome("error", err))
        with self.store.transaction():
            if self.store.has_instance(header.sop_instance_uid):
                self.store.record_file(path, st.st_size, st.st_mtime, "duplicate", header.sop_instance_uid)
                return self._notify(path, Outcome("duplicate"))
            self.store.touch_exam(header.study_uid, time.time())
            events = self.assembler.add(header)
            self.store.record_file(path, st.st_size, st.st_mtime, "ingested", header.sop_instance_uid)
            n = self._append(events)
        self._series_bytes[header.series_uid] = self._series_bytes.get(header.series_uid, 0) + header.pixel_bytes
        return self._notify(path, Outcome("ingested", events=n))

    def _check_series_bytes(self, header) -> None:
        """Per-series memory cap: the declared pixel bytes of a series' recorded files plus this one.
        A file that would take the series past the cap is refused (quarantined as series_oversized);
        the series keeps the files it has and completes as usual, so what it holds stays loadable."""
        cap = self.config.ingest.max_series_bytes
        if header.series_uid not in self._series_bytes:
            self._series_bytes[header.series_uid] = sum(h.pixel_bytes for h in self.store.series_headers(header.series_uid))
        total = self._series_bytes[header.series_uid] + header.pixel_bytes
        if total > cap and not self.store.has_instance(header.sop_instance_uid):
            raise HeaderError("series_oversized", f"series would hold {total} declared pixel bytes, cap {cap}")

    def quarantine(self, path: str, err: HeaderError) -> None:
        from scanside.agent.intake.ingest import redact

        ref = file_ref(path)
        size, mtime = _size_mtime(path)
        detail = redact(err.detail, path, os.path.realpath(path))  # error texts quote paths: never one in an event
        try:
            # the ingest worker checked that a link resolves inside the watched folders (scanside.agent.intake.ingest.admit)
            copied = self.quarantine_box.put(os.path.realpath(path), ref, err.reason, detail)
        except OSError as exc:  # quarantine disk full or unwritable: keep the record, say so
            log.error("could not quarantine file %s: %s", ref, exc.strerror or type(exc).__name__)
            copied = None
        if copied is None or not copied.exists():
            detail += f" (not copied: {self.quarantine_box.last_refusal or 'the quarantine folder could not be written'})"
        event = FileQuarantined(
            key=f"file_quarantined:{ref}:{mtime}", file_ref=ref, reason=err.reason, detail=detail,
            path=storable(path) if self.config.privacy.include_file_paths else None, study_uid=readable_study_uid(path),
        )
        with self.store.transaction():
            self.store.record_file(storable(path), size, mtime, "quarantined", reason=f"{err.reason}: {detail}")
            self._append([event])
        log.warning("quarantined file %s: %s (%s)", ref, err.reason, detail)
        self._notify(path, Outcome("quarantined", err))

    def refuse(self, path: str, err: HeaderError) -> None:
        """An entry that is no file to read (FIFO, device, symlink leaving the watched folders, loop):
        recorded with its reason, logged and counted; nothing is opened or copied, no alert is raised."""
        size, mtime = _size_mtime(path)
        with self.store.transaction():
            self.store.record_file(storable(path), size, mtime, "refused", reason=f"{err.reason}: {err.detail}")
        log.warning("refused entry %s: %s (%s)", file_ref(path), err.reason, err.detail)
        self._notify(path, Outcome("refused", err))

    # ------------------------------------------------------------------ time
    def tick(self) -> int:
        with self.store.transaction():
            n = self._append(self.assembler.due())
        with self.store.transaction():
            n += self._append(self._exam_events(self.exams.due))
        return n

    def exam_done(self, study_uid: str, reason: str = "operator") -> int:
        """End an exam now (the technologist's 'exam done'; the API calls this): close its open
        series, check it for missing series, record ExamCompleted. Events recorded, counted."""
        with self.store.transaction():
            n = self._append(self.assembler.complete_study(study_uid))
        with self.store.transaction():
            return n + self._append(self._exam_events(lambda: self.exams.end(study_uid, reason)))  # type: ignore[arg-type]

    def end_exams(self) -> int:
        """End every exam not yet ended (one-shot scans, after complete_all)."""
        n = 0
        for row in self.store.exams():
            if not self.exams.is_done(row["study_uid"], row["last_seen"]):
                n += self.exam_done(row["study_uid"])
        return n

    def _exam_events(self, produce: Callable[[], list[EventBase]]) -> list[EventBase]:
        try:
            return produce()
        except Exception:  # exam bookkeeping must never stop ingestion
            log.exception("exam end failed")
            self.exams.forget_all()
            return []

    def complete_all(self) -> int:
        with self.store.transaction():
            return self._append(self.assembler.complete_all())

    def complete_exam(self, study_uid: str) -> int:
        """Close one exam's open series now (the technologist's 'exam done'); events recorded."""
        with self.store.transaction():
            events: list[EventBase] = []
            for row in self.store.all_series("open"):
                if row["study_uid"] == study_uid:
                    reached = bool(row["expected"] and row["n_images"] >= row["expected"]) or not row["expected"]
                    events += self.assembler.complete(row["series_uid"], complete=reached)
            return self._append(events)

    def next_due_in(self) -> Optional[float]:
        waits = [w for w in (self.assembler.next_due_in(), self.exams.next_due_in()) if w is not None]
        return min(waits) if waits else None

    # ------------------------------------------------------------------ events
    def _append(self, events: list[EventBase]) -> int:
        stored = sum(1 for e in events if self.store.append_event(e) is not None)  # type: ignore[arg-type]
        if self.protocol is not None and any(e.type == "series_completed" for e in events):  # type: ignore[attr-defined]
            try:
                deviations = self.protocol.after(events)
            except Exception:  # a checker bug must not roll back (and so re-try, then quarantine) good files
                log.exception("protocol check failed")
                deviations = []
            stored += sum(1 for e in deviations if self.store.append_event(e) is not None)
        if stored:  # an output woken now reads the events once the transaction commits (the store's lock)
            with self.new_events:
                self.new_events.notify_all()
        return stored

    def _notify(self, path: str, outcome: Outcome) -> Outcome:
        for listener in self.listeners:
            try:
                listener(path, outcome)
            except Exception:  # a metrics hook must never stop ingestion
                log.exception("outcome listener failed")
        return outcome
