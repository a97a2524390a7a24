"""The one preprocessing implementation (PreprocessSpec) shared by training, calibration,
evaluation and the agent: reorient -> resample -> crop/pad -> normalise, channels on one grid.

Conventions:

* Volumes are ``scanside.agent.dicom.volume.Volume`` (array (axis0, axis1, axis2), ``affine`` maps the axes in
  reverse order (axis2, axis1, axis0) -> LPS mm; ``array_affine`` in array order).
* A ``Grid`` is a voxel grid in patient space: ``shape`` and ``affine`` mapping *array-order*
  indices (d0, d1, d2, 1) -> LPS mm. This is what prepare() returns with the model input, so a
  model output on that grid maps back to the patient with ``Grid.index_to_lps``.
* Axis codes are nibabel-style letters in the LPS world ("SPL": axis0 runs to Superior,
  axis1 to Posterior, axis2 to Left -- a straight axial stack as the scanner writes it).
* Resampling keeps the centre of the field of view: a grid of n voxels at spacing s becomes
  round(n*s/s') voxels at s', centred on the same point, so the physical extent is preserved
  (exactly when n*s/s' is an integer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import numpy as np
from scipy import ndimage

from scanside.agent.dicom.volume import LPS_LABELS, Volume, axcodes_of, float3, int3
from scanside.engines.spec import DetailView, PreprocessSpec, WindowSpec


SplineOrder = Literal[0, 1, 2, 3, 4, 5]  # the interpolation orders scipy.ndimage takes


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, int, int]
    affine: np.ndarray  # 4x4: (d0, d1, d2, 1) -> LPS mm, array-axis order

    @classmethod
    def of(cls, vol: Volume) -> "Grid":
        return cls(shape=vol.shape, affine=vol.array_affine.copy())

    @property
    def spacing(self) -> tuple[float, float, float]:
        return float3(np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def axcodes(self) -> str:
        return axcodes_of(self.affine)

    def index_to_lps(self, ijk) -> np.ndarray:
        """Array indices (..., 3) in (d0, d1, d2) order -> LPS mm (..., 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, xyz) -> np.ndarray:
        """LPS mm (..., 3) -> fractional array indices (..., 3)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def center_lps(self) -> np.ndarray:
        return self.index_to_lps((np.asarray(self.shape, dtype=float) - 1) / 2)

    def volume(self, array: np.ndarray) -> Volume:
        """Wrap an array laid out on this grid as a Volume (e.g. a model output)."""
        if tuple(array.shape) != tuple(self.shape):
            raise ValueError(f"array shape {array.shape} != grid shape {self.shape}")
        return Volume.from_array_affine(np.asarray(array, dtype=np.float32), self.affine)


GridLike = Union[Grid, Volume]


def _grid(g: GridLike) -> Grid:
    return Grid.of(g) if isinstance(g, Volume) else g


# ----------------------------------------------------------------------------------------
# Reorient
# ----------------------------------------------------------------------------------------


def _reorient_transform(array_affine: np.ndarray, axcodes: str):
    import nibabel.orientations as nio

    start = nio.io_orientation(array_affine)  # world axes are LPS here; labels only name them
    end = nio.axcodes2ornt(tuple(axcodes.upper()), labels=LPS_LABELS)
    return nio.ornt_transform(start, end)


def reorient_grid(grid: GridLike, axcodes: str) -> Grid:
    """The grid with its axes permuted/flipped to the closest match of ``axcodes`` (no resampling)."""
    import nibabel.orientations as nio

    g = _grid(grid)
    t = _reorient_transform(g.affine, axcodes)
    aff = g.affine @ nio.inv_ornt_aff(t, g.shape)
    shape = int3(g.shape[int(k)] for k in np.argsort(t[:, 0]))
    return Grid(shape=shape, affine=aff)


def reorient(vol: Volume, axcodes: str) -> Volume:
    """Permute/flip the array axes to ``axcodes`` (LPS world); exact, no interpolation."""
    import nibabel.orientations as nio

    t = _reorient_transform(vol.array_affine, axcodes)
    arr = np.ascontiguousarray(nio.apply_orientation(vol.array, t))
    aff = vol.array_affine @ nio.inv_ornt_aff(t, vol.array.shape)
    return Volume.from_array_affine(arr, aff, slice_thickness=vol.slice_thickness, warnings=list(vol.warnings))


# ----------------------------------------------------------------------------------------
# Resample
# ----------------------------------------------------------------------------------------


def resampled_grid(grid: GridLike, spacing_mm) -> Grid:
    """Same directions and centre, new spacing, shape round(n*s/s')."""
    g = _grid(grid)
    old = np.asarray(g.spacing)
    new = np.asarray(spacing_mm, dtype=float)
    n = np.asarray(g.shape, dtype=float)
    n_new = np.maximum(1, np.round(n * old / new)).astype(int)
    zoom = new / old  # old-index step per new-index step
    origin_idx = (n - 1) / 2 - (n_new - 1) / 2 * zoom  # keep the FOV centre
    aff = g.affine.copy()
    aff[:3, :3] = g.affine[:3, :3] * zoom
    aff[:3, 3] = g.affine[:3, :3] @ origin_idx + g.affine[:3, 3]
    return Grid(shape=int3(n_new), affine=aff)


def _sample(
    array: np.ndarray, src_affine: np.ndarray, dst: Grid, order: SplineOrder, outside: str
) -> np.ndarray:
    """Sample ``array`` (with array-order affine ``src_affine``) on grid ``dst``.

    outside="zero": voxels whose centre falls more than half a voxel outside the source are 0;
    inside that, the edge is extended (no darkening of border voxels by interpolation).
    outside="nearest": extend edge values everywhere."""
    m = np.linalg.inv(src_affine) @ dst.affine  # dst index -> src index
    lin, off = m[:3, :3], m[:3, 3]
    src = np.asarray(array, dtype=np.float32)
    if np.allclose(lin, np.diag(np.diag(lin)), atol=1e-9):
        lin_arg = np.diag(lin)  # separable fast path in scipy
    else:
        lin_arg = lin
    if outside == "zero" and np.allclose(lin, np.eye(3), atol=1e-9) and np.allclose(off, np.round(off), atol=1e-6):
        return _shift_copy(src, np.round(off).astype(int), dst.shape)  # pure crop/pad, exact
    else:
        out = ndimage.affine_transform(
            src, lin_arg, offset=off, output_shape=tuple(dst.shape), order=order, mode="nearest", prefilter=order > 1
        )
    if outside == "zero":
        inside = np.ones(dst.shape, dtype=bool)
        idx = [np.arange(s, dtype=np.float64) for s in dst.shape]
        for a in range(3):  # separable sums of an affine map: no per-voxel Python
            coord = (
                lin[a, 0] * idx[0][:, None, None] + lin[a, 1] * idx[1][None, :, None] + lin[a, 2] * idx[2][None, None, :] + off[a]
            )
            inside &= (coord >= -0.5) & (coord <= src.shape[a] - 0.5)
        out[~inside] = 0.0
    return out.astype(np.float32, copy=False)


def _shift_copy(src: np.ndarray, start: np.ndarray, shape) -> np.ndarray:
    """out[i] = src[i + start] where defined, else 0 (integer crop/pad, one vectorised copy)."""
    out = np.zeros(tuple(shape), dtype=np.float32)
    s_sl, d_sl = [], []
    for a in range(3):
        lo = max(0, int(start[a]))
        hi = min(src.shape[a], int(start[a]) + int(shape[a]))
        if hi <= lo:
            return out
        s_sl.append(slice(lo, hi))
        d_sl.append(slice(lo - int(start[a]), hi - int(start[a])))
    out[tuple(d_sl)] = src[tuple(s_sl)]
    return out


def resample(vol: Volume, spacing_mm, order: SplineOrder = 1) -> Volume:
    """Resample to ``spacing_mm`` along the array axes (same directions and FOV centre)."""
    g = resampled_grid(vol, spacing_mm)
    arr = _sample(vol.array, vol.array_affine, g, order, outside="nearest")
    return Volume.from_array_affine(arr, g.affine, slice_thickness=vol.slice_thickness, warnings=list(vol.warnings))


def resample_to_reference(moving: Volume, reference_grid: GridLike, order: SplineOrder = 1) -> Volume:
    """Put ``moving`` on ``reference_grid`` by its affine (any FOV, resolution or orientation).
    Grid voxels outside the moving volume's field of view are 0."""
    g = _grid(reference_grid)
    arr = _sample(moving.array, moving.array_affine, g, order, outside="zero")
    return Volume.from_array_affine(arr, g.affine, slice_thickness=moving.slice_thickness)


# ----------------------------------------------------------------------------------------
# Crop / pad
# ----------------------------------------------------------------------------------------


def resized_grid(grid: GridLike, shape) -> Grid:
    """Same directions, centre and physical extent (n * spacing per axis), ``shape`` voxels:
    spacing becomes n * s / shape along each axis (an image resize in patient space)."""
    g = _grid(grid)
    shape_a = np.asarray(shape, dtype=float)
    if shape_a.shape != (3,) or np.any(shape_a < 1):
        raise ValueError(f"resize shape must be 3 positive sizes, got {shape}")
    new = np.asarray(g.shape, dtype=float) * np.asarray(g.spacing) / shape_a
    out = resampled_grid(g, new)
    if tuple(out.shape) != tuple(int(v) for v in shape_a):  # rounding guard; cannot differ by more than 1
        raise AssertionError(f"resized grid {out.shape} != {tuple(shape)}")
    return out


def antialias_for(array: np.ndarray, src_affine: np.ndarray, dst: Grid) -> np.ndarray:
    """Gaussian prefilter of ``array`` before it is sampled on ``dst``: along each source axis
    whose step per destination voxel (zoom) exceeds 1, sigma = (zoom - 1) / 2 source voxels
    (as skimage.transform.resize(anti_aliasing=True)); unchanged where nothing is downsampled."""
    lin = (np.linalg.inv(src_affine) @ dst.affine)[:3, :3]
    zoom = np.abs(lin).max(axis=1)  # source-index step along each source axis
    sigma = np.maximum(0.0, (zoom - 1.0) / 2.0)
    if not np.any(sigma > 0.05):
        return array
    return ndimage.gaussian_filter(np.asarray(array, dtype=np.float32), sigma, mode="nearest")


def cropped_grid(grid: GridLike, shape, center_lps=None) -> Grid:
    """A ``shape`` window of ``grid`` (integer voxel offset) centred on the grid centre or on
    the voxel nearest ``center_lps``."""
    g = _grid(grid)
    shape = np.asarray(shape, dtype=int)
    if center_lps is None:
        c = (np.asarray(g.shape, dtype=float) - 1) / 2
    else:
        c = g.lps_to_index(np.asarray(center_lps, dtype=float))
    start = np.floor(c - (shape - 1) / 2 + 0.5).astype(int)
    aff = g.affine.copy()
    aff[:3, 3] = g.affine[:3, :3] @ start + g.affine[:3, 3]
    return Grid(shape=int3(shape), affine=aff)


def crop_or_pad(vol: Volume, shape, center_lps=None) -> Volume:
    """Crop/zero-pad to ``shape`` around the centre (or ``center_lps``); affine follows."""
    g = cropped_grid(vol, shape, center_lps)
    start = np.round(np.linalg.inv(vol.array_affine) @ g.affine[:, 3])[:3].astype(int)
    arr = _shift_copy(np.asarray(vol.array, dtype=np.float32), start, g.shape)
    return Volume.from_array_affine(arr, g.affine, slice_thickness=vol.slice_thickness)


# ----------------------------------------------------------------------------------------
# Normalise
# ----------------------------------------------------------------------------------------


def normalize(array: np.ndarray, mode: str = "zscore_percentile", clip_percentiles=(0.5, 99.5)) -> np.ndarray:
    """zscore_percentile: clip to the percentiles, then z-score (PI-CAI).
    zscore_nonzero: z-score over non-zero voxels, zeros stay 0 (MONAI NormalizeIntensity(nonzero=True), TAPS).
    none: unchanged (float32)."""
    a = np.asarray(array, dtype=np.float32)
    if mode == "none":
        return a.copy()
    if mode == "zscore_percentile":
        lo, hi = np.percentile(a, [float(clip_percentiles[0]), float(clip_percentiles[1])])
        a = np.clip(a, lo, hi)
        mean, std = float(a.mean(dtype=np.float64)), float(a.std(dtype=np.float64))
        return ((a - mean) / (std if std > 0 else 1.0)).astype(np.float32)
    if mode == "zscore_nonzero":
        out = a.copy()
        mask = a != 0
        if not mask.any():
            return out
        v = a[mask].astype(np.float64)
        std = float(v.std())
        out[mask] = ((v - v.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
        return out
    raise ValueError(f"unknown normalisation mode {mode!r}")


# ----------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------


def _oriented(reference: GridLike, spec: PreprocessSpec) -> Grid:
    """``reference`` in the model's axes: its own acquisition axes, or reoriented to spec.axcodes."""
    return _grid(reference) if spec.orientation == "acquisition" else reorient_grid(reference, spec.axcodes)


def model_grid(reference: GridLike, spec: PreprocessSpec, center_lps=None) -> Grid:
    """The model's input grid: reference reoriented to spec.axcodes (or kept in its acquisition
    axes, orientation="acquisition"), resampled to spec.spacing_mm, cropped/padded to spec.shape
    (centre, or ``center_lps`` for crop="gland"); with fit="resize" the whole field of view is
    resampled onto spec.shape instead."""
    g = _oriented(reference, spec)
    if spec.fit == "resize":
        if spec.shape is None:
            raise ValueError("fit='resize' needs spec.shape")
        return resized_grid(g, spec.shape)
    g = resampled_grid(g, spec.spacing_mm)
    if spec.shape is not None and spec.crop != "none":
        if spec.crop == "gland" and center_lps is None:
            raise ValueError("crop='gland' needs center_lps (e.g. the gland centroid)")
        g = cropped_grid(g, spec.shape, center_lps)
    return g


def detail_grid(reference: GridLike, spec: PreprocessSpec, view: DetailView) -> Grid:
    """The grid of one detail view: ``reference`` in the main grid's orientation, resampled to
    ``view.spacing_mm`` and cropped/padded to ``spec.shape`` around its centre."""
    if spec.shape is None:
        raise ValueError("detail views need spec.shape")
    return cropped_grid(resampled_grid(_oriented(reference, spec), view.spacing_mm), spec.shape)


def _channel(v: Volume, grid: Grid, spec: PreprocessSpec, order: SplineOrder) -> np.ndarray:
    src = antialias_for(v.array, v.array_affine, grid) if spec.antialias else v.array
    return normalize(_sample(src, v.array_affine, grid, order, outside="zero"), spec.normalize, spec.clip_percentiles)


def prepare(
    volumes: dict[str, Volume], spec: PreprocessSpec, center_lps=None, order: SplineOrder = 1
) -> tuple[np.ndarray, Grid]:
    """All channels of ``spec.channels`` on one model grid (the first channel's), normalised,
    followed by the first channel's ``spec.detail_views`` (each on its own fine grid).

    Each channel is interpolated once, straight from its native grid, by affine
    (reorient + resample + crop collapse into one sampling). Returns float32 (C, d0, d1, d2)
    and the main Grid, whose ``index_to_lps`` maps model-output voxels back to the patient."""
    missing = [c for c in spec.channels if c not in volumes]
    if missing:
        raise KeyError(f"prepare: missing channels {missing} (have {sorted(volumes)})")
    first = volumes[spec.channels[0]]
    grid = model_grid(first, spec, center_lps)
    out = np.empty((spec.n_input_channels,) + tuple(grid.shape), dtype=np.float32)
    for i, name in enumerate(spec.channels):
        out[i] = _channel(volumes[name], grid, spec, order)
    for j, view in enumerate(spec.detail_views):
        out[len(spec.channels) + j] = _channel(first, detail_grid(first, spec, view), spec, order)
    return out, grid


# ----------------------------------------------------------------------------------------
# Sliding window inference
# ----------------------------------------------------------------------------------------


def _starts(size: int, roi: int, overlap: float) -> list[int]:
    if size <= roi:
        return [0]
    interval = max(1, int(roi * (1.0 - overlap)))
    n = int(np.ceil((size - roi) / interval)) + 1
    return sorted({min(i * interval, size - roi) for i in range(n)})


def importance_map(roi, blend: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI-style blending weights over one window (gaussian centred at roi//2, min clamped
    to the smallest positive value so every voxel gets weight)."""
    roi = tuple(int(r) for r in roi)
    if blend == "constant":
        return np.ones(roi, dtype=np.float32)
    w = np.ones((), dtype=np.float64)
    for r in roi:
        sigma = max(sigma_scale * r, 1e-6)
        x = np.arange(r, dtype=np.float64) - r // 2
        g = np.exp(-0.5 * (x / sigma) ** 2)
        w = np.multiply.outer(w, g)
    w = w / w.max()
    pos = w[w > 0]
    w = np.maximum(w, pos.min() if pos.size else 1.0)
    return w.astype(np.float32)


def sliding_window(
    run_fn: Callable[[np.ndarray], np.ndarray],
    array: np.ndarray,
    window: WindowSpec,
    batch_size: int = 4,
) -> np.ndarray:
    """Run ``run_fn`` over overlapping ``window.roi`` windows of ``array`` (C, d0, d1, d2) and
    blend the outputs: returns (C_out, d0, d1, d2) float32.

    ``run_fn`` takes a batch (B, C, *roi) float32 and returns (B, C_out, *roi). A volume
    smaller than the roi is zero-padded symmetrically (and cropped back)."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"sliding_window expects (C, d0, d1, d2), got {array.shape}")
    roi = tuple(int(r) for r in window.roi)
    size = a.shape[1:]
    pad = [(max(0, r - s) // 2, max(0, r - s) - max(0, r - s) // 2) for r, s in zip(roi, size)]
    if any(p != (0, 0) for p in pad):
        a = np.pad(a, [(0, 0)] + pad)
    psize = a.shape[1:]
    starts = [(i, j, k) for i in _starts(psize[0], roi[0], window.overlap)
              for j in _starts(psize[1], roi[1], window.overlap)
              for k in _starts(psize[2], roi[2], window.overlap)]
    w = importance_map(roi, window.blend, window.sigma_scale)
    acc: Optional[np.ndarray] = None
    norm = np.zeros(psize, dtype=np.float32)
    for b0 in range(0, len(starts), batch_size):
        chunk = starts[b0:b0 + batch_size]
        batch = np.stack([a[:, i:i + roi[0], j:j + roi[1], k:k + roi[2]] for i, j, k in chunk])
        pred = np.asarray(run_fn(batch), dtype=np.float32)
        if pred.ndim != 5 or pred.shape[0] != len(chunk) or tuple(pred.shape[2:]) != roi:
            raise ValueError(f"run_fn returned {pred.shape}, expected ({len(chunk)}, C_out, {roi})")
        if acc is None:
            acc = np.zeros((pred.shape[1],) + tuple(psize), dtype=np.float32)
        for (i, j, k), p in zip(chunk, pred):  # per window, not per voxel
            sl = (slice(i, i + roi[0]), slice(j, j + roi[1]), slice(k, k + roi[2]))
            acc[(slice(None),) + sl] += p * w
            norm[sl] += w
    assert acc is not None
    out = acc / norm
    crop = tuple(slice(p[0], p[0] + s) for p, s in zip(pad, size))
    return np.ascontiguousarray(out[(slice(None),) + crop])
