"""Training data by the render path: scanside.simulator.render -> a Volume with the geometry and the
12-bit quantisation the DICOM writers give -> scanside.engines.preprocess.prepare (the runtime's one
preprocessing) -> cached float16 arrays (npz shards).

What one exam contributes (labels from the simulator's own ground-truth rule):
localizer (one of its three planes) -> other; every T2W -> T2WI_nan / T2WI_fs; DWI -> one
sample per b-value (b < 500 DWI_Low, else DWI_High); calculated high b -> DWI_High; ADC -> ADC;
T1 -> other; DCE -> two random temporal phases (of 2-5) -> other (the agent passes one phase of a dynamic
series: the middle one, see scanside.agent.dicom.frames.select_frames).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from scanside.training.common import run_jobs

from scanside.agent.schema.taxonomy import DWI_HIGH_MIN_B, LABELS
from scanside.agent.dicom.volume import Volume
from scanside.engines.preprocess import prepare
from scanside.engines.spec import DetailView, PreprocessSpec
from scanside.simulator.model import RenderedImage, SeriesSpec
from scanside.training.sequence.protocols import VENDORS, Variant, random_exam

log = logging.getLogger(__name__)

INPUT_SHAPE = (16, 64, 64)
CHANNEL = "series"
#: the preprocessing the model is trained with and that the agent runs (goes into the manifest):
#: channel 0 the whole field of view resized onto INPUT_SHAPE (anatomy, contrast); channels 1 and 2
#: the centre of it at 3 x 0.8 x 0.8 mm (48 x 51 x 51 mm) and 3 x 0.5 x 0.5 mm (48 x 32 x 32 mm).
#: They tell how finely the series was acquired: TSE T2W has 0.4-0.8 mm pixels, EPI DWI 1-2.7 mm,
#: and a fat-suppressed T2W and a b0/b50 EPI differ mostly there. The resize alone erased it
#: (1.1.0's main error); 0.8 mm alone could not tell a 0.78 mm T2W from a 1.0 mm DWI (1.3.0's errors).
PREPROCESS = PreprocessSpec(channels=[CHANNEL], orientation="acquisition", fit="resize", shape=INPUT_SHAPE,
                            spacing_mm=(3.0, 3.0, 3.0), antialias=True, normalize="zscore_percentile",
                            clip_percentiles=(0.5, 99.5), crop="none",
                            detail_views=[DetailView(spacing_mm=(3.0, 0.8, 0.8)), DetailView(spacing_mm=(3.0, 0.5, 0.5))])
IN_CHANNELS = PREPROCESS.n_input_channels
MAX_STORED = 4095
DEFAULT_CACHE = Path(os.environ.get("SCANSIDE_TRAIN_CACHE", Path(__file__).resolve().parents[2] / "var" / "train-cache"))
LABEL_INDEX = {name: i for i, name in enumerate(LABELS)}
#: fraction of training exams rendered from a realistic phantom (scanside.training.sequence.realism: deformed anatomy,
#: septa, sub-tissue texture) and, with REALISM_EPI_P, with EPI series interpolated to a 256 matrix (GE habit).
#: 0 keeps the cartoon phantom only (every release up to 1.4.1).
REALISM = 0.0
REALISM_EPI_P = {"ge": 0.7}
REALISM_EPI_P_DEFAULT = 0.25
#: with REALISM: log-sd of the per-exam tissue-constant factors (scanside.training.sequence.realism ``constants_sd``)
REALISM_CONSTANTS_SD = 0.0
#: with REALISM: probability of a real pelvis (scanside.training.sequence.realism ``pelvis``: fat, texture, ADC masking)
REALISM_PELVIS_P = 0.0


def stack_volume(images: Sequence[RenderedImage]) -> Volume:
    """Rendered 2D images of one position set -> Volume sorted along the slice normal, as
    scanside.agent.dicom.volume.load_volume builds it from the written files."""
    o = np.asarray(images[0].orientation, dtype=float)
    row_dir, col_dir = o[:3], o[3:]
    normal = np.cross(row_dir, col_dir)
    d = np.array([float(np.dot(normal, im.position)) for im in images])
    order = np.argsort(d, kind="stable")
    ims = [images[i] for i in order]
    arr = np.stack([im.pixels for im in ims]).astype(np.float32)
    sr, sc = ims[0].pixel_spacing
    step = float(np.median(np.diff(d[order]))) if len(ims) > 1 else 1.0
    aff = np.eye(4)
    aff[:3, 0] = normal * step
    aff[:3, 1] = col_dir * sr
    aff[:3, 2] = row_dir * sc
    aff[:3, 3] = ims[0].position
    return Volume.from_array_affine(arr, aff)


def quantise(images: Sequence[RenderedImage]) -> list[np.ndarray]:
    """The writers' 12-bit storage: one scale per series from its magnitude peak, ADC in its own units."""
    peak = max((float(np.max(im.pixels)) for im in images if im.derived != "ADC" and im.pixels.size), default=0.0)
    scale = 0.95 * MAX_STORED / peak if math.isfinite(peak) and peak > 0 else 1.0
    out = []
    for im in images:
        s = 1.0 if im.derived == "ADC" else scale
        q = np.clip(np.rint(np.nan_to_num(im.pixels.astype(np.float64) * s)), 0, MAX_STORED)
        out.append((q / s).astype(np.float32))
    return out


def label_of(spec: SeriesSpec, im: RenderedImage) -> str:
    if spec.kind in ("localizer", "t1", "dce"):
        return "other"
    if spec.kind == "t2w":
        return "T2WI_fs" if spec.fat_sat else "T2WI_nan"
    if spec.kind == "t2w_fs":
        return "T2WI_fs"
    if im.derived == "ADC":
        return "ADC"
    return "DWI_High" if float(im.b_value or 0.0) >= DWI_HIGH_MIN_B else "DWI_Low"


def exam_samples(seed: int, vendor: str, variant: Variant = "train", severity: Optional[float] = None,
                 realism: Optional[float] = None, constants_sd: Optional[float] = None
                 ) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(label, prepared array (IN_CHANNELS, *INPUT_SHAPE) float32, info) for every logical series of one
    randomised exam rendered straight from the phantom."""
    from scanside.simulator.phantom import make_phantom
    from scanside.simulator.render import Artifacts, render_series

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E9]))
    exam = random_exam(rng, vendor, variant, dce_phases=int(rng.integers(2, 6)))
    phantom = make_phantom(seed)
    epi_matrix = 0
    pelvis_art: Optional[dict] = None
    realism = REALISM if realism is None else realism
    if realism > 0:  # own stream: the exam's protocol and artifacts stay those of the same seed without realism
        from scanside.training.sequence.realism import pelvis_artifacts, realistic_phantom

        rr = np.random.default_rng(np.random.SeedSequence([int(seed), 0x2EA1]))
        if rr.random() < realism:
            # own stream: without the real pelvis, the draws stay those of earlier recipes
            pr = np.random.default_rng(np.random.SeedSequence([int(seed), 0xFA7]))
            pelvis = bool(pr.random() < REALISM_PELVIS_P)
            phantom = realistic_phantom(phantom, pr if pelvis else rr, constants_sd=REALISM_CONSTANTS_SD
                                        if constants_sd is None else constants_sd, pelvis=pelvis)
            pelvis_art = pelvis_artifacts(pr) if pelvis else None
            epi_matrix = 256 if rr.random() < REALISM_EPI_P.get(vendor, REALISM_EPI_P_DEFAULT) else 0
    for spec in exam.series:
        sev = float(rng.uniform(0.3, 1.6)) if severity is None else severity
        art = Artifacts.sample(rng, sev)
        if pelvis_art is not None and spec.kind in pelvis_art:
            update = dict(pelvis_art[spec.kind])
            if "noise_scale" in update:  # a factor on the series' own draw
                update["noise_scale"] *= art.noise_scale
            art = art.model_copy(update=update)
        if spec.kind == "localizer":
            spec = spec.model_copy(update=dict(plane=str(rng.choice(["sagittal", "coronal", "axial"]))))
        rendered = render_series(phantom, spec, exam.field_strength_t, rng, art)
        if epi_matrix and spec.kind in ("dwi", "adc", "calc_bvalue") and max(spec.matrix) < epi_matrix:
            from scanside.training.sequence.realism import interpolate_epi

            rendered = rendered.model_copy(update=dict(images=interpolate_epi(rendered.images, epi_matrix)))
        pix = quantise(rendered.images)
        groups: dict[tuple, list[RenderedImage]] = {}
        for im, p in zip(rendered.images, pix):
            key = ("ADC",) if im.derived == "ADC" else (im.b_value, im.derived, im.temporal_index)
            groups.setdefault(key, []).append(im.model_copy(update=dict(pixels=p)))
        keys = list(groups)
        if spec.kind == "dce":  # single phases, as the agent passes one; two per exam for variety
            keys = [keys[int(i)] for i in rng.choice(len(keys), size=min(2, len(keys)), replace=False)]
        for key in keys:
            ims = groups[key]
            vol = stack_volume(ims)
            arr, _ = prepare({CHANNEL: vol}, PREPROCESS)
            info = dict(seed=seed, vendor=vendor, variant=variant, kind=spec.kind, plane=spec.plane,
                        b_value=ims[0].b_value, field=exam.field_strength_t, matrix=list(spec.matrix))
            yield label_of(spec, ims[0]), arr, info


def _shard(args: tuple[list[int], str, str, float, float, float]) -> str:
    global REALISM_PELVIS_P
    seeds, variant, path, realism, constants_sd, REALISM_PELVIS_P = args  # workers do not share globals
    xs, ys, infos = [], [], []
    for s in seeds:
        vendor = VENDORS[s % len(VENDORS)]
        for label, arr, info in exam_samples(s, vendor, variant, realism=realism,
                                             constants_sd=constants_sd):  # type: ignore[arg-type]
            xs.append(arr.astype(np.float16))
            ys.append(LABEL_INDEX[label])
            infos.append(info)
    tmp = path + ".tmp.npz"
    np.savez(tmp, x=np.stack(xs), y=np.asarray(ys, dtype=np.int64), info=np.asarray(json.dumps(infos)))
    os.replace(tmp, path)
    return path


def spec_key() -> str:
    """Cache key: the simulator, the preprocessing, this module and its protocol generator (changes
    invalidate the cache)."""
    from scanside.training.common import render_cache_key

    if REALISM:
        return render_cache_key("scanside.training.sequence.protocols", "scanside.training.sequence.realism", __name__,
                                salt=PREPROCESS.model_dump_json() + f"realism={REALISM},{REALISM_CONSTANTS_SD}"
                                + (f",pelvis={REALISM_PELVIS_P}" if REALISM_PELVIS_P else ""))
    return render_cache_key("scanside.training.sequence.protocols", __name__, salt=PREPROCESS.model_dump_json())


def build_dataset(seeds: Sequence[int], variant: Variant = "train", cache_dir: Path | None = None,
                  jobs: int = 1, shard_size: int = 8) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Render (or load from the cache) the samples of the given exam seeds.
    Returns x float16 (N, IN_CHANNELS, *INPUT_SHAPE), y int64 (N,), info per sample."""
    cache = Path(cache_dir or DEFAULT_CACHE) / spec_key()
    cache.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds)
    chunks = [seeds[i:i + shard_size] for i in range(0, len(seeds), shard_size)]
    todo, paths = [], []
    for ch in chunks:
        name = f"{variant}-{ch[0]}-{ch[-1]}-{len(ch)}.npz"
        p = str(cache / name)
        paths.append(p)
        if not Path(p).is_file():
            todo.append((ch, variant, p, REALISM, REALISM_CONSTANTS_SD, REALISM_PELVIS_P))
    t0 = time.time()
    if todo:
        run_jobs(_shard, todo, jobs, desc=f"rendering {variant} shards ({shard_size} exams each)", unit="shard")
        log.info("rendered %d shard(s) in %.0f s", len(todo), time.time() - t0)
    xs, ys, infos = [], [], []
    for p in paths:
        with np.load(p) as z:
            xs.append(z["x"])
            ys.append(z["y"])
            infos += json.loads(str(z["info"]))
    return np.concatenate(xs), np.concatenate(ys), infos
