"""CPU inference: every shipped model x CPU back end, as ratios against ONNX Runtime FP32 on the same inputs.

    .venv/bin/python bench/bench_cpu.py [--threads 2] [--repeats 5] [--taps-repeats 3] [--skip-taps]

Models: prostate-gland-taps (one 128x128x32 window; the INT8 variants from bench/bench_int8.py's store
~/.cache/scanside/int8-store when present), sequence-classifier, cspca-reference.
Back ends: ONNX Runtime and OpenVINO, each on FP32 and on the INT8 Q/DQ files the manifest has (U8/S8
``int8_u8s8``, symmetric ``int8_sym``); ``store_default`` says what the agent's model store picks by default.  Inputs: simulated series prepared by the agent's preprocessing
(scanside.converters.calibration_data.build_set); the task metric (Dice of masks / top-1 agreement / decision
agreement) and max |diff| of every back end's output against ONNX Runtime FP32 (scanside.converters.parity.task_metrics).
Non-inference work on the critical path, timed on the same simulated series: read+decode (read_series:
headers + load_volume), prepare() per model spec, and the sliding-window stitching cost (sliding_window with a
run_fn that does no inference).

The machine may be shared with other jobs: os.getloadavg() is recorded per
stage, and latencies are medians of several runs.  Writes bench/results/cpu.json (saved as stages finish).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "cpu.json"
CACHE = Path(os.environ.get("SCANSIDE_CACHE_DIR", Path.home() / ".cache" / "scanside"))
INT8_STORE = CACHE / "int8-store"
T2W_EXAMS = CACHE / "int8-t2w"  # bench/make_t2w_data.py (simulated axial T2W exams)
CONFIGS = (("onnxruntime", "fp32"), ("onnxruntime", "int8_u8s8"), ("onnxruntime", "int8_sym"), ("openvino", "fp32"),
           ("openvino", "int8_u8s8"), ("openvino", "int8_sym"))


def save(res: Dict[str, Any], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    tmp.replace(path)


def load() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def med(xs: List[float]) -> float:
    return round(statistics.median(xs), 6)  # microseconds: the classifier runs in 0.3 ms


def make_engine(backend: str, manifest: Any, variant: str, threads: int, cache_dir: Path) -> Any:
    if backend == "onnxruntime":
        from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(["CPUExecutionProvider"], intra_op_threads=threads).load(manifest, variant)
    from scanside.engines.backends.openvino_engine import OpenVinoEngine

    return OpenVinoEngine(threads=threads, cache_dir=cache_dir).load(manifest, variant)


def timed(fn: Callable[[], Any], repeats: int) -> Tuple[List[float], Any]:
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return ts, out


def interleaved(fns: Dict[str, Callable[[], Any]], rounds: int, inner: int) -> Dict[str, List[float]]:
    """Per config, the median of `inner` back-to-back runs, once per round; configs take turns within a
    round, so a slow spell of this shared (virtual) machine hits every config alike instead of one."""
    per: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            per[k].append(med(timed(fn, inner)[0]))
    return per


def bench_model(manifest: Any, cset: Any, threads: int, repeats: int, cache_dir: Path, rounds: int = 5) -> Dict[str, Any]:
    """Latency of one sample and outputs on every sample, per back end x variant; ratios vs ORT FP32.
    Every engine stays loaded and the timing runs in interleaved rounds (see `interleaved`); the speed-up
    is the median over rounds of ORT FP32's time over the config's time in the same round."""
    import contextlib

    from scanside.converters.parity import task_metrics

    feeds = list(cset.feeds(1))
    first = feeds[0]
    out: Dict[str, Any] = {"model": manifest.ref, "samples": len(feeds),
                           "input_shape": list(first[manifest.inputs[0].name].shape), "configs": {}}
    ref_outs: Optional[List[Dict[str, np.ndarray]]] = None
    stack = contextlib.ExitStack()
    engines: Dict[str, Any] = {}
    for backend, variant in CONFIGS:
        key = f"{backend}:{variant}"
        if variant not in manifest.files:
            out["configs"][key] = {"skipped": f"no {variant} variant in {manifest.ref}"}
            continue
        try:
            t0 = time.perf_counter()
            eng = make_engine(backend, manifest, variant, threads, cache_dir)
            load_s = time.perf_counter() - t0
        except Exception as e:  # a back end that cannot run here is reported, not fatal
            out["configs"][key] = {"skipped": f"{type(e).__name__}: {e}"}
            continue
        stack.enter_context(eng)
        engines[key] = eng
        t0 = time.perf_counter()
        eng.run(first)
        first_s = time.perf_counter() - t0
        outs = [eng.run(f) for f in feeds]
        entry: Dict[str, Any] = {"load_s": round(load_s, 3), "first_run_s": round(first_s, 4)}
        if ref_outs is None:
            ref_outs = outs
        else:
            entry["max_abs_diff"] = {o.name: round(float(max(np.abs(a[o.name] - b[o.name]).max()
                                                             for a, b in zip(outs, ref_outs))), 6)
                                     for o in manifest.outputs}
            name = manifest.outputs[0].name
            ref = np.concatenate([r[name] for r in ref_outs])
            got = np.concatenate([g[name] for g in outs])
            if manifest.task == "cspca_detection":  # exam decision, AUROC where truth is known, lesions
                from scanside.converters.parity import cspca_metrics

                both = {o.name: (np.concatenate([r[o.name] for r in ref_outs]),
                                 np.concatenate([g[o.name] for g in outs])) for o in manifest.outputs}
                entry["task_metric_vs_ort_fp32"] = cspca_metrics(manifest, {k: v[0] for k, v in both.items()},
                                                                 {k: v[1] for k, v in both.items()}, cset)
            else:
                entry["task_metric_vs_ort_fp32"] = task_metrics(manifest, ref, got, cset)
            if ref.ndim > 2 and ref.size > 1000:
                # dense output: the model's own threshold may segment nothing on simulated images (TAPS finds
                # no gland on them), which makes that Dice vacuous; also compare the masks of the 5 % of voxels
                # FP32 scores highest (same threshold applied to both): does the variant rank the same voxels?
                from scanside.converters.parity import dice

                t = float(np.percentile(ref, 95))
                entry["dice_top5pct_vs_ort_fp32"] = round(dice(ref > t, got > t), 5)
                den = float(np.sqrt(np.sum(ref.astype(np.float64) ** 2)))
                entry["rel_l2_vs_ort_fp32"] = round(float(np.sqrt(np.sum((got.astype(np.float64) - ref) ** 2))) / den, 6)
        out["configs"][key] = entry
    with stack:  # timing: every engine loaded, configs taking turns
        la = load()
        per = interleaved({k: (lambda e=e: e.run(first)) for k, e in engines.items()}, rounds, repeats)
        la_end = load()
    ref_rounds = per.get("onnxruntime:fp32")
    for key, ts in per.items():
        entry = out["configs"][key]
        entry.update({"median_s": med(ts), "min_s": round(min(ts), 6), "rounds": rounds, "runs_per_round": repeats,
                      "loadavg": la, "loadavg_end": la_end})
        if ref_rounds:
            entry["speedup_vs_ort_fp32_median_of_rounds"] = round(float(np.median([r / t for r, t in zip(ref_rounds, ts)])), 3)
        print(f"  {manifest.name:22s} {key:24s} median {entry['median_s']:.4f} s  "
              f"x{entry.get('speedup_vs_ort_fp32_median_of_rounds', float('nan')):.2f}  loadavg {la[0]}", flush=True)
    try:  # what the agent's store would pick by default here (scanside.engines.store.default_preference + parity)
        from scanside.engines.store import ModelStore

        sel = ModelStore(manifest.root.parent.parent, user_dir=None).explain(manifest)
        out["store_default"] = {"backend": sel.backend, "variant": sel.variant, "reason": sel.reason,
                                "skipped": sel.skipped, "order": sel.order}
        if sel.backend is not None:
            out["store_default"]["config"] = f"{sel.backend}:{sel.variant}"
    except Exception as e:
        out["store_default"] = {"error": f"{type(e).__name__}: {e}"}
    base = out["configs"].get("onnxruntime:fp32", {}).get("median_s")
    if base:
        out["speedup_vs_ort_fp32"] = {k: round(base / v["median_s"], 3) for k, v in out["configs"].items()
                                      if "median_s" in v}
    return out


def series_set(manifest: Any, series: List[Any]) -> Any:
    """A classifier's inputs: every series prepared on its own (channel "series"), labelled by the header rules."""
    from scanside.converters.calibration_data import CalibrationSet
    from scanside.engines.preprocess import prepare

    spec = manifest.preprocessing
    arrs, labels = [], []
    for s in series:
        arr, _ = prepare({spec.channels[0]: s.volume}, spec)
        arrs.append(arr.astype(np.float32))
        labels.append(s.label)
    return CalibrationSet(np.stack(arrs), labels=labels, sources=[s.series_key for s in series],
                          input_name=manifest.inputs[0].name)


def taps_manifest_for_bench() -> Optional[Any]:
    """The TAPS manifest with INT8 variants (bench_int8 store) if there, else the package store's FP32 one."""
    from scanside.engines.manifest import ModelManifest
    from scanside.engines.store import ModelStore

    p = INT8_STORE / "prostate-gland-taps" / "1.1.2"
    if (p / "manifest.json").is_file():
        return ModelManifest.load(p)
    store = ModelStore()
    return store.resolve("prostate-gland-taps") if store.versions("prostate-gland-taps") else None


def non_inference(res: Dict[str, Any], exam_dirs: List[Path], manifests: Dict[str, Any]) -> None:
    from scanside.converters.calibration_data import channel_labels, exam_channel_volumes, read_series
    from scanside.engines.preprocess import prepare, sliding_window

    out: Dict[str, Any] = {"loadavg": load()}
    ts, series = timed(lambda: read_series(exam_dirs[:1], planes=None), 1)
    out["read_series_one_exam_s"] = round(ts[0], 3)
    out["series_in_exam"] = len(series)
    out["voxels_in_exam"] = int(sum(int(np.prod(s.volume.array.shape)) for s in series))
    t2 = [s for s in series if s.label in channel_labels("T2W")]
    if t2:
        ts, _ = timed(lambda: read_series(exam_dirs[:1], labels=[t2[0].label], planes=("axial",)), 3)
        out["read_decode_axial_t2w_s"] = med(ts)
        out["t2w_shape"] = list(t2[0].volume.array.shape)
    prep: Dict[str, Any] = {}
    for name, m in manifests.items():
        spec = m.preprocessing
        studies = exam_channel_volumes(series, spec)
        if not studies:
            prep[name] = {"skipped": f"no series with channels {spec.channels}"}
            continue
        vols = studies[0][2]
        ts, (arr, _grid) = timed(lambda: prepare(vols, spec), 3)
        entry = {"median_s": med(ts), "output_shape": list(arr.shape)}
        if spec.window is not None:
            roi = tuple(spec.window.roi)
            calls: List[int] = []

            def no_inference(b: np.ndarray) -> np.ndarray:
                calls.append(b.shape[0])
                return np.zeros((b.shape[0], 1, *roi), np.float32)

            ts, _ = timed(lambda: sliding_window(no_inference, arr, spec.window, batch_size=1), 3)
            entry["sliding_window_stitching_s"] = med(ts)
            entry["windows"] = len(calls) // 3
        prep[name] = entry
    out["prepare"] = prep
    res["non_inference"] = out
    save(res)


def keep_previous(res: Dict[str, Any], prev: Dict[str, Any], only: List[str], skip_taps: bool) -> None:
    """Carries over the entries of models this run does not measure (not in --only, or TAPS under
    --skip-taps), with the machine they were measured on, so a partial run never erases a figure."""
    if only:
        kept = {k: v for k, v in prev.get("models", {}).items() if k not in only}
    elif skip_taps:
        kept = {k: v for k, v in prev.get("models", {}).items() if k == "prostate-gland-taps"}
    else:
        return
    if kept:
        res["models"] = kept
        earlier = prev.get("kept_from_previous_run") or {}
        # each figure keeps the machine it was measured on: a model kept last time too keeps that machine
        machines = {k: (earlier.get("machines") or {}).get(k)
                    or (earlier.get("machine") if k in earlier.get("models", []) else prev.get("machine"))
                    for k in sorted(kept)}
        res["kept_from_previous_run"] = {"models": sorted(kept), "machines": machines}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20, help="runs per round (small models)")
    ap.add_argument("--taps-repeats", type=int, default=1, help="runs per round for the TAPS window")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per model")
    ap.add_argument("--taps-windows", type=int, default=3, help="held-out windows for the Dice")
    ap.add_argument("--exams", type=int, default=4, help="simulated bp-MRI exams for the classifier/csPCa inputs (csPCa alternating)")
    ap.add_argument("--skip-taps", action="store_true")
    ap.add_argument("--only", action="append", default=[],
                    help="re-run only this model (repeatable); the other models' entries in cpu.json are kept")
    args = ap.parse_args()

    import onnxruntime as ort

    from scanside.converters.calibrate import cpu_has_vnni
    from scanside.converters.calibration_data import build_set, read_series
    from scanside.engines.store import ModelStore

    machine: Dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                               "vnni": cpu_has_vnni(), "onnxruntime": ort.__version__,
                               "python": platform.python_version(), "threads": args.threads,
                               "loadavg_at_start": load(),
                               "note": "2-core machine that other jobs may share: latencies are medians of "
                                       "interleaved rounds, loadavg recorded per stage"}
    try:
        import openvino as ov

        machine["openvino"] = str(ov.get_version())
    except Exception as e:
        machine["openvino"] = f"not installed ({e})"
    res: Dict[str, Any] = {"machine": machine, "command": "python bench/bench_cpu.py " + " ".join(sys.argv[1:]),
                           "models": {}}
    if RESULTS.is_file():
        keep_previous(res, json.loads(RESULTS.read_text()), args.only, args.skip_taps)
    save(res)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cpu_"))
    cache_dir = tmp / "openvino-cache"

    # simulated bp-MRI exams (T2W, DWI, ADC): classifier and csPCa inputs, non-inference timings
    from scanside.simulator.scanner import simulate_exam

    exam_dirs = []
    t0 = time.perf_counter()
    for i in range(args.exams):
        d = tmp / f"exam{i}"
        simulate_exam(("siemens", "ge", "philips")[i % 3], d, seed=100 + i, profile="prostate-bpmri",
                      cspca=(i % 2 == 0))
        exam_dirs.append(d)
    res["data"] = {"simulated_exams": len(exam_dirs), "simulate_s": round(time.perf_counter() - t0, 1)}
    save(res)

    store = ModelStore()
    manifests: Dict[str, Any] = {}
    for name in ("sequence-classifier", "cspca-reference"):
        if store.versions(name):
            manifests[name] = store.resolve(name)
    taps = None if args.skip_taps else taps_manifest_for_bench()
    if taps is not None:
        manifests["prostate-gland-taps"] = taps

    series = read_series(exam_dirs, planes=None)
    for name, m in manifests.items():
        if args.only and name not in args.only:
            continue
        print(f"{name}:", flush=True)
        try:
            if name == "prostate-gland-taps":
                t2w_dirs = sorted(T2W_EXAMS.glob("exam*"))[-2:] or exam_dirs
                held = read_series(t2w_dirs, labels=["T2WI_nan", "T2WI_fs"])
                cset = build_set(m, None, series=held, windows_per_series=2, max_samples=args.taps_windows)
                reps = args.taps_repeats
            elif list(m.preprocessing.channels) == ["series"]:
                cset = series_set(m, series)  # one sample per series, whatever its label
                reps = args.repeats
            else:
                cset = build_set(m, exam_dirs, series=series)  # exam_dirs: ground truth for the AUROC
                reps = args.repeats
            res["models"][name] = bench_model(m, cset, args.threads, reps, cache_dir, args.rounds)
        except Exception as e:
            res["models"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {name}: {type(e).__name__}: {e}", flush=True)
        save(res)

    non_inference(res, exam_dirs, manifests)
    # whole-series projection for TAPS: windows x best per-window latency + stitching
    tp = res["models"].get("prostate-gland-taps", {}).get("configs", {})
    pw = res["non_inference"]["prepare"].get("prostate-gland-taps", {})
    if tp and "windows" in pw:
        res["taps_series_projection_s"] = {k: round(v["median_s"] * pw["windows"] + pw["sliding_window_stitching_s"]
                                                    + pw["median_s"], 2)
                                           for k, v in tp.items() if "median_s" in v}
    res["machine"]["loadavg_at_end"] = load()
    save(res)
    print(json.dumps({k: v.get("speedup_vs_ort_fp32") for k, v in res["models"].items()}, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
