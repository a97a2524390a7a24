"""The virtual scanner: render an exam profile with the phantom renderer, write it as a vendor's
DICOM export with ground truth, or stream an already written exam into a watched folder.

Layout of ``simulate_exam(vendor, out_dir, seed, ...)``::

    out_dir/ground_truth.json
    out_dir/STUDY_<uid tail>/<NNN>_<series description>/IM_0001.dcm ...

GroundTruth file paths are relative to ``out_dir`` (the "exam folder"). Series are listed in
acquisition order; ``stream_exam`` replays them in that order.
"""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from scanside.simulator.model import (ExamSpec, GroundTruth, GroundTruthLesion, GroundTruthPart, GroundTruthSeries, RenderedImage,
                             RenderedSeries, SeriesSpec)
from scanside.simulator.protocols import build_exam, check_faults
from scanside.simulator.vendors import VENDORS, get_writer, make_study_context
from scanside.simulator.vendors.common import WrittenFile

GROUND_TRUTH_NAME = "ground_truth.json"
DWI_HIGH_MIN_B = 500.0


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:48] or "series"


def _series_number(vendor: str, k: int) -> int:
    return 100 * k + 1 if vendor == "philips" else k


def _rng(seed: int, spec: SeriesSpec, occurrence: int) -> np.random.Generator:
    key = zlib.crc32(f"{spec.kind}:{spec.plane}:{occurrence}".encode())
    return np.random.default_rng(np.random.SeedSequence([int(seed), key]))


def _render(phantom, spec: SeriesSpec, fs: float, rng: np.random.Generator, artifacts=None) -> RenderedSeries:
    from scanside.simulator.render import render_series

    if spec.kind != "localizer":
        return render_series(phantom, spec, fs, rng, artifacts)
    # 3-plane localizer: one series, n_slices per plane, planes sagittal, coronal, axial
    images: list[RenderedImage] = []
    for p, plane in enumerate(("sagittal", "coronal", "axial")):
        sub = render_series(phantom, spec.model_copy(update=dict(plane=plane)), fs, rng, artifacts)
        for im in sub.images:
            images.append(im.model_copy(update=dict(slice_index=im.slice_index + p * spec.n_slices)))
    return RenderedSeries(spec=spec, images=images)


def _parts(spec: SeriesSpec, images: Sequence[RenderedImage]) -> list[GroundTruthPart]:
    if spec.kind == "localizer":
        return [GroundTruthPart(label="other", other_kind="localizer", n_images=len(images))]
    if spec.kind == "t2w":
        return [GroundTruthPart(label="T2WI_fs" if spec.fat_sat else "T2WI_nan", n_images=len(images))]
    if spec.kind == "t2w_fs":
        return [GroundTruthPart(label="T2WI_fs", n_images=len(images))]
    if spec.kind == "dce":
        return [GroundTruthPart(label="other", other_kind="DCE", n_images=len(images))]
    if spec.kind == "t1":
        return [GroundTruthPart(label="other", other_kind="T1", n_images=len(images))]
    parts: list[GroundTruthPart] = []
    groups: dict = {}
    for im in images:
        if im.derived == "ADC":
            key = ("ADC", None)
        else:
            key = (im.derived if im.derived == "CALC_BVALUE" else None, float(im.b_value or 0.0))
        groups[key] = groups.get(key, 0) + 1
    for (derived, b), n in sorted(groups.items(), key=lambda kv: (kv[0][0] == "ADC", kv[0][1] or 0.0)):
        if derived == "ADC":
            parts.append(GroundTruthPart(label="ADC", derived="ADC", n_images=n))
        else:
            parts.append(GroundTruthPart(label="DWI_High" if b >= DWI_HIGH_MIN_B else "DWI_Low", b_value=b,
                                         derived=derived, n_images=n))
    return parts


def simulate_exam(vendor: str, out_dir, seed: int, faults: Iterable[str] = (), profile: str = "prostate-mpmri",
                  field_strength: float = 3.0, enhanced: Optional[bool] = None, mosaic: bool = False, *,
                  artifacts=None, n_lesions: Optional[int] = None, cspca: Optional[bool] = None,
                  exam: Optional[ExamSpec] = None) -> GroundTruth:
    """Render and write one exam; returns (and writes ``out_dir/ground_truth.json``) its GroundTruth."""
    from scanside.simulator.phantom import make_phantom

    if vendor not in VENDORS:
        raise ValueError(f"unknown vendor {vendor!r}; expected one of {VENDORS}")
    faults = check_faults(faults)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exam = exam or build_exam(profile, vendor, field_strength, faults)
    ctx = make_study_context(vendor, seed, field_strength,
                             key=(profile, ",".join(sorted(faults)), enhanced, mosaic))
    phantom = make_phantom(seed, n_lesions=n_lesions, cspca=cspca)
    study_dir = out_dir / f"STUDY_{ctx.study_uid[-8:]}"
    writer = get_writer(vendor)

    # render, merging Philips' ADC into the preceding DWI series
    plan: list[tuple[SeriesSpec, RenderedSeries]] = []
    seen: dict[str, int] = {}
    for spec in exam.series:
        occ = seen.get(spec.kind, 0)
        seen[spec.kind] = occ + 1
        rendered = _render(phantom, spec, exam.field_strength_t, _rng(seed, spec, occ), artifacts)
        if vendor == "philips" and spec.kind == "adc" and plan and plan[-1][0].kind == "dwi":
            dwi_spec, dwi = plan[-1]
            plan[-1] = (dwi_spec, RenderedSeries(spec=dwi_spec, images=list(dwi.images) + list(rendered.images)))
            continue
        plan.append((spec, rendered))

    gt_series: list[GroundTruthSeries] = []
    written_all: list[tuple[GroundTruthSeries, list[WrittenFile]]] = []
    for k, (spec, rendered) in enumerate(plan, start=1):
        number = _series_number(vendor, k)
        series_uid = ctx.uid("series", number)
        sdir = study_dir / f"{number:03d}_{_safe(spec.description)}"
        if sdir.exists():
            shutil.rmtree(sdir)
        files = writer.write_series(rendered, ctx, sdir, series_number=number, series_uid=series_uid,
                                    enhanced=enhanced, mosaic=mosaic)
        images = [im for wf in files for im in wf.images]
        gts = GroundTruthSeries(
            series_uid=series_uid, series_number=number, description=spec.description, kind=spec.kind,
            plane=spec.plane, n_files=len(files), files=[wf.path.relative_to(out_dir).as_posix() for wf in files],
            parts=_parts(spec, images))
        gt_series.append(gts)
        written_all.append((gts, files))

    corrupt: list[str] = []
    if "truncated_file" in faults:
        gts = next(s for s in gt_series if s.kind == "t2w" and s.plane == "axial")
        rel = gts.files[len(gts.files) // 2]
        path = out_dir / rel
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate(int(size * 0.6))
        corrupt.append(rel)

    gt = GroundTruth(
        vendor=vendor, seed=seed, field_strength_t=float(exam.field_strength_t), faults=list(faults),
        study_uid=ctx.study_uid, patient_name=ctx.patient_name, patient_id=ctx.patient_id,
        patient_birth_date=ctx.patient_birth_date, accession_number=ctx.accession_number,
        prostate_center_lps_mm=tuple(float(v) for v in phantom.prostate_center_lps_mm),
        prostate_volume_ml=float(phantom.prostate_volume_ml),
        lesions=[GroundTruthLesion.model_validate(les.model_dump() if hasattr(les, "model_dump") else les)
                 for les in phantom.lesions],
        cspca=bool(phantom.cspca), series=gt_series, corrupt_files=corrupt)
    (out_dir / GROUND_TRUTH_NAME).write_text(gt.model_dump_json(indent=2))
    return gt


def load_ground_truth(exam_dir) -> GroundTruth:
    return GroundTruth.model_validate_json((Path(exam_dir) / GROUND_TRUTH_NAME).read_text())


def exam_files(gt: GroundTruth) -> list[str]:
    """All files of an exam in acquisition order (series order, then file order)."""
    return [f for s in gt.series for f in s.files]


def stream_exam(src_dir, dest_dir, *, rate: float = 20.0, write_mode: str = "chunks", chunk_size: int = 64 * 1024,
                chunk_delay_s: float = 0.0, stop_event: Optional[threading.Event] = None,
                ground_truth: Optional[GroundTruth] = None, series_pause_s: float = 0.0,
                on_file: Optional[Callable[[Path], None]] = None) -> list[Path]:
    """Replay an exam written by ``simulate_exam`` into ``dest_dir`` one file at a time.

    rate: files per second (<= 0: as fast as possible). write_mode "chunks": the file is
    created at its final name and written chunk by chunk (flush, optional ``chunk_delay_s``
    sleep between chunks) like a scanner writing over SMB; "rename": written to a hidden
    ``.<name>.tmp`` beside it, then ``os.replace``d into place. Series in acquisition order,
    optional ``series_pause_s`` between series. Stops (returning what was completed) when
    ``stop_event`` is set; a file being written when stopped is left as it is (partial in
    "chunks" mode, a hidden temp file in "rename" mode). Returns the destination paths of
    completed files.
    """
    if write_mode not in ("chunks", "rename"):
        raise ValueError("write_mode must be 'chunks' or 'rename'")
    src_dir, dest_dir = Path(src_dir), Path(dest_dir)
    gt = ground_truth or load_ground_truth(src_dir)
    stop = stop_event or threading.Event()
    period = 1.0 / rate if rate and rate > 0 else 0.0
    done: list[Path] = []
    t_next = time.monotonic()
    for si, series in enumerate(gt.series):
        if si and series_pause_s > 0 and stop.wait(series_pause_s):
            return done
        for rel in series.files:
            if stop.is_set():
                return done
            if period:
                delay = t_next - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return done
                t_next = max(t_next, time.monotonic()) + period
            src = src_dir / rel
            dst = dest_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            data = src.read_bytes()
            if write_mode == "rename":
                tmp = dst.with_name(f".{dst.name}.tmp")
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, dst)
            else:
                with open(dst, "wb") as fh:
                    for i in range(0, len(data), max(chunk_size, 1)):
                        if i and stop.is_set():
                            return done
                        fh.write(data[i:i + chunk_size])
                        fh.flush()
                        if chunk_delay_s > 0 and i + chunk_size < len(data):
                            time.sleep(chunk_delay_s)
            done.append(dst)
            if on_file:
                on_file(dst)
    return done


def simulate_realtime(vendor: str, watch_dir, seed: int, *, staging_dir=None, rate: float = 20.0,
                      write_mode: str = "chunks", stop_event: Optional[threading.Event] = None,
                      **simulate_kw) -> GroundTruth:
    """Render the exam into a staging folder, then stream it into ``watch_dir``."""
    import tempfile

    watch_dir = Path(watch_dir)
    tmp = None
    if staging_dir is None:
        tmp = tempfile.mkdtemp(prefix="scanside-sim-")
        staging_dir = tmp
    try:
        gt = simulate_exam(vendor, staging_dir, seed, **simulate_kw)
        stream_exam(staging_dir, watch_dir, rate=rate, write_mode=write_mode, stop_event=stop_event, ground_truth=gt)
        return gt
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
