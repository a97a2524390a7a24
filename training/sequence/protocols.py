"""Randomised exam protocols for the sequence classifier: varied planes, TE/TR/FOV/matrix/slices,
b-values, 1.5/3 T, by vendor habit. One generator serves training (render path) and evaluation
(simulated DICOM), so that the held-out set differs only by seed, plus a protocol variant whose
values training never draws.

Held-out protocol variant ``heldout`` (never sampled in training): DWI b-values 100 / 1200 / 2000
(calculated b2000 on Siemens), DWI matrix 112, T2W matrix 320 with FOV 140 mm, T2W TE 125 ms,
at 1.5 T. Training draws b in {0, 50} / {800, 1000} / {1400, 1500, 1600, 1800}, DWI matrix
{96, 128, 160}, T2W matrix {256, 384}, T2W TE 85-115 ms. (Training reaches b1800 so that the
unseen b2000 is a small extrapolation, as a site's b2000 would be for a model trained on b1400-1800.)
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from scanside.simulator.model import ExamSpec, SeriesSpec

Variant = Literal["train", "heldout"]
VENDORS = ("siemens", "siemens-xa", "ge", "philips")
PLANES_T2 = ("axial", "axial", "sagittal", "coronal", "oblique")


def _u(rng: np.random.Generator, lo: float, hi: float, nd: int = 1) -> float:
    return round(float(rng.uniform(lo, hi)), nd)


def _c(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _t2(rng, kind: str, plane: str, fs: bool, variant: Variant, field: float) -> SeriesSpec:
    held = variant == "heldout"
    m = 320 if held else int(_c(rng, (256, 384)))
    fov = 140.0 if held else _u(rng, 150, 200, 0)
    thick = _u(rng, 2.5, 4.0)
    return SeriesSpec(kind=kind, description=f"t2_{plane}{'_fs' if fs else ''}", plane=plane, slice_thickness_mm=thick,
                      n_slices=int(rng.integers(16, 31)), fov_mm=(fov, fov), matrix=(m, m),
                      tr_ms=_u(rng, 3000, 7000, 0), te_ms=125.0 if held else _u(rng, 85, 115, 0),
                      flip_angle_deg=_u(rng, 120, 170, 0), fat_sat=fs)


def dwi_b_values(rng, vendor: str, variant: Variant) -> tuple[list[float], float | None]:
    """(acquired b-values, calculated high b or None) in the vendor's habit."""
    if variant == "heldout":
        if vendor.startswith("siemens"):
            return [100.0, 1200.0], 2000.0
        return [100.0, 1200.0, 2000.0], None
    low = 0.0 if vendor == "ge" else float(_c(rng, (0.0, 50.0, 50.0)))
    mid = float(_c(rng, (800.0, 1000.0)))
    high = float(_c(rng, (1400.0, 1500.0, 1600.0, 1800.0)))
    if vendor.startswith("siemens"):
        return [low, mid], (high if rng.random() < 0.85 else None)
    return ([low, mid, high] if rng.random() < 0.85 else [low, mid]), None


def random_exam(rng: np.random.Generator, vendor: str, variant: Variant = "train",
                field_strength_t: float | None = None, *, dce_phases: int | None = None) -> ExamSpec:
    """An mpMRI-like exam with randomised protocol; every class appears at least once."""
    held = variant == "heldout"
    fs_t = 1.5 if held else float(field_strength_t if field_strength_t is not None else _c(rng, (1.5, 3.0)))
    series: list[SeriesSpec] = []
    loc_m = int(_c(rng, (160, 192, 256)))
    loc_fov = _u(rng, 250, 350, 0)
    series.append(SeriesSpec(kind="localizer", description="localizer", plane="sagittal",
                             slice_thickness_mm=_u(rng, 5, 10), slice_gap_mm=_u(rng, 0, 5),
                             n_slices=int(rng.integers(3, 6)), fov_mm=(loc_fov, loc_fov), matrix=(loc_m, loc_m),
                             tr_ms=_u(rng, 4, 10), te_ms=_u(rng, 1.5, 5), flip_angle_deg=_u(rng, 15, 45, 0)))
    planes = list(rng.permutation(PLANES_T2))
    for i in range(int(rng.integers(1, 3))):
        series.append(_t2(rng, "t2w", str(planes[i]), False, variant, fs_t))
    for i in range(int(rng.integers(1, 3))):
        series.append(_t2(rng, "t2w_fs", str(_c(rng, PLANES_T2)), True, variant, fs_t))
    acquired, calc = dwi_b_values(rng, vendor, variant)
    dm = 112 if held else int(_c(rng, (96, 128, 128, 160)))
    dfov = 240.0 if held else _u(rng, 160, 260, 0)
    dwi_geom = dict(plane=str(_c(rng, ("axial", "axial", "axial", "oblique"))), slice_thickness_mm=_u(rng, 3.0, 4.5),
                    n_slices=int(rng.integers(16, 31)), fov_mm=(dfov, dfov), matrix=(dm, dm),
                    tr_ms=_u(rng, 3000, 6000, 0), te_ms=_u(rng, 55, 90, 0), flip_angle_deg=90.0, fat_sat=True)
    series.append(SeriesSpec(kind="dwi", description="dwi", b_values=acquired, n_directions=3, include_trace=True,
                             **dwi_geom))
    series.append(SeriesSpec(kind="adc", description="dwi_ADC", b_values=[b for b in acquired if b <= 1200.0],
                             **dwi_geom))
    if calc is not None:
        series.append(SeriesSpec(kind="calc_bvalue", description="dwi_CALC_BVAL", b_values=[calc], **dwi_geom))
    t1_se = rng.random() < 0.6
    t1m = int(_c(rng, (192, 256, 320)))
    series.append(SeriesSpec(kind="t1", description="t1", plane=str(_c(rng, ("axial", "axial", "coronal"))),
                             slice_thickness_mm=_u(rng, 3, 5), n_slices=int(rng.integers(16, 31)),
                             fov_mm=(_u(rng, 180, 300, 0),) * 2, matrix=(t1m, t1m),
                             tr_ms=_u(rng, 400, 800, 0) if t1_se else _u(rng, 5, 200, 0),
                             te_ms=_u(rng, 8, 15) if t1_se else _u(rng, 2, 5),
                             flip_angle_deg=90.0 if t1_se else _u(rng, 10, 50, 0), fat_sat=bool(rng.random() < 0.3)))
    dm2 = int(_c(rng, (128, 160, 192)))
    series.append(SeriesSpec(kind="dce", description="dce", plane="axial", slice_thickness_mm=_u(rng, 2.5, 3.5),
                             n_slices=int(rng.integers(16, 31)), fov_mm=(_u(rng, 180, 260, 0),) * 2, matrix=(dm2, dm2),
                             tr_ms=_u(rng, 3, 6), te_ms=_u(rng, 1.2, 2.5), flip_angle_deg=_u(rng, 8, 25, 0),
                             fat_sat=bool(rng.random() < 0.7),
                             n_phases=int(dce_phases if dce_phases is not None else rng.integers(4, 9)),
                             temporal_resolution_s=_u(rng, 5, 15)))
    return ExamSpec(name=f"sequence-{variant}", field_strength_t=fs_t, series=series)
