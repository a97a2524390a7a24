"""Protocol profiles: what an exam must contain and the parameter ranges each series must meet.

A profile is a TOML file validated by pydantic. Shipped: ``pirads-2.1-mpmri`` and
``pirads-2.1-bpmri`` (agent/protocol/profiles/*.toml). A site profile names a base with ``extends`` (a
shipped name or a path) and overrides it: tables merge key by key, any other value (arrays
included) replaces the base's, and ``enabled = false`` switches a requirement or a parameter group
off. `scanside profiles list|show|check FILE`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scanside.agent.schema.events import Severity
from scanside.agent.schema.taxonomy import OtherKind, Plane, SequenceLabel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROFILE_DIR = Path(__file__).with_name("profiles")
DEFAULT_PROFILE = "pirads-2.1-mpmri"


class ProfileError(Exception):
    pass


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Model):
    """Bounds on one measured value: ge/gt below, le/lt above (any may be left out)."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    @model_validator(mode="after")
    def _some_bound(self) -> "Range":
        if all(v is None for v in (self.ge, self.gt, self.le, self.lt)):
            raise ValueError("a range needs at least one of ge, gt, le, lt")
        lo = max((v for v in (self.ge, self.gt) if v is not None), default=None)
        hi = min((v for v in (self.le, self.lt) if v is not None), default=None)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"empty range: lower bound {lo} above upper bound {hi}")
        return self

    def contains(self, x: float) -> bool:
        """Inclusive bounds get a slack of 0.1% (at least 0.001): header values are rounded decimal
        strings and slice spacings come from rounded positions. Strict bounds are strict."""
        def eps(b: float) -> float:
            return max(1e-3, 1e-3 * abs(b))
        if self.ge is not None and x < self.ge - eps(self.ge):
            return False
        if self.gt is not None and x <= self.gt:
            return False
        if self.le is not None and x > self.le + eps(self.le):
            return False
        if self.lt is not None and x >= self.lt:
            return False
        return True

    def describe(self, unit: str = "") -> str:
        u = f" {unit}" if unit else ""
        lo = ("≥", self.ge) if self.ge is not None else ((">", self.gt) if self.gt is not None else None)
        hi = ("≤", self.le) if self.le is not None else (("<", self.lt) if self.lt is not None else None)
        if lo and hi:
            if lo[0] == "≥" and hi[0] == "≤":
                return f"{lo[1]:g}–{hi[1]:g}{u}"
            return f"{lo[0]} {lo[1]:g}{u} and {hi[0]} {hi[1]:g}{u}"
        op, v = lo or hi  # type: ignore[misc]  # a Range has at least one bound (_some_bound)
        return f"{op} {v:g}{u}"


class SeriesMatch(_Model):
    """Which series a requirement or a parameter group is about."""

    labels: list[SequenceLabel]
    other_kinds: list[OtherKind] = Field(default_factory=list, description="for label 'other': which kinds (DCE, T1, ...)")
    planes: list[Plane] = Field(default_factory=list, description="empty: any plane")

    def matches(self, label: str, other_kind: Optional[str], plane: Optional[str]) -> bool:
        if label not in self.labels:
            return False
        if label == "other" and self.other_kinds and other_kind not in self.other_kinds:
            return False
        return not self.planes or plane in self.planes


class Requirement(SeriesMatch):
    """A series the exam must contain (checked when the exam ends)."""

    enabled: bool = True
    what: str = Field(description="how a technologist calls it, e.g. 'axial T2W'")
    code: str = "SERIES_MISSING"
    severity: Severity = "critical"
    b_min: Optional[float] = Field(None, description="diffusion: only a b-value at least this counts (acquired or calculated)")
    action: str = Field("acquire it before the patient leaves", description="what the technologist should do when it is missing")


class ParameterGroup(SeriesMatch):
    """Parameter ranges for the series it matches, checked the moment each series completes."""

    enabled: bool = True
    what: str
    slice_thickness_mm: Optional[Range] = None
    slice_gap_mm: Optional[Range] = None
    fov_mm: Optional[Range] = Field(None, description="the larger in-plane extent (PI-RADS gives one FOV figure; rectangular FOVs are common)")
    in_plane_mm: Optional[Range] = Field(None, description="the coarser pixel spacing (the phase-encoding limit)")
    in_plane_fine_mm: Optional[Range] = Field(None, description="the finer reconstructed pixel spacing; unset in the shipped profiles (see acquired_frequency_mm)")
    acquired_phase_mm: Optional[Range] = Field(None, description="acquired resolution along the phase-encoding axis (field of view / phase steps); skipped when the header has no acquisition matrix")
    acquired_frequency_mm: Optional[Range] = Field(None, description="acquired resolution along the frequency-encoding axis (field of view / frequency steps); skipped when the header has no acquisition matrix")
    echo_time_ms: Optional[Range] = None
    repetition_time_ms: Optional[Range] = None
    field_strength_t: Optional[Range] = None
    temporal_resolution_s: Optional[Range] = None
    observation_s: Optional[Range] = None


class BValues(_Model):
    low: Range = Range(ge=0, le=100)
    intermediate: Range = Range(ge=800, le=1000)
    high: Range = Range(ge=1400)


class Geometry(_Model):
    """DWI/ADC must sit where the axial T2W is (PI-RADS: 'same locations')."""

    enabled: bool = True
    reference: SeriesMatch = SeriesMatch(labels=["T2WI_nan", "T2WI_fs"], planes=["axial"])
    checked: SeriesMatch = SeriesMatch(labels=["DWI_Low", "DWI_High", "ADC"])
    angle_tolerance_deg: float = Field(5.0, ge=0, description="between the slice normals")
    center_tolerance_mm: float = Field(5.0, ge=0, description="slab centres along the normal")
    in_plane_tolerance_mm: float = Field(10.0, ge=0, description="slab centres across the normal")
    edge_tolerance_mm: float = Field(10.0, ge=0, description="each end of the slab along the normal")
    edge_check: Literal["always", "without_gland"] = Field(
        "without_gland", description="always: slab ends beyond edge_tolerance_mm are DWI_T2_MISALIGNED; without_gland: "
        "only when no gland model runs -- with one, a shorter slab is judged by what it misses of the gland "
        "([coverage], GLAND_NOT_COVERED)")


class Coverage(_Model):
    """The gland (segmented on the axial T2W by the gland model, when one is in the store) must lie inside
    the slab of each checked series: GLAND_NOT_COVERED otherwise."""

    enabled: bool = True
    min_fraction: float = Field(0.95, ge=0, le=1, description="fraction of the gland's volume that must lie inside the slab")
    checked: SeriesMatch = SeriesMatch(labels=["DWI_Low", "DWI_High", "ADC"], planes=["axial"])
    severity: Severity = "critical"


class DescriptionCheck(_Model):
    enabled: bool = True
    severity: Severity = "warning"


class Profile(_Model):
    name: str
    title: str = ""
    authority: str = Field("", description="who the limits come from, as messages name it (default: the profile name)")
    reference: str = ""
    extends: Optional[str] = None
    required: dict[str, Requirement] = Field(default_factory=dict)
    parameters: dict[str, ParameterGroup] = Field(default_factory=dict)
    b_values: BValues = BValues()
    geometry: Geometry = Geometry()
    coverage: Coverage = Coverage()
    description_check: DescriptionCheck = DescriptionCheck()
    severity: dict[str, Severity] = Field(default_factory=dict, description="per-code severity overrides")
    disabled_codes: list[str] = Field(default_factory=list, description="codes never raised")

    @property
    def source(self) -> str:
        return self.authority or self.name

    def severity_of(self, code: str, default: Severity) -> Severity:
        return self.severity.get(code, default)


# ---------------------------------------------------------------------------- loading
def shipped() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.toml"))}


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fp:
            return tomllib.load(fp)
    except FileNotFoundError as exc:
        raise ProfileError(f"profile file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {path} is not valid TOML: {exc}") from exc


def _locate(ref: str, relative_to: Optional[Path] = None) -> Path:
    known = shipped()
    if ref in known:
        return known[ref]
    p = Path(ref)
    if not p.is_absolute() and relative_to is not None and (relative_to / p).exists():
        p = relative_to / p
    if p.suffix == ".toml" or p.exists():
        return p
    raise ProfileError(f"unknown profile {ref!r}: not a file, and not one of {', '.join(known)}")


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else in `over` replaces the base value."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _raw(ref: str, relative_to: Optional[Path] = None, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = _locate(ref, relative_to)
    key = str(path.resolve())
    if key in seen:
        raise ProfileError(f"profile {path} extends itself (through {' -> '.join(seen)})")
    data = _read(path)
    base = data.get("extends")
    if base:
        data = merge(_raw(str(base), path.parent, seen + (key,)), {k: v for k, v in data.items() if k != "extends"})
        data["extends"] = base
    return data


def _validate(data: dict[str, Any], where: str) -> Profile:
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ProfileError(f"invalid profile {where}:\n" + "\n".join(lines)) from exc


def load_profile(ref: str = DEFAULT_PROFILE, site: Optional[str | Path] = None) -> Profile:
    """The effective profile: `ref` (shipped name or path), overridden by the site profile if given.
    A site profile with its own `extends` names its base itself."""
    if site is None:
        return _validate(_raw(ref), ref)
    site_path = Path(site)
    site_data = _read(site_path)
    base_ref = str(site_data.get("extends") or ref)
    data = merge(_raw(base_ref, site_path.parent), {k: v for k, v in site_data.items() if k != "extends"})
    data["extends"] = base_ref
    return _validate(data, str(site_path))


# ---------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profiles", help="protocol profiles: list, show, check a site profile")
    sub = p.add_subparsers(metavar="ACTION")
    ls = sub.add_parser("list", help="the shipped profiles")
    ls.set_defaults(func=_cmd_list)
    show = sub.add_parser("show", help="print a profile as resolved (JSON)")
    show.add_argument("profile", nargs="?", default=DEFAULT_PROFILE, help="shipped name or path")
    show.add_argument("--site", type=Path, help="site profile overriding it")
    show.set_defaults(func=_cmd_show)
    check = sub.add_parser("check", help="validate a profile file (and what it extends); exit 2 if invalid")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_cmd_check)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    return p


def _cmd_list(args: argparse.Namespace) -> int:
    for name, path in shipped().items():
        prof = load_profile(name)
        print(f"{name:<22} {prof.title}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    try:
        prof = load_profile(args.profile, args.site)
    except ProfileError as exc:
        print(f"scanside: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(prof.model_dump(mode="json", exclude_none=True), indent=2, ensure_ascii=False))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        prof = load_profile(str(args.file))
    except ProfileError as exc:
        print(f"scanside: {exc}", file=sys.stderr)
        return 2
    req = [k for k, r in prof.required.items() if r.enabled]
    par = [k for k, g in prof.parameters.items() if g.enabled]
    print(f"{args.file}: valid profile {prof.name!r}"
          f"{' (extends ' + prof.extends + ')' if prof.extends else ''}; requires {', '.join(req) or 'nothing'}; "
          f"parameter groups {', '.join(par) or 'none'}")
    return 0
