"""Shadow mode: an image model learns a site before it may alert the technologist.

A model validated on simulated images (or on another site's scans) has not shown that it holds on
this site's scanner, protocol and patients. Until it has, its outputs (image labels, csPCa triage)
are recorded in events and metrics, where agreement with the header labels can be watched, but they
raise no technologist alert (scanside.agent.state.alerts reads each event's ``shadow`` flag).

A model version leaves shadow mode for a site when a validation is recorded for it:

* an operator accepts it: ``scanside models accept NAME[@VERSION] --by WHO`` (who, when, why);
* a site adaptation promotes it after beating the current version on the site's held-out exams
  (``method="adaptation_holdout"``, written by the adaptation job).

Validations are an append-only JSON-lines audit trail (``[shadow] validations_file``, default
``<state dir>/site_validations.jsonl``). A site can switch shadow mode off altogether
(``[shadow] enabled = false``).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, Field, ValidationError

log = logging.getLogger(__name__)

FILE_NAME = "site_validations.jsonl"


class SiteValidation(BaseModel):
    model: str = Field(description="model name")
    version: str
    method: Literal["operator", "adaptation_holdout"]
    by: str = Field(max_length=64, description="who accepted it (an operator's name or the adaptation job), not a patient's")
    at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    note: str = Field("", max_length=500)
    exams: Optional[int] = Field(None, description="site exams the validation rests on (hold-out size, or the operator's review)")

    @property
    def ref(self) -> str:
        return f"{self.model}/{self.version}"


def validations_path(config: Any) -> Path:
    return Path(config.shadow.validations_file or Path(config.state.dir) / FILE_NAME)


def record_validation(path: Path, validation: SiteValidation) -> SiteValidation:
    """Append one validation (fsynced: an acceptance must survive a power cut)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fp:
        fp.write(validation.model_dump_json() + "\n")
        fp.flush()
        os.fsync(fp.fileno())
    log.info("model %s validated for this site (%s)", validation.ref, validation.method)
    return validation


def load_validations(path: Path) -> List[SiteValidation]:
    """Every recorded validation; a damaged line is skipped (and logged), never fatal."""
    out: List[SiteValidation] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(SiteValidation.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as exc:
            log.warning("site validations line %d unreadable (%s): skipped", n, type(exc).__name__)
    return out


def _split_ref(ref: str) -> tuple[str, str]:
    for sep in ("/", "@"):
        if sep in ref:
            name, _, version = ref.partition(sep)
            return name, version
    return ref, ""


class ShadowPolicy:
    """Which model versions are still in shadow mode here (re-reads the validations file when it changes)."""

    def __init__(self, config: Any) -> None:
        self.enabled = bool(config.shadow.enabled)
        self.path = validations_path(config)
        self._lock = threading.Lock()
        self._stamp: Optional[tuple] = None
        self._validated: Dict[str, SiteValidation] = {}

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp: Optional[tuple] = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._validated = {v.ref: v for v in load_validations(self.path)} if stamp else {}
            self._stamp = stamp

    def validation(self, model_ref: str) -> Optional[SiteValidation]:
        name, version = _split_ref(model_ref)
        with self._lock:
            self._refresh()
            return self._validated.get(f"{name}/{version}")

    def shadow(self, model_ref: str) -> bool:
        """True while *model_ref* ("name/version") must not alert: shadow mode on and no validation recorded."""
        return self.enabled and self.validation(model_ref) is None


def learning_line(n_exams: int) -> str:
    """The console's and the readiness detail's words for shadow mode."""
    return f"image checks: learning this site ({n_exams} exam{'s' if n_exams != 1 else ''})"
