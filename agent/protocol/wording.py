"""Words a technologist reads: display names for the sequence labels, and on-screen text without
DICOM tag numbers. Events, JSON and metrics keep the codes (T2WI_nan, DWI_High, ...); the console,
the terminal and the SR's sentences use these.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

DISPLAY_NAMES: dict[str, str] = {
    "T2WI_nan": "T2W",
    "T2WI_fs": "T2W fat-sat",
    "DWI_Low": "DWI low b",
    "DWI_High": "DWI high b",
    "ADC": "ADC",
    "other": "other",
    "uncertain": "uncertain (image model unsure)",
}
OTHER_KINDS = {"DCE": "DCE", "localizer": "localizer", "T1": "T1W", "unknown": "other"}

# "(0018,9087) ", "GE (0043,1039) ", "(0029,1010)": the tag itself is for engineers (it stays in the JSON)
_TAG = re.compile(r"\s*\(\s*[0-9A-Fa-f]{4}\s*,\s*[0-9A-Fa-f]{4}\s*\)")


def display_name(label: str, b_values: Iterable[float] = (), other_kind: Optional[str] = None) -> str:
    """'T2W', 'T2W fat-sat', 'DWI b1400', 'DWI low b', 'ADC', 'DCE' ... for a label code."""
    b = [float(x) for x in b_values or ()]
    if label in ("DWI_Low", "DWI_High") and b:
        return f"DWI b{max(b):g}"
    if label == "other" and other_kind:
        return OTHER_KINDS.get(other_kind, "other")
    return DISPLAY_NAMES.get(label, label)


def plain(text: str) -> str:
    """On-screen text: DICOM tag numbers taken out, whitespace tidied."""
    return re.sub(r"\s{2,}", " ", _TAG.sub("", text or "")).strip()
