"""Scan-time protocol checks against a profile (scanside.agent.protocol.profiles): each series the moment it completes,
the exam for missing series when it ends (scanside.agent.state.exam).

Every deviation is a ProtocolDeviation event with a stable code, a severity, the measured and the
required value, the series, and one sentence a technologist at the console can act on. Keys are
deterministic (the same fact always has the same key), so a restart or a re-check never repeats an
alert: per series ``deviation:<study>:<code>:<series_id>:r<revision>``, per exam
``deviation:<study>:<code>:<requirement>:e<round>``.

Codes: SERIES_MISSING, T2_ORTHOGONAL_MISSING, SERIES_INCOMPLETE, DWI_HIGH_B_TOO_LOW,
DWI_LOW_B_OUT_OF_RANGE, DWI_INTERMEDIATE_B_OUT_OF_RANGE, SLICE_TOO_THICK, SLICE_TOO_THIN, SLICE_GAP,
FOV_OUT_OF_RANGE, IN_PLANE_RESOLUTION, TE_OUT_OF_RANGE, TR_OUT_OF_RANGE, FIELD_STRENGTH_OUT_OF_RANGE,
DCE_TEMPORAL_RESOLUTION, DCE_OBSERVATION_TOO_SHORT, DWI_T2_MISALIGNED, DESCRIPTION_MISMATCH, GLAND_NOT_COVERED
(raised by scanside.agent.analysis.analysis, where the gland model runs: ``coverage_deviation``).

Transfer problems are not protocol deviations: a file that could not be read is reported once, as
FileQuarantined. So a series short of its count because of a quarantined file, or a required series
whose only files were quarantined, raises no deviation of its own.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

from scanside.agent.schema.events import EventBase, ProtocolDeviation, SeriesCompleted, SeriesSummary, Severity
from scanside.agent.protocol.profiles import ParameterGroup, Profile, Range, Requirement

if TYPE_CHECKING:  # the daemon passes its settings; the protocol layer does not import them
    from scanside.agent.runtime.config import AgentConfig
    from scanside.agent.dicom.header import InstanceHeader
    from scanside.agent.state.database import StateStore  # the checker is handed the daemon's store

log = logging.getLogger(__name__)

DEFAULT_SEVERITY: dict[str, Severity] = {
    "SERIES_INCOMPLETE": "critical",
    "DWI_HIGH_B_TOO_LOW": "critical",
    "DWI_T2_MISALIGNED": "warning",
    "DESCRIPTION_MISMATCH": "warning",
}

# parameter -> (unit, code when above the range, code when below)
PARAMETERS: dict[str, tuple[str, str, str]] = {
    "slice_thickness_mm": ("mm", "SLICE_TOO_THICK", "SLICE_TOO_THIN"),
    "slice_gap_mm": ("mm", "SLICE_GAP", "SLICE_GAP"),
    "fov_mm": ("mm", "FOV_OUT_OF_RANGE", "FOV_OUT_OF_RANGE"),
    "in_plane_mm": ("mm", "IN_PLANE_RESOLUTION", "IN_PLANE_RESOLUTION"),
    "in_plane_fine_mm": ("mm", "IN_PLANE_RESOLUTION", "IN_PLANE_RESOLUTION"),
    "acquired_phase_mm": ("mm", "IN_PLANE_RESOLUTION", "IN_PLANE_RESOLUTION"),
    "acquired_frequency_mm": ("mm", "IN_PLANE_RESOLUTION", "IN_PLANE_RESOLUTION"),
    "echo_time_ms": ("ms", "TE_OUT_OF_RANGE", "TE_OUT_OF_RANGE"),
    "repetition_time_ms": ("ms", "TR_OUT_OF_RANGE", "TR_OUT_OF_RANGE"),
    "field_strength_t": ("T", "FIELD_STRENGTH_OUT_OF_RANGE", "FIELD_STRENGTH_OUT_OF_RANGE"),
    "temporal_resolution_s": ("s", "DCE_TEMPORAL_RESOLUTION", "DCE_TEMPORAL_RESOLUTION"),
    "observation_s": ("s", "DCE_OBSERVATION_TOO_SHORT", "DCE_OBSERVATION_TOO_SHORT"),
}

# what the technologist should do, per code (the sentence's second half)
ACTIONS: dict[str, str] = {
    "SLICE_TOO_THICK": "repeat it with thinner slices before the patient leaves",
    "SLICE_TOO_THIN": "check the slice thickness in the protocol",
    "SLICE_GAP": "repeat it with contiguous slices (no gap) before the patient leaves",
    "FOV_OUT_OF_RANGE": "repeat it with the field of view in range before the patient leaves",
    "IN_PLANE_RESOLUTION": "repeat it with a finer matrix or a smaller field of view",
    "TE_OUT_OF_RANGE": "check the echo time in the protocol",
    "TR_OUT_OF_RANGE": "check the repetition time in the protocol",
    "FIELD_STRENGTH_OUT_OF_RANGE": "this scanner's field strength is outside the profile",
    "DCE_TEMPORAL_RESOLUTION": "shorten the time per phase for the next DCE",
    "DCE_OBSERVATION_TOO_SHORT": "acquire more phases next time",
}

DWI_LABELS = ("DWI_Low", "DWI_High")
T2_LABELS = ("T2WI_nan", "T2WI_fs")


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.4g}"


def _who(s: SeriesSummary, what: str) -> str:
    return f"{what} (series {s.series_number})" if s.series_number is not None else what


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def max_b(s: SeriesSummary) -> Optional[float]:
    return max(s.b_values) if s.b_values else None


# ---------------------------------------------------------------------------- descriptions
_DESC_ADC = re.compile(r"(^|[^a-z])adc([^a-z]|$)|apparent diffusion|\beadc\b", re.I)
_DESC_DWI = re.compile(r"diff|dwi|(^|[^a-z])dw([^a-z]|$)|ep2d|resolve|zoomit|trace|calc_?bval", re.I)
_DESC_DCE = re.compile(r"dce|dyn|dynamic|perf|vibe|lava|thrive|twist|disco|(^|[^a-z0-9])t1([^0-9]|$)", re.I)
_DESC_T2 = re.compile(r"(^|[^a-z0-9])t2([^0-9*]|$)", re.I)


def description_family(description: str) -> Optional[str]:
    """The sequence a series description names: ADC, DWI, T1 (incl. DCE), T2; None when it names none."""
    if _DESC_ADC.search(description):
        return "ADC"
    if _DESC_DWI.search(description):
        return "DWI"
    if _DESC_DCE.search(description):
        return "T1"
    if _DESC_T2.search(description):
        return "T2"
    return None


def header_family(s: SeriesSummary) -> Optional[str]:
    if s.label in T2_LABELS:
        return "T2"
    if s.label in DWI_LABELS:
        return "DWI"
    if s.label == "ADC":
        return "ADC"
    if s.label == "other" and s.other_kind in ("DCE", "T1"):
        return "T1"
    return None  # localizers and unknowns: the header rules themselves lean on the description


COMPATIBLE = {"T2": {"T2"}, "DWI": {"DWI", "ADC"}, "ADC": {"ADC"}, "T1": {"T1"}}


# ---------------------------------------------------------------------------- quarantine
# quarantined for these, a file has no header worth a parse: none at all, or one that cost too much once
_NO_HEADER_REASONS = ("oversized", "too_complex", "not_dicom", "permission_denied", "unreadable")
_MAX_HEADER_FILE_BYTES = 600 * 1024**2  # the largest image file ingest opens (scanside.agent.intake.ingest.Ingestor.max_file_bytes)


def _header_worth_reading(reason: str, st: os.stat_result) -> bool:
    """Runs inside the exam-end transaction: a 1 GiB sparse file or a FIFO must not hold the database."""
    import stat as stat_

    return stat_.S_ISREG(st.st_mode) and st.st_size <= _MAX_HEADER_FILE_BYTES and not reason.startswith(_NO_HEADER_REASONS)



QUARANTINE_LOOKBACK_S = 86400.0  # an exam's files refused before its first image was recorded (all of a series' first files bad)


class QuarantineIndex:
    """Which exam and series the quarantined files belonged to (their headers are usually intact:
    a truncated file loses pixels, not its header). Cached by path, size and mtime."""

    def __init__(self, store: StateStore, quarantine_dir: Optional[Path]):
        self.store = store
        self.quarantine_dir = quarantine_dir
        self._cache: dict[tuple[str, float, int], Optional[InstanceHeader]] = {}

    def headers(self, study_uid: str) -> list[InstanceHeader]:
        from scanside.agent.dicom.header import header_from_dataset, read_bounded_dataset

        out = []
        # only files quarantined since shortly before the exam's first image: a file of this exam
        # cannot have been refused earlier, and the quarantine of past years is not read per exam
        first_seen = self.store.exam_first_seen(study_uid)
        since = first_seen - QUARANTINE_LOOKBACK_S if first_seen is not None else None
        for row in self.store.quarantined(since):
            path = row["path"]
            for candidate in self._candidates(path):
                try:
                    st = os.stat(candidate)
                except OSError:
                    continue
                key = (candidate, st.st_mtime, st.st_size)
                if key not in self._cache:
                    self._cache[key] = None  # unreadable header, or nothing worth reading: nothing to attribute
                    if _header_worth_reading(row["reason"] or "", st):
                        try:
                            self._cache[key] = header_from_dataset(read_bounded_dataset(candidate, st.st_size), path)
                        except Exception:
                            pass
                h = self._cache[key]
                if h is not None and h.study_uid == study_uid:
                    out.append(h)
                break
        return out

    def _candidates(self, path: str) -> list[str]:
        out = [path]
        if self.quarantine_dir is not None:
            ref = hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()[:12]  # scanside.agent.intake.pipeline.file_ref
            out.append(str(self.quarantine_dir / f"{ref}.dcm"))
        return out

    def images_in_series(self, study_uid: str, series_uid: str) -> int:
        return sum(h.n_images for h in self.headers(study_uid) if h.series_uid == series_uid)

    def summaries(self, study_uid: str) -> list[SeriesSummary]:
        from scanside.agent.dicom.series import split_parts, summarise

        by_series: dict[str, list] = {}
        for h in self.headers(study_uid):
            by_series.setdefault(h.series_uid, []).append(h)
        out = []
        for headers in by_series.values():
            for part in split_parts(headers):
                try:
                    out.append(summarise(part, 0, False, None))
                except Exception:
                    continue
        return out


# ---------------------------------------------------------------------------- checker
class ProtocolChecker:
    """Call `after(events)` with the events just recorded (inside the same store transaction);
    `exam_end(study_uid, round)` when the exam ends. Both return the deviations to record."""

    def __init__(self, profile: Profile, store: StateStore, quarantine_dir: Optional[Path] = None,
                 gland_coverage: bool = False):
        self.profile = profile
        self.store = store
        self.quarantine = QuarantineIndex(store, quarantine_dir)
        # a gland model runs (scanside.agent.analysis.analysis): slab ends are judged by GLAND_NOT_COVERED instead
        # (profile.geometry.edge_check = "without_gland")
        self.gland_coverage = bool(gland_coverage)

    # ------------------------------------------------------------------ exam state
    def exam_series(self, study_uid: str) -> list[SeriesSummary]:
        """The latest revision of every series part of the exam, in completion order (the exam read model)."""
        return self.store.read_model.latest_series(study_uid, order="last_completed")

    def deviations(self, study_uid: str) -> list[ProtocolDeviation]:
        return [e for e in self.store.read_model.findings(study_uid, ("protocol_deviation",)) if isinstance(e, ProtocolDeviation)]

    # ------------------------------------------------------------------ events
    def _deviation(self, code: str, default: Severity, s: Optional[SeriesSummary], study_uid: str, message: str,
                   measured: Optional[str] = None, required: Optional[str] = None,
                   subject: Optional[str] = None) -> Optional[ProtocolDeviation]:
        if code in self.profile.disabled_codes:
            return None
        if s is not None:
            key = f"deviation:{study_uid}:{code}:{s.series_id}:r{s.revision}"
        else:
            key = f"deviation:{study_uid}:{code}:{subject}"
        return ProtocolDeviation(
            key=key, study_uid=study_uid, alert_id="pd-" + hashlib.sha1(key.encode()).hexdigest()[:16], code=code,
            severity=self.profile.severity_of(code, default), series_id=s.series_id if s else None,
            series_number=s.series_number if s else None, label=s.label if s else None, measured=measured,
            required=required, message=message, profile=self.profile.name,
        )

    # ------------------------------------------------------------------ per series
    def after(self, events: Iterable[EventBase]) -> list[ProtocolDeviation]:
        """Check the series these events completed, grouped per acquisition (all parts of one series
        UID complete together)."""
        groups: dict[tuple[str, str, int], list[SeriesSummary]] = {}
        for ev in events:
            if isinstance(ev, SeriesCompleted):
                s = ev.series
                groups.setdefault((s.study_uid, s.series_uid, s.revision), []).append(s)
        out: list[ProtocolDeviation] = []
        for (study_uid, _uid, _rev), parts in groups.items():
            out += self.check_acquisition(study_uid, parts)
        return [d for d in out if d is not None]

    def check_acquisition(self, study_uid: str, parts: Sequence[SeriesSummary]) -> list[ProtocolDeviation]:
        found: list[Optional[ProtocolDeviation]] = []
        found.append(self._incomplete(study_uid, parts))
        found.append(self._description(study_uid, parts))
        for group in self.profile.parameters.values():
            if group.enabled:
                found += self._parameters(study_uid, parts, group)
        found += self._b_values(study_uid, parts)
        found += self._geometry(study_uid, parts)
        return [d for d in found if d is not None]

    def _incomplete(self, study_uid: str, parts: Sequence[SeriesSummary]) -> Optional[ProtocolDeviation]:
        s = parts[0]
        if s.complete or not s.expected_images:
            return None
        received = sum(p.n_images for p in parts)
        expected = s.expected_images
        if received >= expected:
            return None
        lost = self.quarantine.images_in_series(study_uid, s.series_uid)
        if lost and received + lost >= expected:
            return None  # the shortfall is the quarantined file(s): reported as FileQuarantined
        return self._deviation(
            "SERIES_INCOMPLETE", "critical", s, study_uid,
            f"Series {s.series_number} arrived with {received} of {expected} images: "
            "re-send it from the scanner (or repeat it) before the patient leaves.",
            measured=f"{received} images", required=f"{expected} images")

    def _description(self, study_uid: str, parts: Sequence[SeriesSummary]) -> Optional[ProtocolDeviation]:
        if not self.profile.description_check.enabled:
            return None
        for s in parts:
            named, actual = description_family(s.series_description), header_family(s)
            if named is None or actual is None or actual in COMPATIBLE[named]:
                continue
            names = {"T2": "a T2W series", "DWI": "diffusion", "ADC": "an ADC map", "T1": "a T1/DCE series"}
            return self._deviation(
                "DESCRIPTION_MISMATCH", self.profile.description_check.severity, s, study_uid,
                f"Series {s.series_number} is described as {names[named]} but its header says {names[actual]} "
                f"({s.label}): check the protocol names on the scanner before the images go to PACS.",
                measured=f"description names {named}; header {s.label}", required=f"description naming {actual}")
        return None

    def _parameters(self, study_uid: str, parts: Sequence[SeriesSummary], group: ParameterGroup) -> list[Optional[ProtocolDeviation]]:
        s = next((p for p in parts if group.matches(p.label, p.other_kind, p.plane)), None)
        if s is None:
            return []
        values = measured_values(s)
        out: list[Optional[ProtocolDeviation]] = []
        fov_bad = in_plane_told = False
        for name, (unit, above, below) in PARAMETERS.items():
            rng: Optional[Range] = getattr(group, name)
            x = values.get(name)
            if rng is None or x is None or rng.contains(x):
                continue
            high = (rng.le is not None and x > rng.le) or (rng.lt is not None and x >= rng.lt)
            code = above if high else below
            if name == "fov_mm":
                fov_bad = True
            if code == "IN_PLANE_RESOLUTION" and (fov_bad or in_plane_told):
                continue  # the field of view is the cause, or already said: one alert per series
            in_plane_told = in_plane_told or code == "IN_PLANE_RESOLUTION"
            req = "no gap" if name == "slice_gap_mm" and rng.le == 0 and rng.ge is None and rng.gt is None else rng.describe(unit)
            what = _who(s, group.what)
            if name == "slice_gap_mm":
                text = f"{_cap(what)} has a {_fmt(x)} mm gap between slices; {self.profile.source} needs {req}"
            elif name == "fov_mm":
                text = f"{_cap(what)} has a {_fmt(x)} mm field of view; {self.profile.source} needs {req}"
            else:
                label = name.rsplit("_", 1)[0].replace("_", " ").replace("echo time", "TE").replace("repetition time", "TR")
                label = {"in plane": "in-plane pixel size", "in plane fine": "finer in-plane pixel size",
                         "acquired phase": "acquired resolution along phase",
                         "acquired frequency": "acquired resolution along frequency",
                         "observation": "observation time"}.get(label, label)
                text = f"{_cap(what)} {label} is {_fmt(x)} {unit}; {self.profile.source} needs {req}"
            action = ACTIONS[code]
            out.append(self._deviation(code, "warning", s, study_uid, f"{text}: {action}.",
                                       measured=f"{_fmt(x)} {unit}", required=req))
        return out

    # ------------------------------------------------------------------ b-values
    def _b_values(self, study_uid: str, parts: Sequence[SeriesSummary]) -> list[Optional[ProtocolDeviation]]:
        bv = self.profile.b_values
        dwi = [p for p in parts if p.label in DWI_LABELS and p.b_values]
        if not dwi:
            return []
        out: list[Optional[ProtocolDeviation]] = []
        lows = [p for p in dwi if p.label == "DWI_Low"]
        if lows:
            low = min(lows, key=lambda p: max_b(p) or 0.0)
            b = max_b(low) or 0.0
            if not bv.low.contains(b):
                out.append(self._deviation(
                    "DWI_LOW_B_OUT_OF_RANGE", "warning", low, study_uid,
                    f"Low b-value of {_who(low, 'DWI')} is {b:g} s/mm²; the profile needs {bv.low.describe('s/mm²')}: "
                    "use a low b in range for the next DWI.", measured=f"b={b:g} s/mm²", required=bv.low.describe("s/mm²")))
        highs = sorted((p for p in dwi if p.label == "DWI_High"), key=lambda p: max_b(p) or 0.0)
        calc = [p for p in highs if p.calculated]
        top: Optional[SeriesSummary] = None
        if calc:
            top = calc[-1]
        elif len(highs) >= 2:
            top = highs[-1]
            mid = highs[0]
            b = max_b(mid) or 0.0
            if not bv.intermediate.contains(b):
                out.append(self._deviation(
                    "DWI_INTERMEDIATE_B_OUT_OF_RANGE", "warning", mid, study_uid,
                    f"Intermediate b-value of {_who(mid, 'DWI')} is {b:g} s/mm²; the profile needs "
                    f"{bv.intermediate.describe('s/mm²')} for the ADC map: adjust it for the next DWI.",
                    measured=f"b={b:g} s/mm²", required=bv.intermediate.describe("s/mm²")))
        elif len(highs) == 1:
            b = max_b(highs[0]) or 0.0
            lo = bv.intermediate.ge if bv.intermediate.ge is not None else bv.intermediate.gt
            if lo is not None and b < lo:
                out.append(self._deviation(
                    "DWI_INTERMEDIATE_B_OUT_OF_RANGE", "warning", highs[0], study_uid,
                    f"Intermediate b-value of {_who(highs[0], 'DWI')} is {b:g} s/mm²; the profile needs "
                    f"{bv.intermediate.describe('s/mm²')} for the ADC map: adjust it for the next DWI.",
                    measured=f"b={b:g} s/mm²", required=bv.intermediate.describe("s/mm²")))
            # one b >= 500 alone: the intermediate one, or a high b still to come (calculated
            # later, or its own series): decided when the exam ends
        if top is not None:
            out.append(self._high_b(study_uid, top))
        return out

    def _high_b(self, study_uid: str, top: SeriesSummary) -> Optional[ProtocolDeviation]:
        bv = self.profile.b_values
        b = max_b(top) or 0.0
        if bv.high.contains(b):
            return None
        kind = "calculated " if top.calculated else ""
        return self._deviation(
            "DWI_HIGH_B_TOO_LOW", "critical", top, study_uid,
            f"High b-value is {b:g} s/mm² ({kind}{_who(top, 'DWI')}); {self.profile.source} needs "
            f"{bv.high.describe('s/mm²')}: add a b1400 acquisition or a calculated b1400 series before the patient leaves.",
            measured=f"b={b:g} s/mm²", required=bv.high.describe("s/mm²"))

    # ------------------------------------------------------------------ geometry
    def _geometry(self, study_uid: str, parts: Sequence[SeriesSummary]) -> list[Optional[ProtocolDeviation]]:
        g = self.profile.geometry
        if not g.enabled:
            return []
        ref_here = next((p for p in parts if p.slab and g.reference.matches(p.label, p.other_kind, p.plane)), None)
        checked_here = next((p for p in parts if p.slab and g.checked.matches(p.label, p.other_kind, p.plane)), None)
        if ref_here is None and checked_here is None:
            return []
        exam = self.exam_series(study_uid)
        if checked_here is not None:
            ref = ref_here or next((s for s in reversed(exam) if s.slab and s.series_uid != checked_here.series_uid
                                    and g.reference.matches(s.label, s.other_kind, s.plane)), None)
            return [self.misaligned(study_uid, checked_here, ref)] if ref is not None else []
        # a new axial T2W: check the DWI/ADC series that came before it
        assert ref_here is not None
        out: list[Optional[ProtocolDeviation]] = []
        seen: set[str] = set()
        for s in exam:
            if s.series_uid in seen or s.series_uid == ref_here.series_uid or not s.slab:
                continue
            if g.checked.matches(s.label, s.other_kind, s.plane):
                seen.add(s.series_uid)
                out.append(self.misaligned(study_uid, s, ref_here))
        return out

    def misaligned(self, study_uid: str, s: SeriesSummary, ref: SeriesSummary) -> Optional[ProtocolDeviation]:
        g = self.profile.geometry
        a, r = s.slab, ref.slab
        assert a is not None and r is not None
        cos = abs(sum(x * y for x, y in zip(a.normal, r.normal)))
        angle = math.degrees(math.acos(min(1.0, cos)))
        n = r.normal
        # the checked slab's extent along the reference normal
        delta = [x - y for x, y in zip(a.center_lps_mm, r.center_lps_mm)]
        along = sum(x * y for x, y in zip(delta, n))
        across = math.sqrt(max(0.0, sum(x * x for x in delta) - along * along))
        half_a = (a.end_mm - a.start_mm) / 2.0
        half_r = (r.end_mm - r.start_mm) / 2.0
        edge = max(abs((along - half_a) - (-half_r)), abs((along + half_a) - half_r))
        problems = []
        if angle > g.angle_tolerance_deg:
            problems.append((f"tilted {angle:.1f}°", f"≤ {g.angle_tolerance_deg:g}°"))
        if abs(along) > g.center_tolerance_mm:
            problems.append((f"slab centre {along:+.1f} mm along the slice normal", f"≤ {g.center_tolerance_mm:g} mm"))
        if across > g.in_plane_tolerance_mm:
            problems.append((f"slab centre {across:.1f} mm off in-plane", f"≤ {g.in_plane_tolerance_mm:g} mm"))
        edge_by_gland = g.edge_check == "without_gland" and self.gland_coverage and self.profile.coverage.enabled
        if not problems and edge > g.edge_tolerance_mm and not edge_by_gland:
            problems.append((f"slab ends differ by {edge:.1f} mm", f"≤ {g.edge_tolerance_mm:g} mm"))
        if not problems:
            return None
        measured = "; ".join(p[0] for p in problems)
        required = "; ".join(p[1] for p in problems)
        return self._deviation(
            "DWI_T2_MISALIGNED", "warning", s, study_uid,
            f"{_cap(_who(s, s.label))} is not at the axial T2W's locations (series {ref.series_number}: {measured}): "
            "copy the T2W slice positions to the DWI and repeat it before the patient leaves.",
            measured=measured, required=required)

    # ------------------------------------------------------------------ gland coverage
    def coverage_deviation(self, study_uid: str, s: SeriesSummary, t2: SeriesSummary, fraction: float,
                           missed: Optional[str] = None) -> Optional[ProtocolDeviation]:
        """GLAND_NOT_COVERED for series *s* when less than the profile's [coverage] min_fraction of the gland
        (segmented on the axial T2W *t2*) lies inside its slab; None when covered or the check is off.
        *missed*: which end of the gland is outside ("apex", "base", "apex and base"). Called by
        scanside.agent.analysis.analysis (the gland model runs there); the key names the (series, T2W) pair."""
        cov = self.profile.coverage
        if not cov.enabled or not cov.checked.matches(s.label, s.other_kind, s.plane) or fraction >= cov.min_fraction:
            return None
        code = "GLAND_NOT_COVERED"
        what = "ADC map" if s.label == "ADC" else "DWI"
        miss = 1.0 - fraction
        where = f" ({missed})" if missed else ""
        move = {"apex": "move the slab caudally (towards the feet) or add slices",
                "base": "move the slab cranially (towards the head) or add slices",
                "apex and base": "add slices at both ends"}.get(missed or "", "add slices")
        dev = self._deviation(
            code, cov.severity, s, study_uid,
            f"The {what} slab (series {s.series_number}) misses {miss:.0%} of the prostate{where} seen on the axial "
            f"T2W (series {t2.series_number}): {move} so that it covers the whole gland, and repeat it before the "
            "patient leaves.",
            measured=f"{fraction:.0%} of the gland inside the slab", required=f"≥ {cov.min_fraction:.0%} of the gland")
        if dev is None:
            return None
        # one per acquisition: the parts of a multi-b DWI series (one slab) share the key
        key = f"deviation:{study_uid}:{code}:{s.series_uid}:r{s.revision}:t2:{t2.series_id}:r{t2.revision}"
        return dev.model_copy(update={"key": key, "alert_id": "pd-" + hashlib.sha1(key.encode()).hexdigest()[:16]})

    # ------------------------------------------------------------------ exam end
    def exam_end(self, study_uid: str, round_: int) -> list[ProtocolDeviation]:
        exam = self.exam_series(study_uid)
        present = exam + self.quarantine.summaries(study_uid)
        out: list[Optional[ProtocolDeviation]] = []
        for name, req in self.profile.required.items():
            if not req.enabled:
                continue
            if any(self._satisfies(s, req) for s in present):
                continue
            if req.b_min is not None:
                out.append(self._high_b_at_end(study_uid, req, name, exam, round_))
                continue
            out.append(self._missing(study_uid, req, name, round_))
        return [d for d in out if d is not None]

    @staticmethod
    def _satisfies(s: SeriesSummary, req: Requirement) -> bool:
        if not req.matches(s.label, s.other_kind, s.plane):
            return False
        if req.b_min is not None:
            b = max_b(s)
            return b is not None and b >= req.b_min - max(1e-3, 1e-3 * req.b_min)
        return True

    def _missing(self, study_uid: str, req: Requirement, name: str, round_: int) -> Optional[ProtocolDeviation]:
        what = req.what
        return self._deviation(
            req.code, req.severity, None, study_uid,
            f"No {what} in this exam; {self.profile.source} requires it: {req.action}.",
            measured="none received", required=what, subject=f"{name}:e{round_}")

    def _high_b_at_end(self, study_uid: str, req: Requirement, name: str, exam: list[SeriesSummary],
                       round_: int) -> Optional[ProtocolDeviation]:
        """No b >= b_min anywhere: a high b that is too low (two b >= 500 values, or one above the
        intermediate range), else a missing high-b series."""
        bv = self.profile.b_values
        highs = sorted((s for s in exam if req.matches(s.label, s.other_kind, s.plane) and s.b_values),
                       key=lambda s: max_b(s) or 0.0)
        distinct = {max_b(s) for s in highs}
        top_b = max_b(highs[-1]) if highs else None
        above_mid = top_b is not None and not bv.intermediate.contains(top_b) and (
            (bv.intermediate.le is not None and top_b > bv.intermediate.le) or (bv.intermediate.lt is not None and top_b >= bv.intermediate.lt))
        if highs and (len(distinct) >= 2 or above_mid):
            calc = [s for s in highs if s.calculated]
            return self._high_b(study_uid, calc[-1] if calc else highs[-1])
        return self._missing(study_uid, req, name, round_)


def measured_values(s: SeriesSummary) -> dict[str, Optional[float]]:
    gap = None
    if s.slice_spacing_mm is not None and s.slice_thickness_mm is not None:
        gap = round(s.slice_spacing_mm - s.slice_thickness_mm, 3)
    ps = s.pixel_spacing_mm
    return {
        "slice_thickness_mm": s.slice_thickness_mm,
        "slice_gap_mm": gap,
        "fov_mm": max(s.fov_mm) if s.fov_mm else None,
        "in_plane_mm": max(ps) if ps else None,
        "in_plane_fine_mm": min(ps) if ps else None,
        "acquired_phase_mm": s.acquired_resolution_mm[0] if s.acquired_resolution_mm else None,
        "acquired_frequency_mm": s.acquired_resolution_mm[1] if s.acquired_resolution_mm else None,
        "echo_time_ms": s.echo_time_ms,
        "repetition_time_ms": s.repetition_time_ms,
        "field_strength_t": s.field_strength_t,
        "temporal_resolution_s": s.temporal_resolution_s,
        "observation_s": s.observation_s,
    }


def checker_from_config(config: AgentConfig, store: StateStore, gland_coverage: bool = False) -> Optional[ProtocolChecker]:
    """The checker the agent's [protocol] section asks for; None when protocol checks are off.
    gland_coverage: the gland model runs beside it (the daemon's Analyzer; see gland_model_active)."""
    from scanside.agent.protocol.profiles import load_profile

    section = config.protocol
    gland = bool(gland_coverage)
    if not section.enabled:
        return None
    return ProtocolChecker(load_profile(section.profile, section.site_profile), store, config.quarantine_path,
                           gland_coverage=gland)


Clock = Callable[[], float]
