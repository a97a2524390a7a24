"""Header rules: a sequence label from the DICOM header alone, with the reason for it.

The image model (agent.image_classify, issue 5) labels the same series from pixels; the two are compared
there. Rules follow the design sheet, section 3; thresholds are PI-RADS-agnostic physics:
T2 weighting needs a long TE and TR, diffusion needs EPI (GE writes (0043,1039) on non-diffusion series).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from pydantic import BaseModel

from scanside.agent.dicom import vendor as vd
from scanside.agent.dicom.header import FrameInfo, InstanceHeader
from scanside.agent.schema.taxonomy import DWI_HIGH_MIN_B, OtherKind, SequenceLabel

LOCALIZER_WORDS = re.compile(r"(locali[sz]er|scout|survey|\bloc\b|3[- ]?plane|tri[- ]?pilot|aahead)", re.I)
DCE_WORDS = re.compile(r"(dce|dyn|dynamic|perf|twist|disco|vibe.*dyn|t1.*\+c)", re.I)
FS_WORDS = re.compile(r"(spair|spir|\bfs\b|_fs\b|fat ?sat|fatsat|stir)", re.I)
SEQ_B = re.compile(r"ep_b(\d+)", re.I)


class HeaderLabel(BaseModel):
    label: SequenceLabel
    other_kind: Optional[OtherKind] = None
    confidence: float
    reason: str
    b_value: Optional[float] = None
    fat_suppressed: Optional[bool] = None


DIFFUSION_MACRO = {"DIRECTIONAL", "ISOTROPIC", "BMATRIX"}
DIFFUSION_DERIVED = {"ADC", "TRACE", "FA", "CALC_BVALUE"}


def diffusion_evidence(headers: Sequence[InstanceHeader]) -> Optional[str]:
    """Why these images (one acquisition) are diffusion-weighted, or None.

    A b-value tag alone is no evidence: GE writes (0043,1039) = 0 and Philips (2001,1003) = 0 on
    ordinary images (fMRI, field maps, pCASL, MPRAGE). Evidence is a b > 0, a diffusion ImageType or
    AcquisitionContrast, the diffusion macro's directionality, a derived diffusion map, a diffusion
    sequence name (Siemens *ep_b0), or several distinct unit gradient directions."""
    directions: set[tuple[float, ...]] = set()
    for h in headers:
        if "DIFFUSION" in h.image_type:
            return "ImageType DIFFUSION"
        if h.acquisition_contrast == "DIFFUSION":
            return "AcquisitionContrast DIFFUSION"
        if SEQ_B.search(h.sequence_name):
            return f"sequence name {h.sequence_name}"
        for f in h.frames:
            if f.b_value:
                return f"b={f.b_value:g} from {f.b_source}"
            if f.directionality in DIFFUSION_MACRO:
                return f"DiffusionDirectionality {f.directionality}"
            if f.derived in DIFFUSION_DERIVED:
                return f"derived {f.derived} image"
            if f.direction is not None and 0.9 < sum(c * c for c in f.direction) ** 0.5 < 1.1:
                directions.add(tuple(round(c, 3) for c in f.direction))
    if len(directions) >= 2:
        return f"{len(directions)} gradient directions"
    return None


def is_diffusion(h: InstanceHeader) -> bool:
    """Whether this one file shows diffusion weighting (see diffusion_evidence)."""
    return diffusion_evidence([h]) is not None


def t2_like_timing(te: Optional[float], tr: Optional[float]) -> bool:
    return te is not None and tr is not None and te >= 60 and tr >= 1500


def classify_header(headers: Sequence[InstanceHeader], frames: Sequence[FrameInfo],
                    diffusion: Optional[bool] = None) -> HeaderLabel:
    """Label one logical series (the frames of one b-value / derived part of an acquisition).

    diffusion: whether the whole acquisition is diffusion-weighted (scanside.agent.dicom.series.split_parts decides it
    on every file of the series, so that the b0 part of a DWI series is DWI_Low); None: judge these
    headers alone."""
    h = headers[0]
    derived = {f.derived for f in frames if f.derived}
    words = f"{h.series_description} {h.protocol_name}"
    if h.modality and h.modality != "MR":
        return HeaderLabel(label="other", other_kind="unknown", confidence=0.99, reason=f"modality {h.modality}, not MR")
    if "ADC" in derived:
        if {"ADC", "EADC"} & set(h.image_type) or h.is_enhanced:
            return HeaderLabel(label="ADC", confidence=0.99, reason="ImageType/FrameType marks an ADC map")
        return HeaderLabel(label="ADC", confidence=0.95,
                           reason=f"DERIVED image whose description '{h.series_description}' names an ADC map")
    if "FA" in derived:
        return HeaderLabel(label="other", other_kind="unknown", confidence=0.95, reason="FA map (derived diffusion)")

    orientations = {tuple(round(c, 2) for c in f.orientation) for f in frames if f.orientation}
    planes = {vd.plane_of(o) for o in orientations}
    if "LOCALIZER" in h.image_type or len(planes) > 1:
        why = "ImageType LOCALIZER" if "LOCALIZER" in h.image_type else f"images in {len(planes)} planes"
        return HeaderLabel(label="other", other_kind="localizer", confidence=0.95, reason=why)

    if diffusion is None:
        diffusion = diffusion_evidence(headers) is not None
    if diffusion:
        return _diffusion_label(h, frames, derived)

    te, tr = h.echo_time, h.repetition_time
    temporal = {f.temporal_index for f in frames if f.temporal_index is not None}
    n_phases = max(h.number_of_temporal_positions or 0, len(temporal))
    if h.epi:
        # EPI without diffusion evidence (fMRI, field maps, spin-echo EPI, pCASL, DSC perfusion): neither a
        # PI-RADS T2W (TSE), whatever its TE and fat suppression, nor a DCE (T1-weighted gradient echo)
        dynamic = f"dynamic, {n_phases} temporal positions: fMRI or perfusion, " if n_phases > 1 else ""
        return HeaderLabel(label="other", other_kind="unknown", confidence=0.9,
                           reason=f"echo-planar without diffusion evidence ({dynamic}not a T2W or DCE series; "
                                  f"TE {te}, TR {tr}, sequence {'/'.join(h.scanning_sequence) or '?'})")
    gradient = "GR" in h.scanning_sequence and "SE" not in h.scanning_sequence
    if n_phases > 1:
        return HeaderLabel(label="other", other_kind="DCE", confidence=0.95, reason=f"{n_phases} temporal positions (dynamic series)")
    if LOCALIZER_WORDS.search(words):
        return HeaderLabel(label="other", other_kind="localizer", confidence=0.7, reason=f"description '{h.series_description}' names a localizer")

    t2_contrast = h.acquisition_contrast == "T2"
    long_te_tr = t2_like_timing(te, tr)
    if (t2_contrast or long_te_tr) and not gradient:
        fat, evidence = vd.fat_suppressed(h.spectral_fat_suppression, h.scan_options)
        basis = f"TE {te:g} ms, TR {tr:g} ms" if te is not None and tr is not None else "AcquisitionContrast T2"
        if fat is None:
            hint = FS_WORDS.search(words)
            label: SequenceLabel = "T2WI_fs" if hint else "T2WI_nan"
            why = (f"T2-weighted ({basis}); the header does not record fat suppression"
                   f"{' (' + h.vendor + ' keeps it in private fields)' if h.vendor == 'philips' else ''}; "
                   + (f"description '{h.series_description}' suggests it" if hint else "assumed none: the image model decides"))
            return HeaderLabel(label=label, confidence=0.55, reason=why, fat_suppressed=bool(hint))
        label = "T2WI_fs" if fat else "T2WI_nan"
        return HeaderLabel(label=label, confidence=0.95, reason=f"T2-weighted ({basis}); {evidence}", fat_suppressed=fat)

    if te is not None and tr is not None and tr < 1000 and te < 30:
        kind: OtherKind = "DCE" if DCE_WORDS.search(words) else "T1"
        return HeaderLabel(label="other", other_kind=kind, confidence=0.8, reason=f"T1-weighted timing (TE {te:g} ms, TR {tr:g} ms)")
    return HeaderLabel(label="other", other_kind="unknown", confidence=0.5,
                       reason=f"no rule matched (TE {te}, TR {tr}, sequence {h.scanning_sequence or '?'})")


def _diffusion_label(h: InstanceHeader, frames: Sequence[FrameInfo], derived: set[str]) -> HeaderLabel:
    bs = sorted({f.b_value for f in frames if f.b_value is not None})
    source = next((f.b_source for f in frames if f.b_value is not None and f.b_source), "header b-value")
    if not bs:
        m = SEQ_B.search(h.sequence_name)
        if m:
            bs, source = [float(m.group(1))], f"sequence name {h.sequence_name}"
    if not bs:
        return HeaderLabel(label="other", other_kind="unknown", confidence=0.5, reason="diffusion series without a readable b-value")
    b = max(bs)
    kind = "calculated " if "CALC_BVALUE" in derived else ""
    trace = " trace" if any(f.isotropic for f in frames) else ""
    if b >= DWI_HIGH_MIN_B:
        return HeaderLabel(label="DWI_High", confidence=0.97, b_value=b, reason=f"{kind}DWI{trace} b={b:g} (>= {DWI_HIGH_MIN_B:g}) from {source}")
    return HeaderLabel(label="DWI_Low", confidence=0.97, b_value=b, reason=f"DWI{trace} b={b:g} (< {DWI_HIGH_MIN_B:g}) from {source}")
