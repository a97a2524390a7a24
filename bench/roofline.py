"""Roofline per model: FLOPs and bytes per inference from the ONNX graph, this machine's measured peaks,
each model's measured time as a multiple of the floor, and where the rest of the time goes.

    .venv/bin/python bench/roofline.py [--threads 2] [--skip-taps]

1. Work per inference (batch 1, onnx shape inference with the dynamic dims fixed): FLOPs of Conv,
   ConvTranspose, MatMul and Gemm (2 x multiply-adds, from the inferred shapes); compulsory bytes =
   weights + inputs + outputs, the traffic no runtime can avoid. Also recorded, not used for the floor:
   the unfused traffic, every intermediate activation written once and read once (a fused runtime whose
   activations stay in cache moves far less: OpenVINO's INT8 csPCa model ran in 0.84x the time that
   traffic takes at DRAM bandwidth, so it is no floor).
2. Peaks measured through the same runtimes with the same thread count: FP32 GEMM (MatMul 1024^3) and
   a 3-D convolution (64->64 channels, k3, 32x64x64), each also as a U8/S8 per-channel Q/DQ model
   (onnxruntime.quantization) on ONNX Runtime and OpenVINO; memory bandwidth from a large numpy copy.
3. Floor = max(FLOPs / best measured compute peak of that precision, compulsory bytes / bandwidth).  Measured
   times come from bench/results/cpu.json (bench/bench_cpu.py), the time of each model / back end is
   reported as a multiple of its floor.
4. Where the rest goes: ONNX Runtime's profiler (enable_profiling, time per op type and top nodes) and
   OpenVINO's performance counters (PERF_COUNT, time per layer type and the kernel it ran).

Writes bench/results/roofline.json and bench/results/roofline.md.
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
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_int8 import session as ort_session  # noqa: E402  (same folder; one ONNX Runtime session recipe)

RESULTS = ROOT / "bench" / "results" / "roofline.json"
SUMMARY = ROOT / "bench" / "results" / "roofline.md"
CPU_RESULTS = ROOT / "bench" / "results" / "cpu.json"
DTYPE_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def save(res: Dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    tmp.replace(RESULTS)


# ---- 1. work per inference --------------------------------------------------------------------------------
def _dims(vi: Any) -> Optional[List[int]]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    d = [x.dim_value if x.HasField("dim_value") else None for x in t.shape.dim]
    return None if any(v is None or v <= 0 for v in d) else d


def graph_work(onnx_path: Path, batch: int = 1) -> Dict[str, Any]:
    """FLOPs (by op type) and bytes per inference of the ONNX model at *batch*."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(onnx_path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    for inp in g.input:
        if inp.name in inits:
            continue
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = batch  # the only dynamic dim of our models is the batch
    model = shape_inference.infer_shapes(model, data_prop=True)
    g = model.graph
    shapes: Dict[str, List[int]] = {}
    types: Dict[str, int] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        d = _dims(vi)
        if d is not None:
            shapes[vi.name] = d
            types[vi.name] = vi.type.tensor_type.elem_type
    for name, t in inits.items():
        shapes[name] = list(t.dims)
        types[name] = t.data_type
    flops: Dict[str, int] = defaultdict(int)
    unknown: List[str] = []
    for n in g.node:
        try:
            if n.op_type == "Conv":
                out, w = shapes[n.output[0]], shapes[n.input[1]]
                flops["Conv"] += 2 * int(np.prod(out)) * int(np.prod(w[1:]))  # w: (Cout, Cin/group, *k)
            elif n.op_type == "ConvTranspose":
                x, w = shapes[n.input[0]], shapes[n.input[1]]  # w: (Cin, Cout/group, *k)
                flops["ConvTranspose"] += 2 * int(np.prod(x)) * int(np.prod(w[1:]))
            elif n.op_type == "MatMul":
                a, out = shapes[n.input[0]], shapes[n.output[0]]
                flops["MatMul"] += 2 * int(np.prod(out)) * int(a[-1])
            elif n.op_type == "Gemm":
                a, out = shapes[n.input[0]], shapes[n.output[0]]
                trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
                flops["Gemm"] += 2 * int(np.prod(out)) * int(a[0] if trans_a else a[1])
        except KeyError:
            unknown.append(n.name or n.op_type)
    weight_bytes = sum(int(np.prod(t.dims)) * DTYPE_BYTES.get(t.data_type, 4) for t in inits.values())
    io_names = {i.name for i in g.input if i.name not in inits} | {o.name for o in g.output}
    io_bytes = sum(int(np.prod(shapes[n])) * DTYPE_BYTES.get(types[n], 4) for n in io_names if n in shapes)
    act_bytes = 0
    for n in g.node:
        for o in n.output:
            if o in shapes and o not in io_names and n.op_type not in ("Constant", "Shape"):
                act_bytes += int(np.prod(shapes[o])) * DTYPE_BYTES.get(types.get(o, 1), 4)
    ops = defaultdict(int)
    for n in g.node:
        ops[n.op_type] += 1
    total = int(sum(flops.values()))
    moved = weight_bytes + io_bytes + 2 * act_bytes
    compulsory = weight_bytes + io_bytes
    return {"batch": batch, "flops": total, "gflops": round(total / 1e9, 3), "flops_by_op": dict(flops),
            "weight_bytes": weight_bytes, "io_bytes": io_bytes, "activation_bytes_written": act_bytes,
            "bytes_moved": moved, "mbytes_moved": round(moved / 1e6, 1),
            "compulsory_bytes": compulsory, "mbytes_compulsory": round(compulsory / 1e6, 2),
            "arithmetic_intensity_flop_per_byte": round(total / moved, 2) if moved else None,
            "nodes": len(g.node), "op_counts": dict(ops), "shape_unknown_nodes": unknown[:20]}


def floor(work: Dict[str, Any], peak_gflops_per_s: float, bytes_per_s: float) -> Dict[str, Any]:
    """The lower bound on one inference: the compute term at the measured peak, or the compulsory traffic
    (weights, inputs, outputs) at the measured bandwidth, whichever is longer."""
    compute = work["flops"] / (peak_gflops_per_s * 1e9)
    memory = work["compulsory_bytes"] / bytes_per_s
    return {"compute_s": round(compute, 6), "memory_s": round(memory, 6), "floor_s": round(max(compute, memory), 6),
            "bound": "compute" if compute >= memory else "memory"}


# ---- 2. peaks ---------------------------------------------------------------------------------------------
def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _build(kind: str, path: Path) -> Tuple[Path, Dict[str, np.ndarray], int]:
    """An FP32 MatMul or Conv3d model, its input, and its FLOPs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "gemm":
        m = k = n = 1024
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = (rng.standard_normal((k, n)) * 0.03).astype(np.float32)
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        out_shape = [m, n]
        flops = 2 * m * n * k
    else:
        c, d, h, wd = 64, 32, 64, 64
        x = rng.standard_normal((1, c, d, h, wd)).astype(np.float32)
        w = (rng.standard_normal((c, c, 3, 3, 3)) * 0.02).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3, 3], pads=[1] * 6)
        out_shape = [1, c, d, h, wd]
        flops = 2 * int(np.prod(out_shape)) * c * 27
    graph = helper.make_graph([node], kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path, {"x": x}, flops


def _quantize(src: Path, dst: Path, feed: Dict[str, np.ndarray]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([feed])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    return dst


def _ov_compiled(path: Path, threads: int, perf: bool = False) -> Any:
    import openvino as ov

    cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    if perf:
        cfg["PERF_COUNT"] = True
    return ov.Core().compile_model(str(path), "CPU", cfg)


def measure_peaks(threads: int, tmp: Path, repeats: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for kind in ("gemm", "conv3d"):
        fp32, feed, flops = _build(kind, tmp / f"{kind}.onnx")
        q = _quantize(fp32, tmp / f"{kind}.u8s8.onnx", feed)
        entry: Dict[str, Any] = {"flops": flops}
        for prec, path in (("fp32", fp32), ("int8_u8s8", q)):
            s = ort_session(path, threads)
            t = _median_time(lambda: s.run(None, feed), repeats)
            entry[f"onnxruntime:{prec}"] = {"s": round(t, 5), "gflops_per_s": round(flops / t / 1e9, 1)}
            try:
                c = _ov_compiled(path, threads)
                r = c.create_infer_request()
                t = _median_time(lambda: r.infer(feed), repeats)
                entry[f"openvino:{prec}"] = {"s": round(t, 5), "gflops_per_s": round(flops / t / 1e9, 1)}
            except Exception as e:
                entry[f"openvino:{prec}"] = {"skipped": f"{type(e).__name__}: {e}"}
        out[kind] = entry
        print(f"  peak {kind}: " + ", ".join(f"{k} {v['gflops_per_s']} GFLOP/s" for k, v in entry.items()
                                            if isinstance(v, dict) and "gflops_per_s" in v), flush=True)
    # memory bandwidth: copy of a 256 MB array (read + write)
    a = np.ones(64 * 1024 * 1024, np.float32)
    b = np.empty_like(a)
    t = _median_time(lambda: np.copyto(b, a), 5, warmup=1)
    out["memory"] = {"copy_bytes": 2 * a.nbytes, "s": round(t, 4), "gbytes_per_s": round(2 * a.nbytes / t / 1e9, 2),
                     "note": "numpy copy of 256 MB (one thread): bytes read + bytes written"}
    print(f"  memory copy {out['memory']['gbytes_per_s']} GB/s", flush=True)

    def best(prec: str) -> float:
        return max(v[f"{rt}:{prec}"]["gflops_per_s"] for k, v in out.items() if k != "memory"
                   for rt in ("onnxruntime", "openvino") if "gflops_per_s" in v.get(f"{rt}:{prec}", {}))

    out["best_gflops_per_s"] = {"fp32": best("fp32"), "int8": best("int8_u8s8")}
    return out


# ---- 4. profiles ------------------------------------------------------------------------------------------
def ort_profile(path: Path, feed: Dict[str, np.ndarray], threads: int, tmp: Path, top: int = 8) -> Dict[str, Any]:
    s = ort_session(path, threads, profile_prefix=str(tmp / f"ort_{path.stem}"))
    s.run(None, feed)
    s.run(None, feed)
    prof = s.end_profiling()
    events = json.loads(Path(prof).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last_start = runs[-1]["ts"] if runs else 0
    by_type: Dict[str, float] = defaultdict(float)
    nodes: List[Tuple[float, str, str]] = []
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e["ts"] < last_start:
            continue
        dur = e["dur"] / 1e6
        op = e.get("args", {}).get("op_name", "?")
        by_type[op] += dur
        nodes.append((dur, e["name"].replace("_kernel_time", ""), op))
    total = sum(by_type.values())
    Path(prof).unlink(missing_ok=True)
    return {"kernel_s": round(total, 4),
            "by_op_type": {k: {"s": round(v, 4), "share": round(v / total, 3)}
                           for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
            "top_nodes": [{"node": n, "op": op, "s": round(d, 4)} for d, n, op in sorted(nodes, reverse=True)[:top]]}


def ov_profile(path: Path, feed: Dict[str, np.ndarray], threads: int, top: int = 8) -> Dict[str, Any]:
    c = _ov_compiled(path, threads, perf=True)
    r = c.create_infer_request()
    r.infer(feed)
    r.infer(feed)
    by_type: Dict[str, float] = defaultdict(float)
    kernels: Dict[str, float] = defaultdict(float)
    layers = []
    for p in r.profiling_info:
        s = p.real_time.total_seconds()
        if s <= 0:
            continue
        by_type[p.node_type] += s
        kernels[f"{p.node_type}/{p.exec_type}"] += s
        layers.append((s, p.node_name, p.node_type, p.exec_type))
    total = sum(by_type.values())
    return {"layer_s": round(total, 4),
            "by_layer_type": {k: {"s": round(v, 4), "share": round(v / total, 3)}
                              for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
            "by_kernel": {k: round(v, 4) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]},
            "top_layers": [{"layer": n, "type": t, "kernel": k, "s": round(s, 4)}
                           for s, n, t, k in sorted(layers, reverse=True)[:top]]}


# ---- main -------------------------------------------------------------------------------------------------
def model_files() -> Dict[str, Dict[str, Path]]:
    from scanside.engines.manifest import ModelManifest
    from scanside.engines.store import ModelStore

    out: Dict[str, Dict[str, Path]] = {}
    store = ModelStore()
    for name in ("prostate-gland-taps", "sequence-classifier", "cspca-reference"):
        m = None
        if name == "prostate-gland-taps":
            p = Path(os.environ.get("SCANSIDE_CACHE_DIR", Path.home() / ".cache" / "scanside")) / "int8-store" / name / "1.1.2"
            if (p / "manifest.json").is_file():
                m = ModelManifest.load(p)
        if m is None and store.versions(name):
            m = store.resolve(name)
        if m is not None:
            out[name] = {v: m.resolve(f.path) for v, f in m.files.items() if v in ("fp32", "int8_u8s8", "int8_sym")}
            out[name]["_input"] = m.inputs[0]  # type: ignore[assignment]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-taps", action="store_true")
    args = ap.parse_args()
    import onnxruntime as ort

    from scanside.converters.calibrate import cpu_has_vnni

    res: Dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                       "threads": args.threads, "onnxruntime": ort.__version__,
                                       "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
                                       "vnni": cpu_has_vnni(),
                                       "note": "2-core machine that other jobs may share: peaks and times are medians, "
                                               "the load average says how quiet it was"},
                           "command": "python bench/roofline.py " + " ".join(sys.argv[1:])}
    try:
        import openvino as ov

        res["machine"]["openvino"] = str(ov.get_version())
    except Exception:
        res["machine"]["openvino"] = None
    prev = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    tmp = Path(tempfile.mkdtemp(prefix="roofline_"))
    print("peaks:", flush=True)
    peaks = measure_peaks(args.threads, tmp, args.repeats)
    res["peaks"] = peaks
    save(res)
    cpu = json.loads(CPU_RESULTS.read_text()) if CPU_RESULTS.is_file() else {}
    bw = peaks["memory"]["gbytes_per_s"] * 1e9
    res["models"] = {}
    elsewhere = timed_elsewhere(cpu)
    for name, files in model_files().items():
        if args.skip_taps and name == "prostate-gland-taps":
            continue
        if name in elsewhere:
            print(f"  {name}: cpu.json kept its timings from an earlier run; its earlier roofline entry is kept", flush=True)
            continue
        spec = files.pop("_input")  # type: ignore[arg-type]
        work = graph_work(files["fp32"])
        entry: Dict[str, Any] = {"work": work, "floor_s": {}, "measured_s": {}, "times_floor": {}}
        for prec in ("fp32", "int8"):
            entry["floor_s"][prec] = floor(work, peaks["best_gflops_per_s"][prec], bw)
        configs = (cpu.get("models", {}).get(name, {}) or {}).get("configs", {})
        for key, c in configs.items():
            if "median_s" not in c:
                continue
            prec = "int8" if "int8" in key else "fp32"
            entry["measured_s"][key] = c["median_s"]
            entry["times_floor"][key] = round(c["median_s"] / entry["floor_s"][prec]["floor_s"], 2)
        if entry["times_floor"]:
            best = min(entry["measured_s"], key=lambda k: entry["measured_s"][k])
            entry["best"] = {"config": best, "s": entry["measured_s"][best], "times_floor": entry["times_floor"][best],
                             "within_3x": entry["times_floor"][best] <= 3.0}
        rng = np.random.default_rng(0)
        feed = {spec.name: rng.standard_normal(spec.concrete_shape(1)).astype(np.float32)}
        prof: Dict[str, Any] = {}
        for v, path in files.items():
            prof[f"onnxruntime:{v}"] = ort_profile(path, feed, args.threads, tmp)
            try:
                prof[f"openvino:{v}"] = ov_profile(path, feed, args.threads)
            except Exception as e:
                prof[f"openvino:{v}"] = {"skipped": f"{type(e).__name__}: {e}"}
        entry["profile"] = prof
        res["models"][name] = entry
        print(f"  {name}: {work['gflops']} GFLOP, {work['mbytes_compulsory']} MB compulsory, floor fp32 "
              f"{entry['floor_s']['fp32']['floor_s']} s; times floor {entry['times_floor']}", flush=True)
        save(res)
    keep_unmeasured(res, prev)
    res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    save(res)
    SUMMARY.write_text(summary(res))
    print(f"wrote {RESULTS} and {SUMMARY}")
    return 0


def timed_elsewhere(cpu: Dict[str, Any]) -> set:
    """Models whose timings cpu.json kept from an earlier run (bench_cpu --only / --skip-taps): dividing them
    by this run's peaks would mix two machines (seen: classifier timings from a slower host at 3.0x the
    floor of a faster one), so the roofline keeps their earlier entry, which was measured with them."""
    return set((cpu.get("kept_from_previous_run") or {}).get("models", []))


def keep_unmeasured(res: Dict[str, Any], prev: Dict[str, Any]) -> None:
    """A model this run did not measure (TAPS not imported into this machine's store, or timed in an earlier
    bench_cpu run) keeps its previous entry, with the machine and peaks it was measured against, per model
    (models kept from different runs keep different machines), instead of vanishing from the file."""
    kept = {k: v for k, v in prev.get("models", {}).items() if k not in res["models"]}
    if not kept:
        return
    res["models"].update(kept)
    earlier = prev.get("kept_from_previous_run") or {}
    prev_peaks = prev.get("peaks", {}).get("best_gflops_per_s")

    def where(k: str) -> Dict[str, Any]:
        if k in (earlier.get("runs") or {}):
            return earlier["runs"][k]
        if k in earlier.get("models", []):  # the older one-machine record
            return {"machine": earlier.get("machine"), "peaks_best_gflops_per_s": earlier.get("peaks_best_gflops_per_s")}
        return {"machine": prev.get("machine"), "peaks_best_gflops_per_s": prev_peaks}

    res["kept_from_previous_run"] = {"models": sorted(kept), "runs": {k: where(k) for k in sorted(kept)}}


def summary(res: Dict[str, Any]) -> str:
    p = res["peaks"]
    lines = ["# CPU roofline", "", f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, "
             f"{res['machine']['threads']} threads; onnxruntime {res['machine']['onnxruntime']}, openvino "
             f"{res['machine']['openvino']}; load average at start {res['machine']['loadavg_at_start']} "
             f"(2 cores; a load near 2 means another job shared them); AVX-512/AVX VNNI: {res['machine'].get('vnni')}.", "",
             f"Reproduce: `.venv/bin/python bench/bench_cpu.py && .venv/bin/python bench/roofline.py`", "",
             "## Measured peaks (GFLOP/s, median)", "", "| kernel | ORT fp32 | ORT int8 u8s8 | OpenVINO fp32 | OpenVINO int8 u8s8 |",
             "|---|---|---|---|---|"]
    for k in ("gemm", "conv3d"):
        e = p[k]
        cells = [str(e.get(c, {}).get("gflops_per_s", "-")) for c in
                 ("onnxruntime:fp32", "onnxruntime:int8_u8s8", "openvino:fp32", "openvino:int8_u8s8")]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", f"Memory bandwidth (numpy copy): {p['memory']['gbytes_per_s']} GB/s. Best compute peak: FP32 "
              f"{p['best_gflops_per_s']['fp32']} GFLOP/s, INT8 {p['best_gflops_per_s']['int8']} GFLOP/s.", "",
              "## Models (batch 1)", "", "| model | GFLOP | MB compulsory | MB unfused | floor fp32 (s) | floor int8 (s) | measured (s) x floor |",
              "|---|---|---|---|---|---|---|"]
    for name, e in res["models"].items():
        w = e["work"]
        meas = "; ".join(f"{k} {e['measured_s'][k]} ({e['times_floor'][k]}x)" for k in e["times_floor"]) or "run bench_cpu.py"
        lines.append(f"| {name} | {w['gflops']} | {w.get('mbytes_compulsory', '-')} | {w['mbytes_moved']} | {e['floor_s']['fp32']['floor_s']} "
                     f"({e['floor_s']['fp32']['bound']}) | {e['floor_s']['int8']['floor_s']} | {meas} |")
    kept = res.get("kept_from_previous_run")
    for name, run in ((kept or {}).get("runs") or {}).items():
        lines += ["", f"Kept from an earlier run (not measured in this one): {name}; its multiples are against that run's "
                  f"peaks {run.get('peaks_best_gflops_per_s')} GFLOP/s, load average at start "
                  f"{(run.get('machine') or {}).get('loadavg_at_start')}."]
    lines += ["", "Floor = max(GFLOP / best measured peak of that precision, compulsory bytes / bandwidth); peaks and "
              "model times are measured under the same (shared, loaded) conditions, so the multiples compare like with "
              "like. Compulsory bytes are weights, inputs and outputs, which every runtime must move; the unfused "
              "column (every activation written once and read once) is what a runtime without fusion or cache reuse "
              "would move, and is no floor: fused INT8 runtimes beat it.",
              "", "## Where the time goes (top op types / layers)", ""]
    for name, e in res["models"].items():
        lines.append(f"**{name}**")
        for key, pr in e["profile"].items():
            if "by_op_type" in pr:
                top = list(pr["by_op_type"].items())[:4]
                lines.append(f"- {key}: kernels {pr['kernel_s']} s: " + ", ".join(f"{k} {v['share']:.0%}" for k, v in top))
            elif "by_kernel" in pr:
                top = list(pr["by_kernel"].items())[:4]
                lines.append(f"- {key}: layers {pr['layer_s']} s: " + ", ".join(f"{k} {v} s" for k, v in top))
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
