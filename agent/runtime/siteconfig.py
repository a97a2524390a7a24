"""The example site configuration (`scanside config init`, `examples/site.toml`), generated from the
pydantic models in scanside.agent.runtime.config so that it cannot drift from them, and the check of SCANSIDE_*
environment names against the same models.

Every key of every section is written, commented out, with its meaning, its default (or an example
value where the default is unset) and its environment variable name. Uncommenting a line sets it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr

ENV_PREFIX = "SCANSIDE_"
NESTED = "__"

# example values for keys whose default is unset (TOML has no null); a key missing here is written
# without a value, which tests/agent/test_siteconfig.py refuses
EXAMPLES: dict[str, Any] = {
    "retention.exams.max_age_days": 730,
    "watch.folder": "/srv/scanner-export",
    "ingest.quarantine_dir": "/var/lib/scanside/quarantine",
    "output.jsonl": "/var/lib/scanside/events.jsonl",
    "cstore.folder": "/var/lib/scanside/received",
    "api.enabled": True,
    "api.token": "change-me-to-a-long-random-string",
    "api.token_file": "/etc/scanside/api.token",
    "webhook.url": "https://ris.example.org/scanside/events",
    "webhook.secret": "whsec_change-me",
    "dicom_output.folder": "/var/lib/scanside/dicom-out",
    "dicom_output.institution_name": "Example Hospital",
    "dicom_output.send.host": "pacs.example.org",
    "protocol.site_profile": "/etc/scanside/site-profile.toml",
    "engines.int8_tolerance": 0.02,
    "engines.user_models_dir": "/var/lib/scanside/models",
    "engines.cache_dir": "/var/cache/scanside",
    "gland.variant": "int8_u8s8",
    "analysis.dce_advised_threshold": 0.3,
    "adapt.user_dir": "/var/lib/scanside/models",
    "shadow.validations_file": "/var/lib/scanside/site_validations.jsonl",
}

# one line above each section
SECTION_NOTES: dict[str, str] = {
    "watch": "The scanner's export folder: the agent only reads it.",
    "ingest": "Files that are not readable yet: retried, then quarantined with a reason (nothing is deleted).",
    "series": "When a series counts as complete.",
    "state": "SQLite state, quarantine, event log, received objects (systemd: StateDirectory=).",
    "output": "Event outputs on this host.",
    "privacy": "Export folder names often hold patient names: paths stay out of events and logs unless set.",
    "protocol": "The PI-RADS v2.1 protocol check (`scanside profiles show|check`).",
    "api": "HTTP API, /metrics and the technologist console.",
    "readiness": "What /readyz requires.",
    "cstore": "DICOM C-STORE receiver (SCP): the scanner pushes images to the agent.",
    "webhook": "POST every event to an HTTP endpoint, at least once, from a persistent outbox.",
    "dicom_output": "Per exam a TID 1500 SR and a lesion-likelihood SEG, written to a folder.",
    "dicom_output.send": "... and sent by C-STORE to a PACS or console (uncomment the table header too).",
    "engines": "Inference back ends and the INT8 parity gate.",
    "gland": "Prostate gland segmentation (zones, volume, slab coverage).",
    "analysis": "The image models: sequence classifier and csPCa triage.",
    "adapt": "Scheduled site adaptation of the sequence classifier (off by default).",
    "shadow": "Shadow mode: image models not yet validated here record their outputs but raise no alert.",
    "retention": "What the agent keeps, by age and size; nothing undelivered is deleted.",
}

HEADER = """\
# scanside site configuration (written by `scanside config init`; the same text is examples/site.toml).
#
# Every key is listed with its meaning and default, commented out: uncomment a line to set it.
# Check a file with `scanside config check --config FILE`; an unknown key or a wrong value is refused
# with the key named.
#
# Precedence, highest first: command-line flags (--watch, --state-dir, --api-host, --api-port, --no-api),
# then environment variables, then this file, then the defaults.
# Environment names: SCANSIDE_<SECTION>__<KEY> (two underscores between levels), e.g.
#   SCANSIDE_WATCH__FOLDER=/srv/scanner-export  SCANSIDE_DICOM_OUTPUT__SEND__HOST=pacs.example.org
# Lists and tables take JSON: SCANSIDE_CSTORE__ALLOWED_CALLING_AES='["MR1"]'. An unknown SCANSIDE_
# name with a section in it (a misspelled section or key) is refused like an unknown key here.
"""


def _unwrap(annotation: Any) -> Any:
    """Optional[X] -> X."""
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _submodel(annotation: Any) -> Optional[type[BaseModel]]:
    inner = _unwrap(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def toml_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)  # a JSON string or number is a TOML one


def _env_name(dotted: str) -> str:
    return ENV_PREFIX + dotted.upper().replace(".", NESTED)


Table = tuple[str, type[BaseModel], Optional[BaseModel]]  # dotted name, model, its default as the parent sets it


def _section_lines(model: type[BaseModel], dotted: str, defaults: Optional[BaseModel] = None) -> tuple[list[str], list[Table]]:
    """The lines of one table; *defaults* is the table's default as its parent builds it (a parent's
    default_factory can set other values than the table's own field defaults: [retention.received])."""
    lines: list[str] = []
    tables: list[Table] = []
    for key, field in model.model_fields.items():
        path = f"{dotted}.{key}"
        sub = _submodel(field.annotation)
        own = None if field.is_required() else field.get_default(call_default_factory=True)
        default = getattr(defaults, key) if defaults is not None else own
        if sub is not None:
            tables.append((path, sub, default if isinstance(default, BaseModel) else None))
            continue
        if field.description:
            lines.append(f"# {field.description}")
        if default is None and path not in EXAMPLES:  # a new key without an example: the test names it
            lines.append(f"# {key} =    # unset by default; {_env_name(path)}")
            continue
        if default is None:
            value, note = EXAMPLES[path], "required; example" if field.is_required() else "unset by default; example"
        else:
            value, note = default, "default"
        lines.append(f"# {key} = {toml_value(value)}    # {note}; {_env_name(path)}")
    return lines, tables


def example_site_toml() -> str:
    """The commented example configuration: every section and key of scanside.agent.runtime.config.AgentConfig."""
    from scanside.agent.runtime.config import AgentConfig

    out = [HEADER]
    pending: list[Table] = [(name, _submodel(f.annotation), None) for name, f in AgentConfig.model_fields.items()]  # type: ignore[misc]
    while pending:
        dotted, model, defaults = pending.pop(0)
        lines, tables = _section_lines(model, dotted, defaults)
        out.append(f"# {SECTION_NOTES.get(dotted, dotted)}")
        required = any(f.is_required() for f in model.model_fields.values())
        # a table whose keys are required (dicom_output.send) would be enabled by its bare header
        out.append(f"# [{dotted}]" if required else f"[{dotted}]")
        out.extend(lines)
        out.append("")
        pending[0:0] = tables
    return "\n".join(out).rstrip() + "\n"


def unknown_env_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """SCANSIDE_* names that look like configuration (a nested name, or a section and a key joined by
    one underscore) but name no key. Other SCANSIDE_* names (the model store's, the tools') pass."""
    from scanside.agent.runtime.config import AgentConfig

    bad = []
    sections = {name.upper() for name in AgentConfig.model_fields}
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        rest = upper[len(ENV_PREFIX):]
        if NESTED not in rest:
            # a section as a whole (JSON) is fine; SECTION_KEY (one underscore) is a typo; anything else
            # (SCANSIDE_MODELS_DIR, SCANSIDE_CACHE_DIR, ...) belongs to the tools, not to the configuration
            if rest not in sections and any(rest.startswith(s + "_") for s in sections):
                bad.append(name)
            continue
        model: Any = AgentConfig
        for part in rest.split(NESTED):
            fields = {k.upper(): f for k, f in model.model_fields.items()} if model is not None else {}
            if part not in fields:
                bad.append(name)
                break
            model = _submodel(fields[part].annotation)
    return sorted(bad)


def suggestion(name: str) -> str:
    """`did you mean` for an unknown name: the closest configuration variable."""
    import difflib

    from scanside.agent.runtime.config import AgentConfig

    known = []
    pending: list[tuple[str, type[BaseModel]]] = [(n, _submodel(f.annotation)) for n, f in AgentConfig.model_fields.items()]  # type: ignore[misc]
    while pending:
        dotted, model = pending.pop()
        for key, field in model.model_fields.items():
            sub = _submodel(field.annotation)
            if sub is not None:
                pending.append((f"{dotted}.{key}", sub))
            known.append(_env_name(f"{dotted}.{key}"))
    close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
