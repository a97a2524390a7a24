"""TensorRT back end (TensorRT 10 and 11, named-tensor API) with cuda-python buffers.

Importable without tensorrt or cuda-python: both are imported lazily.  Before a plan is
deserialized, `check_plan_compatibility` compares the manifest's plan record with this
machine (TensorRT version, GPU compute capability, hardware-compatibility level); the
model store falls back to ONNX Runtime with that reason when it fails.

Compatibility rules (TensorRT docs, "Engine Compatibility"):
- By default a plan runs only on the TensorRT version that built it: major.minor.patch.build must
  match (the full ``trt.__version__`` is recorded; an older record without the build number gets a note).
- A version-compatible plan (BuilderFlag.VERSION_COMPATIBLE, TensorRT >= 8.6) runs on the same or a
  later TensorRT of the same major; across majors only 8 -> 10 and 10 -> 11 are supported; never on an
  older one.  The runtime must allow engine host code (``runtime.engine_host_code_allowed = True``).
- Plans are not portable across platforms (OS, CPU architecture, discrete vs integrated GPU): the
  record names the platform that built it (``plan_platform``) and it must match.
- Hardware compatibility: NONE -> same compute capability as the build GPU (a different GPU model
  of the same SM works, TensorRT warns); SAME_COMPUTE_CAPABILITY -> same compute capability;
  AMPERE_PLUS -> any GPU with compute capability >= 8.0.  Not supported on JetPack (integrated GPUs).
- TensorRT 10.0-10.4 support compute capability >= 7.0 (Volta); 10.5 and later >= 7.5 (Turing).
- DLA: the plan's core must exist on this device (``runtime.num_DLA_cores``: Orin Nano has none) and
  TensorRT 11.0-11.3 has no DLA support; ``runtime.DLA_core`` is set before deserializing.
"""
from __future__ import annotations

import ctypes
import dataclasses
import platform
import re
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from scanside.engines.base import TRT_TO_NUMPY, Engine, EngineError, EngineInfo, EngineUnavailable, InputValidationError, \
    ManifestMismatch
from scanside.engines.manifest import ModelManifest, ShapeRange, TensorRTPlan, verify_sha256

MIN_VERSION_COMPATIBLE = (8, 6)
MIN_COMPUTE_CAPABILITY = (7, 5)  # TensorRT >= 10.5 (Turing)
MIN_COMPUTE_CAPABILITY_VOLTA = (7, 0)  # TensorRT 10.0-10.4 still support Volta
#: (built major, runtime major) pairs a version-compatible plan may cross
CROSS_MAJOR_VERSION_COMPATIBLE = {(8, 10), (10, 11)}
#: TensorRT releases without DLA support
NO_DLA_VERSIONS = ((11, 0), (11, 3))
#: oldest Linux driver for each CUDA major (CUDA toolkit release notes, table 3)
MIN_DRIVER_FOR_CUDA = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


# ---------------------------------------------------------------------------------------------
# plain-data descriptions of this machine (filled from cuda-python, or by tests)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: Tuple[int, int]
    total_memory_bytes: int = 0
    integrated: bool = False  # Jetson / iGPU
    dla_cores: Optional[int] = None  # runtime.num_DLA_cores; None: not asked (tensorrt not loaded)

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CudaDevice":
        cc = d["compute_capability"]
        if isinstance(cc, str):
            cc = tuple(int(x) for x in cc.split("."))
        return cls(index=int(d.get("index", 0)), name=str(d.get("name", "")), compute_capability=(int(cc[0]), int(cc[1])),
                   total_memory_bytes=int(d.get("total_memory_bytes", 0)), integrated=bool(d.get("integrated", False)),
                   dla_cores=None if d.get("dla_cores") is None else int(d["dla_cores"]))


@dataclasses.dataclass
class Compatibility:
    ok: bool
    reason: str
    notes: List[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok


def parse_version(v: str) -> Tuple[int, ...]:
    parts = []
    for p in str(v).split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(p):  # "0rc1", "1+cuda12": stop at the first non-numeric suffix
            break
    if not parts:
        raise ValueError(f"not a version: {v!r}")
    return tuple(parts)


def plan_platform(device: Optional[CudaDevice] = None) -> str:
    """What a plan is tied to besides the GPU: OS, CPU architecture and discrete vs integrated GPU
    ('linux-x86_64', 'linux-aarch64' for SBSA, 'linux-aarch64-tegra' for Jetson)."""
    base = f"{platform.system().lower()}-{platform.machine().lower()}"
    return base + ("-tegra" if device is not None and device.integrated else "")


def min_compute_capability(trt_version: str) -> Tuple[int, int]:
    return MIN_COMPUTE_CAPABILITY_VOLTA if parse_version(trt_version)[:2] < (10, 5) else MIN_COMPUTE_CAPABILITY


def dla_refusal(trt_version: str, device: CudaDevice, core: int) -> Optional[str]:
    """Why DLA core *core* cannot be used with *trt_version* on *device* (None: it can)."""
    v = parse_version(trt_version)[:2]
    if NO_DLA_VERSIONS[0] <= v <= NO_DLA_VERSIONS[1]:
        return f"TensorRT {trt_version} has no DLA support (11.0-11.3); use 10.x or >= 11.4"
    cores = device.dla_cores if device.dla_cores is not None else (None if device.integrated else 0)
    if cores is not None and core >= cores:
        return f"DLA core {core} requested; {device.name} has {cores} DLA core(s)"
    return None


def _version_refusal(plan: TensorRTPlan, built: Tuple[int, ...], runtime: Tuple[int, ...], trt_version: str,
                     notes: List[str]) -> Optional[str]:
    if plan.version_compatible:
        if built[:2] < MIN_VERSION_COMPATIBLE:
            return f"plan marked version-compatible but built with TensorRT {plan.trt_version} (< 8.6, which introduced it)"
        if runtime < built:
            return f"version-compatible plan built with TensorRT {plan.trt_version} cannot run on older TensorRT {trt_version}"
        if runtime[0] != built[0] and (built[0], runtime[0]) not in CROSS_MAJOR_VERSION_COMPATIBLE:
            return (f"version-compatible plan from TensorRT {built[0]} cannot run on TensorRT {runtime[0]}: across "
                    f"majors only 8 -> 10 and 10 -> 11 are supported (rebuild the plan)")
        return None
    n = min(len(built), len(runtime))
    if built[:n] != runtime[:n]:
        return (f"plan built with TensorRT {plan.trt_version}, runtime is TensorRT {trt_version}; a plan without "
                f"VERSION_COMPATIBLE needs the same major.minor.patch.build (rebuild the plan)")
    if n < 4:
        notes.append(f"TensorRT build number not recorded ({plan.trt_version} vs {trt_version}); the standard "
                     f"runtime needs major.minor.patch.build to match")
    return None


def check_plan_compatibility(plan: TensorRTPlan, device: Optional[CudaDevice], trt_version: Optional[str],
                             host_platform: Optional[str] = None) -> Compatibility:
    """Can *plan* be deserialized with TensorRT *trt_version* on *device* (on *host_platform*, default
    this machine's)?  Pure logic on plain data."""
    notes: List[str] = []
    if trt_version is None:
        return Compatibility(False, "tensorrt not importable")
    if device is None:
        return Compatibility(False, "no CUDA device")
    why = _version_refusal(plan, parse_version(plan.trt_version), parse_version(trt_version), trt_version, notes)
    if why:
        return Compatibility(False, why)
    here = host_platform or plan_platform(device)
    if plan.platform is None:
        notes.append("plan record names no build platform; plans are not portable across platforms")
    elif plan.platform != here:
        return Compatibility(False, f"plan built on platform {plan.platform}, this machine is {here}; TensorRT plans "
                                    f"are not portable across platforms (rebuild the plan here)")
    cc_built = parse_version(plan.compute_capability)[:2]
    cc_dev = device.compute_capability
    cc_min = min_compute_capability(trt_version)
    if cc_dev < cc_min:
        return Compatibility(False, f"GPU {device.name} has compute capability {device.cc}; TensorRT {trt_version} "
                                    f"needs >= {cc_min[0]}.{cc_min[1]}")
    level = plan.hardware_compatibility
    if level != "none" and device.integrated:
        return Compatibility(False, f"plan is {level.upper()}: hardware compatibility is not supported on JetPack "
                                    f"(integrated GPU {device.name})")
    if level == "ampere_plus":
        if cc_dev < (8, 0):
            return Compatibility(False, f"plan is AMPERE_PLUS but GPU {device.name} has compute capability {device.cc} (< 8.0)")
        if cc_built < (8, 0):
            return Compatibility(False, f"plan claims AMPERE_PLUS but was built on compute capability {plan.compute_capability}")
    else:
        if cc_dev != cc_built:
            return Compatibility(False, f"plan built for compute capability {plan.compute_capability} "
                                        f"(hardware compatibility {level.upper()}), GPU {device.name} is {device.cc}")
        if level == "none" and plan.gpu_name and device.name and plan.gpu_name != device.name:
            notes.append(f"plan built on {plan.gpu_name}, running on {device.name} (same compute capability; "
                         f"TensorRT warns, performance may differ)")
    if plan.min_device_memory_bytes and device.total_memory_bytes and \
            plan.min_device_memory_bytes > device.total_memory_bytes:
        return Compatibility(False, f"plan needs {plan.min_device_memory_bytes} bytes of device memory, "
                                    f"GPU has {device.total_memory_bytes}")
    if plan.dla_core is not None:
        why = dla_refusal(trt_version, device, plan.dla_core)
        if why:
            return Compatibility(False, f"plan targets DLA core {plan.dla_core}: {why}")
    return Compatibility(True, f"TensorRT {trt_version} on {device.name} (sm {device.cc}) can run a plan from TensorRT "
                               f"{plan.trt_version} for sm {plan.compute_capability} "
                               f"[{level}{', version-compatible' if plan.version_compatible else ''}]", notes)


def select_plan(manifest: ModelManifest, device: Optional[CudaDevice], trt_version: Optional[str],
                precision: Optional[str] = None, host_platform: Optional[str] = None,
                ) -> Tuple[Optional[TensorRTPlan], List[Tuple[str, str]]]:
    """First compatible plan (optionally of a given precision) and the reason each other was passed over."""
    reasons: List[Tuple[str, str]] = []
    if not manifest.plans:
        return None, [("-", "no TensorRT plan in the manifest")]
    for plan in manifest.plans:
        if precision is not None and plan.precision != precision:
            reasons.append((plan.path, f"precision {plan.precision}, wanted {precision}"))
            continue
        c = check_plan_compatibility(plan, device, trt_version, host_platform)
        if c.ok:
            return plan, reasons
        reasons.append((plan.path, c.reason))
    return None, reasons


def check_shape_in_profile(profile: Mapping[str, ShapeRange], name: str, shape: Sequence[int]) -> Optional[str]:
    """None if *shape* is within the optimization profile for input *name*, else why not."""
    r = profile.get(name)
    if r is None:
        return None
    if len(shape) != len(r.min):
        return f"input {name!r}: rank {len(shape)}, profile rank {len(r.min)}"
    for a, (lo, s, hi) in enumerate(zip(r.min, shape, r.max)):
        if not lo <= s <= hi:
            return f"input {name!r}: axis {a} = {s} outside the plan's profile [{lo}, {hi}] (shape {list(shape)})"
    return None


def trt_dtype_to_numpy(dtype: Any) -> np.dtype:
    """tensorrt.DataType (or its member name) -> numpy dtype; error for types numpy lacks."""
    name = getattr(dtype, "name", None) or str(dtype).split(".")[-1]
    if name not in TRT_TO_NUMPY:
        raise EngineError(f"unknown TensorRT data type {name}")
    np_name = TRT_TO_NUMPY[name]
    if np_name is None:
        raise EngineError(f"TensorRT data type {name} has no numpy equivalent; "
                          f"build the plan with {name} kept internal (I/O in float32/float16)")
    return np.dtype(np_name)


# ---------------------------------------------------------------------------------------------
# lazy library access
# ---------------------------------------------------------------------------------------------
def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise EngineUnavailable("tensorrt", f"cuda-python not importable ({e}); pip install cuda-python") from e
    return cudart


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except Exception as e:
        raise EngineUnavailable("tensorrt", f"tensorrt not importable ({type(e).__name__}: {e})") from e
    return trt


def _cuda_call(result: Any) -> Any:
    """cuda-python returns (err, *values); raise on error, unwrap values."""
    cudart = _import_cudart()
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        try:
            name = cudart.cudaGetErrorName(err)[1].decode()
        except Exception:
            name = str(err)
        raise EngineError(f"CUDA runtime error: {name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def probe_tensorrt() -> Tuple[Optional[str], str]:
    try:
        trt = _import_trt()
    except EngineUnavailable as e:
        return None, e.reason
    return str(trt.__version__), f"tensorrt {trt.__version__}"


def cuda_version_str(v: Optional[int]) -> str:
    """12060 -> '12.6' (the encoding of cudaDriverGetVersion / cudaRuntimeGetVersion)."""
    return "?" if v is None else f"{v // 1000}.{(v % 1000) // 10}"


def cuda_versions(cudart: Any) -> Tuple[Optional[int], Optional[int]]:
    """(CUDA version the driver supports, CUDA runtime version of cuda-python); None where unknown.
    Both calls answer even when the driver is too old for the runtime."""
    def ask(fn: Any) -> Optional[int]:
        try:
            r = fn()
            return int(r[1]) if r[0] == cudart.cudaError_t.cudaSuccess else None
        except Exception:
            return None
    return ask(cudart.cudaDriverGetVersion), ask(cudart.cudaRuntimeGetVersion)


def driver_mismatch(driver: Optional[int], runtime: Optional[int]) -> Optional[str]:
    """A clear sentence when the driver cannot run cuda-python's CUDA runtime (None: it can, or unknown).
    Within a CUDA major an older driver works (minor version compatibility); across majors it does not."""
    if driver is None or runtime is None:
        return None
    if driver == 0:
        return "no NVIDIA driver is loaded (cudaDriverGetVersion returned 0)"
    if driver // 1000 >= runtime // 1000:
        return None
    need = MIN_DRIVER_FOR_CUDA.get(runtime // 1000)
    return (f"driver/runtime mismatch: the NVIDIA driver supports CUDA {cuda_version_str(driver)}, cuda-python is "
            f"built for CUDA {cuda_version_str(runtime)}{f' (needs driver >= {need})' if need else ''}; install the "
            f"cuda-python of the driver's CUDA major (pip install 'cuda-python>={driver // 1000},<{driver // 1000 + 1}'"
            f"; the scanside[gpu] extra pins CUDA 12) or upgrade the driver")


def probe_cuda_device(index: int = 0) -> Tuple[Optional[CudaDevice], str]:
    try:
        cudart = _import_cudart()
    except EngineUnavailable as e:
        return None, e.reason
    try:
        count = _cuda_call(cudart.cudaGetDeviceCount())
        if not count:
            return None, "no CUDA device"
        if index >= count:
            return None, f"CUDA device {index} requested, {count} present"
        prop = _cuda_call(cudart.cudaGetDeviceProperties(index))
    except EngineError as e:
        mismatch = driver_mismatch(*cuda_versions(cudart))
        return None, f"no usable CUDA device ({e}){': ' + mismatch if mismatch else ''}"
    name = prop.name.decode(errors="replace") if isinstance(prop.name, (bytes, bytearray)) else str(prop.name)
    dev = CudaDevice(index=index, name=name.rstrip("\x00"), compute_capability=(int(prop.major), int(prop.minor)),
                     total_memory_bytes=int(prop.totalGlobalMem), integrated=bool(getattr(prop, "integrated", 0)))
    return dev, f"{dev.name} (sm {dev.cc})"


def probe_machine(index: int = 0) -> Tuple[Optional[str], Optional[CudaDevice], str]:
    """(tensorrt version, the CUDA device with its DLA core count, why) -- what the model store and the
    plan builder decide on."""
    version, why = probe_tensorrt()
    if version is None:
        return None, None, why
    dev, dwhy = probe_cuda_device(index)
    if dev is not None:
        try:
            trt = _import_trt()
            n = trt.Runtime(trt.Logger(trt.Logger.ERROR)).num_DLA_cores
            dev = dataclasses.replace(dev, dla_cores=int(n))
        except Exception as e:  # the count is advisory; load() asks again
            dwhy += f"; DLA cores unknown ({type(e).__name__})"
    return version, dev, f"{why}; {dwhy}"


def gpu_report(index: int = 0) -> Dict[str, Any]:
    """What `scanside models show` prints about this machine's GPU path, a driver/runtime mismatch first."""
    out: Dict[str, Any] = {"tensorrt": probe_tensorrt()[1]}
    try:
        cudart = _import_cudart()
    except EngineUnavailable as e:
        out["cuda"] = e.reason
        return out
    driver, runtime = cuda_versions(cudart)
    out["cuda_driver"], out["cuda_runtime"] = cuda_version_str(driver), cuda_version_str(runtime)
    out["problem"] = driver_mismatch(driver, runtime)
    dev, why = probe_cuda_device(index)
    out["cuda"] = why if dev is None else f"cuda:{index} {why}"
    return out


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _IOTensor:
    name: str
    is_input: bool
    dtype: np.dtype
    host_ptr: int = 0
    device_ptr: int = 0
    nbytes: int = 0


class TensorRTEngine(Engine):
    backend = "tensorrt"

    def __init__(self, device_index: int = 0, *, plan_path: Optional[str] = None, precision: Optional[str] = None,
                 log_level: str = "WARNING") -> None:
        super().__init__()
        self.device_index = device_index
        self.plan_path = plan_path
        self.precision = precision
        self.log_level = log_level
        self.plan: Optional[TensorRTPlan] = None
        self.device: Optional[CudaDevice] = None
        self.trt_version: Optional[str] = None
        self.compat: Optional[Compatibility] = None
        self._trt: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._io: Dict[str, _IOTensor] = {}
        # one execution context, one stream and one set of pinned buffers: a run at a time
        self._lock = threading.Lock()

    @classmethod
    def availability(cls) -> Tuple[bool, str]:
        v, why = probe_tensorrt()
        if v is None:
            return False, why
        dev, dwhy = probe_cuda_device(0)
        if dev is None:
            return False, dwhy
        return True, f"{why}; {dwhy}"

    def load(self, manifest: ModelManifest, variant: Optional[str] = None, *, verify: bool = True) -> "TensorRTEngine":
        trt = _import_trt()
        cudart = _import_cudart()
        self.trt_version = str(trt.__version__)
        self.device, why = probe_cuda_device(self.device_index)
        if self.device is None:
            raise EngineUnavailable(self.backend, why)
        _cuda_call(cudart.cudaSetDevice(self.device_index))
        logger = trt.Logger(getattr(trt.Logger, self.log_level))
        runtime = trt.Runtime(logger)
        self.device = dataclasses.replace(self.device, dla_cores=int(runtime.num_DLA_cores))
        plans = manifest
        if self.plan_path is not None:
            plans = manifest.model_copy(update={"plans": [p for p in manifest.plans if p.path == self.plan_path]})
        if variant is not None:
            plans = plans.model_copy(update={"plans": [p for p in plans.plans if p.source_variant in (None, variant)]})
        plan, reasons = select_plan(plans, self.device, self.trt_version, self.precision)
        if plan is None:
            raise EngineUnavailable(self.backend, "; ".join(f"{p}: {r}" for p, r in reasons))
        self.compat = check_plan_compatibility(plan, self.device, self.trt_version)
        path = manifest.resolve(plan.path)
        if verify:
            verify_sha256(path, plan.sha256)
        self._trt = trt
        self._runtime = runtime
        if plan.version_compatible:
            runtime.engine_host_code_allowed = True
        if plan.dla_core is not None:  # must be set before deserializing (IRuntime::setDLACore)
            runtime.DLA_core = int(plan.dla_core)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineError(f"{manifest.ref}: TensorRT could not deserialize {path} (see the TensorRT log)")
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"{manifest.ref}: could not create an execution context")
        self._io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            self._io[name] = _IOTensor(name, is_input, trt_dtype_to_numpy(engine.get_tensor_dtype(name)))
        self._check_against_manifest(manifest)
        self._stream = _cuda_call(cudart.cudaStreamCreate())
        self.manifest, self.variant, self.plan = manifest, plan.source_variant, plan
        return self

    def _check_against_manifest(self, manifest: ModelManifest) -> None:
        problems = []
        for specs, want_input in ((manifest.inputs, True), (manifest.outputs, False)):
            for s in specs:
                t = self._io.get(s.name)
                if t is None or t.is_input != want_input:
                    problems.append(f"{'input' if want_input else 'output'} {s.name!r} not in the plan "
                                    f"(plan I/O: {sorted(self._io)})")
                elif t.dtype != np.dtype(s.dtype):
                    problems.append(f"{s.name!r}: plan dtype {t.dtype}, manifest {s.dtype}")
        if problems:
            raise ManifestMismatch(f"{manifest.ref}: plan does not match its manifest: " + "; ".join(problems))

    def _ensure(self, t: _IOTensor, nbytes: int) -> None:
        if nbytes <= t.nbytes:
            return
        cudart = _import_cudart()
        self._free(t)
        nbytes = max(nbytes, 1)
        device_ptr = int(_cuda_call(cudart.cudaMalloc(nbytes)))
        try:
            host_ptr = int(_cuda_call(cudart.cudaMallocHost(nbytes)))  # pinned: async copies need it
        except EngineError:
            cudart.cudaFree(device_ptr)
            raise
        t.device_ptr, t.host_ptr, t.nbytes = device_ptr, host_ptr, nbytes

    def _host_view(self, t: _IOTensor, shape: Tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64)) * t.dtype.itemsize
        buf = (ctypes.c_byte * max(n, 1)).from_address(t.host_ptr)
        return np.frombuffer(memoryview(buf), dtype=np.uint8, count=n).view(t.dtype).reshape(shape)

    def _bind(self, name: str, ptr: int) -> None:
        if not self._context.set_tensor_address(name, ptr):
            raise EngineError(f"TensorRT refused the device address of tensor {name!r} (see the TensorRT log)")

    def _run(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        with self._lock:
            try:
                return self._run_locked(inputs)
            except Exception:
                if self._stream is not None:  # no queued copy may outlive a failed run: its buffers get reused
                    _import_cudart().cudaStreamSynchronize(self._stream)
                raise

    def _run_locked(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        cudart = _import_cudart()
        ctx = self._context
        if self.plan is not None and self.plan.profiles:
            for name, arr in inputs.items():
                why = check_shape_in_profile(self.plan.profiles[0], name, arr.shape)
                if why:
                    raise InputValidationError(f"{self.manifest.ref if self.manifest else ''}: {why}")
        for name, arr in inputs.items():
            if not ctx.set_input_shape(name, tuple(int(d) for d in arr.shape)):
                raise InputValidationError(f"TensorRT refused shape {list(arr.shape)} for input {name!r}")
        stream = self._stream
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in inputs.items():
            t = self._io[name]
            arr = np.ascontiguousarray(arr, dtype=t.dtype)
            self._ensure(t, arr.nbytes)
            np.copyto(self._host_view(t, arr.shape), arr)
            _cuda_call(cudart.cudaMemcpyAsync(t.device_ptr, t.host_ptr, arr.nbytes, h2d, stream))
            self._bind(name, t.device_ptr)
        out_shapes: Dict[str, Tuple[int, ...]] = {}
        for t in self._io.values():
            if t.is_input:
                continue
            shape = tuple(int(d) for d in ctx.get_tensor_shape(t.name))
            if any(d < 0 for d in shape):
                raise EngineError(f"output {t.name!r} has a data-dependent shape {shape}; not supported")
            out_shapes[t.name] = shape
            self._ensure(t, int(np.prod(shape, dtype=np.int64)) * t.dtype.itemsize)
            self._bind(t.name, t.device_ptr)
        if not ctx.execute_async_v3(int(stream)):
            raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        for name, shape in out_shapes.items():
            t = self._io[name]
            n = int(np.prod(shape, dtype=np.int64)) * t.dtype.itemsize
            _cuda_call(cudart.cudaMemcpyAsync(t.host_ptr, t.device_ptr, n, d2h, stream))
        _cuda_call(cudart.cudaStreamSynchronize(stream))
        return {name: self._host_view(self._io[name], shape).copy() for name, shape in out_shapes.items()
                if self.manifest is None or name in {o.name for o in self.manifest.outputs}}

    def _warmup_shape(self, spec: Any, dynamic: int) -> Tuple[int, ...]:
        if self.plan is not None and self.plan.profiles and spec.name in self.plan.profiles[0]:
            return tuple(self.plan.profiles[0][spec.name].opt)
        return spec.concrete_shape(dynamic)

    def describe(self) -> EngineInfo:
        m = self._require_loaded()
        assert self.plan is not None and self.device is not None
        versions = {"tensorrt": str(self.trt_version), "numpy": np.__version__, "python": platform.python_version()}
        try:
            cudart = _import_cudart()
            versions["cuda_runtime"] = cuda_version_str(_cuda_call(cudart.cudaRuntimeGetVersion()))
            versions["cuda_driver"] = cuda_version_str(_cuda_call(cudart.cudaDriverGetVersion()))
        except Exception:  # pragma: no cover - only on a GPU host
            pass
        return EngineInfo(backend=self.backend, model=m.ref, variant=self.variant, precision=self.plan.precision,
                          device=f"cuda:{self.device.index} {self.device.name} (sm {self.device.cc})",
                          library_versions=versions, providers=["tensorrt"],
                          extra={"plan": self.plan.path, "compatibility": self.compat.reason if self.compat else None,
                                 "notes": self.compat.notes if self.compat else []})

    def _free(self, t: _IOTensor) -> None:
        if not t.nbytes:
            return
        cudart = _import_cudart()
        cudart.cudaFree(t.device_ptr)
        cudart.cudaFreeHost(t.host_ptr)
        t.device_ptr = t.host_ptr = t.nbytes = 0

    def close(self) -> None:
        with self._lock:
            self._close_locked()
        super().close()

    def _close_locked(self) -> None:
        if self._engine is not None:
            try:
                cudart = _import_cudart()
                if self._stream is not None:
                    cudart.cudaStreamSynchronize(self._stream)
                for t in self._io.values():
                    self._free(t)
                if self._stream is not None:
                    cudart.cudaStreamDestroy(self._stream)
            finally:
                self._stream = None
                self._context = None
                self._engine = None
                self._runtime = None
                self._io = {}
