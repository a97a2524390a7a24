"""Fit the csPCa model's validated input range (scanside.engines.tasks.input_range) on held-out inputs.

    python -m scanside.training.cspca.input_range [--name cspca-reference] [--fit-exams-per-vendor 4]
        [--val-exams-per-vendor 2] [--seed 930000] [--real ../shared/realdata/prostate] [--write]

Fresh simulated exams (seeds never used in training, none of the evaluation's 900000+ ones), read as
the daemon reads them (scanside.agent.dicom.exam_reader: read_exam -> triage_inputs -> model frames) and prepared
with the model's PreprocessSpec, give the input statistics of the validated kind of image: the
``fit`` exams set their mean and SD, the separate ``validation`` exams set the threshold
(margin x their largest distance). Real exams (``--real``), where given, are scored against the
fitted range and reported next to it: the threshold is not moved to fit them, so that what they show
is a measurement. ``--write`` saves ``input_range.json`` beside the model's manifest.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

VENDORS = ("siemens", "siemens-xa", "ge", "philips")


def exam_features(exams: Sequence[Any], spec: Any) -> List[Dict[str, Any]]:
    """Input statistics of each exam that has the model's inputs (read_exam's Exam objects)."""
    from scanside.agent.dicom.exam_reader import triage_inputs
    from scanside.engines.tasks.input_range import input_features
    from scanside.engines.preprocess import prepare

    out = []
    for exam in exams:
        chosen = triage_inputs(exam.summaries(), exam_over=True)
        if chosen is None:
            continue
        x, _grid = prepare(exam.volumes(chosen), spec)
        out.append({"inputs": {ch: s.series_number for ch, s in chosen.items()},
                    "features": input_features(x, list(spec.channels))})
    return out


def simulated(root: Path, seeds: Sequence[int]) -> List[Any]:
    from scanside.agent.dicom.exam_reader import read_exam
    from scanside.training.cspca.evaluate import _simulate

    exams = []
    for i, seed in enumerate(seeds):
        vendor = VENDORS[i % len(VENDORS)]
        d = root / f"{vendor}-{seed}"
        if not (d / "ground_truth.json").is_file():
            _simulate((vendor, seed, str(d)))
        exams.append(read_exam(d))
    return exams


def fit(name: str = "cspca-reference", fit_per_vendor: int = 4, val_per_vendor: int = 2, seed: int = 930_000,
        real: Optional[Sequence[Path]] = None, workdir: Optional[Path] = None, margin: float = 1.25,
        write: bool = False, store: Any = None) -> Dict[str, Any]:
    from scanside.agent.dicom.exam_reader import read_exams
    from scanside.engines.tasks.input_range import fit_input_range
    from scanside.engines.store import ModelStore

    store = store or ModelStore()
    manifest = store.resolve(name)
    spec = manifest.preprocessing
    n_fit, n_val = fit_per_vendor * len(VENDORS), val_per_vendor * len(VENDORS)
    root = Path(workdir or tempfile.mkdtemp(prefix="scanside-input-range-"))
    t0 = time.time()
    fit_rows = exam_features(simulated(root / "fit", range(seed, seed + n_fit)), spec)
    val_rows = exam_features(simulated(root / "val", range(seed + n_fit, seed + n_fit + n_val)), spec)
    rng = fit_input_range([r["features"] for r in fit_rows], [r["features"] for r in val_rows], list(spec.channels),
                          margin=margin, fitted_on={
                              "model": manifest.ref, "fit_exams": len(fit_rows), "validation_exams": len(val_rows),
                              "source": f"simulated bpMRI exams, seeds {seed}..{seed + n_fit + n_val - 1}, "
                                        f"{len(VENDORS)} vendor styles, read by scanside.agent.dicom.exam_reader",
                              "margin": margin,
                              "command": "python -m scanside.training.cspca.input_range " + " ".join(sys.argv[1:])})
    real_rows = []
    for folder in real or []:
        for row in exam_features(read_exams(folder), spec):
            check = rng.check_features(row["features"])
            real_rows.append({"folder": Path(folder).name, "inputs": row["inputs"], "score": check.score,
                              "in_range": check.in_range, "outside": check.outside[:5]})
    if real_rows:
        rng.fitted_on["real_exams_scored"] = [{"score": r["score"], "in_range": r["in_range"]} for r in real_rows]
    report = {"model": manifest.ref, "threshold": rng.threshold, "validation_scores": rng.validation_scores,
              "fit_scores_max": max(rng.check_features(r["features"]).score for r in fit_rows),
              "real": real_rows, "seconds": round(time.time() - t0, 1)}
    if write:
        report["written"] = str(rng.save(manifest.root))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="cspca-reference")
    ap.add_argument("--fit-exams-per-vendor", type=int, default=4)
    ap.add_argument("--val-exams-per-vendor", type=int, default=2)
    ap.add_argument("--seed", type=int, default=930_000)
    ap.add_argument("--margin", type=float, default=1.25)
    ap.add_argument("--real", type=Path, action="append", default=[], help="real DICOM folder(s) to score (repeatable)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the simulated exams here (reused when present)")
    ap.add_argument("--write", action="store_true", help="save input_range.json beside the model's manifest")
    args = ap.parse_args(argv)
    rep = fit(args.name, args.fit_exams_per_vendor, args.val_exams_per_vendor, args.seed, args.real, args.workdir,
              args.margin, args.write)
    print(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
