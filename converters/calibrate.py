"""INT8 post-training calibration: one calibration pass on real DICOM, two Q/DQ INT8 ONNX variants.

* ``int8_sym``  (precision ``int8_qdq_sym``): symmetric S8 activations and per-channel symmetric S8
  weights -- what TensorRT's explicit quantization (TensorRT 11 strongly typed networks, and TensorRT 10
  Q/DQ) needs.  Runs on ONNX Runtime too, but on x86 without VNNI it is not faster than FP32.
* ``int8_u8s8`` (precision ``int8_qdq_u8s8``): asymmetric U8 activations and per-channel S8 weights
  (7-bit ``reduce_range`` on CPUs without VNNI, as ONNX Runtime recommends) -- the CPU variant.

The activation ranges are computed once (onnxruntime.quantization calibrator: MinMax, Entropy or
Percentile) and cached as JSON (``calibration/<method>.ranges.json``); both variants -- and the op-type
selection below -- are quantized from that cache, so "one calibration" is literal.

Op-type selection by measurement: each candidate op type present in the graph (Conv, ConvTranspose,
MatMul, Gemm by default) is quantized alone and its output error on held-back calibration samples is
measured; types above ``max_rel_error`` stay FP32 (ONNX Runtime 1.32 breaks a Gemm(transB=1) head by
~50% on a small test model while its Conv paths are fine).  Everything else (normalisation, activations,
reshapes) stays FP32.

nvidia-modelopt (``modelopt.onnx.quantization.quantize``) is used for the symmetric variant when it is
installed and ``tool="modelopt"`` is asked for.
"""
from __future__ import annotations

import datetime as _dt
import logging
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from scanside.converters.calibration_data import CalibrationSet
from scanside.engines.manifest import ModelFile, ModelManifest, sha256_file

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
CANDIDATE_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
DEFAULT_MAX_REL_ERROR = 0.10


@dataclass(frozen=True)
class VariantRecipe:
    key: str
    precision: str
    activation: str  # "QInt8" | "QUInt8"
    weight: str
    symmetric_activations: bool
    per_channel: bool = True
    reduce_range: Optional[bool] = None  # None: decided from the CPU (no VNNI -> True)
    purpose: str = ""
    # False keeps biases FP32: TensorRT's dequantize layer takes only INT8/FP8/INT4 input, so an INT32 bias
    # DequantizeLinear (onnxruntime's default) fails the build (onnx/onnx-tensorrt#850)
    quantize_bias: bool = True


RECIPES: Dict[str, VariantRecipe] = {
    "int8_sym": VariantRecipe("int8_sym", "int8_qdq_sym", "QInt8", "QInt8", True, True, False,
                              "TensorRT explicit quantization (strongly typed, FP32 biases); ONNX Runtime runs it too",
                              quantize_bias=False),
    "int8_u8s8": VariantRecipe("int8_u8s8", "int8_qdq_u8s8", "QUInt8", "QInt8", False, True, None,
                               "ONNX Runtime CPU (U8 activations, per-channel S8 weights)"),
}


def cpu_has_vnni() -> bool:
    """AVX512-VNNI or AVX-VNNI on this x86 CPU (Linux /proc/cpuinfo); False when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool({"avx512_vnni", "avx_vnni"} & flags)


class _NoPreprocessNag(logging.Filter):
    """onnxruntime.quantization warns on the root logger before and after every quantize_static call that
    the model was not run through its pre-processing; we quantize the exported graph as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


logging.getLogger().addFilter(_NoPreprocessNag())


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    try:
        return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}[name]
    except KeyError:
        raise ValueError(f"calibration method must be one of {METHODS}, got {name!r}") from None


def make_reader(cset: CalibrationSet, bar: Any = None) -> Any:
    """An onnxruntime CalibrationDataReader over *cset* (one sample per batch; supports set_range
    so the calibrator can collect in strides and keep memory bounded); *bar* counts the samples read."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.start, self.end, self.i = 0, len(cset), 0

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            idx = self.start + self.i
            if idx >= self.end:
                return None
            self.i += 1
            if bar is not None:
                bar.update(1)
            return {cset.input_name: np.ascontiguousarray(cset.inputs[idx:idx + 1])}

        def __len__(self) -> int:
            return len(cset)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.end, self.i = start_index, min(end_index, len(cset)), 0

        def rewind(self) -> None:
            self.i = 0

    return _Reader()


def op_types_in(onnx_path: Union[str, Path]) -> List[str]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return sorted({n.op_type for n in m.graph.node})


def _extra_options(recipe: VariantRecipe) -> Dict[str, Any]:
    return {"ActivationSymmetric": recipe.symmetric_activations, "WeightSymmetric": True,
            "QuantizeBias": recipe.quantize_bias}


def compute_ranges(fp32_path: Path, cset: CalibrationSet, cache_path: Path, method: str = "minmax",
                   op_types: Sequence[str] = CANDIDATE_OP_TYPES, percentile: float = 99.999) -> Path:
    """Run the calibrator once over *cset* and write the activation ranges to *cache_path* (JSON).
    Strides of one sample keep memory bounded for 3-D models with large activations."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    cache_path.parent.mkdir(parents=True, exist_ok=True)
    if cache_path.exists():
        cache_path.unlink()
    # strides of one sample: ranges are merged per stride (CalibMaxIntermediateOutputs clears without
    # computing in onnxruntime 1.32, so it is not used)
    extra: Dict[str, Any] = {"CalibStridedMinMax": 1}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    from scanside.agent.service.progress import progress

    with tempfile.TemporaryDirectory(prefix="scanside-calib-") as tmp, \
            progress(total=len(cset), desc="calibration ranges", unit="sample") as bar:
        quantize_static(str(fp32_path), str(Path(tmp) / "probe.onnx"), make_reader(cset, bar),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=_method(method), extra_options=extra,
                        calibration_cache_path=str(cache_path))
    return cache_path


def quantize_variant(fp32_path: Path, out_path: Path, cache_path: Path, recipe: VariantRecipe, method: str,
                     op_types: Sequence[str], reduce_range: bool, nodes_to_exclude: Sequence[str] = ()) -> Path:
    """Quantize from the cached ranges (no new calibration pass); *nodes_to_exclude* stay FP32."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    quantize_static(str(fp32_path), str(tmp), None, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(op_types), per_channel=recipe.per_channel, reduce_range=reduce_range,
                    activation_type=getattr(QuantType, recipe.activation), weight_type=getattr(QuantType, recipe.weight),
                    calibrate_method=_method(method), extra_options=_extra_options(recipe),
                    calibration_cache_path=str(cache_path), nodes_to_exclude=list(nodes_to_exclude))
    tmp.replace(out_path)
    return out_path


def quantize_modelopt(fp32_path: Path, out_path: Path, cset: CalibrationSet, method: str,
                      op_types: Sequence[str]) -> Path:
    """Symmetric INT8 Q/DQ with nvidia-modelopt (TensorRT's own placement rules)."""
    try:
        from modelopt.onnx.quantization import quantize as mo_quantize
    except ImportError as e:
        raise RuntimeError(f"nvidia-modelopt is not installed ({e}); use tool='onnxruntime'") from e
    mo_method = {"minmax": "max", "entropy": "entropy"}.get(method)
    if mo_method is None:
        raise ValueError(f"modelopt supports entropy and minmax (max) calibration, not {method!r}")
    mo_quantize(onnx_path=str(fp32_path), quantize_mode="int8", calibration_data={cset.input_name: cset.inputs},
                calibration_method=mo_method, op_types_to_quantize=list(op_types), calibration_eps=["cpu"],
                output_path=str(out_path))
    return out_path


def _session(path: Path, threads: Optional[int] = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _run_all(sess: Any, cset: CalibrationSet) -> List[np.ndarray]:
    from scanside.agent.service.progress import progress

    outs = []
    for feed in progress(cset.feeds(1), total=len(cset), desc="measuring", unit="sample"):
        outs.append(np.asarray(sess.run(None, feed)[0], dtype=np.float64))
    return outs


def rel_error(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(ref, got))
    den = sum(float(np.sum(a ** 2)) for a in ref)
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


@dataclass
class OpSelection:
    kept: List[str]
    measured: Dict[str, float] = field(default_factory=dict)  # op type -> relative output error alone
    dropped: Dict[str, str] = field(default_factory=dict)


def select_op_types(fp32_path: Path, cache_path: Path, probe: CalibrationSet, recipe: VariantRecipe, method: str,
                    reduce_range: bool, candidates: Sequence[str] = CANDIDATE_OP_TYPES,
                    max_rel_error: float = DEFAULT_MAX_REL_ERROR, threads: Optional[int] = None) -> OpSelection:
    """Quantize each candidate op type alone; keep those whose relative output error on *probe* is within
    *max_rel_error*."""
    present = set(op_types_in(fp32_path))
    cands = [c for c in candidates if c in present]
    ref = _run_all(_session(fp32_path, threads), probe)
    sel = OpSelection(kept=[])
    with tempfile.TemporaryDirectory(prefix="scanside-opsel-") as tmp:
        for op in cands:
            q = quantize_variant(fp32_path, Path(tmp) / f"{op}.onnx", cache_path, recipe, method, [op], reduce_range)
            err = rel_error(ref, _run_all(_session(q, threads), probe))
            sel.measured[op] = round(err, 6)
            if err <= max_rel_error and np.isfinite(err):
                sel.kept.append(op)
            else:
                sel.dropped[op] = f"relative output error {err:.3g} > {max_rel_error:g} when quantized alone: kept FP32"
    return sel


def boundary_nodes(onnx_path: Union[str, Path], op_types: Sequence[str] = ("Conv", "ConvTranspose")) -> Dict[str, str]:
    """Nodes that often lose accuracy (or gain no speed) when quantized: the first and the last
    convolution, and convolutions right after a Resize (upsampling).  name -> why it is a candidate."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    convs = [n for n in m.graph.node if n.op_type in op_types]
    out: Dict[str, str] = {}
    if not convs:
        return out
    out[convs[0].name] = "first convolution"
    out.setdefault(convs[-1].name, "last convolution")
    producer = {o: n for n in m.graph.node for o in n.output}
    for n in convs:
        src = producer.get(n.input[0]) if n.input else None
        if src is not None and src.op_type == "Resize":
            out.setdefault(n.name, f"convolution after {src.op_type} {src.name}")
    return out


def _latency(path: Path, probe: CalibrationSet, backend: str, threads: Optional[int], repeats: int = 7) -> float:
    """Median seconds of one sample on *backend* (openvino or onnxruntime)."""
    import time

    feed = next(probe.feeds(1))
    if backend == "openvino":
        import openvino as ov

        cfg: Dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
        compiled = ov.Core().compile_model(str(path), "CPU", cfg)
        req = compiled.create_infer_request()
        run = lambda: req.infer(feed)  # noqa: E731
    else:
        sess = _session(path, threads)
        run = lambda: sess.run(None, feed)  # noqa: E731
    run()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _speed_backend() -> str:
    """The CPU back end a variant is timed on: the one the model store runs it on here, OpenVINO when
    installed (the store prefers it on x86 for either variant where its parity passes; a node kept FP32
    that costs ONNX Runtime nothing can break OpenVINO's INT8 chain), else ONNX Runtime."""
    try:
        import openvino  # noqa: F401
        return "openvino"
    except ImportError:
        return "onnxruntime"


@dataclass
class NodeSelection:
    kept_fp32: Dict[str, str] = field(default_factory=dict)  # node -> why (measured)
    measured: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # "all" and each candidate excluded alone
    speed_backend: str = ""


def quantizable_nodes(onnx_path: Union[str, Path], op_types: Sequence[str]) -> List[str]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in m.graph.node if n.op_type in op_types and n.name]


def select_nodes(fp32_path: Path, cache_path: Path, probe: CalibrationSet, recipe: VariantRecipe, method: str,
                 reduce_range: bool, op_types: Sequence[str], candidates: Dict[str, str], *,
                 min_error_gain: float = 0.2, max_slowdown: float = 0.05,
                 max_rel_error: float = DEFAULT_MAX_REL_ERROR, threads: Optional[int] = None) -> NodeSelection:
    """Which nodes stay FP32, by measurement on *probe* (relative output error against FP32, latency on
    the variant's CPU back end):

    1. boundary candidates (first/last convolution, convolution after a Resize): each kept FP32 alone;
       kept when that removes at least *min_error_gain* of the error at most *max_slowdown* slower;
    2. if the error is still above *max_rel_error*: every quantizable node is quantized alone
       (its sensitivity) and the most sensitive are kept FP32, one at a time, until the error is within
       *max_rel_error* (at most half the nodes).
    The final combination is measured and recorded ("chosen")."""
    backend = _speed_backend()
    ref = _run_all(_session(fp32_path, threads), probe)
    sel = NodeSelection(speed_backend=backend)
    with tempfile.TemporaryDirectory(prefix="scanside-nodesel-") as tmp:
        def measure(tag: str, exclude: Sequence[str], timed: bool = True) -> Dict[str, Any]:
            q = quantize_variant(fp32_path, Path(tmp) / f"{len(sel.measured)}.onnx", cache_path, recipe, method,
                                 op_types, reduce_range, exclude)
            err = rel_error(ref, _run_all(_session(q, threads), probe))
            res: Dict[str, Any] = {"rel_error": round(err, 6), "fp32_nodes": list(exclude)}
            if timed:
                res["latency_s"] = round(_latency(q, probe, backend, threads), 5)
            sel.measured[tag] = res
            return res

        base = measure("all_quantized", [])
        from scanside.agent.service.progress import progress

        for node, why in progress(candidates.items(), total=len(candidates), desc="trying nodes in FP32", unit="node"):
            r = measure(f"fp32:{node}", [node])
            gain = 1.0 - r["rel_error"] / base["rel_error"] if base["rel_error"] > 0 else 0.0
            slow = r["latency_s"] / base["latency_s"] - 1.0 if base["latency_s"] > 0 else 0.0
            r.update({"candidate": why, "error_gain": round(gain, 4), "slowdown": round(slow, 4)})
            if gain >= min_error_gain and slow <= max_slowdown:
                sel.kept_fp32[node] = (f"{why}: FP32 removes {gain:.0%} of the output error "
                                       f"({base['rel_error']:.3g} -> {r['rel_error']:.3g}) at {slow:+.0%} latency")
        current = measure("boundary_chosen", list(sel.kept_fp32), timed=False) if sel.kept_fp32 else base
        if current["rel_error"] > max_rel_error:
            nodes = quantizable_nodes(fp32_path, op_types)
            sens: Dict[str, float] = {}
            for node in nodes:
                if node in sel.kept_fp32:
                    continue
                r = measure(f"alone:{node}", [n for n in nodes if n != node], timed=False)
                sens[node] = r["rel_error"]
            for node in sorted(sens, key=lambda n: -sens[n])[:max(1, len(nodes) // 2)]:
                sel.kept_fp32[node] = (f"most sensitive remaining node (relative error {sens[node]:.3g} when "
                                       f"quantized alone; all quantized {base['rel_error']:.3g} > {max_rel_error:g})")
                current = measure(f"sensitivity_step{len(sel.kept_fp32)}", list(sel.kept_fp32), timed=False)
                if current["rel_error"] <= max_rel_error:
                    break
        if sel.kept_fp32:
            measure("chosen", list(sel.kept_fp32))
    return sel


@dataclass
class CalibrationResult:
    manifest: ModelManifest
    variants: Dict[str, Path]
    tensors_path: Path
    ranges_path: Path
    selections: Dict[str, OpSelection]
    seconds: Dict[str, float]
    nodes: Dict[str, NodeSelection] = field(default_factory=dict)


def calibrate(manifest: ModelManifest, cset: CalibrationSet, *, method: str = "minmax",
              variants: Sequence[str] = ("int8_sym", "int8_u8s8"), source_variant: str = "fp32",
              candidates: Sequence[str] = CANDIDATE_OP_TYPES, select_ops: bool = True, probe_samples: int = 2,
              max_rel_error: float = DEFAULT_MAX_REL_ERROR, reduce_range: Optional[bool] = None,
              tool: str = "onnxruntime", data_description: str = "", threads: Optional[int] = None,
              save: bool = True, select_nodes_fp32: bool = False, keep_fp32: Sequence[str] = ()) -> CalibrationResult:
    """Calibrate *manifest*'s FP32 ONNX on *cset*, write the INT8 variants beside it, record them in the
    manifest (files[variant] with precision, sha256 and a `calibration` record) and save the manifest.

    The calibration tensors are written to ``calibration/<variant source>.<method>.npz`` (what was used,
    reproducibly: the set rounded to half precision, CalibrationSet.rounded_to_half), the activation ranges
    to ``calibration/<method>.ranges.json``.  The model must have been loaded from a store directory
    (manifest.root).

    Nodes kept FP32: *keep_fp32* (by name, as asked) plus, with *select_nodes_fp32*, the boundary nodes
    (first/last convolution, convolutions after a Resize) that measurement says to keep (select_nodes);
    the choice and its measurements go into the variant's calibration record."""
    import time

    import onnxruntime as ort

    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    unknown = [v for v in variants if v not in RECIPES]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(RECIPES)}")
    if len(cset) == 0:
        raise ValueError("empty calibration set")
    if manifest.root is None:
        raise ValueError(f"{manifest.ref}: manifest has no directory (load it from the store)")
    if tool not in ("onnxruntime", "modelopt"):
        raise ValueError("tool must be 'onnxruntime' or 'modelopt'")
    root = manifest.root
    fp32 = manifest.resolve(manifest.files[source_variant].path)
    stem = Path(manifest.files[source_variant].path).stem
    seconds: Dict[str, float] = {}
    calib_dir = root / "calibration"
    cset = cset.rounded_to_half()  # what is calibrated on is exactly what is kept, at half the size
    tensors_path = cset.save(calib_dir / f"{stem}.{method}.npz")
    with np.load(tensors_path) as z:
        tensors_dtype = str(z["inputs"].dtype)
    ranges_path = calib_dir / f"{stem}.{method}.ranges.json"
    t0 = time.perf_counter()
    compute_ranges(fp32, cset, ranges_path, method, candidates)
    seconds["calibration"] = round(time.perf_counter() - t0, 3)
    probe = cset.subset(range(max(0, len(cset) - probe_samples), len(cset)))
    vnni = cpu_has_vnni()
    out_paths: Dict[str, Path] = {}
    selections: Dict[str, OpSelection] = {}
    nodes_sel: Dict[str, NodeSelection] = {}
    files = dict(manifest.files)
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    from scanside.agent.service.progress import progress

    for key in progress(variants, desc="INT8 variants", unit="variant"):
        recipe = RECIPES[key]
        rr = recipe.reduce_range if recipe.reduce_range is not None else (reduce_range if reduce_range is not None
                                                                          else not vnni)
        t0 = time.perf_counter()
        if select_ops and not select_nodes_fp32:
            sel = select_op_types(fp32, ranges_path, probe, recipe, method, rr, candidates, max_rel_error, threads)
        else:
            present = set(op_types_in(fp32))
            sel = OpSelection(kept=[c for c in candidates if c in present])
        selections[key] = sel
        fp32_nodes: Dict[str, str] = {n: "asked (--keep-fp32)" for n in keep_fp32}
        if select_nodes_fp32 and sel.kept:
            # node-level choice replaces the op-type one: every candidate type is quantized except the
            # nodes that measurement keeps FP32
            cands = {n: w for n, w in boundary_nodes(fp32).items() if n not in fp32_nodes}
            nsel = select_nodes(fp32, ranges_path, probe, recipe, method, rr, sel.kept, cands,
                                max_rel_error=max_rel_error, threads=threads)
            nodes_sel[key] = nsel
            fp32_nodes.update(nsel.kept_fp32)
        if not sel.kept:
            log.warning("%s: no op type survives quantization for %s; variant not written", manifest.ref, key)
            continue
        out = root / f"{stem}.{key}.onnx"
        used_tool = "onnxruntime"
        if tool == "modelopt" and recipe.symmetric_activations:
            quantize_modelopt(fp32, out, cset, method, sel.kept)
            used_tool = "nvidia-modelopt"
        else:
            quantize_variant(fp32, out, ranges_path, recipe, method, sel.kept, rr, list(fp32_nodes))
        seconds[key] = round(time.perf_counter() - t0, 3)
        out_paths[key] = out
        files[key] = ModelFile(
            path=out.name, sha256=sha256_file(out), precision=recipe.precision,  # type: ignore[arg-type]
            size_bytes=out.stat().st_size, opset=manifest.files[source_variant].opset,
            calibration={
                "source_variant": source_variant, "method": method, "samples": len(cset),
                "series": len(set(cset.sources)), "data": data_description or "DICOM folder(s), agent preprocessing",
                "data_origin": cset.origin_summary(),  # real / simulated / mixed: what the ranges were taken from
                "tensors": str(tensors_path.relative_to(root)), "tensors_sha256": sha256_file(tensors_path),
                "tensors_dtype": tensors_dtype,
                "ranges": str(ranges_path.relative_to(root)),
                "tool": f"{used_tool} {ort.__version__ if used_tool == 'onnxruntime' else ''}".strip(),
                "activations": recipe.activation, "weights": recipe.weight, "per_channel": recipe.per_channel,
                "symmetric_activations": recipe.symmetric_activations, "reduce_range": rr,
                "quantize_bias": recipe.quantize_bias, "op_types_quantized": sel.kept, "op_types_kept_fp32": sel.dropped,
                "op_type_rel_error": sel.measured, "cpu_vnni": vnni, "machine": platform.machine(),
                "nodes_kept_fp32": fp32_nodes,
                **({"node_measurements": nodes_sel[key].measured, "node_speed_backend": nodes_sel[key].speed_backend}
                   if key in nodes_sel else {}),
                "created_at": now,
            },
            notes=recipe.purpose)
    parity = dict(manifest.parity or {})
    stale = [k for k in out_paths if k in (parity.get("variants") or {})]
    if stale:  # a re-calibrated file invalidates its parity report (the gate also checks the sha256)
        parity["variants"] = {k: v for k, v in parity["variants"].items() if k not in out_paths}
    updated = manifest.model_copy(update={"files": files, "parity": parity or None})
    updated = ModelManifest.model_validate(updated.model_dump()).set_root(root)
    if save:
        updated.save(root)
    return CalibrationResult(updated, out_paths, tensors_path, ranges_path, selections, seconds, nodes_sel)
