"""FP32 vs INT8 (symmetric Q/DQ for TensorRT, U8/S8 for CPU) on ONNX Runtime CPU.

    .venv/bin/python bench/bench_int8.py [--threads 2] [--calib-exams 4] [--heldout-exams 4] [--skip-taps]

1. tiny 3-D model (tests/engines/_tiny.py): calibrated on simulated T2W DICOM, latency per variant.
2. TAPS (prostate-gland-taps, imported from the lavlab-taps wheel into a bench store under
   ~/.cache/scanside/int8-store): calibration on windows of simulated axial T2W series prepared by the
   agent's preprocessing, parity on held-out series (Dice of INT8 masks against FP32), latency of one
   128x128x32 window per variant (median of 3), whole-series gland Dice INT8 vs FP32 (scanside.engines.tasks.gland),
   and an ONNX Runtime profile per variant (which kernels ran, time per op type) to explain the speed.

Writes bench/results/int8.json (stages are saved as they finish)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "int8.json"
CACHE = Path(os.environ.get("SCANSIDE_CACHE_DIR", Path.home() / ".cache" / "scanside"))


def save(res: Dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    tmp.replace(RESULTS)


def session(path: Path, threads: int, profile_prefix: str = "") -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def latency(path: Path, feed: Dict[str, np.ndarray], threads: int, repeats: int, warmup: int = 1) -> Dict[str, float]:
    s = session(path, threads)
    for _ in range(warmup):
        s.run(None, feed)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.run(None, feed)
        ts.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(ts), 5), "min_s": round(min(ts), 5), "runs": repeats}


def profile(path: Path, feed: Dict[str, np.ndarray], threads: int) -> Dict[str, Any]:
    """One profiled run: kernel time per op type (the optimized graph's nodes, after fusions)."""
    with tempfile.TemporaryDirectory() as tmp:
        s = session(path, threads, str(Path(tmp) / "p"))
        s.run(None, feed)  # first run: allocations
        s.run(None, feed)
        prof = s.end_profiling()
        events = json.loads(Path(prof).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last_start = runs[-1]["ts"] if runs else 0
    per_op: Dict[str, float] = defaultdict(float)
    count: Dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < last_start:
            continue
        op = e.get("args", {}).get("op_name", "?")
        per_op[op] += e["dur"] / 1e6
        count[op] += 1
    total = sum(per_op.values())
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:10]
    return {"kernel_seconds": round(total, 4),
            "by_op_type": {k: {"seconds": round(v, 4), "share": round(v / total, 3) if total else 0, "nodes": count[k]}
                           for k, v in top}}


def qdq_counts(path: Path) -> Dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    c: Dict[str, int] = defaultdict(int)
    for n in m.graph.node:
        c[n.op_type] += 1
    return {k: c[k] for k in ("QuantizeLinear", "DequantizeLinear", "Conv", "ConvTranspose", "Gemm") if k in c}


def bench_tiny(res: Dict[str, Any], data: List[Path], threads: int) -> None:
    from scanside.converters.calibrate import calibrate
    from scanside.converters.calibration_data import build_set
    from scanside.converters.parity import parity_report, record
    from tests.converters._models import install_tiny_t2w

    with tempfile.TemporaryDirectory() as tmp:
        m = install_tiny_t2w(Path(tmp) / "models")
        cset = build_set(m, data)
        cal, held = cset.split(max(1, len(set(cset.sources)) // 2))
        r = calibrate(m, cal, data_description="simulated axial T2W")
        rep = parity_report(r.manifest, held, threads=threads, tensorrt=False)
        m2 = record(r.manifest, rep)
        batch = np.repeat(cset.inputs[:1], 64, axis=0)
        lat = {v: latency(m2.file_path(v), {"x": batch}, threads, 50, 5) for v in m2.files}
        res["tiny"] = {
            "model": "tests/engines/_tiny.py Conv3d(1->4)+ReLU+GAP+Gemm, input [64,1,8,8,4]",
            "calibration": {k: {"op_types_quantized": s.kept, "op_type_rel_error": s.measured} for k, s in r.selections.items()},
            "parity": rep["variants"], "latency_batch64": lat,
            "speedup_vs_fp32": {v: round(lat["fp32"]["median_s"] / lat[v]["median_s"], 3) for v in lat},
        }
    save(res)


def taps_store() -> Any:
    from scanside.engines.manifest import ModelManifest
    from scanside.agent.cli.taps import fetch_wheel, import_taps

    root = CACHE / "int8-store"
    m = import_taps(root, fetch_wheel())
    # start from a clean FP32 manifest each run (drop earlier INT8 files and parity)
    from scanside.agent.cli.taps import taps_manifest

    base = taps_manifest()
    base.save(m.root)
    for f in Path(m.root).glob("model_v1.int8_*.onnx"):
        f.unlink()
    return ModelManifest.load(m.root)


def bench_taps(res: Dict[str, Any], calib_dirs: List[Path], held_dirs: List[Path], threads: int,
               windows_per_series: int, method: str) -> None:
    from scanside.engines.tasks.gland import segment_gland
    from scanside.converters.calibrate import calibrate
    from scanside.converters.calibration_data import build_set, read_series
    from scanside.converters.parity import dice, parity_report, record
    from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine

    out: Dict[str, Any] = {"method": method, "threads": threads}
    res["taps"] = out
    m = taps_store()
    t0 = time.perf_counter()
    cal = build_set(m, calib_dirs, windows_per_series=windows_per_series)
    held_series = read_series(held_dirs, labels=["T2WI_nan", "T2WI_fs"])
    held = build_set(m, None, series=held_series, windows_per_series=1)
    out["data"] = {"calibration_windows": len(cal), "calibration_series": len(set(cal.sources)),
                   "heldout_windows": len(held), "heldout_series": len(set(held.sources)),
                   "prepare_seconds": round(time.perf_counter() - t0, 2),
                   "source": "simulated axial T2W (bench/make_t2w_data.py), agent preprocessing"}
    save(res)
    r = calibrate(m, cal, method=method, data_description="simulated axial T2W", threads=threads)
    out["calibration"] = {"seconds": r.seconds,
                          "variants": {k: {"op_types_quantized": s.kept, "op_type_rel_error": s.measured,
                                           "kept_fp32": s.dropped} for k, s in r.selections.items()},
                          "qdq_nodes": {k: qdq_counts(p) for k, p in r.variants.items()}}
    save(res)
    rep = parity_report(r.manifest, held, threads=threads, tensorrt=True, data_description="simulated axial T2W, held out")
    m = record(r.manifest, rep)
    out["parity"] = rep
    save(res)
    feed = {"input": np.ascontiguousarray(held.inputs[:1])}
    lat = {v: latency(m.file_path(v), feed, threads, 3) for v in m.files}
    out["latency_one_window"] = lat
    out["speedup_vs_fp32"] = {v: round(lat["fp32"]["median_s"] / lat[v]["median_s"], 3) for v in lat}
    save(res)
    out["profile"] = {v: profile(m.file_path(v), feed, threads) for v in m.files}
    save(res)
    # whole-series gland masks (scanside.engines.tasks.gland, centre window) INT8 vs FP32
    seg: Dict[str, Any] = {}
    engines = {v: OnnxRuntimeEngine(["CPUExecutionProvider"], intra_op_threads=threads).load(m, v) for v in m.files}
    for s in held_series[:2]:
        results = {v: segment_gland(e, s.volume) for v, e in engines.items()}
        ref = results["fp32"]
        seg[s.series_key] = {v: {"volume_ml": round(g.volume_ml, 2), "dice_vs_fp32": round(dice(ref.mask, g.mask), 5),
                                 "seconds": round(g.seconds, 2)} for v, g in results.items()}
    out["gland_series"] = seg
    save(res)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-exams", type=int, default=4)
    ap.add_argument("--heldout-exams", type=int, default=4)
    ap.add_argument("--windows-per-series", type=int, default=2)
    ap.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    ap.add_argument("--skip-taps", action="store_true")
    ap.add_argument("--data", type=Path, default=CACHE / "int8-t2w")
    a = ap.parse_args()
    import onnxruntime as ort

    from bench.make_t2w_data import make
    from scanside.converters.calibrate import cpu_has_vnni

    dirs = make(a.data, n=a.calib_exams + a.heldout_exams, seed0=100)
    res: Dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "vnni": cpu_has_vnni(),
                    "onnxruntime": ort.__version__, "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
        "command": " ".join(["python"] + sys.argv),
    }
    if RESULTS.exists():  # keep an earlier TAPS result when only the tiny model is re-run
        try:
            old = json.loads(RESULTS.read_text())
            if a.skip_taps and "taps" in old:
                res["taps"] = old["taps"]
        except ValueError:
            pass
    bench_tiny(res, dirs[:4], a.threads)
    print(json.dumps(res["tiny"]["speedup_vs_fp32"]), flush=True)
    if not a.skip_taps:
        bench_taps(res, dirs[:a.calib_exams], dirs[a.calib_exams:], a.threads, a.windows_per_series, a.method)
        print(json.dumps({k: res["taps"].get(k) for k in ("speedup_vs_fp32",)}), flush=True)
    res["load_average_at_end"] = os.getloadavg()
    save(res)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
