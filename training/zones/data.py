"""Training cases for the zonal model, rendered straight from the simulator (no DICOM round trip).

One case = one phantom (``scanside.simulator.phantom.make_phantom``) rendered as the axial T2W of
``scanside.simulator.protocols.build_exam("prostate-bpmri", vendor)`` by ``scanside.simulator.render.render_series``
(quantised like the vendor writers, ``scanside.training.cspca.data.rendered_to_volume``), with the slab
plan varied per case (field of view 140-200 mm, slab centre off the gland by up to ~10 mm in-plane
and ~15 mm along the slices, so the gland is sometimes cut by the slab ends), vendor style,
3 T / 1.5 T and artifacts (``Artifacts.sample``). The volume goes through the one preprocessing
(``scanside.engines.preprocess.prepare`` with ZONES_SPEC).

Ground truth: the phantom's tissue labels as zones (Tissue.TZ -> 1, Tissue.PZ -> 2, lesion voxels
-> the zone of their lesion) resampled nearest-neighbour onto the model grid
(``zone_target``); voxels outside the T2W slab are background (the model cannot see them).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from scanside.training.common import run_jobs

from scanside.agent.dicom.volume import Volume
from scanside.engines.preprocess import Grid, prepare, resample_to_reference
from scanside.engines.spec import PreprocessSpec
from scanside.training.zones.spec import LABELS, ZONES_SPEC

VENDORS = ("siemens", "siemens-xa", "ge", "philips")
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / "var" / "zones-cache"
TZ, PZ = LABELS.index("TZ"), LABELS.index("PZ")


@dataclass
class Case:
    x: np.ndarray  # float32 (1, D, H, W) model input
    y: np.ndarray  # uint8 (D, H, W): 0 background, 1 TZ, 2 PZ
    grid: Grid
    volume_ml: float  # gland volume on the model grid (inside the slab)


def zone_labels(phantom) -> np.ndarray:
    """uint8 (z, y, x) on the phantom grid: 0 outside the gland, 1 TZ, 2 PZ (lesions in their zone)."""
    from scanside.simulator.physics import Tissue

    lut = np.zeros(256, dtype=np.uint8)
    lut[int(Tissue.TZ)] = TZ
    lut[int(Tissue.PZ)] = PZ
    z = lut[phantom.labels]
    for k, les in enumerate(phantom.lesions, start=1):
        z[phantom.lesion_masks == k] = TZ if les.zone == "TZ" else PZ
    return z


def zone_target(phantom, grid: Grid, inside=None) -> np.ndarray:
    """Zone labels on ``grid`` (nearest-neighbour); ``inside``: optional bool mask of the voxels the
    series imaged (others -> background)."""
    src = zone_labels(phantom).astype(np.float32)
    arr_aff = phantom.affine[:, [2, 1, 0, 3]]  # (z, y, x) array order
    vol = Volume.from_array_affine(src, arr_aff)
    y = np.rint(resample_to_reference(vol, grid, order=0).array).astype(np.uint8)
    if inside is not None:
        y[~inside] = 0
    return y


def slab_mask(t2w: Volume, grid: Grid) -> np.ndarray:
    """Voxels of ``grid`` inside the T2W's slab (along its slice normal, half a slice margin): the runtime's rule."""
    from scanside.engines.tasks.gland import inside_slab

    return inside_slab(grid, t2w)


def case_plan(seed: int) -> dict:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x20E5]))
    return dict(
        vendor=str(rng.choice(VENDORS)),
        field_strength=3.0 if rng.random() < 0.75 else 1.5,
        severity=float(rng.choice([0.0, 0.5, 1.0, 1.0])),
        n_lesions=int(rng.choice([0, 1, 1, 2, 3])),
        fov_mm=float(rng.uniform(140.0, 200.0)),
        # slab centre off the gland (LPS mm): in-plane up to ~10 mm, along the slices up to ~15 mm
        offset_mm=[float(rng.normal(0, 4)), float(rng.normal(0, 4)),
                   float(rng.uniform(-15, 15) if rng.random() < 0.4 else rng.normal(0, 3))],
    )


def t2w_spec(plan: dict):
    from scanside.simulator.protocols import build_exam

    exam = build_exam("prostate-bpmri", plan["vendor"], plan["field_strength"])
    t2 = next(s for s in exam.series if s.kind == "t2w" and s.plane == "axial")
    return t2.model_copy(update=dict(fov_mm=(plan["fov_mm"], plan["fov_mm"]), center_offset_mm=tuple(plan["offset_mm"])))


def render_t2w(phantom, plan: dict, rng: np.random.Generator, artifacts=None) -> Volume:
    from scanside.simulator.render import render_series
    from scanside.simulator.vendors.common import series_scale
    from scanside.training.cspca.data import rendered_to_volume

    t2 = render_series(phantom, t2w_spec(plan), plan["field_strength"], rng, artifacts)
    return rendered_to_volume(t2.images, series_scale(t2.images))


def make_case(seed: int, spec: PreprocessSpec = ZONES_SPEC) -> Case:
    from scanside.simulator.phantom import make_phantom
    from scanside.simulator.render import Artifacts

    plan = case_plan(seed)
    ph = make_phantom(seed, n_lesions=plan["n_lesions"])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(b"zones-render")]))
    art = Artifacts() if plan["severity"] == 0 else Artifacts.sample(rng, plan["severity"])
    art = art.model_copy(update={"partial_coverage": 0.0})  # the slab offset is planned above
    t2 = render_t2w(ph, plan, rng, art)
    x, grid = prepare({"T2W": t2}, spec)
    y = zone_target(ph, grid, slab_mask(t2, grid))
    vox_ml = float(np.prod(grid.spacing)) / 1000.0
    return Case(x=x, y=y, grid=grid, volume_ml=float((y > 0).sum()) * vox_ml)


def _write_case(args) -> str:
    seed, out = args
    path = Path(out) / f"case_{seed:06d}.npz"
    if path.exists():
        return str(path)
    c = make_case(seed)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, x=c.x.astype(np.float16), y=c.y)
    os.replace(tmp, path)
    return str(path)


def cache_key() -> str:
    """The simulator, the preprocessing, the zones spec and this module: the sub-folder of the cache."""
    from scanside.training.common import render_cache_key

    return render_cache_key("scanside.training.zones.spec", __name__, salt=ZONES_SPEC.model_dump_json())


def build_cache(seeds: Sequence[int], out_dir=DEFAULT_CACHE, workers: int = 2) -> list[str]:
    """Render the cases not yet cached (npz per seed, under ``out_dir/cache_key()``) and return all their paths."""
    out = Path(out_dir) / cache_key()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(int(s), str(out)) for s in seeds]
    return run_jobs(_write_case, jobs, workers, desc="rendering training cases", unit="case")


def load_cache(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for p in paths:
        with np.load(p) as z:
            xs.append(z["x"])
            ys.append(z["y"])
    return np.stack(xs), np.stack(ys)


if __name__ == "__main__":  # python -m scanside.training.zones.data N [FIRST_SEED]
    import sys
    import time

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    t0 = time.perf_counter()
    paths = build_cache(range(first, first + n), workers=int(os.environ.get("ZONES_WORKERS", "2")))
    print(f"{len(paths)} cases in {time.perf_counter() - t0:.1f} s -> {DEFAULT_CACHE}")
