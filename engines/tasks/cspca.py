"""Runtime csPCa model: volumes -> exam probability, voxel likelihood map and lesion findings.

``CspcaModel(store).predict({"T2W": v, "ADC": v, "HBV": v}, center_lps=None)`` prepares the three
volumes with the manifest's PreprocessSpec (scanside.engines.preprocess.prepare: the same code the model was
trained and evaluated with), runs the ONNX model on whatever back end the store picks (no torch),
and extracts findings from the likelihood map.

Finding extraction (``extract_findings``), parameters from ``manifest.postprocessing``:

1. Threshold the likelihood map at ``lesion_threshold``; 3D connected components (scipy.ndimage,
   26-connectivity). A component that holds two or more peaks is split between them (``split_peaks``):
   a peak counts when it rises at least ``split_dynamic`` above the saddle that joins it to the
   others and is itself ``min_volume_mm3`` big there (so that noise never splits a lesion); every
   voxel of the component goes to its nearest peak. Two lesions that touch on the map are thus
   reported as two findings, each with its own centre. A region is kept when its peak likelihood
   >= ``min_peak`` and its volume >= ``min_volume_mm3``.
2. Centre: the likelihood-weighted centroid of the component's voxels, mapped to LPS mm by the
   grid's affine (``Grid.index_to_lps``).
3. Long / short axis (mm), measured as a radiologist does, in the axial plane: on the slice where
   the component's area is largest, the in-plane covariance of the voxel centres (in mm, along the
   grid's in-plane axis vectors) plus the variance of one voxel (s^2/12 per axis); for a filled
   ellipse with semi-axes a >= b the eigenvalues are a^2/4 and b^2/4, so axis = 4 * sqrt(eigenvalue).
4. Volume (ml) = voxels x voxel volume; likelihood = the component's peak.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

from scanside.agent.schema.events import LesionFinding
from scanside.engines.tasks.input_range import InputRange, RangeCheck
from scanside.agent.dicom.volume import Volume
from scanside.engines.preprocess import Grid, prepare

log = logging.getLogger(__name__)

DEFAULT_MODEL = "cspca-reference"
CHANNELS = ("T2W", "ADC", "HBV")
DEFAULT_POSTPROCESSING: Dict[str, float] = {
    "lesion_threshold": 0.5, "min_peak": 0.5, "min_volume_mm3": 30.0, "decision_threshold": 0.5,
    "split_dynamic": 0.1,
}
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
_SPLIT_STEP = 0.02  # likelihood levels swept when looking for the saddle between two peaks
#: a region larger than this is no lesion (a whole gland is 25-60 mL) but a map that failed (an untrained or
#: out-of-distribution model: noise around the threshold everywhere); it is measured unsplit, since sweeping
#: its thousands of noise peaks costs minutes
_MAX_SPLIT_MM3 = 100_000.0


class CspcaInputError(ValueError):
    """The inputs cannot be used (missing channel, empty or non-finite volume); ``reason`` is a short code."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclasses.dataclass
class CspcaPrediction:
    probability: float
    findings: List[LesionFinding]
    likelihood: np.ndarray  # float32 (d0, d1, d2) on `grid`
    grid: Grid
    model: str = ""
    backend: str = ""
    range_check: Optional[RangeCheck] = None  # the input against the model's validated range (None: no range)

    def likelihood_volume(self) -> Volume:
        return self.grid.volume(self.likelihood)


def _in_plane_axes(coords_mm: np.ndarray, pixel_var: float) -> tuple[float, float]:
    """Long and short axis (mm) of a 2D point set (n, 2) in mm."""
    if len(coords_mm) == 1:
        s = float(np.sqrt(12.0 * pixel_var))
        return s, s
    cov = np.cov(coords_mm, rowvar=False, bias=True) + np.eye(2) * pixel_var
    ev = np.clip(np.linalg.eigvalsh(cov), 0.0, None)
    return float(4.0 * np.sqrt(ev[1])), float(4.0 * np.sqrt(ev[0]))


def _peaks_of(lk: np.ndarray, region: np.ndarray, level: float, dynamic: float, min_voxels: int) -> List[np.ndarray]:
    """The cores (boolean masks) of the separate peaks of ``region``, a connected part of lk >= level:
    sweeping the level up, the first level at which the region falls apart into two or more parts
    that each rise ``dynamic`` above it and hold ``min_voxels`` splits it, and each part is split
    again the same way. A region with one such peak is its own core."""
    top = float(lk[region].max())
    t = level
    while t + _SPLIT_STEP <= top:
        t += _SPLIT_STEP
        parts, n = ndimage.label(region & (lk >= t), structure=_CONNECTIVITY)
        if n < 2:
            continue
        ids = np.arange(1, n + 1)
        peaks = ndimage.maximum(lk, parts, ids)
        sizes = ndimage.sum_labels(np.ones(parts.shape, dtype=np.int32), parts, ids)
        keep = [int(i) for i, p, v in zip(ids, peaks, sizes) if p - (t - _SPLIT_STEP) >= dynamic and v >= min_voxels]
        if len(keep) >= 2:
            return [core for i in keep for core in _peaks_of(lk, parts == i, t, dynamic, min_voxels)]
    return [region]


def split_peaks(lk: np.ndarray, component: np.ndarray, level: float, dynamic: float, min_voxels: int,
                spacing: Sequence[float]) -> List[np.ndarray]:
    """``component`` (boolean, a connected part of lk >= level) as one region per separate peak: the
    voxels go to the nearest core (in mm). See the module docstring."""
    if dynamic <= 0 or float(component.sum()) * float(np.prod(spacing)) > _MAX_SPLIT_MM3:
        return [component]
    cores = _peaks_of(lk, component, level, dynamic, min_voxels)
    if len(cores) == 1:
        return [component]
    marks = np.zeros(component.shape, dtype=np.int32)
    for k, core in enumerate(cores, start=1):
        marks[core] = k
    _, nearest = ndimage.distance_transform_edt(marks == 0, sampling=spacing, return_indices=True)
    owner = marks[tuple(nearest)]
    return [component & (owner == k) for k in range(1, len(cores) + 1)]


def extract_findings(likelihood: np.ndarray, grid: Grid, *, lesion_threshold: float = 0.5, min_peak: float = 0.5,
                     min_volume_mm3: float = 30.0, split_dynamic: float = DEFAULT_POSTPROCESSING["split_dynamic"],
                     max_findings: int = 10, **_: Any) -> List[LesionFinding]:
    """Lesion findings from a likelihood map on ``grid`` (see the module docstring); sorted by likelihood."""
    lk = np.nan_to_num(np.asarray(likelihood, dtype=np.float32), nan=0.0)
    if lk.shape != tuple(grid.shape):
        raise ValueError(f"likelihood shape {lk.shape} != grid shape {grid.shape}")
    mask = lk >= float(lesion_threshold)
    if not mask.any():
        return []
    lab, n = ndimage.label(mask, structure=_CONNECTIVITY)
    a = grid.affine[:3, :3]
    spacing = np.linalg.norm(a, axis=0)
    vox_mm3 = float(abs(np.linalg.det(a)))
    min_voxels = max(1, int(np.ceil(min_volume_mm3 / vox_mm3)))
    u1, u2 = a[:, 1] / spacing[1], a[:, 2] / spacing[2]  # in-plane unit vectors (LPS)
    pixel_var = float((spacing[1] ** 2 + spacing[2] ** 2) / 2.0 / 12.0)
    out: List[LesionFinding] = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        offset = np.array([s.start for s in sl])
        for comp in split_peaks(lk[sl], lab[sl] == k, float(lesion_threshold), float(split_dynamic), min_voxels,
                                spacing):
            vals = lk[sl][comp]
            peak = float(vals.max())
            vol = float(comp.sum()) * vox_mm3
            if peak < min_peak or vol < min_volume_mm3:
                continue
            idx = np.argwhere(comp) + offset
            w = vals.astype(np.float64)
            centre = grid.index_to_lps((idx * w[:, None]).sum(0) / w.sum())
            areas = np.bincount(idx[:, 0] - idx[:, 0].min())
            z_best = int(np.argmax(areas)) + int(idx[:, 0].min())
            plane = idx[idx[:, 0] == z_best]
            pts = grid.index_to_lps(plane.astype(np.float64))
            long_ax, short_ax = _in_plane_axes(np.stack([pts @ u1, pts @ u2], axis=1), pixel_var)
            out.append(LesionFinding(center_lps_mm=tuple(float(v) for v in centre), long_axis_mm=round(long_ax, 2),
                                     short_axis_mm=round(short_ax, 2), volume_ml=round(vol / 1000.0, 4),
                                     likelihood=round(min(max(peak, 0.0), 1.0), 4)))
    out.sort(key=lambda f: -f.likelihood)
    return out[:max_findings]


def run_declared(engine: Any, manifest: Any, volumes: Mapping[str, Volume],
                 center_lps=None) -> "tuple[np.ndarray, float, Grid, np.ndarray]":
    """Prepare *volumes* with the manifest's PreprocessSpec, run *engine* and read its outputs as the manifest
    declares them (scanside.engines.manifest.CspcaIO: input name, detection map and its activation / csPCa channel,
    case probability or the map's maximum, crop on the gland or on the field-of-view centre).  Returns the
    likelihood map (d0, d1, d2) on the returned grid, the exam probability and the prepared input (C, d0, d1, d2).
    The reference model and a site's drop-in model (e.g. a PI-CAI U-Net) run through this one path."""
    io = manifest.cspca_io()
    x, grid = prepare(dict(volumes), manifest.preprocessing, center_lps=center_lps if io.crop_on_gland else None)
    lk, prob = io.decode(engine.run({io.input: x[None].astype(np.float32)}))
    return lk[0, 0], float(np.clip(prob[0], 0.0, 1.0)), grid, x


class CspcaModel:
    """The csPCa model of the store, ready to predict (loaded once, reused)."""

    def __init__(self, store: Any = None, name: str = DEFAULT_MODEL, *, variant: Optional[str] = None,
                 preference: Optional[Sequence[str]] = None):
        if store is None:
            from scanside.engines.store import ModelStore, StoreDefaults
            store = ModelStore.from_settings(StoreDefaults())  # the daemon passes its configured store
        self.manifest = store.resolve(name)
        if self.manifest.preprocessing is None:
            raise ValueError(f"{self.manifest.ref}: manifest has no preprocessing spec")
        self.spec = self.manifest.preprocessing
        self.engine, self.selection = store.open(self.manifest, variant=variant, preference=preference)
        self.post: Dict[str, Any] = {**DEFAULT_POSTPROCESSING, **(self.manifest.postprocessing or {})}
        root = self.manifest.root
        self.input_range: Optional[InputRange] = InputRange.load(root) if root is not None else None

    @property
    def exam_head(self) -> Optional[tuple]:
        """(scale, bias) of the exam head, probability = sigmoid(scale * max voxel logit + bias), when the
        model declares it (postprocessing "exam_head" or its training record); None otherwise."""
        head = self.post.get("exam_head") or ((self.manifest.metrics or {}).get("training") or {}).get("exam_head")
        if isinstance(head, dict) and "scale" in head and "bias" in head:
            return float(head["scale"]), float(head["bias"])
        return None

    @property
    def ref(self) -> str:
        return self.manifest.ref

    @property
    def decision_threshold(self) -> float:
        return float(self.post.get("decision_threshold", 0.5))

    def _check(self, volumes: Mapping[str, Volume]) -> Dict[str, Volume]:
        out: Dict[str, Volume] = {}
        for ch in self.spec.channels:
            v = volumes.get(ch)
            if v is None:
                raise CspcaInputError("missing_channel", f"no {ch} volume (have {sorted(volumes)})")
            arr = np.asarray(v.array)
            if arr.ndim != 3 or arr.size == 0 or min(arr.shape) < 1:
                raise CspcaInputError("empty_volume", f"{ch} volume has shape {arr.shape}")
            if not np.isfinite(np.asarray(v.affine)).all() or abs(np.linalg.det(v.array_affine[:3, :3])) < 1e-9:
                raise CspcaInputError("bad_geometry", f"{ch} volume has a singular or non-finite affine")
            if not np.isfinite(arr).all():
                v = Volume.from_array_affine(np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0),
                                             v.array_affine)
            out[ch] = v
        return out

    def predict(self, volumes: Mapping[str, Volume], center_lps=None) -> CspcaPrediction:
        vols = self._check(volumes)
        lk, prob, grid, x = run_declared(self.engine, self.manifest, vols, center_lps)
        check = self.input_range.check(x) if self.input_range is not None else None
        findings = extract_findings(lk, grid, **self.post)
        return CspcaPrediction(probability=prob, findings=findings, likelihood=lk, grid=grid, model=self.ref,
                               backend=str(self.selection.backend), range_check=check)

    def close(self) -> None:
        try:
            self.engine.close()
        except Exception:  # pragma: no cover - best effort
            pass


@dataclasses.dataclass
class GlandRestricted:
    findings: List[LesionFinding]  # those inside the allowed region
    dropped: int  # findings outside it
    probability: float  # the exam probability from what is left


def restrict_findings(prediction: CspcaPrediction, allowed: Any, exam_head: Optional[tuple]) -> GlandRestricted:
    """Keep the findings whose centre ``allowed`` (points (n, 3) LPS mm -> bool) accepts, e.g. the gland mask
    dilated by a few mm (scanside.engines.tasks.gland.inside_gland), and recompute the exam probability from the evidence left:
    with the model's exam head, sigmoid(scale * logit(peak) + bias) where peak is the highest likelihood of a
    kept finding or of any allowed voxel; without one, the model's probability capped at that peak."""
    kept = [f for f in prediction.findings if bool(allowed(np.asarray([f.center_lps_mm], dtype=np.float64))[0])]
    dropped = len(prediction.findings) - len(kept)
    lk = np.nan_to_num(np.asarray(prediction.likelihood, dtype=np.float32), nan=0.0)
    vox = np.argwhere(np.ones(lk.shape, dtype=bool))
    inside = allowed(prediction.grid.index_to_lps(vox.astype(np.float64)))
    peak = max([float(lk.reshape(-1)[inside].max()) if inside.any() else 0.0] + [f.likelihood for f in kept])
    if exam_head is not None:
        p = min(max(peak, 1e-7), 1.0 - 1e-7)
        prob = float(1.0 / (1.0 + np.exp(-(exam_head[0] * np.log(p / (1.0 - p)) + exam_head[1]))))
    else:
        prob = min(prediction.probability, peak)
    if not dropped and exam_head is None:
        prob = prediction.probability
    return GlandRestricted(findings=kept, dropped=dropped, probability=round(prob, 6))
