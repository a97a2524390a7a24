"""Held-out evaluation of the zonal model through the runtime path.

    scanside models evaluate prostate-zones-reference [--exams-per-vendor N] [--seed S] [--json] [--write]

For each fresh exam (simulator seeds from ``options.seed``, never used in training; 0-3 lesions;
the four vendor styles): simulate_exam writes the axial T2W of the bpMRI protocol as DICOM ->
agent.exam_reader (the daemon's read path: read_exam -> gland_input picks the axial T2W, its model
frames) -> agent.volume.load_volume -> agent.gland.segment (engines.preprocess.prepare -> ONNX
-> zones, largest component). Ground truth: the phantom's zones (rebuilt with make_phantom from the
same seed) on the model grid, inside the T2W slab (training.zones.data.zone_target).

Metrics: Dice per zone (TZ, PZ) and for the whole gland; gland volume error (predicted vs the
phantom's gland inside the slab, %); inference seconds per series.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

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
    from simulator.protocols import build_exam

    exam = build_exam("prostate-bpmri", vendor, 3.0)
    return exam.model_copy(update={"series": [s for s in exam.series if s.kind == "t2w" and s.plane == "axial"]})


def _simulate(job: tuple) -> str:
    vendor, seed, out = job
    from simulator.scanner import simulate_exam

    simulate_exam(vendor, out, seed, profile="prostate-bpmri", n_lesions=exam_plan(seed)["n_lesions"],
                  exam=t2w_exam(vendor))
    return out


def t2w_volume(exam_dir: Path):
    """The axial T2W Volume of a written exam the daemon would segment (agent.exam_reader.gland_input),
    None if there is none."""
    from agent.exam_reader import gland_input, read_exam

    exam = read_exam(exam_dir)
    t2 = gland_input(exam.summaries())
    return exam.get(t2.series_id).volume() if t2 is not None else None


def dice(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    s = int(a.sum()) + int(b.sum())
    return None if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


def score(result, truth: np.ndarray) -> Dict[str, Any]:
    """Dice per zone and whole gland, volumes, for a GlandResult against zone labels on its grid."""
    from training.zones.spec import LABELS

    pred = result.zones if result.zones is not None else result.mask.astype(np.uint8)
    tz, pz = LABELS.index("TZ"), LABELS.index("PZ")
    vox_ml = float(np.prod(result.grid.spacing)) / 1000.0
    v_true = float((truth > 0).sum()) * vox_ml
    return {"dice_gland": dice(pred > 0, truth > 0), "dice_tz": dice(pred == tz, truth == tz),
            "dice_pz": dice(pred == pz, truth == pz), "volume_ml": result.volume_ml, "volume_true_ml": v_true,
            "volume_error_pct": None if v_true == 0 else 100.0 * (result.volume_ml - v_true) / v_true}


def run_eval(engine, exams_per_vendor: int, seed0: int, workdir: Optional[Path] = None, jobs: int = 1) -> Dict[str, Any]:
    from agent.gland import segment
    from simulator.phantom import make_phantom
    from training.zones.data import slab_mask, zone_target

    tmp = None
    root = Path(workdir) if workdir else Path(tmp := tempfile.mkdtemp(prefix="scanside-zones-eval-"))
    jobs_l = [(v, seed0 + k * len(VENDORS) + i, str(root / f"{v}-{seed0 + k * len(VENDORS) + i}"))
              for k in range(exams_per_vendor) for i, v in enumerate(VENDORS)]
    rows: List[Dict[str, Any]] = []
    errors: List[Dict[str, Any]] = []
    try:
        t0 = time.time()
        todo = [j for j in jobs_l if not (Path(j[2]) / "ground_truth.json").is_file()]
        if jobs > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=jobs) as ex:
                list(ex.map(_simulate, todo))
        else:
            for j in todo:
                _simulate(j)
        t_sim = time.time() - t0
        for vendor, seed, d in jobs_l:
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
    """training.registry evaluator for the zonal model (task gland_segmentation)."""
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
    from training.zones.export import write_card

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
             "runtime path (simulated DICOM -> agent.header/series/classify -> agent.volume -> engines.preprocess -> "
             "ONNX -> agent.gland). Ground truth: the phantom's zones on the model grid, inside the T2W slab.", "",
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
