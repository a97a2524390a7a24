"""Series completion as the daemon keeps it (intake layer): each instance recorded in the state store, an
acquisition's completion decided from the counts its headers declare or a quiet period, a late image reopening
a completed series as its next revision. The rules themselves (counts, parts, summaries) are decoding's:
scanside.agent.dicom.series."""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

from scanside.agent.dicom.header import InstanceHeader
from scanside.agent.dicom.series import SeriesPart, expected_count, expected_images, split_parts, summarise
from scanside.agent.runtime.config import SeriesConfig
from scanside.agent.schema.events import EventBase, SeriesCompleted, SeriesReopened
from scanside.agent.state.database import StateStore


class SeriesAssembler:
    """Completion bookkeeping on top of the state store. Call within a store transaction."""

    def __init__(self, store: StateStore, config: SeriesConfig, clock: Callable[[], float] = time.time):
        self.store = store
        self.config = config
        self.clock = clock

    def add(self, header: InstanceHeader) -> list[EventBase]:
        """Record one instance (the caller has checked it is not a duplicate); events it causes."""
        now = self.clock()
        events: list[EventBase] = []
        self.store.add_instance(header, now)
        row = self.store.get_series(header.series_uid)
        exp = expected_images(header)
        raised = False  # this header raises the series' count: new evidence, trusted even after a reopening
        if row is None:
            state, revision, n, expected, first_seen = "open", 1, 0, exp, now
        else:
            raised = bool(exp and exp > (row["expected"] or 0))
            state, revision, n = row["state"], row["revision"], row["n_images"]
            expected = max(x for x in (row["expected"], exp, 0) if x is not None) or None
            first_seen = row["first_seen"]
            if state == "complete":
                state, revision = "open", revision + 1
                events.append(SeriesReopened(
                    key=f"series_reopened:{header.series_uid}:r{revision}", study_uid=header.study_uid,
                    series_uid=header.series_uid, revision=revision, late_images=header.n_images,
                ))
        n += header.n_images
        self.store.put_series(header.series_uid, header.study_uid, state, revision, n, expected, first_seen, now, None)
        if expected and n >= expected and (self.count_trusted(revision) or raised):
            events += self.complete(header.series_uid, complete=True)
        return events

    @staticmethod
    def count_trusted(revision: int) -> bool:
        """A series reopened by a late image has proved its expected count too small: completing it
        again at that count would complete it once per late image (and rescan it each time) while the
        scanner is still sending, so from then on it completes by its quiet period."""
        return revision <= 1

    def due(self) -> list[EventBase]:
        """Complete the open series whose quiet period (or incomplete grace) has passed."""
        now = self.clock()
        events: list[EventBase] = []
        for row in self.store.all_series("open"):
            idle = now - row["last_seen"]
            expected, n = row["expected"], row["n_images"]
            trusted = self.count_trusted(row["revision"])
            if expected and n >= expected and trusted:
                events += self.complete(row["series_uid"], complete=True)
            elif (not expected or not trusted) and idle >= self.config.quiet_period_s:
                events += self.complete(row["series_uid"], complete=True)
            elif expected and idle >= self.config.incomplete_grace_s:
                events += self.complete(row["series_uid"], complete=False)
        return events

    def next_due_in(self) -> Optional[float]:
        """Seconds until the next open series could complete by time (for the worker's sleep)."""
        now = self.clock()
        waits = []
        for row in self.store.all_series("open"):
            counted = row["expected"] and self.count_trusted(row["revision"])
            limit = self.config.incomplete_grace_s if counted else self.config.quiet_period_s
            waits.append(max(0.0, row["last_seen"] + limit - now))
        return min(waits) if waits else None

    def complete_all(self) -> list[EventBase]:
        """Close every open series now (one-shot scans, `exam done`)."""
        events: list[EventBase] = []
        for row in self.store.all_series("open"):
            reached = bool(row["expected"] and row["n_images"] >= row["expected"]) or not row["expected"]
            events += self.complete(row["series_uid"], complete=reached)
        return events

    def complete_study(self, study_uid: str) -> list[EventBase]:
        """Close one exam's open series now (its 'exam done')."""
        events: list[EventBase] = []
        for row in self.store.all_series("open"):
            if row["study_uid"] == study_uid:
                reached = bool(row["expected"] and row["n_images"] >= row["expected"]) or not row["expected"]
                events += self.complete(row["series_uid"], complete=reached)
        return events

    def complete(self, series_uid: str, complete: bool) -> list[EventBase]:
        row = self.store.get_series(series_uid)
        assert row is not None
        now = self.clock()
        self.store.put_series(series_uid, row["study_uid"], "complete", row["revision"], row["n_images"],
                              row["expected"], row["first_seen"], row["last_seen"], now)
        headers = self.store.series_headers(series_uid)
        events: list[EventBase] = []
        note = self.completion_note(headers, row["revision"], row["expected"], row["n_images"], complete)
        for part in split_parts(headers):
            summary = summarise(part, row["revision"], complete, row["expected"], note)
            events.append(SeriesCompleted(
                key=f"series_completed:{part.series_id}:r{row['revision']}", study_uid=row["study_uid"], series=summary,
            ))
        return events

    def completion_note(self, headers: Sequence[InstanceHeader], revision: int, expected: Optional[int], n: int,
                        complete: bool = True) -> str:
        """Where the series' count could not be trusted as the header gives it, say so (and what was used)."""
        notes = [expected_count(headers[0])[1]] if headers else []
        if not self.count_trusted(revision) and expected:
            notes.append(f"expected count {expected} exceeded ({n} images): completed after the "
                         f"{self.config.quiet_period_s:g} s quiet period")
        elif not complete and expected:
            notes.append(f"closed with {n} of the {expected} images its header counts")
        return "; ".join(x for x in notes if x)

    def parts(self, series_uid: str) -> list[SeriesPart]:
        return split_parts(self.store.series_headers(series_uid))
