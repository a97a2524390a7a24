"""Exams as the API and the console see them, read from the exam read model (scanside.agent.state.exam_repository),
which is written with every event: a restarted agent, or another process reading the same database,
shows the same thing, and a view costs one exam's rows, not a pass over the event log.

`ExamIndex` lists exams and alerts; `exam_view` builds one exam's full view with its checklist.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence

from pydantic import BaseModel, Field

from scanside.agent.state.alerts import Alert
from scanside.agent.schema.events import SeriesSummary
from scanside.agent.state.exam_repository import ExamRow
from scanside.agent.state.database import StateStore

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
def _brief(row: ExamRow) -> ExamBrief:
    return ExamBrief(study_uid=row.study_uid, state=row.state, first_time=row.first_time, last_time=row.last_time,
                     last_seq=row.last_seq, n_series=row.n_series, n_alerts=row.n_alerts, n_open_alerts=row.n_open_alerts,
                     triage=row.triage)


class ExamIndex:
    """Exams and alerts from the exam read model (thread-safe: the store serialises its reads)."""

    def __init__(self, store: StateStore):
        self.store = store

    def brief(self, study_uid: str) -> Optional[ExamBrief]:
        row = self.store.read_model.exam(study_uid)
        return _brief(row) if row is not None else None

    def list_exams(self, limit: Optional[int] = None) -> list[ExamBrief]:
        """Exams, latest activity first."""
        return [_brief(r) for r in self.store.read_model.exams(limit)]

    def current(self) -> Optional[str]:
        """The exam with the latest activity."""
        exams = self.list_exams(limit=1)
        return exams[0].study_uid if exams else None

    def alert(self, alert_id: str) -> Optional[Alert]:
        return self.store.read_model.alert_row(alert_id)

    def list_alerts(self, open_only: bool = False, study_uid: Optional[str] = None,
                    unassigned: bool = False) -> list[Alert]:
        if study_uid is not None and unassigned:
            return []  # an exam's alerts are never unassigned
        return self.store.read_model.alerts(study_uid=study_uid, unassigned=unassigned, open_only=open_only)


# ---------------------------------------------------------------------------------------- one exam
RequirementsFn = Callable[[Optional[str]], Optional[Sequence[Requirement]]]


def exam_view(store: StateStore, study_uid: str, index: ExamIndex,
              requirements: Optional[RequirementsFn] = None) -> Optional[ExamView]:
    row = store.read_model.exam(study_uid)
    if row is None:
        return None
    series = []
    for r in store.read_model.series_rows(study_uid):
        if r.summary is None:
            continue
        c = r.classification
        series.append(SeriesView(series=r.summary, image_label=c.image_label if c else None,
                                 image_confidence=c.image_confidence if c else None, labels_agree=c.agree if c else None))
    deviations = [ev.model_dump(mode="json") for ev in store.read_model.findings(study_uid, ("protocol_deviation", "label_mismatch"))]
    alerts = index.list_alerts(study_uid=study_uid)
    reqs = requirements(row.profile) if requirements else None
    ordered = sorted(series, key=lambda s: (s.series.series_number or 0, s.series.part))
    return ExamView(**_brief(row).model_dump(), profile=row.profile, series=ordered, alerts=alerts, deviations=deviations,
                    triage_result=row.triage_result, completed=row.completed,
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
