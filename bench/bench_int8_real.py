"""TAPS INT8 on real T2W: calibrated on simulated T2W vs calibrated on real T2W (issue 18, item 6).

    .venv/bin/python bench/bench_int8_real.py [--real DIR] [--threads 2] [--sim-exams 2] [--windows-per-series 2]

TAPS (prostate-gland-taps, imported from the lavlab-taps wheel) is calibrated twice, each time into its own
copy of the store, both INT8 variants (int8_sym, int8_u8s8) from one calibration pass:

* ``simulated``: windows of simulated axial T2W (bench/make_t2w_data.py), as bench_int8.py did;
* ``real``: windows of the real exam's *sagittal and coronal* T2 TSE (prepared by the agent's preprocessing,
  which reorients them to TAPS's RAS grid), so that the axial T2W the figures are measured on is a series
  the calibration never saw (same patient: the only real prostate exam here is ../shared/realdata's
  ProstateX-0218; a site calibrates on its own exams with `scanside convert calibrate --data DIR`).

Measured on the real axial T2W: the parity report (scanside.converters.parity, windows with the most foreground,
ONNX Runtime and OpenVINO entries, data origin recorded) and the whole-series gland mask through the agent's
own path (scanside.engines.tasks.gland.segment_gland, sliding window over the series): volume and Dice against FP32, seconds.
Writes bench/results/int8_real.json (stages saved as they finish)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "int8_real.json"
CACHE = Path(os.environ.get("SCANSIDE_CACHE_DIR", Path.home() / ".cache" / "scanside"))
REAL = ROOT.parent / "shared" / "realdata" / "prostate" / "ProstateX-0218"
T2W = ("T2WI_nan", "T2WI_fs")


def save(res: Dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    tmp.replace(RESULTS)


def fresh_taps(root: Path) -> Any:
    """TAPS FP32 alone in its own store under *root*."""
    from scanside.agent.cli.taps import fetch_wheel, import_taps

    return import_taps(root, fetch_wheel())


def gland_on(manifest: Any, series: List[Any], threads: int, windows: str) -> Dict[str, Any]:
    """Whole-series gland masks of every file variant through scanside.engines.tasks.gland (ONNX Runtime), FP32 first."""
    from scanside.engines.tasks.gland import segment_gland
    from scanside.converters.parity import dice
    from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine

    out: Dict[str, Any] = {}
    for s in series:
        masks = {}
        for v in ["fp32"] + [k for k in manifest.files if k != "fp32"]:
            with OnnxRuntimeEngine(["CPUExecutionProvider"], intra_op_threads=threads).load(manifest, v) as e:
                masks[v] = segment_gland(e, s.volume, windows=windows)  # type: ignore[arg-type]
        ref = masks["fp32"]
        out[s.series_key] = {v: {"volume_ml": round(g.volume_ml, 2), "dice_vs_fp32": round(dice(ref.mask, g.mask), 5),
                                 "windows": g.windows, "seconds": round(g.seconds, 2)} for v, g in masks.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", type=Path, default=REAL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sim-exams", type=int, default=2)
    ap.add_argument("--windows-per-series", type=int, default=2)
    ap.add_argument("--heldout-windows", type=int, default=3, help="real axial windows the parity report runs on")
    ap.add_argument("--gland-windows", choices=["center", "full"], default="full")
    ap.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    a = ap.parse_args()
    if not a.real.is_dir():
        print(f"no real data at {a.real} (see ../shared/realdata/README.md)", file=sys.stderr)
        return 2
    from bench.make_t2w_data import make
    from scanside.converters.calibrate import calibrate
    from scanside.converters.calibration_data import build_set, read_series
    from scanside.converters.parity import parity_report, record

    res: Dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": a.threads,
                                       "cpus_visible": os.cpu_count()},
                           "command": "bench/bench_int8_real.py " + " ".join(sys.argv[1:]), "method": a.method,
                           "real_exam": a.real.name}
    with tempfile.TemporaryDirectory(prefix="scanside-int8real-") as tmp:
        t0 = time.perf_counter()
        m0 = fresh_taps(Path(tmp) / "base")
        axial = read_series([a.real], labels=T2W, planes=("axial",))
        other = read_series([a.real], labels=T2W, planes=("sagittal", "coronal"))
        held = build_set(m0, None, series=axial, windows_per_series=a.heldout_windows)
        sim_dirs = make(CACHE / "int8-t2w", n=a.sim_exams, seed0=100)
        sets = {"simulated": build_set(m0, sim_dirs, windows_per_series=a.windows_per_series),
                "real": build_set(m0, None, series=other, windows_per_series=a.windows_per_series)}
        res["data"] = {"heldout": held.origin_summary(), "heldout_series": "real axial T2 TSE",
                       "calibration": {k: {**v.origin_summary(), "windows_per_series": a.windows_per_series}
                                       for k, v in sets.items()},
                       "calibration_real_series": "sagittal and coronal T2 TSE of the same exam (not the axial)",
                       "prepare_seconds": round(time.perf_counter() - t0, 1)}
        save(res)
        res["runs"] = {}
        for source, cset in sets.items():
            run: Dict[str, Any] = {}
            res["runs"][source] = run
            m = fresh_taps(Path(tmp) / source)
            r = calibrate(m, cset, method=a.method, select_ops=False, threads=a.threads,
                          data_description=f"{source} T2W windows (bench_int8_real.py)")
            run["calibration_seconds"] = r.seconds
            save(res)
            rep = parity_report(r.manifest, held, threads=a.threads, tensorrt=False,
                                data_description="real axial T2W windows (held-out series)")
            m = record(r.manifest, rep)
            run["parity"] = {k: {f: e.get(f) for f in ("backend", "metric", "value", "loss", "data_origin",
                                                        "fp32_foreground_voxels", "foreground_voxels",
                                                        "median_latency_s", "max_abs_diff")}
                             for k, e in rep["variants"].items()}
            run["parity_reference_latency_s"] = rep["reference_median_latency_s"]
            save(res)
            run["gland_series"] = gland_on(m, axial, a.threads, a.gland_windows)
            save(res)
            shutil.rmtree(Path(tmp) / source, ignore_errors=True)
    print(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
