"""Hand-built RenderedSeries for writer unit tests (independent of the renderer)."""
from __future__ import annotations

import numpy as np

from scanside.simulator.model import RenderedImage, RenderedSeries, SeriesSpec

_ORIENT = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
}


def fake_series(spec: SeriesSpec, *, adc: bool = False, seed: int = 0, directions: bool = False) -> RenderedSeries:
    rng = np.random.default_rng(seed)
    rows, cols = spec.matrix
    ps = (spec.fov_mm[0] / rows, spec.fov_mm[1] / cols)
    o = _ORIENT[spec.plane]
    r, c = np.asarray(o[:3]), np.asarray(o[3:])
    n = np.cross(r, c)
    step = spec.slice_thickness_mm + spec.slice_gap_mm
    yy, xx = np.mgrid[0:rows, 0:cols]
    base = 800.0 * np.exp(-(((yy - rows / 2) / (rows / 4)) ** 2 + ((xx - cols / 2) / (cols / 4)) ** 2))
    adc_map = 1500.0 + 500.0 * (xx / cols)
    images = []
    if spec.kind == "dwi":
        groups = [(b, None, None) for b in spec.b_values]
        if directions:
            dirs = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
            groups = [(b, None, d) for b in spec.b_values for d in ([None] if b == 0 else dirs)]
    elif spec.kind == "calc_bvalue":
        groups = [(b, "CALC_BVALUE", None) for b in spec.b_values]
    elif spec.kind == "adc" or adc:
        groups = [(None, "ADC", None)]
    else:
        groups = [(None, None, None)]
    if adc and spec.kind == "dwi":
        groups.append((None, "ADC", None))
    for t in range(max(spec.n_phases, 1) if spec.kind == "dce" else 1):
        for b, derived, direction in groups:
            for k in range(spec.n_slices):
                off = (k - (spec.n_slices - 1) / 2) * step
                pos = -r * spec.fov_mm[1] / 2 - c * spec.fov_mm[0] / 2 + n * off + np.asarray(spec.center_offset_mm)
                if derived == "ADC":
                    px = adc_map * (base > 50)
                elif b is not None:
                    px = base * np.exp(-b * adc_map * 1e-6)
                else:
                    px = base * (1.0 + 0.1 * t)
                px = (px + rng.normal(0, 2, px.shape)).clip(0).astype(np.float32)
                images.append(RenderedImage(
                    pixels=px, position=tuple(float(v) for v in pos), orientation=o, pixel_spacing=ps,
                    slice_index=k, b_value=b, direction=direction, derived=derived, temporal_index=t,
                    trigger_time_ms=t * spec.temporal_resolution_s * 1000.0))
    return RenderedSeries(spec=spec, images=images)
