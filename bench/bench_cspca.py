"""csPCa runtime latency: scanside.engines.tasks.cspca.CspcaModel.predict (prepare + ONNX Runtime + findings) on one
simulated bpMRI exam, median of N runs; writes bench/results/cspca.json.

    python bench/bench_cspca.py [--runs 5]
"""
from __future__ import annotations

import argparse
import json
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
    a = ap.parse_args()
    import numpy as np

    from scanside.engines.tasks.cspca import CspcaModel
    from scanside.simulator.scanner import simulate_exam
    from scanside.training.cspca.evaluate import exam_volumes

    with tempfile.TemporaryDirectory() as d:
        simulate_exam("siemens", d, 4242, profile="prostate-bpmri", n_lesions=1, cspca=True)
        vols = exam_volumes(Path(d))
    t0 = time.perf_counter()
    model = CspcaModel()
    t_load = time.perf_counter() - t0
    times = []
    for _ in range(a.runs):
        t = time.perf_counter()
        model.predict(vols)
        times.append(time.perf_counter() - t)
    res = {"model": model.ref, "backend": model.selection.backend, "runs": a.runs, "load_s": round(t_load, 3),
           "predict_median_s": round(float(np.median(times)), 4), "predict_max_s": round(float(np.max(times)), 4),
           "machine": platform.processor() or platform.machine()}
    out = ROOT / "bench" / "results" / "cspca.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
