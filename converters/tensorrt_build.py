"""ONNX -> TensorRT plan, for TensorRT 10 (JetPack 6 ships 10.3) and TensorRT 11.

Version branches (``build_mode``):

* TensorRT 11: networks are always strongly typed; BuilderFlag.INT8/FP16 and ``config.int8_calibrator``
  are gone.  INT8 comes only from the Q/DQ ONNX (``int8_sym``); FP32 from the FP32 ONNX.  An FP16 plan
  would need an FP16 ONNX (not produced here), so fp16 is refused with that reason.
* TensorRT 10: the Q/DQ ONNX is built strongly typed too (NetworkDefinitionCreationFlag.STRONGLY_TYPED);
  additionally FP16 (BuilderFlag.FP16) and implicit INT8 with an entropy calibrator
  (IInt8EntropyCalibrator2, deprecated since 10.1) reading/writing a calibration cache -- the path JetPack 6
  needs.  The cache can also be written from the ONNX Runtime ranges of `scanside.converters.calibrate`
  (``write_calibration_cache(ranges_to_scales(...))``) so no GPU calibration pass is needed.

Common: optimization profiles from the manifest's input shapes (named dynamic dims: min 1, opt/max
given), a timing cache kept between builds, optional DLA with GPU fallback (2-D convolutions only:
3-D layers fall back to the GPU; static shapes only), hardware-compatibility level and
VERSION_COMPATIBLE, ProfilingVerbosity.DETAILED and IEngineInspector to report the precision each layer
actually got.  The plan is recorded in the manifest (scanside.engines.manifest.TensorRTPlan) with the TensorRT
version and the GPU it was built for.

Importable without tensorrt: the library is imported inside `build_plan`; everything that decides
*what* to build is plain Python and tested without a GPU.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from scanside.engines.manifest import ModelManifest, ShapeRange, TensorRTPlan, sha256_file

PRECISIONS = ("fp32", "fp16", "int8_qdq", "int8_implicit")
CACHE_HEADER_RE = re.compile(r"^TRT-(\d+)-(\w+)$")


class BuildRefused(ValueError):
    """What was asked cannot be built with this TensorRT / model (reason in the message)."""


# ------------------------------------------------------------------------------------------------
# version decisions (plain data)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BuildMode:
    trt_major: int
    precision: str  # one of PRECISIONS
    source_variant: str  # manifest file variant the network is parsed from
    strongly_typed: bool
    builder_flags: Tuple[str, ...]  # names of trt.BuilderFlag members to set
    use_calibrator: bool
    manifest_precision: str  # scanside.engines.manifest Precision of the plan
    notes: Tuple[str, ...] = ()


def parse_trt_version(v: str) -> Tuple[int, int, int]:
    nums = [int(x) for x in re.findall(r"\d+", str(v))[:3]]
    if not nums:
        raise ValueError(f"not a TensorRT version: {v!r}")
    while len(nums) < 3:
        nums.append(0)
    return nums[0], nums[1], nums[2]


def trt_version_number(v: str) -> int:
    """NV_TENSORRT_VERSION style number used in calibration-cache headers: 10.3.0 -> 100300, 8.6.1 -> 8601."""
    major, minor, patch = parse_trt_version(v)
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def build_mode(trt_version: str, precision: str, manifest: ModelManifest, *, dla: bool = False) -> BuildMode:
    """Which network flags, builder flags and source ONNX a *precision* needs on *trt_version*."""
    if precision not in PRECISIONS:
        raise BuildRefused(f"precision must be one of {PRECISIONS}, got {precision!r}")
    major = parse_trt_version(trt_version)[0]
    if major < 10:
        raise BuildRefused(f"TensorRT {trt_version}: scanside builds with TensorRT 10 or 11 (named-tensor API)")
    notes: List[str] = []
    minor = parse_trt_version(trt_version)[1]
    if dla and major == 11 and minor <= 3:
        raise BuildRefused(f"TensorRT {trt_version} has no DLA support (11.0-11.3); use 10.x or >= 11.4")
    sym = [k for k, f in manifest.files.items() if f.precision == "int8_qdq_sym"]
    if precision == "int8_qdq":
        if not sym:
            raise BuildRefused(f"{manifest.ref}: no symmetric Q/DQ INT8 file (run `scanside convert calibrate`); "
                               "TensorRT needs symmetric S8 activations")
        if dla:
            notes.append("DLA runs INT8/FP16 2-D layers; 3-D convolutions fall back to the GPU")
        return BuildMode(major, precision, sym[0], True, (), False, "int8_qdq_sym", tuple(notes))
    if precision == "fp32":
        # TF32 is on by default for FP32 layers (10-bit mantissa in matmul/conv): cleared so that an "fp32"
        # plan is FP32, as its parity report against ONNX Runtime FP32 assumes
        return BuildMode(major, precision, "fp32", major >= 11, (), False, "fp32",
                         (("TensorRT 11: strongly typed (FP32 ONNX -> FP32 plan)",) if major >= 11 else ())
                         + ("TF32 off",))
    if major >= 11:
        what = "FP16" if precision == "fp16" else "implicit INT8 calibration"
        raise BuildRefused(f"TensorRT {trt_version} removed {what} (BuilderFlag.INT8/FP16, int8_calibrator): "
                           "networks are strongly typed; use precision int8_qdq (Q/DQ ONNX) or an FP16 ONNX")
    if precision == "fp16":
        return BuildMode(major, precision, "fp32", False, ("FP16",), False, "fp16")
    # int8_implicit on TensorRT 10: deprecated calibrator API, FP16 fallback for layers without INT8
    notes.append("IInt8EntropyCalibrator2 is deprecated since TensorRT 10.1 (removed in 11)")
    return BuildMode(major, precision, "fp32", False, ("INT8", "FP16"), True, "int8_implicit", tuple(notes))


# ------------------------------------------------------------------------------------------------
# Q/DQ files TensorRT can parse
# ------------------------------------------------------------------------------------------------
def int32_dequantize_nodes(onnx_path: Union[str, Path]) -> List[str]:
    """DequantizeLinear nodes whose input is INT32 (onnxruntime's quantized biases).  TensorRT's dequantize
    layer takes only INT8 / FP8 / INT4 input, so the parser refuses them (onnx/onnx-tensorrt#850)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    types = {i.name: i.data_type for i in m.graph.initializer}
    for vi in list(m.graph.value_info) + list(m.graph.input):
        types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    for n in m.graph.node:  # a bias can also come from a Constant node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            types.setdefault(n.output[0], n.attribute[0].t.data_type)
    return [n.name or n.output[0] for n in m.graph.node
            if n.op_type == "DequantizeLinear" and types.get(n.input[0]) == onnx.TensorProto.INT32]


# ------------------------------------------------------------------------------------------------
# optimization profiles from the manifest
# ------------------------------------------------------------------------------------------------
def profile_shapes(manifest: ModelManifest, *, opt: Optional[Mapping[str, int]] = None,
                   max_: Optional[Mapping[str, int]] = None, static: bool = False) -> Dict[str, ShapeRange]:
    """min/opt/max per input: static dims as given; named dynamic dims from *opt*/*max_* (default 1 and
    opt), min 1.  static=True (DLA) pins every dynamic dim to its opt value.  The sliding-window
    roi of the preprocessing fills unnamed spatial dims when the manifest leaves them free."""
    opt = dict(opt or {})
    max_ = dict(max_ or {})
    roi = None
    if manifest.preprocessing is not None and manifest.preprocessing.window is not None:
        roi = tuple(manifest.preprocessing.window.roi)
    out: Dict[str, ShapeRange] = {}
    for spec in manifest.inputs:
        lo, o, hi = [], [], []
        for a, d in enumerate(spec.shape):
            if isinstance(d, int):
                lo.append(d), o.append(d), hi.append(d)
                continue
            name = d if isinstance(d, str) else f"{spec.name}:{a}"
            if roi is not None and spec.rank == 5 and a >= 2 and name not in opt:
                v = int(roi[a - 2])
                lo.append(v), o.append(v), hi.append(v)
                continue
            ov = int(opt.get(name, 1))
            mv = int(max_.get(name, ov))
            if mv < ov or ov < 1:
                raise BuildRefused(f"input {spec.name!r} axis {a} ({name}): need 1 <= opt <= max, got opt {ov} max {mv}")
            if static:
                lo.append(ov), o.append(ov), hi.append(ov)
            else:
                lo.append(1), o.append(ov), hi.append(mv)
        out[spec.name] = ShapeRange(min=lo, opt=o, max=hi)
    return out


# ------------------------------------------------------------------------------------------------
# calibration cache (TensorRT text format) -- read/write without TensorRT
# ------------------------------------------------------------------------------------------------
def float_to_hex(x: float) -> str:
    return format(struct.unpack(">I", struct.pack(">f", float(x)))[0], "x")


def hex_to_float(h: str) -> float:
    return float(struct.unpack(">f", struct.pack(">I", int(h, 16)))[0])


def write_calibration_cache(scales: Mapping[str, float], trt_version: str,
                            algorithm: str = "EntropyCalibration2") -> bytes:
    """TensorRT calibration cache: ``TRT-<version>-<algorithm>`` then ``tensor: <float32 bits in hex>``
    per tensor (the scale, amax / 127)."""
    lines = [f"TRT-{trt_version_number(trt_version)}-{algorithm}"]
    for name in sorted(scales):
        s = float(scales[name])
        if not np.isfinite(s) or s < 0:
            raise ValueError(f"calibration scale for {name!r} must be finite and >= 0, got {s}")
        lines.append(f"{name}: {float_to_hex(s)}")
    return ("\n".join(lines) + "\n").encode()


def read_calibration_cache(data: Union[bytes, str]) -> Tuple[int, str, Dict[str, float]]:
    """(version number, algorithm, {tensor: scale}); ValueError on a malformed cache."""
    text = data.decode() if isinstance(data, (bytes, bytearray)) else data
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("empty calibration cache")
    m = CACHE_HEADER_RE.match(lines[0])
    if not m:
        raise ValueError(f"calibration cache header {lines[0][:60]!r} is not TRT-<version>-<algorithm>")
    scales: Dict[str, float] = {}
    for ln in lines[1:]:
        name, sep, hx = ln.rpartition(":")
        if not sep or not re.fullmatch(r"[0-9a-fA-F]{1,8}", hx.strip()):
            raise ValueError(f"calibration cache line {ln[:80]!r} is not 'tensor: hexscale'")
        scales[name.strip()] = hex_to_float(hx.strip())
    return int(m.group(1)), m.group(2), scales


def cache_matches(data: bytes, trt_version: str) -> bool:
    """TensorRT rejects a cache from another version: only reuse it on the same one."""
    try:
        version, _alg, _ = read_calibration_cache(data)
    except ValueError:
        return False
    return version == trt_version_number(trt_version)


def ranges_to_scales(ranges_json: Union[str, Path, Mapping[str, Any]]) -> Dict[str, float]:
    """ONNX Runtime calibration ranges (scanside.converters.calibrate cache JSON) -> symmetric INT8 scales amax/127."""
    d = json.loads(Path(ranges_json).read_text()) if isinstance(ranges_json, (str, Path)) else dict(ranges_json)
    data = d.get("data", d)
    out: Dict[str, float] = {}
    def num(x: Any) -> float:
        if isinstance(x, dict):  # onnxruntime cache JSON: {"data": [v], "dtype": ..., "CLS": "numpy.array"}
            x = x.get("data")
        return float(np.asarray(x, dtype=np.float64).ravel()[0])

    for name, v in data.items():
        rng = v.get("range_value") if isinstance(v, dict) else v
        if rng is None and isinstance(v, dict):
            rng = (v.get("lowest"), v.get("highest"))
        try:
            lo, hi = num(rng[0]), num(rng[1])
        except (TypeError, IndexError, ValueError, KeyError):
            continue
        out[name] = max(abs(lo), abs(hi)) / 127.0
    return out


def check_calibration_batches(batches: Sequence[Mapping[str, np.ndarray]], shapes: Mapping[str, ShapeRange]) -> None:
    """TensorRT calibrates with the calibration profile's opt shapes: every batch must hold every input at
    exactly that shape (BuildRefused otherwise)."""
    if not batches:
        raise BuildRefused("implicit INT8 needs calibration batches (or a calibration cache of this TensorRT version)")
    for i, b in enumerate(batches):
        for name, r in shapes.items():
            if name not in b:
                raise BuildRefused(f"calibration batch {i} has no input {name!r}")
            if list(np.shape(b[name])) != list(r.opt):
                raise BuildRefused(f"calibration batch {i}: input {name!r} has shape {list(np.shape(b[name]))}, "
                                   f"the calibration profile's opt shape is {list(r.opt)}")


def calibration_batches(inputs: np.ndarray, input_name: str, shapes: Mapping[str, ShapeRange]) -> List[Dict[str, np.ndarray]]:
    """Calibration samples (N, ...) cut into batches of the calibration profile's opt shape; a last partial
    batch is dropped (TensorRT calibrates at exactly that shape)."""
    opt = list(shapes[input_name].opt)
    x = np.asarray(inputs, dtype=np.float32)
    if list(x.shape[1:]) != opt[1:]:
        raise BuildRefused(f"calibration samples of {input_name!r} have shape {list(x.shape[1:])} per sample, the "
                           f"calibration profile's opt shape is {opt}")
    n = opt[0]
    return [{input_name: np.ascontiguousarray(x[i:i + n])} for i in range(0, len(x) - n + 1, n)]


def make_entropy_calibrator(trt: Any, batches: Iterable[Dict[str, np.ndarray]], cache_path: Path,
                            trt_version: str) -> Any:
    """An IInt8EntropyCalibrator2 (TensorRT 10 only) feeding *batches* through cuda-python device buffers,
    reading the cache when it matches this TensorRT version and writing it after calibration.  Call
    ``free()`` after the build: the device buffers are the calibrator's."""
    from scanside.engines.backends.tensorrt_engine import _cuda_call, _import_cudart

    cudart = _import_cudart()
    batches = list(batches)

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.i = 0
            self.ptrs: Dict[str, Tuple[int, int]] = {}  # name -> (device pointer, bytes)

        def get_batch_size(self) -> int:
            first = batches[0] if batches else {}
            return int(next(iter(first.values())).shape[0]) if first else 1

        def get_batch(self, names: List[str]) -> Optional[List[int]]:
            if self.i >= len(batches):
                return None
            b = batches[self.i]
            self.i += 1
            ptrs = []
            for n in names:
                arr = np.ascontiguousarray(b[n], dtype=np.float32)
                if n not in self.ptrs:
                    self.ptrs[n] = (int(_cuda_call(cudart.cudaMalloc(arr.nbytes))), arr.nbytes)
                ptr, size = self.ptrs[n]
                if arr.nbytes > size:  # checked shapes make this impossible; never copy past the buffer
                    raise BuildRefused(f"calibration batch for {n!r} has {arr.nbytes} bytes, buffer {size}")
                _cuda_call(cudart.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
                ptrs.append(ptr)
            return ptrs

        def read_calibration_cache(self) -> Optional[bytes]:
            if cache_path.is_file():
                data = cache_path.read_bytes()
                if cache_matches(data, trt_version):
                    return data
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(cache))

        def free(self) -> None:
            for ptr, _size in self.ptrs.values():
                cudart.cudaFree(ptr)
            self.ptrs = {}

    return _Calibrator()


# ------------------------------------------------------------------------------------------------
# per-layer precision report (IEngineInspector JSON)
# ------------------------------------------------------------------------------------------------
#: data-type words of TensorRT's tensor format descriptions ("Row major linear FP32", "Row major linear FP16
#: format", "Thirty-two wide channel vectorized row major Int8 format", "Channel major INT8 format ...",
#: "Row major linear Int32", "Row major linear BOOL"; the strings trt-engine-explorer maps in its
#: _regionFormat table) -> one upper-case name
_FORMAT_TYPE_RE = re.compile(r"\b(FP32|FP16|BF16|BFloat16|FP8|FP4|UInt8|Int8|Int4|Int32|Int64|Bool)\b", re.IGNORECASE)


def format_precision(fmt: str) -> str:
    m = _FORMAT_TYPE_RE.search(fmt or "")
    if m is None:
        return "unknown"
    return {"BFLOAT16": "BF16"}.get(m.group(1).upper(), m.group(1).upper())


#: TensorRT 11 splits the field: "DataType" holds the nvinfer1::DataType name, "Format" the layout
_DATATYPE_NAMES = {"FLOAT": "FP32", "HALF": "FP16", "BFLOAT16": "BF16", "INT8": "INT8", "UINT8": "UINT8",
                   "INT32": "INT32", "INT64": "INT64", "BOOL": "BOOL", "FP8": "FP8", "INT4": "INT4", "FP4": "FP4"}


def tensor_precision(t: Mapping[str, Any]) -> str:
    """Precision of one inspector tensor: TensorRT 10 writes "Format/Datatype" ("Row major linear FP32"),
    TensorRT 11 "DataType" ("Float", "Half", "Int8") beside "Format"."""
    dt = t.get("DataType")
    if isinstance(dt, str) and dt.strip():
        return _DATATYPE_NAMES.get(dt.strip().upper(), format_precision(dt))
    return format_precision(str(t.get("Format/Datatype") or t.get("Format") or ""))


def layer_precisions(inspector_json: Union[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """Summarise IEngineInspector (LayerInformationFormat.JSON, ProfilingVerbosity.DETAILED) output of
    TensorRT 10 or 11:
    count of layers per output precision, and the convolution layers that did not run in INT8 (Conv3d
    Q/DQ has failed to fuse in some TensorRT versions)."""
    d = json.loads(inspector_json) if isinstance(inspector_json, str) else dict(inspector_json)
    layers = d.get("Layers", [])
    per: Dict[str, int] = {}
    not_int8: List[str] = []
    for layer in layers:
        if isinstance(layer, str):  # ProfilingVerbosity below DETAILED: names only
            per["unknown"] = per.get("unknown", 0) + 1
            continue
        outs = layer.get("Outputs") or []
        prec = tensor_precision(outs[0]) if outs and isinstance(outs[0], dict) else "unknown"
        per[prec] = per.get(prec, 0) + 1
        kind = str(layer.get("LayerType", ""))
        if kind in ("Convolution", "CaskConvolution", "CaskDeconvolution", "Deconvolution") and prec != "INT8":
            not_int8.append(str(layer.get("Name", "?")))
    return {"layers": len(layers), "by_output_precision": per, "conv_not_int8": not_int8}


# ------------------------------------------------------------------------------------------------
# the build (needs tensorrt + a GPU)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BuildOptions:
    precision: str = "int8_qdq"
    workspace_bytes: int = 2 << 30
    opt: Dict[str, int] = dataclasses.field(default_factory=dict)
    max: Dict[str, int] = dataclasses.field(default_factory=dict)
    timing_cache: Optional[Path] = None
    dla_core: Optional[int] = None
    hardware_compatibility: str = "none"  # none | ampere_plus | same_compute_capability
    version_compatible: bool = False
    calibration_cache: Optional[Path] = None
    calibration_batches: Optional[List[Dict[str, np.ndarray]]] = None
    optimization_level: Optional[int] = None


def skip_reason() -> Optional[str]:
    """Why a plan cannot be built here (None: it can)."""
    from scanside.engines.backends.tensorrt_engine import probe_cuda_device, probe_tensorrt

    v, why = probe_tensorrt()
    if v is None:
        return why
    dev, dwhy = probe_cuda_device(0)
    return None if dev is not None else dwhy


HW_LEVELS = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}


def hardware_compatibility_level(trt: Any, level: str, trt_version: str, device: Any) -> Any:
    """The trt.HardwareCompatibilityLevel member for *level*, or BuildRefused: SAME_COMPUTE_CAPABILITY exists
    from TensorRT 10.9; AMPERE_PLUS needs an Ampere or newer build GPU; neither is supported on JetPack."""
    if level not in HW_LEVELS:
        raise BuildRefused(f"hardware compatibility must be one of {sorted(HW_LEVELS)}, got {level!r}")
    if level != "none" and device.integrated:
        raise BuildRefused(f"hardware compatibility {level} is not supported on JetPack ({device.name}); use none")
    if level == "ampere_plus" and tuple(device.compute_capability) < (8, 0):
        raise BuildRefused(f"AMPERE_PLUS needs an Ampere or newer build GPU; {device.name} is sm {device.cc}")
    name = HW_LEVELS[level]
    if not hasattr(trt.HardwareCompatibilityLevel, name):
        raise BuildRefused(f"TensorRT {trt_version} has no HardwareCompatibilityLevel.{name} "
                           f"(SAME_COMPUTE_CAPABILITY needs TensorRT >= 10.9)")
    return getattr(trt.HardwareCompatibilityLevel, name)


def attach_timing_cache(config: Any, timing: Optional[Path]) -> Optional[str]:
    """Attach the timing cache kept in *timing* (or an empty one).  set_timing_cache returns False for a
    cache from another device or TensorRT version: then a fresh cache is attached (and the file replaced
    after the build).  Returns a note when the kept cache was not used."""
    data = timing.read_bytes() if timing is not None and timing.is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False):
        return None
    if data and config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        return f"timing cache {timing.name} is from another device or TensorRT version: a fresh one was used"  # type: ignore[union-attr]
    return "the timing cache could not be attached: built without one"


def save_timing_cache(config: Any, timing: Path) -> Optional[str]:
    """Keep the build's timing cache for the next build; a note (never an exception) when it cannot be."""
    cache = config.get_timing_cache()
    if cache is None:
        return f"no timing cache to save to {timing.name}"
    try:
        timing.parent.mkdir(parents=True, exist_ok=True)
        tmp = timing.with_name(timing.name + ".tmp")
        tmp.write_bytes(bytes(cache.serialize()))
        tmp.replace(timing)
    except OSError as e:
        return f"timing cache not saved to {timing} ({type(e).__name__}: {e})"
    return None


def build_plan(manifest: ModelManifest, options: BuildOptions, out_path: Optional[Path] = None,
               *, save_manifest: bool = True) -> Tuple[ModelManifest, Dict[str, Any]]:
    """Build a plan, write it beside the manifest, record it (TensorRTPlan) and return the per-layer report."""
    from scanside.engines.backends.tensorrt_engine import _import_trt, dla_refusal, plan_platform, probe_machine

    trt = _import_trt()
    version = str(trt.__version__)
    _v, device, why = probe_machine(0)
    if device is None:
        raise BuildRefused(f"no CUDA device: {why}")
    dla = options.dla_core is not None
    if dla:
        refusal = dla_refusal(version, device, int(options.dla_core))  # type: ignore[arg-type]
        if refusal:
            raise BuildRefused(refusal)
    mode = build_mode(version, options.precision, manifest, dla=dla)
    onnx_path = manifest.resolve(manifest.files[mode.source_variant].path)
    bad = int32_dequantize_nodes(onnx_path) if mode.precision == "int8_qdq" else []
    if bad:
        raise BuildRefused(f"{onnx_path.name}: {len(bad)} DequantizeLinear node(s) over INT32 (quantized biases, e.g. "
                           f"{bad[0]!r}); TensorRT's dequantize takes INT8/FP8/INT4 only: recalibrate "
                           f"(`scanside convert calibrate`, the int8_sym recipe keeps biases FP32)")
    hw_level = hardware_compatibility_level(trt, options.hardware_compatibility, version, device)
    shapes = profile_shapes(manifest, opt=options.opt, max_=options.max, static=dla)
    calib_cache = options.calibration_cache or (manifest.resolve("calibration") / f"trt-{version}.cache")
    if mode.use_calibrator and not (calib_cache.is_file() and cache_matches(calib_cache.read_bytes(), version)):
        check_calibration_batches(options.calibration_batches or [], shapes)
    notes: List[str] = []
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if mode.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildRefused(f"TensorRT could not parse {onnx_path.name}: " + "; ".join(errs))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_bytes))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.optimization_level is not None:
        config.builder_optimization_level = int(options.optimization_level)
    for flag in mode.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if mode.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    config.hardware_compatibility_level = hw_level
    if dla:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(options.dla_core)  # type: ignore[arg-type]
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    profile = builder.create_optimization_profile()
    for name, r in shapes.items():
        profile.set_shape(name, tuple(r.min), tuple(r.opt), tuple(r.max))
    if config.add_optimization_profile(profile) < 0:
        raise BuildRefused(f"TensorRT refused the optimization profile {json.dumps({k: v.model_dump() for k, v in shapes.items()})}")
    calibrator = None
    try:
        if mode.use_calibrator:
            if not config.set_calibration_profile(profile):
                raise BuildRefused("TensorRT refused the calibration profile")
            calibrator = make_entropy_calibrator(trt, options.calibration_batches or [], calib_cache, version)
            config.int8_calibrator = calibrator
        note = attach_timing_cache(config, options.timing_cache)
        if note:
            notes.append(note)
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if serialized is None:
        raise BuildRefused("TensorRT build failed (see the TensorRT log)")
    plan_bytes = bytes(serialized)
    major, minor, _patch = parse_trt_version(version)
    tag = f"trt{major}{minor}.sm{device.cc.replace('.', '')}"
    out_path = out_path or manifest.resolve(f"{Path(manifest.files[mode.source_variant].path).stem}.{tag}."
                                            f"{options.precision}.plan")
    out_path.write_bytes(plan_bytes)  # the plan first: nothing after this may lose it
    if options.timing_cache is not None:
        note = save_timing_cache(config, options.timing_cache)
        if note:
            notes.append(note)
    runtime = trt.Runtime(logger)
    if options.version_compatible:
        runtime.engine_host_code_allowed = True
    if dla:
        runtime.DLA_core = int(options.dla_core)  # type: ignore[arg-type]
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise BuildRefused(f"TensorRT built {out_path.name} but cannot deserialize it on this machine "
                           f"(see the TensorRT log); the plan is not recorded")
    inspector = engine.create_engine_inspector()
    report = layer_precisions(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    report.update({"mode": dataclasses.asdict(mode), "trt_version": version, "gpu": device.name, "notes": notes})
    record = plan_record(manifest, out_path, mode, version, device.name, device.cc, shapes, options,
                         min_device_memory=int(getattr(engine, "device_memory_size_v2", 0) or 0) or None,
                         layer_report=report, platform=plan_platform(device))
    updated = add_plan(manifest, record)
    if save_manifest and manifest.root is not None:
        updated.save(manifest.root)
    return updated, report


def plan_record(manifest: ModelManifest, plan_path: Path, mode: BuildMode, trt_version: str, gpu_name: str,
                compute_capability: str, shapes: Mapping[str, ShapeRange], options: BuildOptions, *,
                min_device_memory: Optional[int] = None, layer_report: Optional[Mapping[str, Any]] = None,
                platform: Optional[str] = None) -> TensorRTPlan:
    """The manifest record of a built plan (path relative to the manifest): the full TensorRT version
    (major.minor.patch.build: the standard runtime needs all four to match) and the build platform."""
    from scanside.engines.backends.tensorrt_engine import parse_version

    root = manifest.root
    rel = str(Path(plan_path).resolve().relative_to(Path(root).resolve())) if root is not None else Path(plan_path).name
    notes = list(mode.notes)
    if layer_report:
        notes.append("layers by output precision: " + json.dumps(layer_report.get("by_output_precision", {}),
                                                                 sort_keys=True))
        if layer_report.get("conv_not_int8"):
            notes.append(f"{len(layer_report['conv_not_int8'])} convolution layer(s) not in INT8")
        notes.extend(layer_report.get("notes") or [])
    return TensorRTPlan(
        path=rel, sha256=sha256_file(plan_path), trt_version=".".join(str(x) for x in parse_version(trt_version)[:4]),
        compute_capability=compute_capability, precision=mode.manifest_precision,  # type: ignore[arg-type]
        hardware_compatibility=options.hardware_compatibility,  # type: ignore[arg-type]
        version_compatible=options.version_compatible, source_variant=mode.source_variant, gpu_name=gpu_name,
        platform=platform,
        profiles=[dict(shapes)], min_device_memory_bytes=min_device_memory, dla_core=options.dla_core,
        built_at=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(), notes="; ".join(notes) or None)


def add_plan(manifest: ModelManifest, plan: TensorRTPlan) -> ModelManifest:
    """Replace any plan at the same path, keep the others; parity entries of a replaced plan are dropped."""
    plans = [p for p in manifest.plans if p.path != plan.path] + [plan]
    parity = dict(manifest.parity or {})
    if parity.get("variants"):
        parity["variants"] = {k: v for k, v in parity["variants"].items() if k != f"plan:{plan.path}"}
    m = manifest.model_copy(update={"plans": plans, "parity": parity or None})
    return ModelManifest.model_validate(m.model_dump()).set_root(manifest.root)
