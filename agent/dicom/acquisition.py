"""How a series was acquired, from its headers alone: slab geometry, field of view, dynamic timing.

Feeds the SeriesSummary fields the protocol checks read (scanside.agent.protocol.checker); no pixels are decoded.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from scanside.agent.schema.events import SlabGeometry
from scanside.agent.dicom.header import FrameInfo, InstanceHeader


def mosaic_tiles(h: InstanceHeader) -> int:
    """Tiles per side of a Siemens mosaic (ceil(sqrt(slices))); 1 for an ordinary image."""
    if not h.is_mosaic:
        return 1
    n = max((f.n_slices for f in h.frames), default=1)
    return max(1, math.ceil(math.sqrt(n)))


def field_of_view(h: InstanceHeader) -> Optional[tuple[float, float]]:
    """(rows, columns) extent of one slice in mm: matrix x pixel spacing (a mosaic's tile, not the mosaic)."""
    if not h.pixel_spacing or not h.rows or not h.columns:
        return None
    tiles = mosaic_tiles(h)
    return (round(h.rows / tiles * h.pixel_spacing[0], 2), round(h.columns / tiles * h.pixel_spacing[1], 2))


def acquired_resolution(h: InstanceHeader) -> Optional[tuple[float, float]]:
    """(phase, frequency) acquired in-plane resolution in mm: the field of view along each axis over
    its encoding steps. This is what PI-RADS limits (0.7 x 0.4 mm for T2W); the reconstructed
    PixelSpacing is usually interpolated and can hide a coarse acquisition. None without the
    acquisition matrix, or when the phase axis is unknown and the field of view is not square."""
    fov = field_of_view(h)
    if fov is None or h.encoding_steps is None:
        return None
    freq_steps, phase_steps = h.encoding_steps
    if h.phase_direction == "COL":  # phase along the columns: across the rows' extent
        phase_fov, freq_fov = fov
    elif h.phase_direction == "ROW":
        freq_fov, phase_fov = fov
    elif abs(fov[0] - fov[1]) < 1e-3:
        phase_fov = freq_fov = fov[0]
    else:
        return None
    return round(phase_fov / phase_steps, 3), round(freq_fov / freq_steps, 3)


def slab_geometry(headers: Sequence[InstanceHeader], frames: Sequence[FrameInfo]) -> Optional[SlabGeometry]:
    """Slab extent along the slice normal and its centre. None for mosaics (the file's position is the
    mosaic's corner, not a slice's), for mixed orientations (localizers) and when geometry is missing."""
    h = headers[0]
    if any(x.is_mosaic for x in headers) or not h.pixel_spacing or not h.rows or not h.columns:
        return None
    pts = [f for f in frames if f.position and f.orientation]
    if not pts:
        return None
    o = np.asarray(pts[0].orientation, dtype=float)
    if any(np.abs(np.asarray(f.orientation, dtype=float) - o).max() > 1e-3 for f in pts):
        return None
    row_dir, col_dir = o[:3], o[3:]
    normal = np.cross(row_dir, col_dir)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return None
    normal /= norm
    positions = np.unique(np.round(np.asarray([f.position for f in pts], dtype=float), 3), axis=0)
    d = positions @ normal
    half = (h.slice_thickness or 0.0) / 2.0
    # ImagePositionPatient is the centre of the first voxel; the slice centre is half the matrix in
    offset = row_dir * h.pixel_spacing[1] * (h.columns - 1) / 2.0 + col_dir * h.pixel_spacing[0] * (h.rows - 1) / 2.0
    center = positions.mean(axis=0) + offset
    return SlabGeometry(
        normal=tuple(round(float(x), 6) for x in normal),
        center_lps_mm=tuple(round(float(x), 3) for x in center),
        start_mm=round(float(d.min()) - half, 3),
        end_mm=round(float(d.max()) + half, 3),
    )


def _median_step(values: Sequence[float]) -> Optional[float]:
    v = sorted(values)
    steps = [(b - a) % 86400.0 for a, b in zip(v, v[1:]) if (b - a) % 86400.0 > 1e-3]
    return float(np.median(steps)) if steps else None


def dynamic_timing(headers: Sequence[InstanceHeader], frames: Sequence[FrameInfo]
                   ) -> tuple[Optional[int], Optional[float], Optional[float]]:
    """(phases, temporal resolution s, observation s) of a dynamic series; (None, None, None) otherwise.

    The time between phases comes from the phases' own start times (AcquisitionTime /
    FrameAcquisitionDateTime, then TriggerTime), and only without those from (0020,0110)
    TemporalResolution or the acquisition duration split over the phases: what was done beats what
    was declared.
    """
    h = headers[0]
    by_phase: dict[int, list[FrameInfo]] = {}
    for f in frames:
        if f.temporal_index is not None:
            by_phase.setdefault(f.temporal_index, []).append(f)
    phases = max(len(by_phase), h.number_of_temporal_positions or 0)
    if phases < 2:
        return None, None, None
    resolution: Optional[float] = None
    starts: list[float] = []
    for attr, scale in (("acquisition_time_s", 1.0), ("trigger_time_ms", 0.001)):
        starts = [min(getattr(f, attr) for f in fs) * scale for _, fs in sorted(by_phase.items())
                  if all(getattr(f, attr) is not None for f in fs)]
        if len(starts) == len(by_phase) >= 2:
            resolution = _median_step(starts)
            if resolution:
                break
    if not resolution and h.temporal_resolution_ms:
        resolution = h.temporal_resolution_ms / 1000.0
    if not resolution and h.acquisition_duration_s:
        resolution = h.acquisition_duration_s / phases
    if not resolution:
        return phases, None, None
    span = ((max(starts) - min(starts)) % 86400.0 + resolution) if len(starts) >= 2 and _median_step(starts) else phases * resolution
    return phases, round(resolution, 3), round(span, 3)
