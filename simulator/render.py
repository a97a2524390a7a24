"""Render a SeriesSpec from a Phantom: slab geometry, slice profile, MR signal equations, artifacts.

Pipeline (vectorised; no loops over voxels):

1. Geometry. The slab is centred on the prostate (+ ``spec.center_offset_mm``, + the partial
   coverage shift). Orientation (DICOM ImageOrientationPatient, row then column cosines):
   axial (1,0,0, 0,1,0); sagittal (0,1,0, 0,0,-1); coronal (1,0,0, 0,0,-1); oblique = axial
   tilted 15 deg about the LR axis. Slice k (0-based) has its centre at
   ``centre + (k - (n-1)/2) (thickness + gap) normal`` with ``normal = row x col``, so
   ImagePositionPatient (the centre of the top-left voxel) steps by thickness + gap along the
   normal. Pixel (i, j) (row i, column j) sits at ``position + j * spacing_col * row_dir +
   i * spacing_row * col_dir``; PixelSpacing = (fov_rows / rows, fov_cols / cols).
2. Partial volume / slice profile. Per render class (tissue code, or one class per lesion) a
   table of signal values is looked up on the phantom grid cropped to the slab, filtered with a
   box the slice thickness wide along the slice normal (and a pixel wide in-plane when pixels
   are coarser than the phantom voxels), then sampled at the pixel centres with
   ``scipy.ndimage.map_coordinates`` (order 1). With many contrasts (DCE phases) per-class
   partial-volume fractions are sampled once and combined linearly.
3. Physics: see :mod:`scanside.simulator.physics` (spin echo, SPGR, mono-exponential diffusion, Tofts
   with the Parker AIF). Fat saturation keeps ``artifacts.fat_sat_residual`` of fat/marrow.
4. Artifacts: smooth multiplicative bias field (world-coordinate polynomial, one per series),
   a fine tissue texture fixed to the phantom (plane waves, same in every series),
   motion blur along the phase-encoding direction (+ optional N/2 ghost), Rician noise
   (magnitude of complex Gaussian; sigma scales with 1/B0 and 1/sqrt(voxel volume)),
   global intensity scale, partial coverage (slab shifted along its normal).
5. Echo-planar imaging (DWI and the maps derived from it), applied to every b-value alike:
   B0-inhomogeneity distortion along the phase direction (a smooth displacement field with
   the Jacobian's signal pile-up and stretch), the chemical shift of the residual fat along
   phase (3.4 ppm of the Larmor frequency over the bandwidth per pixel: tens of pixels, wrapped
   around the field of view, which is why SE-EPI suppresses fat twice, spectrally and by
   slice-select gradient reversal: ``epi_fat_residual``), T2* blurring along
   phase and the Nyquist N/2 ghost that every EPI readout leaves. Turbo spin echo has none of
   these; they are what tells a low-b DWI from a fat-saturated T2W at the same contrast.

Pixel values: float32, non-negative, arbitrary units (~0-1000 for spin echo/DWI, ~0-1500 for
gradient echo, scaled x8000); ADC maps in 1e-6 mm^2/s.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
from pydantic import BaseModel, Field
from scipy import ndimage

from scanside.simulator import physics
from scanside.simulator.model import RenderedImage, RenderedSeries, SeriesSpec
from scanside.simulator.phantom import Phantom
from scanside.simulator.physics import N_TISSUES, Tissue

# Acquired b-values assumed for derived maps when the spec does not list them.
DEFAULT_ADC_B_VALUES: tuple[float, ...] = (50.0, 800.0)
DEFAULT_CALC_ACQUIRED_B_VALUES: tuple[float, ...] = (50.0, 800.0)
OBLIQUE_TILT_DEG = 15.0
FAT_WATER_SHIFT_PPM = 3.4
GAMMA_MHZ_PER_T = 42.577

# Noise sigma at 3 T in signal units (PD = 1) for a reference voxel volume (mm^3) and 1 average.
_NOISE_REF: dict[str, tuple[float, float]] = {
    "t2w": (0.010, 0.7 * 0.7 * 3.0),
    "t2w_fs": (0.009, 0.7 * 0.7 * 3.0),
    "dwi": (0.012, 1.6 * 1.6 * 3.5),
    "adc": (0.012, 1.6 * 1.6 * 3.5),
    "calc_bvalue": (0.012, 1.6 * 1.6 * 3.5),
    "dce": (0.0012, 1.5 * 1.5 * 3.0),
    "t1": (0.006, 0.8 * 0.8 * 3.0),
    "localizer": (0.002, 1.2 * 1.2 * 6.0),
}
# Output scaling of signal units to pixel values.
_OUT_SCALE = {"se": 1000.0, "gre": 8000.0}


class Artifacts(BaseModel):
    """Image degradations; the defaults are a realistic mild exam. Training varies them."""

    noise_scale: float = Field(1.0, ge=0.0)  # multiplies the sequence's noise sigma
    bias_field: float = Field(0.15, ge=0.0)  # log-amplitude of the smooth multiplicative field
    motion_blur: float = Field(0.3, ge=0.0)  # mm, FWHM of the blur along the phase direction
    intensity_scale: float = Field(1.0, gt=0.0)  # global gain
    partial_coverage: float = Field(0.0, ge=0.0, le=1.0)  # fraction of the slab shifted off the gland
    fat_sat_residual: float = Field(0.07, ge=0.0, le=1.0)  # fat signal kept by fat saturation
    ghosting: float = Field(0.0, ge=0.0, le=1.0)  # amplitude of an N/2 ghost along phase
    texture: float = Field(0.04, ge=0.0, le=0.5)  # amplitude of the phantom's fine tissue texture
    # echo-planar imaging (DWI); 0 turns each off
    epi_ghost: float = Field(0.02, ge=0.0, le=0.5)  # Nyquist N/2 ghost amplitude
    # fat kept by SE-EPI's fat suppression: spectral saturation plus slice-select gradient reversal
    epi_fat_residual: float = Field(0.02, ge=0.0, le=1.0)
    epi_distortion_mm: float = Field(1.0, ge=0.0)  # typical B0 displacement along phase at the gland
    epi_bandwidth_hz: float = Field(20.0, ge=0.0)  # bandwidth per pixel along phase (0: no fat shift)
    epi_blur_px: float = Field(0.8, ge=0.0)  # FWHM in pixels of the T2* point spread along phase
    # ADC map blanked where the lowest-b signal is below this fraction of its 99th percentile or this many
    # noise sigmas: 0.06 and 3 blank suppressed fat too; scanners that fit it (speckled fat) blank less
    adc_mask_fraction: float = Field(0.06, ge=0.0, le=1.0)
    adc_mask_noise: float = Field(3.0, ge=0.0)

    @classmethod
    def sample(cls, rng: np.random.Generator, severity: float = 1.0) -> "Artifacts":
        """Random artifacts for training; severity 0 = clean, 1 = typical spread, >1 = harsh."""
        s = float(severity)
        return cls(
            noise_scale=float(np.exp(rng.normal(0.0, 0.35 * s))),
            bias_field=float(abs(rng.normal(0.15, 0.1 * s))),
            motion_blur=float(abs(rng.normal(0.0, 1.0 * s))),
            intensity_scale=float(np.exp(rng.normal(0.0, 0.5 * s))),
            partial_coverage=float(min(1.0, rng.uniform(0.0, 0.3 * s)) if rng.random() < 0.1 * s else 0.0),
            fat_sat_residual=float(np.clip(rng.normal(0.07, 0.03 * s), 0.01, 0.4)),
            ghosting=float(abs(rng.normal(0.0, 0.03 * s)) if rng.random() < 0.2 * s else 0.0),
            texture=float(np.clip(rng.normal(0.04, 0.015 * s), 0.0, 0.15)),
            epi_ghost=float(np.clip(0.02 * np.exp(rng.normal(0.0, 0.6 * s)), 0.003, 0.12)),
            epi_fat_residual=float(np.clip(rng.normal(0.02, 0.012 * s), 0.003, 0.1)),
            epi_distortion_mm=float(abs(rng.normal(1.0, 1.0 * s))),
            epi_bandwidth_hz=float(rng.uniform(12.0, 35.0)),
            epi_blur_px=float(rng.uniform(0.4, 1.4)),
        )


# --------------------------------------------------------------------------- geometry


@dataclass
class SlabGeometry:
    row_dir: np.ndarray  # direction along a row (increasing column index)
    col_dir: np.ndarray  # direction down a column (increasing row index)
    normal: np.ndarray
    spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    cols: int
    centres: np.ndarray  # (n_slices, 3) slice centres LPS
    positions: np.ndarray  # (n_slices, 3) ImagePositionPatient

    @property
    def orientation(self) -> tuple[float, float, float, float, float, float]:
        return tuple(float(round(v, 6)) + 0.0 for v in (*self.row_dir, *self.col_dir))  # type: ignore[return-value]

    def pixel_lps(self) -> np.ndarray:
        """World coordinates of all pixel centres, float32 (3, n_slices, rows, cols)."""
        i = np.arange(self.rows, dtype=np.float32) * np.float32(self.spacing[0])
        j = np.arange(self.cols, dtype=np.float32) * np.float32(self.spacing[1])
        out = np.empty((3, len(self.positions), self.rows, self.cols), dtype=np.float32)
        for a in range(3):
            out[a] = (self.positions[:, a].astype(np.float32)[:, None, None]
                      + np.float32(self.col_dir[a]) * i[None, :, None]
                      + np.float32(self.row_dir[a]) * j[None, None, :])
        return out


def plane_axes(plane: str) -> tuple[np.ndarray, np.ndarray]:
    if plane == "axial":
        return np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    if plane == "sagittal":
        return np.array([0, 1.0, 0]), np.array([0, 0, -1.0])
    if plane == "coronal":
        return np.array([1.0, 0, 0]), np.array([0, 0, -1.0])
    if plane == "oblique":
        t = np.deg2rad(OBLIQUE_TILT_DEG)
        return np.array([1.0, 0, 0]), np.array([0, np.cos(t), -np.sin(t)])
    raise ValueError(f"unknown plane {plane!r}")


def slab_geometry(spec: SeriesSpec, centre_lps) -> SlabGeometry:
    r, c = plane_axes(spec.plane)
    nrm = np.cross(r, c)
    rows, cols = int(spec.matrix[0]), int(spec.matrix[1])
    sr, sc = float(spec.fov_mm[0]) / rows, float(spec.fov_mm[1]) / cols
    step = float(spec.slice_thickness_mm) + float(spec.slice_gap_mm)
    k = np.arange(spec.n_slices, dtype=np.float64) - (spec.n_slices - 1) / 2.0
    centres = np.asarray(centre_lps, dtype=np.float64)[None, :] + k[:, None] * step * nrm[None, :]
    pos = centres - (cols - 1) / 2.0 * sc * r[None, :] - (rows - 1) / 2.0 * sr * c[None, :]
    return SlabGeometry(r, c, nrm, (sr, sc), rows, cols, centres, pos)


# --------------------------------------------------------------------------- sampling


def _box_kernel(width_vox: float) -> Optional[np.ndarray]:
    """Normalised box of `width_vox` voxels with fractional end taps; None for width <= 1."""
    if width_vox <= 1.05:
        return None
    half = width_vox / 2.0
    K = int(np.ceil(half - 0.5))
    k = np.arange(-K, K + 1, dtype=np.float64)
    w = np.clip(np.minimum(k + 0.5, half) - np.maximum(k - 0.5, -half), 0.0, 1.0)
    return (w / w.sum()).astype(np.float32)


def _grid_axis(direction: np.ndarray) -> int:
    """Array axis (0=z, 1=y, 2=x) of the grid direction closest to `direction`."""
    return 2 - int(np.argmax(np.abs(direction)))


class _Sampler:
    """Partial-volume sampling of per-class tables at the pixel centres of one slab.

    Axis-aligned planes (axial/sagittal/coronal): each slice is first reduced to one plane of the
    grid by integrating the slice profile (box of the slice thickness, sub-sampled, linear
    between grid planes), then filtered in-plane and sampled in 2D. Oblique planes: the cropped
    volume is filtered along the (nearest) normal axis and sampled in 3D.
    """

    def __init__(self, phantom: Phantom, geom: SlabGeometry, thickness_mm: float, plane: str):
        self.ph = phantom
        self.geom = geom
        v = phantom.voxel_mm
        self.lps = geom.pixel_lps()  # (3, n, r, c)
        idx = (self.lps - phantom.affine[:3, 3].astype(np.float32)[:, None, None, None]) / np.float32(v)
        shp = phantom.labels.shape  # (nz, ny, nx)
        nz, ny, nx = shp
        idx[2] = np.clip(idx[2], 0, nz - 1)  # extend the grid along z
        xi, yi = idx[0], idx[1]
        self.oog = (xi < 0) | (xi > nx - 1) | (yi < 0) | (yi > ny - 1)
        self._body_cls: Optional[np.ndarray] = None
        ins = ~self.oog
        self.empty = not ins.any()
        if self.empty:
            return
        self.aligned = plane in ("axial", "sagittal", "coronal")
        ax_n = _grid_axis(geom.normal)
        # kernel widths (voxels) per array axis: pixel-wide box in plane when pixels are coarse
        widths = [0.0, 0.0, 0.0]
        for d, sp in ((geom.row_dir, geom.spacing[1]), (geom.col_dir, geom.spacing[0])):
            widths[_grid_axis(d)] = sp / v if sp / v > 1.2 else 0.0
        if not self.aligned:
            widths[ax_n] = thickness_mm / v
        self.kernels = [_box_kernel(w) for w in widths]
        margin = [(len(k) // 2 if k is not None else 0) + 2 for k in self.kernels]
        lo, hi = [0, 0, 0], [0, 0, 0]
        for ax in range(3):
            a = idx[2 - ax][ins]
            lo[ax] = max(int(np.floor(a.min())) - margin[ax], 0)
            hi[ax] = min(int(np.ceil(a.max())) + margin[ax] + 1, shp[ax])
        if self.aligned:
            # slice profile -> per slice a few (plane, weight) pairs along the normal axis
            half_w = thickness_mm / v / 2.0
            n_sub = max(2, int(np.ceil(4 * half_w)))
            offs = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * 2 * half_w
            cen = (geom.centres - phantom.affine[:3, 3]) / v
            cen = cen[:, 2 - ax_n]
            t = np.clip(cen[:, None] + offs[None, :], 0, shp[ax_n] - 1)
            j0 = np.floor(t).astype(int)
            f = t - j0
            j1 = np.minimum(j0 + 1, shp[ax_n] - 1)
            self.plane_w: list[dict[int, float]] = []
            for k in range(len(cen)):
                d: dict[int, float] = {}
                for jj, ww in zip(np.concatenate([j0[k], j1[k]]), np.concatenate([1 - f[k], f[k]]) / n_sub):
                    if ww > 1e-6:
                        d[int(jj)] = d.get(int(jj), 0.0) + float(ww)
                self.plane_w.append(d)
            lo[ax_n], hi[ax_n] = 0, shp[ax_n]
            crop = tuple(slice(lo[a], hi[a]) for a in range(3))
            cls = phantom.classes[crop]
            needed = sorted({j for d in self.plane_w for j in d})
            self.planes = {j: cls[(slice(None),) * ax_n + (j,)] for j in needed}
            self.inplane_axes = [a for a in range(3) if a != ax_n]
            self.kernels = [None] + [self.kernels[a] for a in self.inplane_axes]
            coords = np.empty((3,) + xi.shape, dtype=np.float32)
            coords[0] = np.arange(xi.shape[0], dtype=np.float32)[:, None, None]
            for n_, a in enumerate(self.inplane_axes, 1):
                coords[n_] = idx[2 - a] - lo[a]
            sel = (slice(None),) * ax_n + (slice(needed[0], needed[-1] + 1),)
            self.present = np.flatnonzero(np.bincount(cls[sel].ravel()))
        else:
            crop = tuple(slice(lo[a], hi[a]) for a in range(3))
            self.classes = phantom.classes[crop]
            coords = np.empty((3,) + xi.shape, dtype=np.float32)
            for a in range(3):
                coords[a] = idx[2 - a] - lo[a]
            self.present = np.flatnonzero(np.bincount(self.classes.ravel()))
        self.coords = coords

    @property
    def body_classes(self) -> np.ndarray:
        if self._body_cls is None:
            p = self.lps[:, self.oog]
            self._body_cls = self.ph.body_labels_at(p[0], p[1], p[2]).astype(np.intp)
        return self._body_cls

    def _volume(self, lut: np.ndarray) -> np.ndarray:
        """Per-class values `lut` -> the (reduced) volume to be filtered and sampled."""
        if not self.aligned:
            return lut[self.classes]
        first = next(iter(self.planes.values()))
        out = np.zeros((len(self.plane_w),) + first.shape, dtype=np.float32)
        for k, d in enumerate(self.plane_w):
            for j, w in d.items():
                out[k] += np.float32(w) * lut[self.planes[j]]
        return out

    def _filter_sample(self, vol: np.ndarray) -> np.ndarray:
        for ax, k in enumerate(self.kernels):
            if k is not None:
                vol = ndimage.correlate1d(vol, k, axis=ax, mode="nearest")
        return ndimage.map_coordinates(vol, self.coords, order=1, mode="nearest", prefilter=False,
                                       output=np.float32)

    def sample(self, tables: np.ndarray) -> np.ndarray:
        """tables (n_contrasts, n_classes) -> images (n_contrasts, n_slices, rows, cols) float32."""
        tables = np.atleast_2d(np.asarray(tables, dtype=np.float32))
        shape = (tables.shape[0],) + self.lps.shape[1:]
        out = np.zeros(shape, dtype=np.float32)
        if not self.empty:
            present = self.present
            if tables.shape[0] <= len(present):
                for q in range(tables.shape[0]):
                    out[q] = self._filter_sample(self._volume(tables[q]))
            else:
                fr = np.empty((len(present),) + shape[1:], dtype=np.float32)
                for n_, cl in enumerate(present):
                    lut = np.zeros(tables.shape[1], dtype=np.float32)
                    lut[cl] = 1.0
                    fr[n_] = self._filter_sample(self._volume(lut))
                out[:] = np.tensordot(tables[:, present], fr, axes=(1, 0))
        if self.oog.any():
            out[:, self.oog] = tables[:, self.body_classes]
        return out


# --------------------------------------------------------------------------- tissue tables


@dataclass
class _ClassParams:
    pd: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    t2s: np.ndarray
    adc: np.ndarray
    ktrans: np.ndarray
    ve: np.ndarray
    vp: np.ndarray
    flow: np.ndarray
    fat: np.ndarray  # bool


def _class_params(ph: Phantom, field_strength_t: float) -> _ClassParams:
    tp = physics.tissue_params(field_strength_t)
    plist = [tp[Tissue(q)] for q in range(N_TISSUES)]
    for d in ph.lesion_props:
        plist.append(physics.lesion_params(field_strength_t, **d))
    fat = np.zeros(len(plist) + len(ph.texture_props), dtype=bool)
    fat[[int(t) for t in physics.FAT_SUPPRESSED]] = True
    for j, d in enumerate(ph.texture_props):
        base = tp[Tissue(int(d["tissue"]))]
        plist.append(replace(base, t2_ms=base.t2_ms * d["t2"], pd=base.pd * d["pd"], adc=base.adc * d["adc"],
                             t2star_ms=base.t2s * d["t2"]))
        fat[len(plist) - 1] = Tissue(int(d["tissue"])) in physics.FAT_SUPPRESSED
    f = lambda name: np.array([getattr(p, name) for p in plist], dtype=np.float64)  # noqa: E731
    return _ClassParams(f("pd"), f("t1_ms"), f("t2_ms"), np.array([p.t2s for p in plist]), f("adc"),
                        f("ktrans"), f("ve"), f("vp"), f("flow_void"), fat)


# --------------------------------------------------------------------------- artifacts


def _bias(lps: np.ndarray, centre: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    if strength <= 0:
        return np.ones(lps.shape[1:], dtype=np.float32)
    u = (lps - centre.astype(np.float32)[:, None, None, None]) / np.float32(150.0)
    coef = rng.normal(0.0, 1.0, size=9).astype(np.float32)
    coef[3:] *= 0.5
    poly = (coef[0] * u[0] + coef[1] * u[1] + coef[2] * u[2] + coef[3] * u[0] * u[0] + coef[4] * u[1] * u[1]
            + coef[5] * u[2] * u[2] + coef[6] * u[0] * u[1] + coef[7] * u[1] * u[2] + coef[8] * u[0] * u[2])
    return np.exp(np.float32(strength) * poly).astype(np.float32)


def _texture(geom: SlabGeometry, seed: int, amplitude: float) -> np.ndarray:
    """Fine multiplicative texture fixed to the anatomy (same in every series of a phantom):
    a sum of 8 random plane waves, wavelengths 6-25 mm, evaluated at the pixel positions
    (separably: the phase is linear in slice, row and column)."""
    shape = (len(geom.positions), geom.rows, geom.cols)
    if amplitude <= 0:
        return np.ones(shape, dtype=np.float32)
    g = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7E47]))
    n_w = 8
    d = g.normal(size=(n_w, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    k = (2 * np.pi / g.uniform(6.0, 25.0, size=n_w))[:, None] * d
    ph = g.uniform(0, 2 * np.pi, size=n_w)
    acc = np.zeros(shape, dtype=np.float32)
    i = np.arange(geom.rows) * geom.spacing[0]
    j = np.arange(geom.cols) * geom.spacing[1]
    for m in range(n_w):
        e_k = np.exp(1j * (geom.positions @ k[m] + ph[m])).astype(np.complex64)
        e_i = np.exp(1j * i * (geom.col_dir @ k[m])).astype(np.complex64)
        e_j = np.exp(1j * j * (geom.row_dir @ k[m])).astype(np.complex64)
        acc += (e_k[:, None, None] * e_i[None, :, None] * e_j[None, None, :]).real
    return (1.0 + np.float32(amplitude / np.sqrt(n_w / 2.0)) * acc).astype(np.float32)


def _phase_axis(plane: str) -> int:
    """Axis of an (n_slices, rows, cols) stack along which phase is encoded."""
    return 1 if plane in ("axial", "oblique") else 2  # axial: AP (rows); sag: AP (cols); cor: LR (cols)


def _blur_ghost(stack: np.ndarray, geom: SlabGeometry, plane: str, art: Artifacts) -> np.ndarray:
    ax = _phase_axis(plane)
    spacing = geom.spacing[0] if ax == 1 else geom.spacing[1]
    if art.motion_blur > 0:
        sigma = art.motion_blur / 2.355 / spacing
        if sigma > 0.2:
            stack = ndimage.gaussian_filter1d(stack, sigma, axis=ax + (stack.ndim - 3), mode="nearest")
    if art.ghosting > 0:
        n = stack.shape[ax + (stack.ndim - 3)]
        stack = stack + np.float32(art.ghosting) * np.roll(stack, n // 2, axis=ax + (stack.ndim - 3))
    return stack


def _b0_displacement_mm(lps: np.ndarray, centre: np.ndarray, typical_mm: float,
                        rng: np.random.Generator) -> np.ndarray:
    """A smooth B0-inhomogeneity displacement (mm along phase) at the pixel positions: a random
    quadratic of the position (100 mm units) around the gland, about ``typical_mm`` at the gland
    and growing away from it, as a shim leaves it."""
    u = (lps - centre.astype(np.float32)[:, None, None, None]) / np.float32(100.0)
    c = rng.normal(0.0, 1.0, size=10).astype(np.float32)
    poly = (c[0] + c[1] * u[0] + c[2] * u[1] + c[3] * u[2] + 0.5 * (c[4] * u[0] * u[0] + c[5] * u[1] * u[1]
            + c[6] * u[2] * u[2] + c[7] * u[0] * u[1] + c[8] * u[1] * u[2] + c[9] * u[0] * u[2]))
    return np.float32(typical_mm) * poly


def _warp_field(shape: tuple, disp_px: np.ndarray, ax: int) -> tuple[np.ndarray, np.ndarray]:
    """Sampling coordinates and Jacobian of a displacement of ``disp_px`` pixels along axis ``ax``
    (built once per field, applied to every b-value)."""
    coords = np.indices(shape, dtype=np.float32)
    coords[ax] -= disp_px
    jac = np.clip(1.0 - np.gradient(disp_px, axis=ax), 0.2, 3.0).astype(np.float32)
    return coords, jac


def _warp(vol: np.ndarray, field: tuple[np.ndarray, np.ndarray], wrap: bool) -> np.ndarray:
    coords, jac = field
    out = ndimage.map_coordinates(vol, coords, order=1, mode="grid-wrap" if wrap else "nearest",
                                  prefilter=False, output=np.float32)
    return out * jac


def _shift_along(vol: np.ndarray, disp_px: np.ndarray, ax: int, wrap: bool) -> np.ndarray:
    """The image of ``vol`` (n, r, c) whose content is displaced by ``disp_px`` pixels along axis
    ``ax``: I(y) = vol(y - d(y)) * (1 - d'(y)), the Jacobian piling up signal where the field
    compresses the image and thinning it where it stretches."""
    return _warp(vol, _warp_field(vol.shape, disp_px, ax), wrap)


#: what makes one acquisition: the DWI series and the maps the scanner derives from it share these
ACQUISITION_FIELDS = {"plane", "slice_thickness_mm", "slice_gap_mm", "n_slices", "fov_mm", "matrix", "tr_ms", "te_ms",
                       "center_offset_mm"}


def _acquisition_rng(phantom: Phantom, spec: SeriesSpec, stream: int) -> np.random.Generator:
    """A random state of the acquisition rather than of the series: the DWI series and the ADC /
    calculated-b maps that the scanner derives from it share its geometry, hence the same slab
    position, distortion field and fat shift. ``stream`` tells the uses apart."""
    key = zlib.crc32(spec.model_dump_json(include=ACQUISITION_FIELDS).encode())
    return np.random.default_rng(np.random.SeedSequence([int(phantom.seed), key, int(stream)]))


def _epi(water: np.ndarray, fat: np.ndarray, geom: SlabGeometry, plane: str, art: Artifacts,
         field_strength_t: float, centre: np.ndarray, lps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """EPI encoding of the clean water and fat images (n_b, n, r, c): see the module docstring."""
    ax = _phase_axis(plane)
    sp = geom.spacing[0] if ax == 1 else geom.spacing[1]
    disp = (_b0_displacement_mm(lps, centre, art.epi_distortion_mm, rng) / np.float32(sp)
            if art.epi_distortion_mm > 0 else np.zeros(water.shape[1:], dtype=np.float32))
    fat_px = 0.0
    if art.epi_bandwidth_hz > 0:
        sign = 1.0 if rng.random() < 0.5 else -1.0  # the phase-encoding polarity
        fat_px = sign * FAT_WATER_SHIFT_PPM * GAMMA_MHZ_PER_T * field_strength_t / art.epi_bandwidth_hz
    water_field = _warp_field(water.shape[1:], disp, ax) if art.epi_distortion_mm > 0 else None
    fat_field = _warp_field(water.shape[1:], disp + np.float32(fat_px), ax)
    out = np.empty_like(water)
    for q in range(water.shape[0]):
        w = _warp(water[q], water_field, wrap=False) if water_field is not None else water[q]
        out[q] = w + _warp(fat[q], fat_field, wrap=True)
    if art.epi_blur_px > 0:
        out = ndimage.gaussian_filter1d(out, art.epi_blur_px / 2.355, axis=ax + 1, mode="nearest")
    if art.epi_ghost > 0:
        out = out + np.float32(art.epi_ghost) * np.roll(out, out.shape[ax + 1] // 2, axis=ax + 1)
    return out


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    if sigma <= 0:
        return np.abs(signal).astype(np.float32)
    n1 = rng.standard_normal(signal.shape, dtype=np.float32)
    n2 = rng.standard_normal(signal.shape, dtype=np.float32)
    s = np.float32(sigma)
    return np.hypot(signal + s * n1, s * n2)


def noise_sigma(spec: SeriesSpec, field_strength_t: float, art: Artifacts, n_avg: float = 1.0) -> float:
    """Noise sigma in signal units: SNR ~ B0 * sqrt(voxel volume * averages)."""
    s_ref, v_ref = _NOISE_REF.get(spec.kind, (0.01, 2.0))
    vox = spec.fov_mm[0] / spec.matrix[0] * spec.fov_mm[1] / spec.matrix[1] * spec.slice_thickness_mm
    return float(s_ref * (3.0 / max(field_strength_t, 0.1)) * np.sqrt(v_ref / max(vox, 1e-6) / n_avg)
                 * art.noise_scale)


def _directions(n: int) -> list[tuple[float, float, float]]:
    if n == 3:
        return [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    k = np.arange(n) + 0.5
    z = 1.0 - k / n  # hemisphere
    phi = np.pi * (1 + 5**0.5) * k
    rxy = np.sqrt(1 - z**2)
    return [tuple(float(round(t, 6)) for t in (rxy[i] * np.cos(phi[i]), rxy[i] * np.sin(phi[i]), z[i]))
            for i in range(n)]


def _dwi_nex(b: float) -> float:
    """Averages per b-value (scanners average high b more)."""
    return float(1 + int(round(b / 500.0)))


# --------------------------------------------------------------------------- renderer


def render_series(
    phantom: Phantom,
    spec: SeriesSpec,
    field_strength_t: float,
    rng: np.random.Generator,
    artifacts: Artifacts | None = None,
    *,
    emit_directions: bool = False,
) -> RenderedSeries:
    """Render one series. Deterministic for a given phantom, spec and rng state.

    dwi: for each b in spec.b_values (in order) one image per slice: b = 0 -> direction None;
    b > 0 -> the isotropic trace image (direction None, derived None) when spec.include_trace
    (or when no directional images are emitted), followed, when ``emit_directions`` and
    spec.n_directions > 0, by the directional images (unit direction vectors) slice-major per
    direction. The trace is the geometric mean of the directional acquisitions.
    adc: log-linear fit over spec.b_values if it holds >= 2 values, else DEFAULT_ADC_B_VALUES.
    calc_bvalue: extrapolated to spec.b_values[0] (default 1400) from DEFAULT_CALC_ACQUIRED_B_VALUES.
    dce: temporal_index 0..n_phases-1, trigger_time_ms = index * temporal_resolution; contrast
    arrives at 2 * temporal resolution.
    """
    art = artifacts or Artifacts()
    kind = spec.kind
    centre = np.asarray(phantom.prostate_center_lps_mm, dtype=np.float64) + np.asarray(spec.center_offset_mm)
    r, c = plane_axes(spec.plane)
    nrm = np.cross(r, c)
    if art.partial_coverage > 0:
        extent = spec.n_slices * (spec.slice_thickness_mm + spec.slice_gap_mm)
        sign = 1.0 if _acquisition_rng(phantom, spec, 0xC0).random() < 0.5 else -1.0
        centre = centre + sign * art.partial_coverage * extent * nrm
    geom = slab_geometry(spec, centre)
    sampler = _Sampler(phantom, geom, spec.slice_thickness_mm, spec.plane)
    cp = _class_params(phantom, field_strength_t)
    bias = _bias(sampler.lps, centre, art.bias_field, rng)
    bias *= _texture(geom, phantom.seed, art.texture)

    def finish(stack: np.ndarray, sigma: float, scale: float) -> np.ndarray:
        stack = _blur_ghost(stack * bias, geom, spec.plane, art)
        return (_rician(stack, sigma, rng) * np.float32(scale * art.intensity_scale)).astype(np.float32)

    def make(stack: np.ndarray, **kw) -> list[RenderedImage]:
        return [
            RenderedImage(pixels=stack[k], position=tuple(float(t) for t in geom.positions[k]),
                          orientation=geom.orientation, pixel_spacing=geom.spacing, slice_index=k, **kw)
            for k in range(stack.shape[0])
        ]

    images: list[RenderedImage] = []
    se_scale = _OUT_SCALE["se"]

    if kind in ("t2w", "t2w_fs"):
        fs = spec.fat_sat or kind == "t2w_fs"
        pd = cp.pd * cp.flow * np.where(cp.fat & fs, art.fat_sat_residual, 1.0)
        table = physics.spin_echo(pd, cp.t1, cp.t2, spec.tr_ms, spec.te_ms)
        stack = finish(sampler.sample(table)[0], noise_sigma(spec, field_strength_t, art), se_scale)
        images = make(stack)

    elif kind in ("dwi", "adc", "calc_bvalue"):
        if kind == "dwi":
            bvals = [float(b) for b in spec.b_values] or [0.0]
        elif kind == "adc":
            bvals = [float(b) for b in spec.b_values] if len(spec.b_values) >= 2 else list(DEFAULT_ADC_B_VALUES)
        else:
            bvals = list(DEFAULT_CALC_ACQUIRED_B_VALUES)
        pd = cp.pd * cp.flow * np.where(cp.fat, art.epi_fat_residual, 1.0)  # SE-EPI is always fat-suppressed
        s0 = physics.spin_echo(pd, cp.t1, cp.t2, spec.tr_ms, spec.te_ms)
        tables = np.stack([physics.diffusion(s0, cp.adc, b) for b in bvals])
        nb = len(bvals)
        parts = sampler.sample(np.concatenate([np.where(cp.fat, 0.0, tables), np.where(cp.fat, tables, 0.0)]))
        # the scanner computes the ADC and calculated-b maps from the very images of the DWI series: the same
        # coil sensitivity and, b-value by b-value, the same noise (a random state of the acquisition)
        parts *= (_bias(sampler.lps, centre, art.bias_field, _acquisition_rng(phantom, spec, 0xB1A5))
                  * _texture(geom, phantom.seed, art.texture))[None]
        gland = np.asarray(phantom.prostate_center_lps_mm, dtype=np.float64)
        clean = _epi(parts[:nb], parts[nb:], geom, spec.plane, art, field_strength_t, gland, sampler.lps,
                     _acquisition_rng(phantom, spec, 0xE91))
        clean = _blur_ghost(clean, geom, spec.plane, art)
        ndir = max(int(spec.n_directions), 1)
        dirs = _directions(ndir)
        traces, directional = [], []
        for q, b in enumerate(bvals):
            sig = noise_sigma(spec, field_strength_t, art, n_avg=_dwi_nex(b))
            brng = _acquisition_rng(phantom, spec, 0xD0000 + int(round(b)))
            if b <= 0:
                traces.append(_rician(clean[q], sig, brng))
                directional.append(None)
                continue
            d_imgs = np.stack([_rician(clean[q], sig, brng) for _ in range(ndir)])
            traces.append(np.exp(np.mean(np.log(np.maximum(d_imgs, 1e-6)), axis=0)).astype(np.float32))
            directional.append(d_imgs)
        g = np.float32(se_scale * art.intensity_scale)
        if kind == "dwi":
            for q, b in enumerate(bvals):
                with_dirs = emit_directions and spec.n_directions > 0 and b > 0
                if b <= 0 or spec.include_trace or not with_dirs:
                    images += make(traces[q] * g, b_value=b)
                if with_dirs:
                    for di, dvec in enumerate(dirs):
                        images += make(directional[q][di] * g, b_value=b, direction=dvec)
        else:
            S = np.stack(traces)  # (n_b, n, r, c)
            floor = art.adc_mask_noise * noise_sigma(spec, field_strength_t, art, n_avg=_dwi_nex(min(bvals)))
            adc, ln_s0, fg = fit_adc(S, bvals, noise_floor=floor, mask_fraction=art.adc_mask_fraction)
            if kind == "adc":
                images = make(adc, derived="ADC")
            else:
                target = float(spec.b_values[0]) if spec.b_values else 1400.0
                # like the scanner: extrapolate wherever there is signal (only air is blanked)
                slope = np.clip(-np.tensordot(np.asarray(bvals) - np.mean(bvals), np.log(np.maximum(S, 1e-6)),
                                              axes=(0, 0)) / np.sum((np.asarray(bvals) - np.mean(bvals)) ** 2),
                                0.0, None)
                body = S[int(np.argmin(bvals))] >= floor
                calc = np.where(body, np.exp(ln_s0 - target * slope), 0.0).astype(np.float32)
                images = make(calc * g, b_value=target, derived="CALC_BVALUE")

    elif kind == "dce":
        dt = float(spec.temporal_resolution_s) if spec.temporal_resolution_s > 0 else 10.0
        n_ph = max(int(spec.n_phases), 1)
        times = (np.arange(n_ph) + 0.5) * dt  # centre of k-space of each phase
        conc = physics.tofts_concentration(cp.ktrans, cp.ve, cp.vp, times, arrival_s=2.0 * dt)  # (ncls, nph)
        r1 = physics.relaxivity(field_strength_t)
        R1 = 1000.0 / cp.t1[:, None] + r1 * conc  # 1/s
        pd = cp.pd * np.where(cp.fat & spec.fat_sat, art.fat_sat_residual, 1.0)
        tables = physics.spoiled_gre(pd[:, None], 1000.0 / R1, cp.t2s[:, None], spec.tr_ms, spec.te_ms,
                                     spec.flip_angle_deg).T  # (nph, ncls)
        clean = sampler.sample(tables) * bias[None]
        sig = noise_sigma(spec, field_strength_t, art)
        for p in range(n_ph):
            st = _blur_ghost(clean[p], geom, spec.plane, art)
            st = (_rician(st, sig, rng) * np.float32(_OUT_SCALE["gre"] * art.intensity_scale)).astype(np.float32)
            images += make(st, temporal_index=p, trigger_time_ms=float(p * dt * 1000.0))

    elif kind in ("t1", "localizer"):
        pd = cp.pd * np.where(cp.fat & spec.fat_sat, art.fat_sat_residual, 1.0)
        if kind == "t1" and spec.flip_angle_deg >= 60:
            table = physics.spin_echo(pd * cp.flow, cp.t1, cp.t2, spec.tr_ms, spec.te_ms)
            scale = se_scale
        else:
            table = physics.spoiled_gre(pd, cp.t1, cp.t2s, spec.tr_ms, spec.te_ms, spec.flip_angle_deg)
            scale = _OUT_SCALE["gre"]
        stack = finish(sampler.sample(table)[0], noise_sigma(spec, field_strength_t, art), scale)
        images = make(stack)
    else:  # pragma: no cover - SeriesKind is a closed Literal
        raise ValueError(f"unknown series kind {kind!r}")

    return RenderedSeries(spec=spec, images=images)


def fit_adc(S: np.ndarray, bvals, noise_floor: float = 0.0, mask_fraction: float = 0.06
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mono-exponential log-linear least-squares fit over b.

    S: (n_b, ...) signal; returns (ADC in 1e-6 mm^2/s clipped to [0, 4000] and 0 in background,
    ln S0, foreground mask). Background = lowest-b signal below max(mask_fraction of its 99th percentile, noise_floor).
    """
    b = np.asarray(bvals, dtype=np.float64)
    lnS = np.log(np.maximum(S, 1e-6)).astype(np.float32)
    bc = (b - b.mean()).astype(np.float32)
    mean_ln = lnS.mean(axis=0)
    slope = np.tensordot(bc, lnS - mean_ln[None], axes=(0, 0)) / np.float32((bc**2).sum())
    ln_s0 = mean_ln - slope * np.float32(b.mean())
    adc = np.clip(-slope * 1e6, 0.0, 4000.0).astype(np.float32)
    low = S[int(np.argmin(b))]
    thr = max(mask_fraction * float(np.percentile(low, 99)), noise_floor)
    fg = low >= thr
    adc[~fg] = 0.0
    return adc, ln_s0.astype(np.float32), fg
