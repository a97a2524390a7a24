"""Prostate gland segmentation at run time (TAPS, prostate-gland-taps in the model store).

What the agent uses it for:

* gland volume (ml) and centroid (LPS mm) from the axial T2W series;
* the centre of the csPCa model's crop (``crop="gland"`` preprocessing takes ``center_lps``);
* a coverage check: which fraction of the gland lies inside another series' slab
  (``coverage(gland, series_summary)``), e.g. a DWI slab that misses the apex.

Pipeline (as upstream TAPS): the manifest's PreprocessSpec (RAS, 0.8 x 0.8 x 3.0 mm, z-score over
non-zero voxels) via engines.preprocess.prepare -> sliding window (engines.preprocess.sliding_window,
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
from typing import Any, Dict, Literal, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from engines.preprocess import Grid, prepare, sliding_window

log = logging.getLogger(__name__)

MODEL_NAME = "prostate-gland-taps"
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

    @property
    def found(self) -> bool:
        return self.centroid_lps is not None

    def points_lps(self) -> np.ndarray:
        """LPS mm of every gland voxel centre (n, 3)."""
        return self.grid.index_to_lps(np.argwhere(self.mask))

    def summary(self) -> Dict[str, Any]:
        return {"model": self.model, "variant": self.variant, "found": self.found,
                "volume_ml": round(self.volume_ml, 2),
                "centroid_lps_mm": [round(float(v), 2) for v in self.centroid_lps] if self.centroid_lps else None,
                "windows": self.windows, "seconds": round(self.seconds, 2), "qc": self.qc}


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
    return np.ascontiguousarray(array[(slice(None),) + sl]), Grid(shape=tuple(int(w) for w in want), affine=aff)


def segment_gland(engine: Any, t2w: Any, *, windows: Windows = "center", batch_size: int = 1) -> GlandResult:
    """Segment the gland on an axial T2W ``agent.volume.Volume`` with a loaded TAPS *engine*
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

    def __init__(self, store: Any, *, model: str = MODEL_NAME, variant: Optional[str] = None,
                 windows: Windows = "center") -> None:
        self.store, self.model, self.variant, self.windows = store, model, variant, windows
        self._engine: Any = None
        self.unavailable: Optional[str] = None
        self.selection: Any = None

    def engine(self) -> Any:
        if self._engine is None and self.unavailable is None:
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
            return segment_gland(eng, t2w, windows=self.windows)
        except Exception as e:
            log.warning("gland segmentation failed: %s", type(e).__name__)
            return None

    def segment_series(self, summary: Any, refs: Sequence[Any]) -> Optional[GlandResult]:
        """For a completed series: only axial T2W (T2WI_nan / T2WI_fs) are segmented."""
        if getattr(summary, "label", None) not in ("T2WI_nan", "T2WI_fs") or getattr(summary, "plane", None) != "axial":
            return None
        from agent.volume import load_volume

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
