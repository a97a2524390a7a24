"""What the technologist is alerted to: one view of every alert-worthy event (protocol deviations,
label mismatches, triage results, quarantined files) with a stable id, a code, a severity and a
one-line action. Shared by the API, the console and the metrics so that they count the same things.

No patient identifiers: the messages come from events, which carry none. Image-model events in
shadow mode (scanside.agent.analysis.shadow) and NOT_ASSESSED triage results raise no alert.
"""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, Field

from scanside.agent.schema.events import Event

Severity = Literal["info", "warning", "critical"]

_CODE_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,47}$")
_REASON_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class Alert(BaseModel):
    alert_id: str
    code: str = Field(description="stable machine code (bounded set; used as a metrics label)")
    severity: Severity
    message: str = Field(description="what happened, one line")
    action: str = Field(description="what the technologist can do now, one line")
    study_uid: Optional[str] = None
    series_id: Optional[str] = None
    series_number: Optional[int] = None
    label: Optional[str] = None
    measured: Optional[str] = Field(None, description="protocol deviations: what was found, with units")
    required: Optional[str] = Field(None, description="protocol deviations: what the profile requires")
    seq: Optional[int] = None
    time: str = ""
    acknowledged: bool = False
    acknowledged_by: Optional[str] = None
    acknowledged_at: Optional[str] = None


def bounded_code(code: str) -> str:
    """Codes become metrics labels: anything that is not a short upper-case code is 'OTHER'."""
    return code if _CODE_RE.match(code or "") else "OTHER"


def bounded_reason(reason: str) -> str:
    return reason if _REASON_RE.match(reason or "") else "other"


QUARANTINE_ACTIONS = {
    "truncated": "Resend the series from the scanner: one file arrived incomplete.",
    "not_dicom": "Check the scanner's export settings: a file that is not DICOM arrived.",
    "missing_uid": "Resend the series from the scanner: a file lacks its identifiers.",
    "unreadable": "Resend the series from the scanner: a file could not be read.",
    "oversized": "Check the scanner export: a file is far larger than an image can be.",
}


def alert_from_event(ev: Event) -> Optional[Alert]:
    """The alert an event raises, or None."""
    common = dict(study_uid=ev.study_uid, seq=ev.seq, time=ev.time)
    if getattr(ev, "shadow", False):
        return None  # shadow mode: an image model not yet validated for this site is recorded, never alerts
    if ev.type == "protocol_deviation":
        return Alert(alert_id=ev.alert_id, code=bounded_code(ev.code), severity=ev.severity, message=ev.message,
                     action=_deviation_action(ev.measured, ev.required), series_id=ev.series_id,
                     series_number=ev.series_number, label=ev.label, measured=ev.measured, required=ev.required,
                     **common)
    if ev.type == "label_mismatch":
        return Alert(alert_id=ev.alert_id, code="LABEL_MISMATCH", severity=ev.severity, message=ev.message,
                     action="Check the series description and the sequence actually run.",
                     series_id=ev.series_id, series_number=ev.series_number, label=ev.header_label, **common)
    if ev.type == "triage_result":
        if ev.recommendation == "NOT_ASSESSED":
            return None  # the model cannot back an answer here: nothing to act on (the exam view says why)
        advised = ev.recommendation == "DCE_ADVISED"
        return Alert(alert_id=ev.alert_id, code=f"TRIAGE_{ev.recommendation}", severity="warning" if advised else "info",
                     message=f"csPCa decision support: probability {ev.probability:.2f}, {len(ev.findings)} finding(s).",
                     action=("Contrast (DCE) advised: continue with the DCE series." if advised
                             else "Biparametric exam looks sufficient: DCE may be skipped per site protocol."),
                     **common)
    if ev.type == "file_quarantined":
        reason = bounded_reason(ev.reason)
        return Alert(alert_id=f"quarantine-{ev.file_ref}", code="FILE_QUARANTINED", severity="warning",
                     message=f"A file from the scanner could not be used ({reason}); it was quarantined as {ev.file_ref}.",
                     action=QUARANTINE_ACTIONS.get(reason, "Resend the series from the scanner."), **common)
    return None


def _deviation_action(measured: Optional[str], required: Optional[str]) -> str:
    if required and (not measured or measured.startswith("none")):
        return f"Acquire the {required} before the patient leaves."
    if measured and required:
        return f"Measured {measured}; the protocol needs {required}: repeat or adjust the series."
    return "Check the series against the protocol."
