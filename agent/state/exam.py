"""When an exam ends: a quiet period after its last image (no series still open), or an explicit
'exam done' (the API, a one-shot scan). Then the exam is checked for missing series and an
ExamCompleted event closes it.

State lives in the event log and its exam read model (scanside.agent.state.exam_repository: rounds and the time of
the latest end), so a restart neither repeats nor forgets an exam end: an exam is done when its
latest ExamCompleted is newer than its last image. Images arriving after that reopen it; its next
end is round 2 (keys ``exam_completed:<study>:<round>``).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Literal, Optional

from scanside.agent.schema.events import EventBase, ExamCompleted, ProtocolDeviation
from scanside.agent.state.exam_repository import epoch
from scanside.agent.protocol.checker import ProtocolChecker
from scanside.agent.state.database import StateStore

log = logging.getLogger(__name__)


class ExamTracker:
    def __init__(self, store: StateStore, checker: Optional[ProtocolChecker], quiet_period_s: float,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.checker = checker
        self.quiet_period_s = quiet_period_s
        self.clock = clock
        # study -> (rounds, time of the latest end): the read model's, or this process's own clock for
        # an end it recorded (a test clock may run ahead of the events' wall-clock times)
        self._ended: dict[str, tuple[int, float]] = {}

    def _rounds(self, study_uid: str) -> tuple[int, float]:
        if study_uid not in self._ended:
            row = self.store.read_model.exam(study_uid)
            self._ended[study_uid] = (row.rounds, row.last_end_epoch) if row is not None else (0, 0.0)
        return self._ended[study_uid]

    def is_done(self, study_uid: str, last_seen: float) -> bool:
        rounds, at = self._rounds(study_uid)
        return rounds > 0 and at >= last_seen

    def due(self) -> list[EventBase]:
        """End the exams whose quiet period has passed with no series still open."""
        now = self.clock()
        open_studies = {r["study_uid"] for r in self.store.all_series("open")}
        out: list[EventBase] = []
        for row in self.store.open_exams():
            study = row["study_uid"]
            if study in open_studies or now - row["last_seen"] < self.quiet_period_s:
                continue
            if self.is_done(study, row["last_seen"]):
                # ended (the tick before, or before an upgrade added the state): off the open list
                # until its next image (StateStore.touch_exam reopens it)
                self.store.mark_exam_ended(study)
                continue
            out += self.end(study, "quiet_period")
        return out

    def next_due_in(self) -> Optional[float]:
        now = self.clock()
        waits = [max(0.0, r["last_seen"] + self.quiet_period_s - now) for r in self.store.open_exams()
                 if not self.is_done(r["study_uid"], r["last_seen"])]
        return min(waits) if waits else None

    def end(self, study_uid: str, reason: Literal["quiet_period", "operator"]) -> list[EventBase]:
        """Events that end this exam now (call inside the store transaction that records them)."""
        rounds, _ = self._rounds(study_uid)
        round_ = rounds + 1
        deviations: list[ProtocolDeviation] = []
        if self.checker is not None:
            try:
                deviations = self.checker.exam_end(study_uid, round_)
            except Exception:  # a checker bug must not stop the exam from ending
                log.exception("exam-end protocol check failed")
        known = self.store.read_model.finding_keys(study_uid, "protocol_deviation")
        n_dev = len(known | {d.key for d in deviations})
        done = ExamCompleted(key=f"exam_completed:{study_uid}:{round_}", study_uid=study_uid, reason=reason,
                             n_series=self.store.read_model.n_acquisitions(study_uid), n_deviations=n_dev)
        self._ended[study_uid] = (round_, max(epoch(done.time), self.clock()))
        return [*deviations, done]

    def forget_all(self) -> None:
        """Drop every cached exam state (after exam bookkeeping failed: it is read again from the log)."""
        self._ended.clear()

    def forget(self, study_uid: str) -> None:
        """Drop the cached state (after a rolled-back transaction)."""
        self._ended.pop(study_uid, None)
