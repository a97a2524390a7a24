"""Exams as the API and the console see them, built from the event log alone (so a restarted agent,
or another process reading the same database, shows the same thing).

`ExamIndex` keeps a small in-memory summary (exams, alerts and their acknowledgements) that catches
up incrementally from the log on each use; `exam_view` builds one exam's full view from its events.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Literal, Optional, Sequence

from pydantic import BaseModel, Field

from agent.alerts import Alert, alert_from_event
from agent.events import Event, SeriesSummary
from agent.state import StateStore

ItemStatus = Literal["pending", "done", "deviating"]


class Requirement(BaseModel):
    """One line of the checklist: a series the protocol profile requires."""

    key: str
    title: str
    labels: list[str] = Field(description="sequence labels that satisfy it")
    other_kinds: list[str] = Field(default_factory=list, description="for label 'other': which kinds count")
    planes: list[str] = Field(default_factory=list, description="empty: any plane")
    b_min: Optional[float] = Field(None, description="diffusion: only a b-value at least this counts")


class ChecklistItem(BaseModel):
    key: str
    title: str
    status: ItemStatus
    series: list[str] = Field(default_factory=list, description="series numbers (or ids) that satisfy it")
    detail: str = ""
    required: bool = Field(description="from the protocol profile (False: listed because it was seen)")


class SeriesView(BaseModel):
    series: SeriesSummary
    image_label: Optional[str] = None
    image_confidence: Optional[float] = None
    labels_agree: Optional[bool] = None


class ExamBrief(BaseModel):
    study_uid: str
    state: Literal["open", "completed"] = "open"
    first_time: str = ""
    last_time: str = ""
    last_seq: int = 0
    n_series: int = 0
    n_alerts: int = 0
    n_open_alerts: int = 0
    triage: Optional[str] = None


class ExamView(ExamBrief):
    profile: Optional[str] = None
    checklist: list[ChecklistItem] = Field(default_factory=list)
    series: list[SeriesView] = Field(default_factory=list)
    alerts: list[Alert] = Field(default_factory=list)
    deviations: list[dict[str, Any]] = Field(default_factory=list, description="protocol_deviation and label_mismatch events")
    triage_result: Optional[dict[str, Any]] = None
    completed: Optional[dict[str, Any]] = None


# ---------------------------------------------------------------------------------------- index
class ExamIndex:
    """Exams and alerts, caught up from the event log on demand (thread-safe)."""

    def __init__(self, store: StateStore):
        self.store = store
        self.seq = 0
        self.exams: dict[str, ExamBrief] = {}
        self.alerts: dict[str, Alert] = {}
        self._series: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def refresh(self) -> int:
        with self._lock:
            n = 0
            while True:
                batch = self.store.events_after(self.seq, limit=1000)
                if not batch:
                    return n
                for ev in batch:
                    self._apply(ev)
                    self.seq = ev.seq or self.seq
                n += len(batch)

    def _apply(self, ev: Event) -> None:
        if ev.type == "alert_acknowledged":
            alert = self.alerts.get(ev.alert_id)
            if alert is not None and not alert.acknowledged:
                alert.acknowledged, alert.acknowledged_by, alert.acknowledged_at = True, ev.by, ev.time
                brief = self.exams.get(alert.study_uid or "")
                if brief:
                    brief.n_open_alerts -= 1
            return
        alert = alert_from_event(ev)
        if alert is not None and alert.alert_id not in self.alerts:
            self.alerts[alert.alert_id] = alert
        if not ev.study_uid:
            return
        brief = self.exams.get(ev.study_uid)
        if brief is None:
            brief = self.exams[ev.study_uid] = ExamBrief(study_uid=ev.study_uid, first_time=ev.time)
            self._series[ev.study_uid] = set()
        brief.last_time, brief.last_seq = ev.time, ev.seq or brief.last_seq
        if ev.type == "series_completed":
            self._series[ev.study_uid].add(ev.series.series_id)
            brief.n_series = len(self._series[ev.study_uid])
            brief.state = "open"  # images after an exam end reopen it (the next end is another round)
        elif ev.type == "series_reopened":
            brief.state = "open"
        elif ev.type == "exam_completed":
            brief.state = "completed"
        elif ev.type == "triage_result":
            brief.triage = ev.recommendation
        if alert is not None:
            brief.n_alerts += 1
            brief.n_open_alerts += 1

    def list_exams(self) -> list[ExamBrief]:
        self.refresh()
        with self._lock:
            return [b.model_copy() for b in sorted(self.exams.values(), key=lambda b: b.last_seq, reverse=True)]

    def current(self) -> Optional[str]:
        """The exam with the latest activity."""
        exams = self.list_exams()
        return exams[0].study_uid if exams else None

    def alert(self, alert_id: str) -> Optional[Alert]:
        self.refresh()
        with self._lock:
            a = self.alerts.get(alert_id)
            return a.model_copy() if a else None

    def list_alerts(self, open_only: bool = False, study_uid: Optional[str] = None,
                    unassigned: bool = False) -> list[Alert]:
        self.refresh()
        with self._lock:
            out = [a.model_copy() for a in self.alerts.values()
                   if not (open_only and a.acknowledged)
                   and (study_uid is None or a.study_uid == study_uid)
                   and (not unassigned or a.study_uid is None)]
        return sorted(out, key=lambda a: a.seq or 0)


# ---------------------------------------------------------------------------------------- one exam
RequirementsFn = Callable[[Optional[str]], Optional[Sequence[Requirement]]]


def exam_view(store: StateStore, study_uid: str, index: ExamIndex,
              requirements: Optional[RequirementsFn] = None) -> Optional[ExamView]:
    brief = next((b for b in index.list_exams() if b.study_uid == study_uid), None)
    if brief is None:
        return None
    events: list[Event] = []
    after = 0
    while True:
        batch = store.events_after(after, limit=5000, study_uid=study_uid)
        if not batch:
            break
        events += batch
        after = batch[-1].seq or after
    series: dict[str, SeriesView] = {}
    deviations: list[dict[str, Any]] = []
    triage = completed = None
    profile: Optional[str] = None
    for ev in events:
        if ev.type == "series_completed":
            prev = series.get(ev.series.series_id)
            series[ev.series.series_id] = SeriesView(series=ev.series, **({} if prev is None else {
                "image_label": prev.image_label, "image_confidence": prev.image_confidence, "labels_agree": prev.labels_agree}))
        elif ev.type == "series_classified" and ev.series_id in series:
            sv = series[ev.series_id]
            sv.image_label, sv.image_confidence, sv.labels_agree = ev.image_label, ev.image_confidence, ev.agree
        elif ev.type in ("protocol_deviation", "label_mismatch"):
            deviations.append(ev.model_dump(mode="json"))
            profile = getattr(ev, "profile", None) or profile
        elif ev.type == "triage_result":
            triage = ev.model_dump(mode="json")
        elif ev.type == "exam_completed":
            completed = ev.model_dump(mode="json")
    alerts = index.list_alerts(study_uid=study_uid)
    reqs = requirements(profile) if requirements else None
    ordered = sorted(series.values(), key=lambda s: (s.series.series_number or 0, s.series.part))
    return ExamView(**brief.model_dump(), profile=profile, series=ordered, alerts=alerts, deviations=deviations,
                    triage_result=triage, completed=completed,
                    checklist=build_checklist([s.series for s in ordered], alerts, reqs))


def _related(s: SeriesSummary, req: Requirement) -> bool:
    """The kind of series the requirement is about (whatever its b-value)."""
    if s.label not in req.labels:
        return False
    if s.label == "other" and req.other_kinds and s.other_kind not in req.other_kinds:
        return False
    return not req.planes or s.plane in req.planes


def _matches(s: SeriesSummary, req: Requirement) -> bool:
    if not _related(s, req):
        return False
    if req.b_min is not None:
        return bool(s.b_values) and max(s.b_values) >= req.b_min - max(1e-3, 1e-3 * req.b_min)
    return True


def _seen_requirements(series: Sequence[SeriesSummary], alerts: Sequence[Alert]) -> list[Requirement]:
    """No profile: one line per kind of series seen (and per kind a deviation names), in order."""
    reqs: dict[str, Requirement] = {}
    for s in series:
        if s.label == "other":
            kind = s.other_kind or "unknown"
            reqs.setdefault(f"other:{kind}", Requirement(key=f"other:{kind}", title=TITLES.get(kind, kind),
                                                         labels=["other"], other_kinds=[kind]))
        else:
            reqs.setdefault(s.label, Requirement(key=s.label, title=TITLES.get(s.label, s.label), labels=[s.label]))
    for a in alerts:
        if a.label and a.label != "other" and a.label not in reqs:
            reqs[a.label] = Requirement(key=a.label, title=TITLES.get(a.label, a.label), labels=[a.label])
    return list(reqs.values())


TITLES = {
    "T2WI_nan": "T2-weighted", "T2WI_fs": "T2-weighted fat-sat", "DWI_Low": "Diffusion, low b",
    "DWI_High": "Diffusion, high b", "ADC": "ADC map", "DCE": "Dynamic contrast (DCE)",
    "localizer": "Localizer", "T1": "T1-weighted", "unknown": "Other series",
}


def build_checklist(series: Sequence[SeriesSummary], alerts: Sequence[Alert],
                    requirements: Optional[Sequence[Requirement]] = None) -> list[ChecklistItem]:
    required = requirements is not None
    reqs = list(requirements) if requirements is not None else _seen_requirements(series, alerts)
    items = []
    deviation_alerts = [a for a in alerts if a.code not in ("FILE_QUARANTINED",) and not a.code.startswith("TRIAGE_")]
    for req in reqs:
        found = [s for s in series if _matches(s, req)]
        related = {s.series_id for s in series if _related(s, req)}
        against = [a for a in deviation_alerts
                   if (a.series_id and a.series_id in related)
                   or (not a.series_id and ((a.label and a.label in req.labels) or (a.required and a.required == req.title)))]
        if against:
            status: ItemStatus = "deviating"
            last = against[-1]
            detail = f"Found {last.measured}; needs {last.required}" if last.measured and last.required else last.message
        elif found:
            incomplete = [s for s in found if not s.complete]
            status, detail = "done", (f"{len(incomplete)} series incomplete" if incomplete and len(incomplete) == len(found) else "")
        else:
            status, detail = "pending", ""
        items.append(ChecklistItem(key=req.key, title=req.title, status=status, required=required, detail=detail,
                                   series=[str(s.series_number) if s.series_number is not None else s.series_id for s in found]))
    return items
