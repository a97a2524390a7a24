"""Zonal gland model latency: scanside.engines.tasks.gland.segment (scanside.engines.preprocess.prepare + ONNX Runtime + zones and
largest component) on the axial T2W of simulated exams, one per vendor style, N runs each; also the ONNX
run alone. Writes bench/results/zones.json.

    python bench/bench_zones.py [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=980000)
    a = ap.parse_args()
    import numpy as np

    from scanside.engines.tasks.gland import segment
    from scanside.engines.preprocess import prepare
    from scanside.engines.store import ModelStore
    from scanside.training.zones.evaluate import VENDORS, _simulate, t2w_volume

    vols = {}
    with tempfile.TemporaryDirectory() as d:
        for i, v in enumerate(VENDORS):
            _simulate((v, a.seed + i, f"{d}/{v}"))
            vols[v] = t2w_volume(Path(f"{d}/{v}"))
    t0 = time.perf_counter()
    engine, sel = ModelStore().open("prostate-zones-reference")
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    segment(engine, vols["siemens"])
    t_first = time.perf_counter() - t1
    total, onnx = [], []
    spec = engine.manifest.preprocessing
    for v, vol in vols.items():
        x, _ = prepare({"T2W": vol}, spec)
        for _ in range(a.runs):
            t = time.perf_counter()
            segment(engine, vol)
            total.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.run({"input": x[None].astype(np.float32)})
            onnx.append(time.perf_counter() - t)
    q = lambda xs, p: round(float(np.percentile(xs, p)), 4)  # noqa: E731
    out = {
        "command": f"python bench/bench_zones.py --runs {a.runs}", "model": engine.manifest.ref,
        "backend": sel.backend, "series": len(vols), "runs_per_series": a.runs,
        "seconds_per_series": {"p50": q(total, 50), "p95": q(total, 95), "max": round(max(total), 4)},
        "seconds_onnx_only": {"p50": q(onnx, 50), "p95": q(onnx, 95)},
        "seconds_load": round(t_load, 3), "seconds_first_series": round(t_first, 3),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    dest = ROOT / "bench" / "results" / "zones.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
