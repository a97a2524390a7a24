"""Engine benchmark: per model and available back end, batch-1 latency p50/p95, throughput,
peak RSS and cold start (load + first inference).  Each (model, back end) runs in its own
process so cold start and peak RSS are not polluted by the previous one.

    .venv/bin/python bench/bench_engines.py --model prostate-gland-taps --threads 2 --iters 10
    -> prints a table, writes bench/results/engines.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _measure(model: str, version: Optional[str], backend: str, variant: Optional[str], threads: Optional[int],
             iters: int, warmup: int, roots: Optional[List[str]], batch: int, q: Any) -> None:
    try:
        import numpy as np

        t0 = time.perf_counter()
        from scanside.engines.store import ModelStore
        opts: Dict[str, Dict[str, Any]] = {}
        if threads:
            opts["onnxruntime"] = {"intra_op_threads": threads, "inter_op_threads": 1}
        store = ModelStore(roots, preference=[backend], engine_options=opts)
        t_import = time.perf_counter() - t0
        m = store.resolve(model, version)
        rng = np.random.default_rng(0)

        def feeds(n: int) -> Dict[str, Any]:
            return {s.name: rng.standard_normal(s.concrete_shape(n)).astype(s.dtype) for s in m.inputs}

        x1 = feeds(1)
        t1 = time.perf_counter()
        engine, sel = store.open(m, variant=variant)
        t_load = time.perf_counter() - t1
        t2 = time.perf_counter()
        engine.run(x1)
        t_first = time.perf_counter() - t2
        for _ in range(warmup):
            engine.run(x1)
        lat = []
        for _ in range(iters):
            t = time.perf_counter()
            engine.run(x1)
            lat.append(time.perf_counter() - t)
        thr = None
        if batch > 1:
            xb = feeds(batch)
            t = time.perf_counter()
            engine.run(xb)
            thr = batch / (time.perf_counter() - t)
        info = engine.describe().to_dict()
        engine.close()
        lat_a = np.array(lat)
        q.put({
            "model": m.ref, "backend": sel.backend, "variant": sel.variant, "precision": sel.precision,
            "providers": info.get("providers"), "threads": info.get("threads"), "device": info.get("device"),
            "library_versions": info.get("library_versions"), "iters": iters,
            "latency_p50_s": float(np.percentile(lat_a, 50)), "latency_p95_s": float(np.percentile(lat_a, 95)),
            "latency_mean_s": float(lat_a.mean()), "latency_min_s": float(lat_a.min()),
            "throughput_batch1_per_s": float(1.0 / lat_a.mean()),
            **({f"throughput_batch{batch}_per_s": thr} if batch > 1 else {}),
            "cold_start_s": t_load + t_first, "load_s": t_load, "first_inference_s": t_first, "import_s": t_import,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "skipped": sel.skipped,
        })
    except Exception as e:  # report, don't crash the whole run
        q.put({"model": model, "backend": backend, "error": f"{type(e).__name__}: {e}"})


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model name[@version] (repeatable; default: every model)")
    ap.add_argument("--backend", action="append", help="back end(s) to try (default: tensorrt, onnxruntime)")
    ap.add_argument("--variant", default=None, help="file variant, e.g. fp32 or int8_qdq_u8s8 (default: manifest's)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="also measure throughput at this batch size (>1)")
    ap.add_argument("--store", action="append", help="store root(s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engines.json")
    args = ap.parse_args(argv)

    from scanside.engines.store import ModelStore
    models = args.model or [m.ref for m in ModelStore(args.store).list()]
    backends = args.backend or ["tensorrt", "onnxruntime"]
    load_before = os.getloadavg()
    ctx = mp.get_context("spawn")
    results = []
    for model in models:
        for backend in backends:
            q = ctx.Queue()
            p = ctx.Process(target=_measure, args=(model, None, backend, args.variant, args.threads, args.iters,
                                                   args.warmup, args.store, args.batch, q))
            p.start()
            r = q.get()
            p.join()
            results.append(r)
    host = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
        host["cpu_model"] = Path("/proc/cpuinfo").read_text().split("model name", 1)[1].split("\n", 1)[0].strip(": \t")
        host["avx512"] = "avx512f" in flags
        host["vnni"] = "avx512_vnni" in flags or "avx_vnni" in flags
    except Exception:
        pass
    doc = {"generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": host,
           "command": " ".join(["bench/bench_engines.py", *(argv if argv is not None else sys.argv[1:])]),
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'model':28} {'backend':12} {'variant':14} {'thr':>3} {'p50 s':>8} {'p95 s':>8} {'it/s':>7} "
          f"{'cold s':>7} {'RSS MiB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['model']:28} {r['backend']:12} unavailable: {r['error']}")
            continue
        print(f"{r['model']:28} {r['backend']:12} {str(r['variant']):14} {str((r['threads'] or {}).get('intra_op')):>3} "
              f"{r['latency_p50_s']:8.3f} {r['latency_p95_s']:8.3f} {r['throughput_batch1_per_s']:7.3f} "
              f"{r['cold_start_s']:7.2f} {r['peak_rss_mib']:8.0f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
