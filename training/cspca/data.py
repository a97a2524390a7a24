"""Training cases for the csPCa model, rendered straight from the simulator (no DICOM round trip).

One case = one phantom (``scanside.simulator.phantom.make_phantom``) rendered as the three inputs a
scanner's bpMRI export would give the agent, with the same geometry and the same uint16
quantisation as the vendor writers (``scanside.simulator.vendors.common.series_scale``/``to_stored``):

* T2W: the axial T2W series of ``scanside.simulator.protocols.build_exam("prostate-bpmri", vendor)``;
* ADC: the ADC series of that protocol;
* HBV: the b1400 image -- Siemens' calculated CALC_BVALUE series, or the b1400 trace of the GE /
  Philips multi-b DWI series (quantised with the scale of the whole DWI series, as written).

Vendor, field strength (3 T / 1.5 T) and artifacts (``Artifacts.sample``) vary per case. The
volumes go through the one preprocessing (``scanside.engines.preprocess.prepare`` with CSPCA_SPEC), and the
ground truth -- the voxel mask of the csPCa lesions (indolent lesions are background) -- is put
on the same model grid by nearest-neighbour resampling of ``phantom.lesion_masks``.

The evaluation (training/cspca/evaluate.py) goes the full DICOM path instead and checks that
what is learnt here transfers.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from scanside.training.common import run_jobs

from scanside.agent.dicom.volume import Volume
from scanside.engines.preprocess import Grid, prepare, resample_to_reference
from scanside.engines.spec import PreprocessSpec
from scanside.training.cspca.spec import CSPCA_SPEC

VENDORS = ("siemens", "siemens-xa", "ge", "philips")
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / "var" / "cspca-cache"


@dataclass
class Case:
    x: np.ndarray  # float32 (3, D, H, W) model input
    y: np.ndarray  # uint8 (D, H, W) csPCa lesion mask on the model grid
    label: int  # exam-level csPCa
    grid: Grid
    lesions: list  # GroundTruthLesion dicts


def rendered_to_volume(images, scale: Optional[float] = None) -> Volume:
    """A stack of RenderedImage (one per slice, one b-value) -> Volume, quantised like the writers."""
    from scanside.simulator.vendors.common import image_scale, to_stored

    ims = sorted(images, key=lambda im: im.slice_index)
    first = ims[0]
    row = np.asarray(first.orientation[:3], dtype=np.float64)
    col = np.asarray(first.orientation[3:], dtype=np.float64)
    nrm = np.cross(row, col)
    pos = np.asarray([im.position for im in ims], dtype=np.float64)
    order = np.argsort(pos @ nrm)
    ims = [ims[i] for i in order]
    pos = pos[order]
    step = pos[1] - pos[0] if len(ims) > 1 else nrm * 3.0
    sr, sc = first.pixel_spacing
    arr = np.stack([to_stored(im.pixels, image_scale(im, scale if scale is not None else 1.0)) for im in ims])
    aff = np.eye(4)
    aff[:3, 0] = step
    aff[:3, 1] = col * sr
    aff[:3, 2] = row * sc
    aff[:3, 3] = pos[0]
    return Volume.from_array_affine(arr.astype(np.float32), aff)


def render_inputs(phantom, vendor: str, field_strength: float, rng: np.random.Generator, artifacts=None) -> dict:
    """{"T2W", "ADC", "HBV"} Volumes of one phantom as ``vendor``'s bpMRI protocol writes them."""
    from scanside.simulator.protocols import build_exam
    from scanside.simulator.render import render_series
    from scanside.simulator.vendors.common import series_scale

    exam = build_exam("prostate-bpmri", vendor, field_strength)
    specs = {s.kind: s for s in exam.series if not (s.kind == "t2w" and s.plane != "axial")}
    t2 = render_series(phantom, specs["t2w"], field_strength, rng, artifacts)
    adc = render_series(phantom, specs["adc"], field_strength, rng, artifacts)
    if "calc_bvalue" in specs:
        hb = render_series(phantom, specs["calc_bvalue"], field_strength, rng, artifacts)
        hb_images, hb_scale = hb.images, series_scale(hb.images)
    else:
        dwi = render_series(phantom, specs["dwi"], field_strength, rng, artifacts)
        bmax = max(im.b_value or 0.0 for im in dwi.images)
        hb_images = [im for im in dwi.images if (im.b_value or 0.0) == bmax and im.direction is None]
        hb_scale = series_scale(dwi.images)
    return {
        "T2W": rendered_to_volume(t2.images, series_scale(t2.images)),
        "ADC": rendered_to_volume(adc.images, 1.0),
        "HBV": rendered_to_volume(hb_images, hb_scale),
    }


def lesion_target(phantom, grid: Grid, cspca_only: bool = True) -> np.ndarray:
    """uint8 mask on ``grid`` of the phantom's (csPCa) lesions, nearest-neighbour."""
    lm = phantom.lesion_masks
    keep = np.zeros(len(phantom.lesions) + 1, dtype=np.float32)
    for k, les in enumerate(phantom.lesions, start=1):
        keep[k] = 1.0 if (les.cspca or not cspca_only) else 0.0
    src = keep[lm]
    if not src.any():
        return np.zeros(grid.shape, dtype=np.uint8)
    arr_aff = phantom.affine[:, [2, 1, 0, 3]]  # (z, y, x) array order
    vol = Volume.from_array_affine(src, arr_aff)
    return (resample_to_reference(vol, grid, order=0).array > 0.5).astype(np.uint8)


def case_plan(seed: int) -> dict:
    """What case ``seed`` is: vendor, field, artifacts severity, forced lesion setting, crop jitter."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC5]))
    cspca = bool(rng.random() < 0.5)
    n_lesions = int(rng.integers(1, 4)) if cspca else int(rng.choice([0, 1, 1, 2, 3]))
    return dict(
        vendor=str(rng.choice(VENDORS)),
        field_strength=3.0 if rng.random() < 0.75 else 1.5,
        severity=float(rng.choice([0.0, 0.5, 1.0, 1.0])),
        cspca=cspca,
        n_lesions=n_lesions,
        jitter_mm=rng.normal(0.0, [2.0, 5.0, 5.0]).tolist(),  # crop-centre jitter (S, P, L) order ignored: LPS below
    )


def make_case(seed: int, spec: PreprocessSpec = CSPCA_SPEC, jitter: bool = True) -> Case:
    from scanside.simulator.phantom import make_phantom
    from scanside.simulator.render import Artifacts

    plan = case_plan(seed)
    ph = make_phantom(seed, n_lesions=plan["n_lesions"], cspca=plan["cspca"])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(b"cspca-render")]))
    art = Artifacts() if plan["severity"] == 0 else Artifacts.sample(rng, plan["severity"])
    vols = render_inputs(ph, plan["vendor"], plan["field_strength"], rng, art)
    center = None
    if jitter:
        j = np.asarray(plan["jitter_mm"], dtype=float)
        center = vols["T2W"].center_lps() + np.array([j[2], j[1], j[0]])
    x, grid = prepare(vols, spec, center_lps=center)
    y = lesion_target(ph, grid)
    return Case(x=x, y=y, label=int(ph.cspca), grid=grid, lesions=[les.model_dump() for les in ph.lesions])


def _write_case(args) -> str:
    seed, out = args
    path = Path(out) / f"case_{seed:06d}.npz"
    if path.exists():
        return str(path)
    c = make_case(seed)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, x=c.x.astype(np.float16), y=c.y, label=np.int64(c.label))
    os.replace(tmp, path)
    return str(path)


def cache_key() -> str:
    """The simulator, the preprocessing, the csPCa spec and this module: the sub-folder of the cache."""
    from scanside.training.common import render_cache_key

    return render_cache_key("scanside.training.cspca.spec", __name__, salt=CSPCA_SPEC.model_dump_json())


def build_cache(seeds: Sequence[int], out_dir=DEFAULT_CACHE, workers: int = 2) -> list[str]:
    """Render the cases not yet cached (npz per seed, under ``out_dir/cache_key()``) and return all their paths."""
    out = Path(out_dir) / cache_key()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(int(s), str(out)) for s in seeds]
    return run_jobs(_write_case, jobs, workers, desc="rendering training cases", unit="case")


def load_cache(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs, ys, ls = [], [], []
    for p in paths:
        with np.load(p) as z:
            xs.append(z["x"])
            ys.append(z["y"])
            ls.append(int(z["label"]))
    return np.stack(xs), np.stack(ys), np.asarray(ls, dtype=np.int64)


if __name__ == "__main__":  # python -m scanside.training.cspca.data N [FIRST_SEED]
    import sys
    import time

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    t0 = time.perf_counter()
    paths = build_cache(range(first, first + n), workers=int(os.environ.get("CSPCA_WORKERS", "2")))
    print(f"{len(paths)} cases in {time.perf_counter() - t0:.1f} s -> {DEFAULT_CACHE}")
