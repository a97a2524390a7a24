"""Prostate gland segmentation at run time: one interface over two models in the store.

* ``prostate-zones-reference`` (training/zones): a 2.5D U-Net on the axial T2W -> background /
  TZ / PZ; the whole gland is TZ u PZ and the result carries the zone map (``GlandResult.zones``).
  Fast (a fraction of a second per series on CPU).
* ``prostate-gland-taps`` (TAPS, imported by ``scanside models import-taps``): whole gland only,
  ``zones`` is None. Seconds per window on CPU.

``[gland] model = "auto"`` (the default) takes TAPS when it has been imported, else the zonal model,
each only when its real-data figures are known and good (``resolve_model``, ``real_data_status``);
a name[@version] picks one.

What the agent uses it for:

* gland volume (ml) and centroid (LPS mm) from the axial T2W series;
* the centre of the csPCa model's crop (``crop="gland"`` preprocessing takes ``center_lps``);
* a coverage check: which fraction of the gland lies inside another series' slab
  (``coverage(gland, series_summary)``), e.g. a DWI slab that misses the apex;
* the zone (PZ / TZ) of a lesion finding (``zone_of``), zonal model only.

Zonal pipeline: the manifest's PreprocessSpec (SPL, 3 x 1 x 1 mm, 24 x 128 x 128 centred on the
T2W slab) via scanside.engines.preprocess.prepare -> ONNX -> argmax over (background, TZ, PZ) -> the gland's
largest connected component (TZ u PZ) keeps its zone labels, everything else is background.

TAPS pipeline
(as upstream TAPS): the manifest's PreprocessSpec (RAS, 0.8 x 0.8 x 3.0 mm, z-score over
non-zero voxels) via scanside.engines.preprocess.prepare -> sliding window (scanside.engines.preprocess.sliding_window,
128 x 128 x 32, overlap 0.5, gaussian blending) -> gaussian (sigma 2.5 voxels) on the logits -> sigmoid ->
threshold 0.55 -> largest connected component.  On CPU one window costs seconds, so by default only the
window at the centre of the field of view is run (``windows="center"``: ~102 x 102 x 96 mm, where the
technologist centres the prostate); ``windows="full"`` covers the whole series.  The agent runs it only
when ``[gland] enabled`` is set and the model is in the store.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Literal, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from scanside.agent.dicom.volume import int3
from scanside.engines.manifest import ModelManifest
from scanside.engines.preprocess import Grid, prepare, sliding_window

log = logging.getLogger(__name__)

MODEL_NAME = "prostate-gland-taps"
ZONES_MODEL = "prostate-zones-reference"
AUTO = "auto"
#: zone map values (GlandResult.zones)
ZONE_LABELS = ("background", "TZ", "PZ")
Windows = Literal["center", "full"]


@dataclass
class GlandResult:
    mask: np.ndarray  # bool, on `grid`
    grid: Grid
    volume_ml: float
    centroid_lps: Optional[tuple]  # (x, y, z) LPS mm; None when no gland was found
    windows: int
    seconds: float
    model: str = MODEL_NAME
    variant: Optional[str] = None
    qc: Dict[str, Any] = field(default_factory=dict)
    zones: Optional[np.ndarray] = None  # uint8 on `grid`: 0 background, 1 TZ, 2 PZ (zonal model only)
    distance_mm: Optional[np.ndarray] = field(default=None, repr=False)  # to the mask, mm (inside_gland, lazily)

    @property
    def found(self) -> bool:
        return self.centroid_lps is not None

    def zone_volumes_ml(self) -> Optional[Dict[str, float]]:
        if self.zones is None:
            return None
        voxel_ml = float(np.prod(self.grid.spacing)) / 1000.0
        return {name: float((self.zones == k).sum()) * voxel_ml for k, name in enumerate(ZONE_LABELS) if k}

    def points_lps(self) -> np.ndarray:
        """LPS mm of every gland voxel centre (n, 3)."""
        return self.grid.index_to_lps(np.argwhere(self.mask))

    def summary(self) -> Dict[str, Any]:
        return {"model": self.model, "variant": self.variant, "found": self.found,
                "volume_ml": round(self.volume_ml, 2),
                "centroid_lps_mm": [round(float(v), 2) for v in self.centroid_lps] if self.centroid_lps else None,
                "windows": self.windows, "seconds": round(self.seconds, 2), "qc": self.qc,
                "zone_volumes_ml": {k: round(v, 2) for k, v in (self.zone_volumes_ml() or {}).items()} or None}


def largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def postprocess(logits: np.ndarray, post: Dict[str, Any]) -> np.ndarray:
    """(d0, d1, d2) logits -> boolean gland mask: gaussian on logits, sigmoid, threshold, largest component."""
    x = np.asarray(logits, dtype=np.float32)
    sigma = float(post.get("gaussian_sigma", 2.5) or 0.0)
    if sigma > 0:
        x = ndimage.gaussian_filter(x, sigma=sigma, mode="nearest")
    prob = 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))
    mask = prob > float(post.get("threshold", 0.55))
    if (post.get("qc") or {}).get("largest_component", True):
        mask = largest_component(mask)
    return mask


def _center_crop(array: np.ndarray, grid: Grid, roi: Sequence[int]) -> tuple:
    size = np.asarray(array.shape[1:])
    want = np.minimum(size, np.asarray(roi))
    start = (size - want) // 2
    sl = tuple(slice(int(s), int(s + w)) for s, w in zip(start, want))
    aff = grid.affine.copy()
    aff[:3, 3] = grid.affine[:3, :3] @ start + grid.affine[:3, 3]
    return np.ascontiguousarray(array[(slice(None),) + sl]), Grid(shape=int3(want), affine=aff)


def segment_gland(engine: Any, t2w: Any, *, windows: Windows = "center", batch_size: int = 1) -> GlandResult:
    """Segment the gland on an axial T2W ``scanside.agent.dicom.volume.Volume`` with a loaded TAPS *engine*
    (engines.Engine whose manifest carries the preprocessing and postprocessing)."""
    m = engine.manifest
    if m is None or m.preprocessing is None or m.preprocessing.window is None:
        raise ValueError("segment_gland needs a loaded engine whose manifest has sliding-window preprocessing")
    spec = m.preprocessing
    t0 = time.perf_counter()
    arr, grid = prepare({spec.channels[0]: t2w}, spec)
    if windows == "center":
        arr, grid = _center_crop(arr, grid, spec.window.roi)
    in_name, out_name = m.inputs[0].name, m.outputs[0].name
    n_windows = 0

    def run(batch: np.ndarray) -> np.ndarray:
        nonlocal n_windows
        n_windows += len(batch)
        return engine.run({in_name: np.ascontiguousarray(batch, dtype=np.float32)})[out_name]

    logits = sliding_window(run, arr, spec.window, batch_size=batch_size)[0]
    post = dict(m.postprocessing or {})
    mask = postprocess(logits, post)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    volume = float(mask.sum()) * voxel_ml
    centroid = tuple(float(v) for v in grid.index_to_lps(np.argwhere(mask).mean(axis=0))) if mask.any() else None
    qc: Dict[str, Any] = {}
    lo_hi = (post.get("qc") or {}).get("volume_cc")
    if lo_hi and centroid is not None:
        qc["volume_in_expected_range"] = bool(lo_hi[0] <= volume <= lo_hi[1])
    if mask.any():
        # a gland touching the edge of what was segmented was probably cut off
        qc["touches_edge"] = bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
                                  or mask[:, :, 0].any() or mask[:, :, -1].any())
    return GlandResult(mask=mask, grid=grid, volume_ml=volume, centroid_lps=centroid, windows=n_windows,
                       seconds=time.perf_counter() - t0, model=m.ref, variant=engine.variant, qc=qc)


def is_zonal(manifest: ModelManifest) -> bool:
    """A zonal model's manifest names the labels background, TZ and PZ."""
    labels = [str(v) for v in (manifest.labels or [])]
    return "TZ" in labels and "PZ" in labels


def segment_zones(engine: Any, t2w: Any) -> GlandResult:
    """Zones and gland on an axial T2W ``Volume`` with a loaded zonal *engine* (manifest labels
    background/TZ/PZ, output: class probabilities (N, 3, d0, d1, d2) on the preprocessing grid)."""
    m = engine.manifest
    if m is None or m.preprocessing is None:
        raise ValueError("segment_zones needs a loaded engine whose manifest has preprocessing")
    spec = m.preprocessing
    t0 = time.perf_counter()
    arr, grid = prepare({spec.channels[0]: t2w}, spec)
    in_name, out_name = m.inputs[0].name, m.outputs[0].name
    prob = engine.run({in_name: np.ascontiguousarray(arr[None], dtype=np.float32)})[out_name][0]
    labels = [str(v) for v in m.labels]
    cls = np.argmax(prob, axis=0)
    zones = np.zeros(cls.shape, dtype=np.uint8)
    for k, name in enumerate(ZONE_LABELS):
        if k and name in labels:
            zones[cls == labels.index(name)] = k
    post = dict(m.postprocessing or {})
    zones[~inside_slab(grid, t2w)] = 0  # the zero padding beyond the series' slab: nothing was imaged there
    gland = zones > 0
    if gland.any() and post.get("largest_component", True):
        gland = largest_component(gland)
    min_ml = float(post.get("min_gland_ml", 0.0) or 0.0)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    if gland.sum() * voxel_ml < min_ml:
        gland = np.zeros_like(gland)
    zones[~gland] = 0
    volume = float(gland.sum()) * voxel_ml
    centroid = tuple(float(v) for v in grid.index_to_lps(np.argwhere(gland).mean(axis=0))) if gland.any() else None
    qc: Dict[str, Any] = {}
    if gland.any():
        # the gland on the first or last slice of the grid: the series probably cut it off
        qc["touches_edge"] = bool(gland[0].any() or gland[-1].any() or gland[:, 0].any() or gland[:, -1].any()
                                  or gland[:, :, 0].any() or gland[:, :, -1].any())
    return GlandResult(mask=gland, grid=grid, volume_ml=volume, centroid_lps=centroid, windows=1,
                       seconds=time.perf_counter() - t0, model=m.ref, variant=engine.variant, qc=qc, zones=zones)


def inside_slab(grid: Grid, volume: Any) -> np.ndarray:
    """Bool mask of ``grid``'s voxels that lie inside *volume*'s slab (along its slice axis, half a slice margin)."""
    src = Grid.of(volume)
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij"), -1).reshape(-1, 3)
    s0 = src.lps_to_index(grid.index_to_lps(ijk))[:, 0].reshape(grid.shape)
    return (s0 >= -0.5) & (s0 <= src.shape[0] - 0.5)


def segment(engine: Any, t2w: Any, *, windows: Windows = "center") -> GlandResult:
    """Either model behind one call: zonal manifests -> segment_zones, else the TAPS pipeline."""
    if is_zonal(engine.manifest):
        return segment_zones(engine, t2w)
    return segment_gland(engine, t2w, windows=windows)


def zone_of(gland: GlandResult, points_lps: Any = None, centre_lps: Any = None,
            max_mm: float = 5.0) -> Optional[str]:
    """The zone (PZ / TZ) of a finding: the majority zone of its voxels (``points_lps`` (n, 3)) that lie
    in the gland; else the zone at its centre; else the nearest gland voxel's zone within ``max_mm`` of
    the centre; else None (and None without a zone map)."""
    if gland.zones is None or not gland.found:
        return None
    z = gland.zones
    shape = np.asarray(z.shape)

    def zones_at(pts: np.ndarray) -> np.ndarray:
        idx = np.rint(gland.grid.lps_to_index(np.atleast_2d(np.asarray(pts, dtype=np.float64)))).astype(int)
        ok = np.all((idx >= 0) & (idx < shape), axis=1)
        out = np.zeros(len(idx), dtype=np.uint8)
        out[ok] = z[tuple(idx[ok].T)]
        return out

    if points_lps is not None and len(points_lps):
        vals = zones_at(points_lps)
        vals = vals[vals > 0]
        if len(vals):
            counts = np.bincount(vals, minlength=len(ZONE_LABELS))
            return ZONE_LABELS[int(np.argmax(counts[1:])) + 1]
    if centre_lps is None:
        return None
    c = np.asarray(centre_lps, dtype=np.float64)
    v = int(zones_at(c)[0])
    if v:
        return ZONE_LABELS[v]
    pts = np.argwhere(z > 0)
    d = np.linalg.norm(gland.grid.index_to_lps(pts) - c, axis=1)
    k = int(np.argmin(d))
    if d[k] <= max_mm:
        return ZONE_LABELS[int(z[tuple(pts[k])])]
    return None


#: manifest.metrics key where a gland model's real-data figures are recorded (``scanside models evaluate NAME
#: --real DIR --write``): {"usable": bool, "reference": ..., "dice_mean": ..., ...}
REAL_DATA = "real_data"
#: models whose real-data figures are known without a local evaluation: TAPS was trained on real patients'
#: T2W, and on a public real case with an expert gland mask (45.7 mL) it reached Dice 0.88 (issue 18)
KNOWN_ON_REAL = {MODEL_NAME: "trained on real T2W (TAPS); Dice 0.88 against an expert mask on a public real case"}


def real_data_status(manifest: ModelManifest) -> tuple:
    """(usable on real exams: True / False / None = unknown, why) for a gland model's manifest."""
    rec = (manifest.metrics or {}).get(REAL_DATA)
    if isinstance(rec, dict) and "usable" in rec:
        return bool(rec["usable"]), str(rec.get("summary") or rec.get("reason") or "real-data evaluation recorded")
    name = manifest.name
    if name in KNOWN_ON_REAL:
        return True, KNOWN_ON_REAL[name]
    return None, "no real-data figures recorded"


def resolve_model(store: Any, model: str = AUTO) -> Optional[str]:
    """``auto``: TAPS (trained on real patients) when imported, else the zonal reference model, either only
    when its real-data figures are known and good (``real_data_status``): a scanner's exams are real, and
    a gland model whose behaviour there is unknown must not place the csPCa crop, drop findings or judge
    coverage. A name[@version]: itself when it is in the store (the operator's explicit choice), else None."""
    if model != AUTO:
        try:
            store.resolve(model)
            return model
        except Exception:
            return None
    for name in (MODEL_NAME, ZONES_MODEL):
        try:
            manifest = store.resolve(name)
        except Exception:
            continue
        usable, why = real_data_status(manifest)
        if usable:
            return name
        log.info("gland model %s not used by [gland] model = auto: %s", manifest.ref,
                 "real-data figures below the bar" if usable is False else why)
    return None


def inside_gland(gland: GlandResult, points_lps: Any, margin_mm: float) -> np.ndarray:
    """Bool per point (n, 3) LPS mm: inside the gland mask dilated by ``margin_mm`` (distance in mm on the
    gland grid; points outside what was segmented are outside). All False when no gland was found."""
    pts = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
    if not gland.found:
        return np.zeros(len(pts), dtype=bool)
    dist = gland.distance_mm
    if dist is None:  # kept with the result: one transform per gland, not per finding
        dist = gland.distance_mm = ndimage.distance_transform_edt(~gland.mask, sampling=gland.grid.spacing)
    idx = np.rint(gland.grid.lps_to_index(pts)).astype(int)
    ok = np.all((idx >= 0) & (idx < np.asarray(dist.shape)), axis=1)
    out = np.zeros(len(pts), dtype=bool)
    out[ok] = dist[tuple(idx[ok].T)] <= float(margin_mm)
    return out


def coverage(gland: GlandResult, target: Any) -> Optional[float]:
    """Fraction of the gland's voxels inside *target*'s imaged region.

    target: a SeriesSummary (its ``slab``) or SlabGeometry -> inside the slab along its normal
    (start_mm..end_mm); a Volume or Grid -> inside its field of view (all three axes, half a voxel
    margin).  None when the gland was not found or the target has no geometry."""
    if not gland.found:
        return None
    pts = gland.points_lps()
    slab = getattr(target, "slab", target)
    if slab is not None and hasattr(slab, "normal") and hasattr(slab, "start_mm"):
        d = pts @ np.asarray(slab.normal, dtype=float)
        inside = (d >= slab.start_mm) & (d <= slab.end_mm)
        return float(inside.mean())
    grid: Optional[Grid] = None
    if isinstance(target, Grid):
        grid = target
    elif hasattr(target, "array_affine") and hasattr(target, "shape"):
        grid = Grid.of(target)
    if grid is None:
        return None
    idx = grid.lps_to_index(pts)
    inside = np.all((idx >= -0.5) & (idx <= np.asarray(grid.shape) - 0.5), axis=1)
    return float(inside.mean())


class GlandService:
    """Lazily opens the gland model from a ModelStore and segments axial T2W series.
    Disabled (returns None) when the model is not in the store; never raises on bad input."""

    def __init__(self, store: Any, *, model: str = AUTO, variant: Optional[str] = None,
                 windows: Windows = "center", on_failure: Optional[Callable[[BaseException], None]] = None) -> None:
        """on_failure: told of each segmentation that failed (the daemon counts it and logs the reason)."""
        self.store, self.variant, self.windows = store, variant, windows
        self.on_failure = on_failure
        self.requested = model
        self.model: Optional[str] = resolve_model(store, model)
        self._engine: Any = None
        self.unavailable: Optional[str] = None
        self.selection: Any = None

    def engine(self) -> Any:
        if self._engine is None and self.unavailable is None:
            if self.model is None:
                self.unavailable = f"no model {self.requested!r} in the store (gland)"
                log.info("gland model unavailable: %s", self.unavailable)
                return None
            try:
                self._engine, self.selection = self.store.open(self.model, variant=self.variant)
            except Exception as e:  # model missing, refused by the parity gate, back end unavailable
                self.unavailable = f"{type(e).__name__}: {e}"
                log.info("gland model unavailable: %s", self.unavailable)
        return self._engine

    def segment(self, t2w: Any) -> Optional[GlandResult]:
        eng = self.engine()
        if eng is None:
            return None
        try:
            return segment(eng, t2w, windows=self.windows)
        except Exception as e:
            if self.on_failure is not None:
                self.on_failure(e)
            else:
                log.error("gland segmentation failed: %s", type(e).__name__)
            return None

    def segment_series(self, summary: Any, refs: Sequence[Any]) -> Optional[GlandResult]:
        """For a completed series: only axial T2W (T2WI_nan / T2WI_fs) are segmented."""
        if summary.label not in ("T2WI_nan", "T2WI_fs") or summary.plane != "axial":
            return None
        from scanside.agent.dicom.volume import load_volume

        try:
            vol = load_volume(refs)
        except Exception as e:
            log.info("gland: series not loadable (%s)", type(e).__name__)
            return None
        return self.segment(vol)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def coverage_report(gland: GlandResult, series: Union[Sequence[Any], Any], threshold: float = 0.95) -> list:
    """Coverage of the gland by each series summary: [{series_id, label, coverage, complete}]."""
    items = series if isinstance(series, (list, tuple)) else [series]
    out = []
    for s in items:
        c = coverage(gland, s)
        out.append({"series_id": getattr(s, "series_id", None), "label": getattr(s, "label", None),
                    "coverage": None if c is None else round(c, 4), "covers_gland": None if c is None else c >= threshold})
    return out
