"""Typed events: the one stream every output (stdout, JSONL log, webhook, console, DICOM SR) is built from.

The schema is published (`scanside schema events`) for vendors to build against. Compatibility rule:
fields are only ever added; a field's meaning never changes within a schema major version.
Events carry no patient name, ID, birth date or accession number.
"""
from __future__ import annotations

import datetime as _dt
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, Field, TypeAdapter

from scanside.agent.schema.taxonomy import OtherKind, Plane, SequenceLabel

SCHEMA_VERSION = "1.2"  # 1.1: series_classified.diffusion and .revises; 1.2: series.modality


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class EventBase(BaseModel):
    schema_version: str = SCHEMA_VERSION
    key: str = Field(description="idempotency key: the same fact always has the same key; consumers de-duplicate on it")
    seq: Optional[int] = Field(None, description="position in the agent's event log, assigned when stored")
    time: str = Field(default_factory=utc_now, description="UTC ISO 8601")
    study_uid: Optional[str] = None


class SlabGeometry(BaseModel):
    """Where a series' slices are, in patient coordinates (LPS, mm): for the 'same locations' checks."""

    normal: tuple[float, float, float] = Field(description="unit slice normal (row cosines x column cosines)")
    center_lps_mm: tuple[float, float, float] = Field(description="centre of the imaged slab")
    start_mm: float = Field(description="slab start along the normal (first slice centre minus half a slice)")
    end_mm: float = Field(description="slab end along the normal (last slice centre plus half a slice)")


class SeriesSummary(BaseModel):
    """One logical series: an acquisition, or one b-value / derived part of a multi-b diffusion series."""

    series_id: str = Field(description="series_uid, or series_uid#part for a split diffusion series (#b1400, #adc)")
    study_uid: str
    series_uid: str
    part: str = ""
    series_number: Optional[int] = None
    series_description: str = ""
    vendor: str = "other"
    modality: str = Field("MR", description="DICOM Modality of its images (MR where the file does not say); the "
                                            "image models read MR series only")
    label: SequenceLabel
    other_kind: Optional[OtherKind] = None
    label_confidence: float
    reason: str
    b_values: list[float] = Field(default_factory=list)
    plane: Optional[Plane] = None
    fat_suppressed: Optional[bool] = None
    n_instances: int
    n_images: int
    expected_images: Optional[int] = None
    complete: bool = Field(description="the expected image count was reached (False: closed by the quiet period short of it, or no count known)")
    revision: int = 1
    slice_thickness_mm: Optional[float] = None
    slice_spacing_mm: Optional[float] = None
    pixel_spacing_mm: Optional[tuple[float, float]] = None
    rows: int = 0
    columns: int = 0
    echo_time_ms: Optional[float] = None
    repetition_time_ms: Optional[float] = None
    field_strength_t: Optional[float] = None
    fov_mm: Optional[tuple[float, float]] = Field(None, description="field of view (rows, columns) of one slice, mm")
    acquired_resolution_mm: Optional[tuple[float, float]] = Field(
        None, description="(phase, frequency) acquired in-plane resolution, mm: field of view over the acquisition matrix")
    slab: Optional[SlabGeometry] = None
    calculated: bool = Field(False, description="computed by the scanner (e.g. a calculated high b-value, CALC_BVALUE)")
    temporal_positions: Optional[int] = Field(None, description="phases of a dynamic series")
    temporal_resolution_s: Optional[float] = Field(None, description="time between phases of a dynamic series")
    observation_s: Optional[float] = Field(None, description="time covered by a dynamic series (first to last phase, plus one phase)")


class SeriesCompleted(EventBase):
    type: Literal["series_completed"] = "series_completed"
    series: SeriesSummary


class SeriesReopened(EventBase):
    type: Literal["series_reopened"] = "series_reopened"
    series_uid: str
    revision: int = Field(description="the revision that will complete next")
    late_images: int


class FileQuarantined(EventBase):
    type: Literal["file_quarantined"] = "file_quarantined"
    file_ref: str = Field(description="stable short id of the file; the quarantine folder names its copy by it")
    reason: str
    detail: str
    path: Optional[str] = Field(None, description="only when privacy.include_file_paths is on: export folder names can hold patient names")


Severity = Literal["info", "warning", "critical"]


class ProtocolDeviation(EventBase):
    """A check against the protocol profile failed: the technologist can act on it now."""

    type: Literal["protocol_deviation"] = "protocol_deviation"
    alert_id: str = Field(description="stable id for acknowledging this alert (POST /v1/alerts/{alert_id}/ack)")
    code: str = Field(description="stable machine code, e.g. DWI_HIGH_B_TOO_LOW, SERIES_MISSING, SLICE_TOO_THICK")
    severity: Severity
    series_id: Optional[str] = None
    series_number: Optional[int] = None
    label: Optional[SequenceLabel] = None
    measured: Optional[str] = Field(None, description="what was found, with units")
    required: Optional[str] = Field(None, description="what the profile requires, with units")
    message: str = Field(description="one sentence a technologist can act on")
    profile: str


class LabelMismatch(EventBase):
    """The image model and the header disagree, each with confidence."""

    type: Literal["label_mismatch"] = "label_mismatch"
    alert_id: str
    code: Literal["LABEL_MISMATCH"] = "LABEL_MISMATCH"
    severity: Severity = "warning"
    series_id: str
    series_number: Optional[int] = None
    header_label: SequenceLabel
    header_confidence: float
    image_label: SequenceLabel
    image_confidence: float
    message: str
    shadow: bool = Field(False, description="shadow mode: recorded, no technologist alert (the model is not yet validated for this site)")


class SeriesClassified(EventBase):
    """The image model's label for a series, kept beside the header's."""

    type: Literal["series_classified"] = "series_classified"
    series_id: str
    series_number: Optional[int] = None
    header_label: SequenceLabel
    image_label: Union[SequenceLabel, Literal["uncertain"]] = Field(
        description="`uncertain`: the model's calibrated gate says it does not know (no alert is raised)")
    image_confidence: float
    probabilities: dict[str, float]
    model: str = Field(description="name/version of the model that ran")
    backend: str
    agree: bool
    image_predicted: Optional[SequenceLabel] = Field(None, description="the most probable class, also when uncertain")
    ood_score: Optional[float] = Field(None, description="feature distance / its threshold (> 1: out of distribution)")
    uncertain_reason: Optional[str] = None
    diffusion: Optional[str] = Field(None, description="what the diffusion physics across the series of its voxel grid "
                                                       "said of it (an ADC map, or a diffusion-weighted image of one), where it placed the series")
    revises: bool = Field(False, description="a later label for the same series revision: the diffusion physics placed it "
                                             "once another series of its grid (its ADC map) came in; it replaces the earlier one")


class LesionFinding(BaseModel):
    center_lps_mm: tuple[float, float, float]
    long_axis_mm: float
    short_axis_mm: float
    volume_ml: Optional[float] = None
    likelihood: float = Field(description="peak voxel lesion likelihood, 0..1")
    zone: Optional[Literal["PZ", "TZ"]] = Field(None, description="when the gland model is present")


class TriageResult(EventBase):
    """csPCa decision support once axial T2W, ADC and high-b DWI are in. Not a diagnosis."""

    type: Literal["triage_result"] = "triage_result"
    alert_id: str
    probability: float = Field(description="exam-level csPCa probability from the reference model (from the findings inside the gland when a gland model checked them)")
    findings: list[LesionFinding] = Field(default_factory=list)
    recommendation: Literal["DCE_ADVISED", "BPMRI_SUFFICIENT", "NOT_ASSESSED"]
    thresholds: dict[str, float]
    inputs: dict[str, str] = Field(description="channel -> series_id used")
    model: str
    backend: str
    gland_volume_ml: Optional[float] = None
    not_assessed_reason: Optional[str] = Field(None, description="why the model's answer is not used (NOT_ASSESSED)")
    confidence: Optional[float] = Field(None, description="max(p, 1 - p) of the calibrated probability; None when not assessed")
    input_range: Optional[dict[str, Any]] = Field(None, description="the inputs against the model's validated range: score, threshold, in_range, in_range_confidence, outside (None: the model has no validated range)")
    input_series: dict[str, str] = Field(default_factory=dict, description="channel -> the series used, in words (number, label, b-value)")
    gland_check: Literal["checked", "no_gland_found", "no_gland_model"] = Field("no_gland_model", description="whether the findings were checked against a gland mask")
    gland_model: Optional[str] = None
    findings_outside_gland: int = Field(0, description="findings dropped because they lie outside the gland (dilated by [gland] finding_margin_mm)")
    label_disagreements: list[dict[str, Any]] = Field(default_factory=list, description="input series whose image label disagrees with the header's")
    shadow: bool = Field(False, description="shadow mode: recorded, no technologist alert (the model is not yet validated for this site)")
    decision_support: Literal[True] = True
    disclaimer: str = "Decision support from a reference model trained on simulated phantoms; not validated on patients."


class ExamCompleted(EventBase):
    """The exam is over (quiet period after its last series, or an explicit 'exam done')."""

    type: Literal["exam_completed"] = "exam_completed"
    reason: Literal["quiet_period", "operator"]
    n_series: int
    n_deviations: int


class AlertAcknowledged(EventBase):
    type: Literal["alert_acknowledged"] = "alert_acknowledged"
    alert_id: str
    by: Optional[str] = Field(None, description="who acknowledged (console user name, if given)")


Event = Annotated[
    Union[SeriesCompleted, SeriesReopened, FileQuarantined, ProtocolDeviation, LabelMismatch, SeriesClassified,
          TriageResult, ExamCompleted, AlertAcknowledged],
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(text: str) -> Event:
    return EVENT_ADAPTER.validate_json(text)


def event_json_schema() -> dict:
    return EVENT_ADAPTER.json_schema()
