"""Held-out evaluation of the zonal model through the runtime path.

    scanside models evaluate prostate-zones-reference [--exams-per-vendor N] [--seed S] [--json] [--write]

For each fresh exam (simulator seeds from ``options.seed``, never used in training; 0-3 lesions;
the four vendor styles): simulate_exam writes the axial T2W of the bpMRI protocol as DICOM ->
scanside.agent.dicom.exam_reader (the daemon's read path: read_exam -> gland_input picks the axial T2W, its model
frames) -> scanside.agent.dicom.volume.load_volume -> scanside.engines.tasks.gland.segment (scanside.engines.preprocess.prepare -> ONNX
-> zones, largest component). Ground truth: the phantom's zones (rebuilt with make_phantom from the
same seed) on the model grid, inside the T2W slab (scanside.training.zones.data.zone_target).

Metrics: Dice per zone (TZ, PZ) and for the whole gland; gland volume error (predicted vs the
phantom's gland inside the slab, %); inference seconds per series.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from scanside.agent.service.progress import progress
from scanside.training.common import run_jobs

VENDORS = ("siemens", "siemens-xa", "ge", "philips")
DEFAULT_EXAMS_PER_VENDOR = 2
REPORT_FILE = "EVALUATION.md"
#: what the shipped model must reach on the small CI set (1-2 exams per vendor)
FLOOR = {"dice_gland_mean": 0.85, "dice_tz_mean": 0.75, "dice_pz_mean": 0.65}


def exam_plan(seed: int) -> Dict[str, Any]:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x20E7]))
    return {"n_lesions": int(rng.choice([0, 1, 2, 3]))}


def t2w_exam(vendor: str):
    """The bpMRI protocol's axial T2W alone (what the zonal model reads)."""
    from scanside.simulator.protocols import build_exam

    exam = build_exam("prostate-bpmri", vendor, 3.0)
    return exam.model_copy(update={"series": [s for s in exam.series if s.kind == "t2w" and s.plane == "axial"]})


def _simulate(job: tuple) -> str:
    vendor, seed, out = job
    from scanside.simulator.scanner import simulate_exam

    simulate_exam(vendor, out, seed, profile="prostate-bpmri", n_lesions=exam_plan(seed)["n_lesions"],
                  exam=t2w_exam(vendor))
    return out


def t2w_volume(exam_dir: Path):
    """The axial T2W Volume of a written exam the daemon would segment (scanside.agent.dicom.exam_reader.gland_input),
    None if there is none."""
    from scanside.agent.dicom.exam_reader import gland_input, read_exam

    exam = read_exam(exam_dir)
    t2 = gland_input(exam.summaries())
    return exam.get(t2.series_id).volume() if t2 is not None else None


def dice(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    s = int(a.sum()) + int(b.sum())
    return None if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


def score(result, truth: np.ndarray) -> Dict[str, Any]:
    """Dice per zone and whole gland, volumes, for a GlandResult against zone labels on its grid."""
    from scanside.training.zones.spec import LABELS

    pred = result.zones if result.zones is not None else result.mask.astype(np.uint8)
    tz, pz = LABELS.index("TZ"), LABELS.index("PZ")
    vox_ml = float(np.prod(result.grid.spacing)) / 1000.0
    v_true = float((truth > 0).sum()) * vox_ml
    return {"dice_gland": dice(pred > 0, truth > 0), "dice_tz": dice(pred == tz, truth == tz),
            "dice_pz": dice(pred == pz, truth == pz), "volume_ml": result.volume_ml, "volume_true_ml": v_true,
            "volume_error_pct": None if v_true == 0 else 100.0 * (result.volume_ml - v_true) / v_true}


def run_eval(engine, exams_per_vendor: int, seed0: int, workdir: Optional[Path] = None, jobs: int = 1) -> Dict[str, Any]:
    from scanside.engines.tasks.gland import segment
    from scanside.simulator.phantom import make_phantom
    from scanside.training.zones.data import slab_mask, zone_target

    tmp = None
    root = Path(workdir) if workdir else Path(tmp := tempfile.mkdtemp(prefix="scanside-zones-eval-"))
    jobs_l = [(v, seed0 + k * len(VENDORS) + i, str(root / f"{v}-{seed0 + k * len(VENDORS) + i}"))
              for k in range(exams_per_vendor) for i, v in enumerate(VENDORS)]
    rows: List[Dict[str, Any]] = []
    errors: List[Dict[str, Any]] = []
    try:
        t0 = time.time()
        todo = [j for j in jobs_l if not (Path(j[2]) / "ground_truth.json").is_file()]
        run_jobs(_simulate, todo, jobs)
        t_sim = time.time() - t0
        for vendor, seed, d in progress(jobs_l, desc="segmenting exams", unit="exam"):
            try:
                vol = t2w_volume(Path(d))
                if vol is None:
                    raise ValueError("no axial T2W found")
                t1 = time.perf_counter()
                res = segment(engine, vol)
                dt = time.perf_counter() - t1
            except Exception as e:  # an exam the runtime cannot read counts as an error, reported
                errors.append({"vendor": vendor, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                continue
            ph = make_phantom(seed, n_lesions=exam_plan(seed)["n_lesions"])
            truth = zone_target(ph, res.grid, slab_mask(vol, res.grid))
            rows.append({"vendor": vendor, "seed": seed, "seconds": dt, "phantom_volume_ml": ph.prostate_volume_ml,
                         **score(res, truth)})
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"metrics": summarise(rows), "per_vendor": {v: summarise([r for r in rows if r["vendor"] == v])
                                                        for v in VENDORS if any(r["vendor"] == v for r in rows)},
            "rows": rows, "errors": errors, "seconds_simulation": round(t_sim, 1)}


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    def vals(k):
        return [r[k] for r in rows if r.get(k) is not None]

    out: Dict[str, Any] = {"n": len(rows)}
    for k in ("dice_gland", "dice_tz", "dice_pz"):
        v = vals(k)
        out[f"{k}_mean"] = float(np.mean(v)) if v else None
        out[f"{k}_min"] = float(np.min(v)) if v else None
    ve = [abs(x) for x in vals("volume_error_pct")]
    out["volume_abs_error_pct_median"] = float(np.median(ve)) if ve else None
    out["volume_abs_error_pct_p90"] = float(np.percentile(ve, 90)) if ve else None
    out["volume_error_pct_mean"] = float(np.mean(vals("volume_error_pct"))) if ve else None
    s = vals("seconds")
    out["seconds_per_series_median"] = float(np.median(s)) if s else None
    out["seconds_per_series_max"] = float(np.max(s)) if s else None
    return out


def _passed(metrics: Dict[str, Any], floor: Dict[str, float]) -> bool:
    return all(metrics.get(k) is not None and metrics[k] >= v for k, v in floor.items())


def evaluate_model(store, manifest, options) -> dict:
    """scanside.training.registry evaluator for the zonal model (task gland_segmentation)."""
    engine, selection = store.open(manifest, variant=options.variant)
    try:
        n = options.exams_per_vendor or DEFAULT_EXAMS_PER_VENDOR
        res = run_eval(engine, n, options.seed, options.workdir, options.jobs)
    finally:
        engine.close()
    report = {"model": manifest.ref, "backend": selection.backend, "exams_per_vendor": n, "seed": options.seed,
              "exams": res["metrics"]["n"], "floor": FLOOR, "passed": _passed(res["metrics"], FLOOR) and not res["errors"],
              **res}
    if options.write:
        write_results(manifest, report)
        report["written"] = str(manifest.root)
    return report


def write_results(manifest, report: dict) -> None:
    """Metrics -> manifest.metrics['evaluation'], EVALUATION.md and the refreshed model card."""
    from scanside.training.zones.export import write_card

    m = report["metrics"]
    ev = {"measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
          "command": f"scanside models evaluate {manifest.name} --exams-per-vendor {report['exams_per_vendor']} "
                     f"--seed {report['seed']} --write",
          "exams": m["n"], "seed": report["seed"], "backend": report["backend"], "metrics": m,
          "per_vendor": report["per_vendor"], "floor": report["floor"], "errors": report["errors"][:20]}
    metrics = dict(manifest.metrics)
    metrics["evaluation"] = ev
    m2 = manifest.model_copy(update={"metrics": metrics})
    m2.set_root(manifest.root)
    m2.save(Path(manifest.root))
    f = lambda v: "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# Evaluation: {manifest.ref}", "",
             f"Measured {ev['measured_at']} with `{ev['command']}` on {m['n']} freshly simulated exams (seeds "
             f"{report['seed']}.., never used in training; 4 vendor styles, 0-3 lesions), back end {report['backend']}, "
             "runtime path (simulated DICOM -> scanside.agent.dicom.header/series/classify -> scanside.agent.dicom.volume -> scanside.engines.preprocess -> "
             "ONNX -> scanside.engines.tasks.gland). Ground truth: the phantom's zones on the model grid, inside the T2W slab.", "",
             "| metric | value |", "|---|---:|"]
    for k in ("dice_gland_mean", "dice_gland_min", "dice_tz_mean", "dice_tz_min", "dice_pz_mean", "dice_pz_min",
              "volume_abs_error_pct_median", "volume_abs_error_pct_p90", "volume_error_pct_mean",
              "seconds_per_series_median", "seconds_per_series_max"):
        lines.append(f"| {k} | {f(m.get(k))} |")
    lines += ["", "Per vendor style (mean Dice gland / TZ / PZ): " + "; ".join(
        f"{v} {f(r['dice_gland_mean'])} / {f(r['dice_tz_mean'])} / {f(r['dice_pz_mean'])} (n={r['n']})"
        for v, r in report["per_vendor"].items()), "", f"CI floor (tests/training/test_zones.py): {report['floor']}",
        "", f"Errors: {len(report['errors'])}"]
    (Path(manifest.root) / REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_card(m2, Path(manifest.root))


#: a real prostate gland on T2W: usually 25-60 mL; outside this range the segmentation is not believable
REAL_GLAND_ML = (15.0, 100.0)
#: agreement with the reference gland (TAPS, trained on real patients) a gland model needs on real T2W
REAL_MIN_DICE = 0.7


def mask_dice(a, b) -> Optional[float]:
    """Dice of two GlandResults' masks on a's grid (b's mask looked up at a's voxel centres, nearest)."""
    if not a.found and not b.found:
        return None
    ijk = np.argwhere(np.ones(a.mask.shape, dtype=bool))
    idx = np.rint(b.grid.lps_to_index(a.grid.index_to_lps(ijk.astype(np.float64)))).astype(int)
    ok = np.all((idx >= 0) & (idx < np.asarray(b.mask.shape)), axis=1)
    b_on_a = np.zeros(len(ijk), dtype=bool)
    b_on_a[ok] = b.mask[tuple(idx[ok].T)]
    return dice(a.mask.reshape(-1), b_on_a)


def evaluate_real(store, manifest, options) -> dict:
    """scanside.training.registry real-data evaluator for task gland_segmentation (the zonal model and TAPS alike): the
    axial T2W the daemon would segment (scanside.agent.dicom.exam_reader.gland_input) of every exam under ``options.real``,
    segmented by this model and by the other gland model when it is in the store (TAPS, trained on real
    patients, is the reference for the zonal model): volume, plausibility, Dice and centroid distance
    between the two. Verdict ``usable`` (recorded with --write; scanside.engines.tasks.gland's [gland] model = auto reads it):
    every gland found with a believable volume and, for a model other than TAPS, Dice >= REAL_MIN_DICE
    against TAPS on every exam; unknown (not recorded) when TAPS is absent for a model that needs it."""
    from scanside.agent.dicom.exam_reader import gland_input, read_exams
    from scanside.engines.tasks.gland import MODEL_NAME, ZONES_MODEL, GlandService, resolve_model
    from scanside.training.common import opaque, record_real_data

    svc = GlandService(store, model=manifest.ref, variant=options.variant)
    other = ZONES_MODEL if manifest.name == MODEL_NAME else MODEL_NAME
    ref = GlandService(store, model=other) if resolve_model(store, other) else None
    rows: List[Dict[str, Any]] = []
    for exam in read_exams(options.real):
        t2 = gland_input(exam.summaries())
        row: Dict[str, Any] = {"exam": opaque(exam.study_uid)}
        if t2 is None:
            rows.append({**row, "status": "no_axial_t2w"})
            continue
        vol = exam.get(t2.series_id).volume()
        mine = svc.segment(vol)
        if mine is None:
            rows.append({**row, "status": "error", "error": svc.unavailable or "segmentation failed"})
            continue
        row.update(status="ok", t2=f"series {t2.series_number} {t2.label}", found=mine.found,
                   volume_ml=round(mine.volume_ml, 1), seconds=round(mine.seconds, 2),
                   plausible=bool(mine.found and REAL_GLAND_ML[0] <= mine.volume_ml <= REAL_GLAND_ML[1]))
        theirs = ref.segment(vol) if ref is not None else None
        if theirs is not None:
            d = mask_dice(mine, theirs)
            row.update(reference=theirs.model, reference_volume_ml=round(theirs.volume_ml, 1),
                       dice_vs_reference=None if d is None else round(d, 3),
                       centroid_distance_mm=round(float(np.linalg.norm(np.subtract(mine.centroid_lps, theirs.centroid_lps))), 1)
                       if mine.found and theirs.found else None)
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    dices = [r["dice_vs_reference"] for r in ok if r.get("dice_vs_reference") is not None]
    metrics: Dict[str, Any] = {
        "exams": len(rows), "segmented": len(ok), "found": sum(r["found"] for r in ok),
        "plausible_volume": sum(r["plausible"] for r in ok),
        "volume_ml": [r["volume_ml"] for r in ok],
        "reference": ref.model if ref is not None else None,
        "reference_volume_ml": [r.get("reference_volume_ml") for r in ok] if ref is not None else None,
        "dice_vs_reference_mean": round(float(np.mean(dices)), 3) if dices else None,
        "dice_vs_reference_min": round(float(np.min(dices)), 3) if dices else None,
    }
    needs_ref = manifest.name != MODEL_NAME
    usable: Optional[bool] = None
    if ok and (not needs_ref or dices):
        usable = all(r["plausible"] for r in ok) and (not needs_ref or (len(dices) == len(ok) and min(dices) >= REAL_MIN_DICE))
    report = {"model": manifest.ref, "real": [str(p) for p in options.real], "metrics": metrics, "rows": rows,
              "usable_on_real": usable, "floor": {"dice_vs_taps": REAL_MIN_DICE, "volume_ml": REAL_GLAND_ML},
              "passed": bool(usable)}
    if options.write and usable is not None:
        from scanside.training.zones.export import write_card

        vols = ", ".join(f"{v:g}" for v in metrics["volume_ml"])
        figures = {"gland volume per exam (mL)": vols, "found": f"{metrics['found']} of {len(ok)}",
                   f"believable volume ({REAL_GLAND_ML[0]:g}-{REAL_GLAND_ML[1]:g} mL)": f"{metrics['plausible_volume']} of {len(ok)}"}
        if ref is not None:
            figures[f"{ref.model} volume per exam (mL)"] = ", ".join(str(v) for v in metrics["reference_volume_ml"])
            figures[f"Dice against {ref.model} (mean / min)"] = f"{metrics['dice_vs_reference_mean']} / {metrics['dice_vs_reference_min']}"
        record_real_data(manifest, {
            "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": f"scanside models evaluate {manifest.name} " + " ".join(f"--real {p}" for p in options.real) + " --write",
            "exams": len(ok), "data": ", ".join(Path(p).name for p in options.real) + f" ({len(rows)} exam(s) read, "
            f"{len(ok)} with the model's inputs)",
            "reference": f"{ref.model} (trained on real patients)" if ref is not None and other == MODEL_NAME
            else (ref.model if ref is not None else "no second gland model; volume plausibility only"),
            "figures": figures, "usable": usable,
            "summary": ("real-data figures within the bar" if usable else
                        f"Dice against TAPS (min {metrics['dice_vs_reference_min']}, needs {REAL_MIN_DICE}) or gland volume "
                        f"({metrics['plausible_volume']} of {len(ok)} believable) below the bar: [gland] model = auto does not use it"),
        }, write_card)
        report["written"] = str(manifest.root)
    return report
