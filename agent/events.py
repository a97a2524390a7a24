"""Typed events: the one stream every output (stdout, JSONL log, webhook, console, DICOM SR) is built from.

The schema is published (`scanside schema events`) for vendors to build against. Compatibility rule:
fields are only ever added; a field's meaning never changes within a schema major version.
Events carry no patient name, ID, birth date or accession number.
"""
from __future__ import annotations

import datetime as _dt
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, Field, TypeAdapter

from agent.taxonomy import OtherKind, Plane, SequenceLabel

SCHEMA_VERSION = "1.0"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class EventBase(BaseModel):
    schema_version: str = SCHEMA_VERSION
    key: str = Field(description="idempotency key: the same fact always has the same key; consumers de-duplicate on it")
    seq: Optional[int] = Field(None, description="position in the agent's event log, assigned when stored")
    time: str = Field(default_factory=utc_now, description="UTC ISO 8601")
    study_uid: Optional[str] = None


class SeriesSummary(BaseModel):
    """One logical series: an acquisition, or one b-value / derived part of a multi-b diffusion series."""

    series_id: str = Field(description="series_uid, or series_uid#part for a split diffusion series (#b1400, #adc)")
    study_uid: str
    series_uid: str
    part: str = ""
    series_number: Optional[int] = None
    series_description: str = ""
    vendor: str = "other"
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


Event = Annotated[Union[SeriesCompleted, SeriesReopened, FileQuarantined], Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(text: str) -> Event:
    return EVENT_ADAPTER.validate_json(text)


def event_json_schema() -> dict:
    return EVENT_ADAPTER.json_schema()
