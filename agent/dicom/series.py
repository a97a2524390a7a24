"""Series assembly: group instances into acquisitions, decide when an acquisition is complete,
split multi-b diffusion series into one logical series per b-value (and pull out appended ADC /
isotropic images), and label each part from its header.

Completion: when the images received reach the expected count ((0020,1002) images in acquisition,
times temporal positions for dynamic series; the frames of an enhanced file; mosaic slices counted),
or, with no count, after a quiet period. A series short of its count closes as incomplete after a
grace period. An image arriving after completion reopens the series; it completes again as the next
revision, so nothing is lost and the late arrival is reported. A reopened series has shown its count to
be too small, so it completes by its quiet period from then on (once, not once per late image); where
a vendor's count is known not to mean the series (GE (0025,1007) on multiphase EPI/DCE, Siemens XA
enhanced files of one volume each), the series' reason says what was used instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from scanside.agent.dicom import vendor as vd
from scanside.agent.dicom.acquisition import acquired_resolution, dynamic_timing, field_of_view, slab_geometry
from scanside.agent.dicom.classify import classify_header, diffusion_evidence
from scanside.agent.schema.events import SeriesSummary
from scanside.agent.dicom.header import FrameInfo, FrameRef, InstanceHeader


def expected_count(h: InstanceHeader) -> tuple[Optional[int], str]:
    """The images the whole acquisition will have, as far as this header says, and a note when a
    count the header carries cannot be trusted as it stands ("" otherwise).

    Enhanced: the file's frames; where the file holds fewer volumes than NumberOfTemporalPositions
    (Siemens XA enhanced DWI/fMRI writes one file per volume, NumberOfTemporalPositions = volumes), its
    slice positions times the temporal positions.
    Classic: (0020,1002) images in acquisition, which counts one phase of a dynamic series, times its
    temporal positions. GE: (0025,1007) images in series where it counts more (DWI directions, which
    have no temporal positions); on multiphase EPI/DCE it counts one volume, like (0020,1002).
    A count that proves too small is caught when it is exceeded (the series then completes by its
    quiet period); one too large by the incomplete grace period.
    """
    ntp = h.number_of_temporal_positions or 0
    if h.is_enhanced:
        in_file = max(h.n_images, h.images_in_acquisition or 0)
        slices = len({f.position for f in h.frames if f.position is not None}) or h.n_images
        if ntp > 1 and slices * ntp > in_file:
            n = slices * ntp
            return n, (f"enhanced file holds {in_file} images ({slices} slice positions), the series "
                       f"{ntp} temporal positions: {n} expected over its files")
        return in_file, ""
    per_phase = h.images_in_acquisition
    by_phase = per_phase * ntp if per_phase and ntp > 1 else per_phase
    if h.images_in_series:
        if by_phase and by_phase > h.images_in_series:
            return by_phase, (f"GE (0025,1007) images in series = {h.images_in_series} counts one volume; "
                              f"{per_phase} x {ntp} temporal positions = {by_phase} expected")
        return h.images_in_series, ""
    return by_phase, ""


def expected_images(h: InstanceHeader) -> Optional[int]:
    """The images the whole acquisition will have, as far as this header says (see expected_count)."""
    return expected_count(h)[0]


def part_key(h: InstanceHeader, f: FrameInfo, diffusion: bool) -> str:
    if f.derived == "ADC":
        return "adc"
    if f.derived == "FA":
        return "fa"
    if diffusion and f.b_value is not None:
        return f"b{int(f.b_value)}"
    return ""


@dataclass
class SeriesPart:
    """One logical series and where its frames are."""

    series_uid: str
    key: str
    headers: list[InstanceHeader] = field(default_factory=list)
    frames: list[FrameInfo] = field(default_factory=list)
    refs: list[FrameRef] = field(default_factory=list)
    diffusion: bool = False  # the whole acquisition is diffusion-weighted (scanside.agent.dicom.classify.diffusion_evidence)

    @property
    def series_id(self) -> str:
        return f"{self.series_uid}#{self.key}" if self.key else self.series_uid


B0_UNTAGGED = "no b-value tag inside a diffusion series: b=0"


def split_parts(headers: Sequence[InstanceHeader]) -> list[SeriesPart]:
    diffusion = diffusion_evidence(headers) is not None
    parts: dict[str, SeriesPart] = {}
    for h in headers:
        seen_in_part: set[str] = set()
        for f in h.frames:
            if diffusion and f.b_value is None and f.derived is None:
                # Canon/Toshiba (and some enhanced b0 frames) write no b-value on the b0 images of a DWI/DTI
                # series: they are its b0, not a separate (T2-looking) series
                f = f.model_copy(update={"b_value": 0.0, "b_source": B0_UNTAGGED})
            key = part_key(h, f, diffusion)
            part = parts.setdefault(key, SeriesPart(series_uid=h.series_uid, key=key, diffusion=diffusion))
            if key not in seen_in_part:
                part.headers.append(h)
                seen_in_part.add(key)
            part.frames.append(f)
            part.refs.append(FrameRef(path=h.path, frame_index=f.frame_index))
    return sorted(parts.values(), key=lambda p: _part_order(p.key))


def _part_order(key: str) -> tuple[int, float]:
    if key.startswith("b"):
        return (1, float(key[1:]))
    return (0 if key == "" else 2, 0.0)


def slice_spacing(frames: Sequence[FrameInfo]) -> Optional[float]:
    """Median distance between neighbouring slice positions along the slice normal."""
    pts = [f for f in frames if f.position and f.orientation]
    if len(pts) < 2:
        return None
    o = np.asarray(pts[0].orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    d = np.unique(np.round([float(np.dot(normal, f.position)) for f in pts], 3))  # type: ignore[arg-type]  # pts: frames with a position
    if len(d) < 2:
        return None
    return float(np.median(np.diff(d)))


def summarise(part: SeriesPart, revision: int, complete: bool, expected: Optional[int], note: str = "") -> SeriesSummary:
    """The SeriesSummary of one part; ``note`` (how completion was decided, where a count was not
    trusted) is appended to the label's reason."""
    h = part.headers[0]
    label = classify_header(part.headers, part.frames, diffusion=part.diffusion)
    # b-values describe diffusion images only: not a derived map (a GE ADC keeps its source b in
    # (0043,1039)), nor a non-diffusion series where Philips/GE write b = 0 on every image
    listed = part.diffusion and label.label in ("DWI_Low", "DWI_High")
    orientation = next((f.orientation for f in part.frames if f.orientation), None)
    mosaic = any(x.is_mosaic for x in part.headers)
    spacing = h.spacing_between_slices if mosaic else (slice_spacing(part.frames) or h.spacing_between_slices)
    phases, temporal_resolution, observation = dynamic_timing(part.headers, part.frames)
    return SeriesSummary(
        series_id=part.series_id,
        study_uid=h.study_uid,
        series_uid=h.series_uid,
        part=part.key,
        series_number=h.series_number,
        series_description=h.series_description,
        vendor=h.vendor,
        modality=h.modality or "MR",
        label=label.label,
        other_kind=label.other_kind,
        label_confidence=label.confidence,
        reason=f"{label.reason}; {note}" if note else label.reason,
        b_values=sorted({f.b_value for f in part.frames if f.b_value is not None}) if listed else [],
        plane=vd.plane_of(orientation),
        fat_suppressed=label.fat_suppressed,
        n_instances=len({x.sop_instance_uid for x in part.headers}),
        n_images=sum(f.n_slices for f in part.frames),
        expected_images=expected,
        complete=complete,
        revision=revision,
        slice_thickness_mm=h.slice_thickness,
        slice_spacing_mm=spacing,
        pixel_spacing_mm=h.pixel_spacing,
        rows=h.rows,
        columns=h.columns,
        echo_time_ms=h.echo_time,
        repetition_time_ms=h.repetition_time,
        field_strength_t=h.magnetic_field_strength,
        fov_mm=field_of_view(h),
        acquired_resolution_mm=acquired_resolution(h),
        slab=slab_geometry(part.headers, part.frames),
        calculated=any(f.derived == "CALC_BVALUE" for f in part.frames),
        temporal_positions=phases,
        temporal_resolution_s=temporal_resolution,
        observation_s=observation,
    )
