"""Which frames of a series part make one volume (decoding layer): one orientation (the largest group), the
middle temporal phase of a dynamic series, one frame per slice position (one mosaic per mosaic position),
preferring isotropic (trace) images to directional ones. The runtime's image models, every evaluation and the
calibration read a series this way (scanside.agent.dicom.exam_reader)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from scanside.agent.dicom.header import FrameInfo, FrameRef, HeaderError, read_header


class FrameSelectionError(ValueError):
    """No volume can be made of these frames; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _frame_infos(refs: Sequence[FrameRef]) -> list[FrameInfo]:
    """Header-only read of each file once; the FrameInfo of every ref."""
    by_path: dict[str, dict[int, FrameInfo]] = {}
    out = []
    for r in refs:
        if r.path not in by_path:
            try:
                h = read_header(r.path)
            except HeaderError as e:
                raise FrameSelectionError("unreadable_header", f"{e}") from e
            by_path[r.path] = {f.frame_index: f for f in h.frames}
        f = by_path[r.path].get(r.frame_index)
        if f is None:
            raise FrameSelectionError("bad_frame_index", f"frame {r.frame_index} not in its file")
        out.append(f)
    return out


def select_frames(refs: Sequence[FrameRef], frames: Optional[Sequence[FrameInfo]] = None) -> list[FrameRef]:
    """The frames that make one volume (see module doc). ``frames`` (aligned with ``refs``) saves
    re-reading headers when the caller has them (a SeriesPart does)."""
    refs = list(refs)
    if not refs:
        raise FrameSelectionError("no_frames", "no frames given")
    infos = list(frames) if frames is not None else _frame_infos(refs)
    if len(infos) != len(refs):
        raise FrameSelectionError("bad_frames", f"{len(refs)} refs but {len(infos)} frame infos")
    idx = list(range(len(refs)))
    # one orientation: the largest group (first seen wins a tie)
    groups: dict[tuple, list[int]] = {}
    for i in idx:
        o = infos[i].orientation
        key = tuple(np.round(o, 3)) if o else ()
        groups.setdefault(key, []).append(i)
    idx = max(groups.values(), key=len)
    # one temporal phase: the middle one present
    phases = sorted({t for t in (infos[i].temporal_index for i in idx) if t is not None})
    if len(phases) > 1:
        mid = phases[len(phases) // 2]
        idx = [i for i in idx if infos[i].temporal_index == mid]
    # one frame per slice position, preferring isotropic/undirected images
    o = next((infos[i].orientation for i in idx if infos[i].orientation), None)
    if o is not None:
        normal = np.cross(np.asarray(o[:3], float), np.asarray(o[3:], float))
        best: dict[tuple, int] = {}
        for i in idx:
            p = infos[i].position
            if p is None:
                best[("unplaced", i)] = i
                continue
            # a mosaic holds a whole volume: mosaics at one position are repeats of it (fMRI volumes, diffusion
            # directions), as 2D frames at one slice position are
            key = (infos[i].n_slices > 1, round(float(np.dot(normal, p)), 2))
            j = best.get(key)
            if j is None or (_directional(infos[j]) and not _directional(infos[i])):
                best[key] = i
        idx = sorted(best.values())
    return [refs[i] for i in idx]


def _directional(f: FrameInfo) -> bool:
    return f.direction is not None and any(abs(c) > 1e-6 for c in f.direction) and not f.isotropic
