"""Stand-ins for ``tensorrt`` and ``cuda.bindings.runtime`` (no NVIDIA GPU or TensorRT here), built to the
real signatures so that a wrong argument order, a wrong type or an unchecked return fails on a CPU.

Checked against:
- TensorRT Python bindings, NVIDIA/TensorRT ``python/src/infer/pyCore.cpp`` and
  ``python/src/parsers/pyOnnx.cpp`` (release/10.3 and 11.x) and ``include/NvInferRuntime.h``:
  ``Runtime(logger)``; ``Runtime.deserialize_cuda_engine(serialized_engine)`` -> ICudaEngine or None;
  ``Runtime.DLA_core`` (read/write, IRuntime::setDLACore: set before deserializing);
  ``Runtime.num_DLA_cores`` (read-only); ``Runtime.engine_host_code_allowed``;
  ``ICudaEngine.num_io_tensors / get_tensor_name(index) / get_tensor_mode(name) / get_tensor_dtype(name) /
  create_execution_context() / create_engine_inspector() / device_memory_size_v2``;
  ``IExecutionContext.set_input_shape(name, shape) -> bool``, ``set_tensor_address(name, memory: int) -> bool``,
  ``get_tensor_shape(name) -> Dims``, ``execute_async_v3(stream_handle: int) -> bool``;
  ``Builder(logger).create_network(flags: int)``, ``create_builder_config()``,
  ``create_optimization_profile()``, ``build_serialized_network(network, config) -> IHostMemory or None``,
  ``num_DLA_cores``; ``IOptimizationProfile.set_shape(input, min, opt, max)`` (raises on inconsistent shapes);
  ``IBuilderConfig.add_optimization_profile(profile) -> int`` (-1 on error),
  ``set_calibration_profile(profile) -> bool``, ``create_timing_cache(serialized_timing_cache)``,
  ``set_timing_cache(cache, ignore_mismatch) -> bool``, ``get_timing_cache() -> ITimingCache or None``,
  ``set_flag / clear_flag / get_flag``, ``hardware_compatibility_level``
  (HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY only from 10.9), ``int8_calibrator``, ``DLA_core``;
  ``OnnxParser(network, logger).parse_from_file(model: str) -> bool``, ``num_errors``, ``get_error(index)``;
  ``IInt8EntropyCalibrator2`` (TensorRT 10 only; removed in 11 with BuilderFlag.INT8/FP16).
  The dequantize refusal mirrors onnx/onnx-tensorrt#850 (INT32 input to DequantizeLinear).
- cuda-python / cuda-bindings 12.x and 13.x ``cuda/bindings/runtime.pyx``: every call returns a tuple
  ``(cudaError_t, *values)``: ``cudaGetDeviceCount() -> (err, int)``, ``cudaGetDeviceProperties(int device)
  -> (err, cudaDeviceProp)``, ``cudaSetDevice(int device) -> (err,)``, ``cudaMalloc(size_t size) -> (err, ptr)``,
  ``cudaMallocHost(size_t size) -> (err, ptr)``, ``cudaFree(devPtr)``, ``cudaFreeHost(ptr)``,
  ``cudaMemcpy(dst, src, size_t count, kind: cudaMemcpyKind)``, ``cudaMemcpyAsync(dst, src, size_t count,
  kind: cudaMemcpyKind, stream)``, ``cudaStreamCreate() -> (err, cudaStream_t)``, ``cudaStreamSynchronize(stream)``,
  ``cudaStreamDestroy(stream)``, ``cudaDriverGetVersion() / cudaRuntimeGetVersion() -> (err, int)``,
  ``cudaGetErrorName(error) -> (err, bytes)``.  Async copies and kernels are queued on their stream and
  only happen at a synchronize (as on a GPU: reading a result before synchronizing reads stale memory).

The fake engine computes with ONNX Runtime on the ONNX file the fake parser read, moving its inputs and
outputs through whichever cuda runtime ``scanside.engines.backends.tensorrt_engine`` imports -- this one, or the real
cuda-bindings on a GPU machine (bench/gpu_check.py), so the engine's buffer code runs on real CUDA there.
"""
from __future__ import annotations

import ctypes
import enum
import json
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

MAGIC = b"FAKETRT\x00"


# =============================================================================================
# cuda.bindings.runtime
# =============================================================================================
class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStream_t:
    """int(stream) is the handle, as in cuda-python."""

    def __init__(self, handle: int = 0) -> None:
        self._h = int(handle)

    def __int__(self) -> int:
        return self._h

    def getPtr(self) -> int:
        return self._h


@dataclass
class cudaDeviceProp:
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int
    integrated: int = 0


@dataclass
class FakeGPU:
    name: str = "NVIDIA RTX A4000"
    cc: Tuple[int, int] = (8, 6)
    memory: int = 16 << 30
    integrated: bool = False
    dla_cores: int = 0
    driver: int = 12060  # CUDA version the driver supports
    runtime: int = 12060  # CUDA version cuda-python was built for
    fail_malloc_host: bool = False


class FakeCudart(types.ModuleType):
    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStream_t = cudaStream_t

    def __init__(self, gpu: FakeGPU) -> None:
        super().__init__("cuda.bindings.runtime")
        self.gpu = gpu
        self.device: Dict[int, Any] = {}  # base -> ctypes buffer ("device" memory)
        self.pinned: Dict[int, Any] = {}
        self.streams: Dict[int, List[Any]] = {}  # live handle -> queued operations
        self.calls: List[str] = []
        self._next_stream = 0x5000
        self._running = False

    # --- helpers ---------------------------------------------------------------------------
    def _ok(self) -> bool:
        return self.gpu.driver // 1000 >= self.gpu.runtime // 1000

    @staticmethod
    def _size_t(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise TypeError(f"size_t expected, got {v!r}")  # Cython's size_t conversion
        return int(v)

    def _find(self, table: Dict[int, Any], ptr: int, n: int) -> bool:
        for base, buf in table.items():
            if base <= ptr and ptr + n <= base + ctypes.sizeof(buf):
                return True
        return False

    def _stream(self, stream: Any) -> Optional[int]:
        h = 0 if stream is None else int(stream)
        return h if (h == 0 or h in self.streams) else None

    def _check_copy(self, dst: Any, src: Any, count: Any, kind: Any, pinned_host: bool) -> cudaError_t:
        if not isinstance(kind, cudaMemcpyKind):
            raise TypeError(f"kind must be cudaMemcpyKind, got {type(kind).__name__}")
        n = self._size_t(count)
        dst, src = int(dst), int(src)
        host_ok = (lambda p: self._find(self.pinned, p, n)) if pinned_host else (lambda p: not self._find(self.device, p, n))
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            ok = self._find(self.device, dst, n) and host_ok(src)
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            ok = self._find(self.device, src, n) and host_ok(dst)
        else:
            ok = False
        return cudaError_t.cudaSuccess if ok else cudaError_t.cudaErrorInvalidValue

    def _flush(self, handle: int) -> None:
        if self._running:  # called from queued work (a kernel's cudaMemcpy): what is queued comes after it
            return
        queue = self.streams.get(handle, [])
        self._running = True
        try:
            while queue:
                queue.pop(0)()
        finally:
            self._running = False

    # --- the API -----------------------------------------------------------------------------
    def cudaGetErrorName(self, error: cudaError_t) -> Tuple[cudaError_t, bytes]:
        return cudaError_t.cudaSuccess, cudaError_t(error).name.encode()

    def cudaDriverGetVersion(self) -> Tuple[cudaError_t, int]:
        return cudaError_t.cudaSuccess, self.gpu.driver

    def cudaRuntimeGetVersion(self) -> Tuple[cudaError_t, int]:
        return cudaError_t.cudaSuccess, self.gpu.runtime

    def cudaGetDeviceCount(self) -> Tuple[cudaError_t, int]:
        if not self._ok():
            return cudaError_t.cudaErrorInsufficientDriver, 0
        return cudaError_t.cudaSuccess, 1

    def cudaGetDeviceProperties(self, device: int) -> Tuple[cudaError_t, Optional[cudaDeviceProp]]:
        if not isinstance(device, int) or device != 0:
            return cudaError_t.cudaErrorInvalidValue, None
        g = self.gpu
        return cudaError_t.cudaSuccess, cudaDeviceProp(g.name.encode() + b"\x00" * 4, g.cc[0], g.cc[1], g.memory,
                                                        int(g.integrated))

    def cudaSetDevice(self, device: int) -> Tuple[cudaError_t]:
        if not isinstance(device, int):
            raise TypeError("device must be int")
        return (cudaError_t.cudaSuccess if device == 0 else cudaError_t.cudaErrorInvalidValue,)

    def cudaMalloc(self, size: int) -> Tuple[cudaError_t, int]:
        n = self._size_t(size)
        buf = (ctypes.c_byte * max(n, 1))()
        self.device[ctypes.addressof(buf)] = buf
        self.calls.append(f"cudaMalloc({n})")
        return cudaError_t.cudaSuccess, ctypes.addressof(buf)

    def cudaMallocHost(self, size: int) -> Tuple[cudaError_t, int]:
        n = self._size_t(size)
        if self.gpu.fail_malloc_host:
            return cudaError_t.cudaErrorMemoryAllocation, 0
        buf = (ctypes.c_byte * max(n, 1))()
        self.pinned[ctypes.addressof(buf)] = buf
        self.calls.append(f"cudaMallocHost({n})")
        return cudaError_t.cudaSuccess, ctypes.addressof(buf)

    def cudaFree(self, devPtr: int) -> Tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess if self.device.pop(int(devPtr), None) is not None
                else cudaError_t.cudaErrorInvalidValue,)

    def cudaFreeHost(self, ptr: int) -> Tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess if self.pinned.pop(int(ptr), None) is not None
                else cudaError_t.cudaErrorInvalidValue,)

    def cudaMemcpy(self, dst: Any, src: Any, count: int, kind: cudaMemcpyKind) -> Tuple[cudaError_t]:
        err = self._check_copy(dst, src, count, kind, pinned_host=False)
        if err == cudaError_t.cudaSuccess:
            for h in list(self.streams):  # the legacy default stream waits for blocking streams
                self._flush(h)
            ctypes.memmove(int(dst), int(src), int(count))
        return (err,)

    def cudaMemcpyAsync(self, dst: Any, src: Any, count: int, kind: cudaMemcpyKind, stream: Any) -> Tuple[cudaError_t]:
        h = self._stream(stream)
        if h is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        err = self._check_copy(dst, src, count, kind, pinned_host=True)  # the engine's copies are from pinned memory
        if err == cudaError_t.cudaSuccess:
            d, s, n = int(dst), int(src), int(count)

            def copy() -> None:  # memory freed while the copy was queued: an error, never a wild write
                if self._check_copy(d, s, n, kind, pinned_host=True) != cudaError_t.cudaSuccess:
                    raise RuntimeError("queued cudaMemcpyAsync on freed memory")
                ctypes.memmove(d, s, n)
            self.streams.setdefault(h, []).append(copy)
        time.sleep(0.0002)  # a GPU call takes time: lets other threads in, as the real call does
        return (err,)

    def cudaStreamCreate(self) -> Tuple[cudaError_t, cudaStream_t]:
        self._next_stream += 0x10
        self.streams[self._next_stream] = []
        return cudaError_t.cudaSuccess, cudaStream_t(self._next_stream)

    def cudaStreamSynchronize(self, stream: Any) -> Tuple[cudaError_t]:
        h = self._stream(stream)
        if h is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self._flush(h)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream: Any) -> Tuple[cudaError_t]:
        h = self._stream(stream)
        if not h:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self._flush(h)
        del self.streams[h]
        return (cudaError_t.cudaSuccess,)

    def enqueue(self, stream_handle: int, op: Any) -> bool:
        """For the fake kernel: work ordered on a stream."""
        if stream_handle not in self.streams:
            return False
        self.streams[stream_handle].append(op)
        return True

    def is_device(self, ptr: int, n: int) -> bool:
        return self._find(self.device, int(ptr), n)


# =============================================================================================
# tensorrt
# =============================================================================================
class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


_ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 7: DataType.INT64,
                9: DataType.BOOL}


class Logger:
    INTERNAL_ERROR = _Severity.INTERNAL_ERROR
    ERROR = _Severity.ERROR
    WARNING = _Severity.WARNING
    INFO = _Severity.INFO
    VERBOSE = _Severity.VERBOSE

    def __init__(self, min_severity: _Severity = _Severity.WARNING) -> None:
        if not isinstance(min_severity, _Severity):
            raise TypeError("min_severity must be a Logger.Severity")
        self.min_severity = min_severity
        self.messages: List[str] = []


class _HostMemory(bytes):
    """IHostMemory: bytes(obj) and the buffer protocol work."""

    def serialize(self) -> "_HostMemory":  # for ITimingCache
        return self


@dataclass
class _Profile:
    shapes: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
        lo, o, hi = tuple(min), tuple(opt), tuple(max)
        if not (len(lo) == len(o) == len(hi)) or any(not a <= b <= c for a, b, c in zip(lo, o, hi)):
            raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
        self.shapes[input] = (lo, o, hi)


class _TimingCache:
    def __init__(self, data: bytes, device_key: str) -> None:
        self.data = bytes(data)
        self.device_key = device_key

    def serialize(self) -> _HostMemory:
        return _HostMemory(self.data or f"TIMING:{self.device_key}".encode())


class _Network:
    def __init__(self, flags: int) -> None:
        if not isinstance(flags, int):
            raise TypeError("flags must be int")
        self.flags = flags
        self.onnx: Optional[bytes] = None
        self.io: List[Tuple[str, bool, DataType]] = []

    @property
    def num_inputs(self) -> int:
        return sum(1 for _n, i, _d in self.io if i)


class _Parser:
    def __init__(self, network: _Network, logger: Logger) -> None:
        self.network = network
        self.errors: List[str] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]

    def parse_from_file(self, model: str) -> bool:
        import onnx

        if not isinstance(model, str):
            raise TypeError("model must be a str path")
        m = onnx.load(model)
        types_ = {i.name: i.data_type for i in m.graph.initializer}
        for n in m.graph.node:
            if n.op_type == "DequantizeLinear" and types_.get(n.input[0]) == onnx.TensorProto.INT32:
                self.errors.append(f"In node {n.name} (parseGraph): INVALID_NODE: DequantizeLinear: only activation "
                                   f"types allowed as input to this layer.")
        if self.errors:
            return False
        inits = set(types_)
        self.network.io = [(i.name, True, _ONNX_TO_TRT[i.type.tensor_type.elem_type]) for i in m.graph.input
                           if i.name not in inits]
        self.network.io += [(o.name, False, _ONNX_TO_TRT[o.type.tensor_type.elem_type]) for o in m.graph.output]
        self.network.onnx = m.SerializeToString()
        return True


class _Inspector:
    def __init__(self, engine: "_Engine") -> None:
        self.engine = engine

    def get_engine_information(self, format: Any) -> str:  # noqa: A002
        import onnx

        fmt = {"int8": "Thirty-two wide channel vectorized row major Int8 format with 3 spatial dimensions",
               "fp16": "Row major linear FP16 format"}.get(self.engine.header["precision"], "Row major linear FP32")
        v11 = int(self.engine.header["trt_version"].split(".")[0]) >= 11
        dtype = {"int8": "Int8", "fp16": "Half"}.get(self.engine.header["precision"], "Float")
        layers = []
        for n in onnx.load_from_string(self.engine.onnx).graph.node:
            if n.op_type in ("Conv", "Gemm", "MatMul"):
                out = {"Name": n.output[0], "DataType": dtype, "Format": fmt} if v11 else \
                    {"Name": n.output[0], "Format/Datatype": fmt}
                layers.append({"Name": n.name, "LayerType": "CaskConvolution" if n.op_type == "Conv" else "CaskGemm",
                               "Outputs": [out]})
        io = [n for n, _i, _d in self.engine.io]
        return json.dumps({"Layers": layers, **({"I/O Tensors": [{"Name": n} for n in io]} if v11 else {"Bindings": io})})


class _Context:
    def __init__(self, engine: "_Engine") -> None:
        self.engine = engine
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.addresses: Dict[str, int] = {}

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(shape)
        prof = self.engine.header["profile"].get(name)
        if prof is None or len(shape) != len(prof[0]) or any(not lo <= s <= hi for lo, s, hi in zip(prof[0], shape, prof[2])):
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> Tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        inputs = [n for n, i, _d in self.engine.io if i]
        if any(n not in self.shapes for n in inputs):
            return (-1,)
        feeds = {n: np.zeros(self.shapes[n], np.float32) for n in inputs}
        outs = self.engine.session.run([name], feeds)
        return tuple(outs[0].shape)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if not isinstance(memory, int):
            raise TypeError(f"set_tensor_address(): incompatible function arguments (memory must be int, "
                            f"got {type(memory).__name__})")
        if name not in {n for n, _i, _d in self.engine.io} or memory == 0:
            return False
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if not isinstance(stream_handle, int):
            raise TypeError("execute_async_v3(): incompatible function arguments (stream_handle must be int)")
        from scanside.engines.backends.tensorrt_engine import _import_cudart

        cudart = _import_cudart()
        io = self.engine.io
        if any(n not in self.addresses for n, _i, _d in io) or any(n not in self.shapes for n, i, _d in io if i):
            return False
        outs = {n: self.get_tensor_shape(n) for n, i, _d in io if not i}
        ins = {n: self.shapes[n] for n, i, _d in io if i}

        def kernel() -> None:
            feeds = {}
            for n, shape in ins.items():
                host = np.empty(shape, np.float32)
                _check(cudart.cudaMemcpy(host.ctypes.data, self.addresses[n], host.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
                feeds[n] = host
            results = self.engine.session.run(list(outs), feeds)
            for n, r in zip(outs, results):
                r = np.ascontiguousarray(r, np.float32)
                _check(cudart.cudaMemcpy(self.addresses[n], r.ctypes.data, r.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))

        if isinstance(cudart, FakeCudart):
            for n, i, _d in io:
                shape = ins[n] if i else outs[n]
                if not cudart.is_device(self.addresses[n], int(np.prod(shape)) * 4):
                    return False  # not a device buffer of the tensor's size
            return cudart.enqueue(stream_handle, kernel)
        # real CUDA (bench/gpu_check.py): wait for the stream's input copies, then compute
        _check(cudart.cudaStreamSynchronize(stream_handle))
        kernel()
        return True


def _check(result: Any) -> None:
    if int(result[0]) != 0:
        raise RuntimeError(f"CUDA error {result[0]}")


class _Engine:
    def __init__(self, header: Dict[str, Any], onnx_bytes: bytes) -> None:
        import onnxruntime as ort

        self.header = header
        self.onnx = onnx_bytes
        self.io = [(n, i, DataType[d]) for n, i, d in header["io"]]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        self.device_memory_size_v2 = 1 << 20

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, index: int) -> str:
        return self.io[index][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return next((TensorIOMode.INPUT if i else TensorIOMode.OUTPUT) for n, i, _d in self.io if n == name)

    def get_tensor_dtype(self, name: str) -> DataType:
        return next(d for n, _i, d in self.io if n == name)

    def create_execution_context(self) -> _Context:
        return _Context(self)

    def create_engine_inspector(self) -> _Inspector:
        return _Inspector(self)


class FakeTensorRT(types.ModuleType):
    DataType = DataType
    TensorIOMode = TensorIOMode
    Logger = Logger

    def __init__(self, version: str, gpu: FakeGPU) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.gpu = gpu
        self.events: List[str] = []
        major, minor = (int(x) for x in version.split(".")[:2])
        self.major = major
        mod = self

        hw = {"NONE": 0, "AMPERE_PLUS": 1}
        if (major, minor) >= (10, 9):
            hw["SAME_COMPUTE_CAPABILITY"] = 2
        self.HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel", hw)
        flags = {"TF32": 6, "VERSION_COMPATIBLE": 13, "GPU_FALLBACK": 3}
        if major < 11:
            flags.update({"FP16": 0, "INT8": 2})
        self.BuilderFlag = enum.Enum("BuilderFlag", flags)
        # TensorRT 11: kEXPLICIT_BATCH is gone and kSTRONGLY_TYPED (= 0) is accepted but ignored
        nflags = {"STRONGLY_TYPED": 0} if major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", nflags)
        self.MemoryPoolType = enum.Enum("MemoryPoolType", {"WORKSPACE": 0})
        self.ProfilingVerbosity = enum.Enum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
        self.DeviceType = enum.Enum("DeviceType", {"GPU": 0, "DLA": 1})
        self.LayerInformationFormat = enum.Enum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})
        self.OnnxParser = _Parser

        if major < 11:
            class IInt8EntropyCalibrator2:
                def __init__(self) -> None:
                    pass
            self.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                if not isinstance(logger, Logger):
                    raise TypeError("Runtime(logger)")
                self._dla = -1
                self.engine_host_code_allowed = False

            @property
            def num_DLA_cores(self) -> int:
                return mod.gpu.dla_cores

            @property
            def DLA_core(self) -> int:
                return self._dla

            @DLA_core.setter
            def DLA_core(self, core: int) -> None:
                mod.events.append(f"runtime.DLA_core={core}")
                self._dla = int(core)

            def deserialize_cuda_engine(self, serialized_engine: bytes) -> Optional[_Engine]:
                mod.events.append("deserialize_cuda_engine")
                data = bytes(serialized_engine)
                if not data.startswith(MAGIC):
                    return None
                hlen = int.from_bytes(data[8:12], "little")
                header = json.loads(data[12:12 + hlen])
                if header["version_compatible"]:
                    if not self.engine_host_code_allowed:
                        return None
                elif header["trt_version"] != mod.__version__:
                    return None
                if header["dla_core"] is not None and header["dla_core"] != self._dla:
                    return None
                return _Engine(header, data[12 + hlen:])

        class Config:
            def __init__(self) -> None:
                self.flags: set = {"TF32"}  # IBuilderConfig: kTF32 is set by default
                self.profiles: List[_Profile] = []
                self.calibration_profile: Optional[_Profile] = None
                self.int8_calibrator: Any = None
                self.hardware_compatibility_level = mod.HardwareCompatibilityLevel.NONE
                self.profiling_verbosity = mod.ProfilingVerbosity.LAYER_NAMES_ONLY
                self.builder_optimization_level = 3
                self.default_device_type = mod.DeviceType.GPU
                self.DLA_core = -1
                self.pool: Dict[Any, int] = {}
                self._timing: Optional[_TimingCache] = None

            def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
                self.pool[pool] = int(pool_size)

            def set_flag(self, flag: Any) -> None:
                if not isinstance(flag, mod.BuilderFlag):
                    raise TypeError("flag must be a BuilderFlag")
                self.flags.add(flag.name)

            def clear_flag(self, flag: Any) -> None:
                self.flags.discard(flag.name)

            def get_flag(self, flag: Any) -> bool:
                return flag.name in self.flags

            def add_optimization_profile(self, profile: _Profile) -> int:
                if not profile.shapes:
                    return -1
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def set_calibration_profile(self, profile: _Profile) -> bool:
                if not profile.shapes:
                    return False
                self.calibration_profile = profile
                return True

            def create_timing_cache(self, serialized_timing_cache: bytes) -> _TimingCache:
                data = bytes(serialized_timing_cache)
                key = data.decode(errors="replace").partition(":")[2] if data else mod._device_key()
                return _TimingCache(data, key)

            def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
                if cache.device_key != mod._device_key() and not ignore_mismatch:
                    return False
                self._timing = cache
                return True

            def get_timing_cache(self) -> Optional[_TimingCache]:
                return self._timing

        class Builder:
            def __init__(self, logger: Logger) -> None:
                self.logger = logger

            @property
            def num_DLA_cores(self) -> int:
                return mod.gpu.dla_cores

            def create_network(self, flags: int = 0) -> _Network:
                return _Network(flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> _Profile:
                return _Profile()

            def build_serialized_network(self, network: _Network, config: Config) -> Optional[_HostMemory]:
                mod.events.append("build_serialized_network")
                if network.onnx is None or not config.profiles:
                    return None
                prof = config.profiles[0]
                if any(n not in prof.shapes for n, i, _d in network.io if i):
                    return None
                hw = config.hardware_compatibility_level.name
                if hw == "AMPERE_PLUS" and mod.gpu.cc < (8, 0):
                    return None
                precision = "int8" if "INT8" in config.flags else "fp16" if "FP16" in config.flags else "fp32"
                if config.int8_calibrator is not None:
                    if "INT8" not in config.flags or config.calibration_profile is None:
                        return None
                    if not mod._calibrate(config.int8_calibrator, network, config.calibration_profile):
                        return None
                if any(n in ("DequantizeLinear",) for n in _op_types(network.onnx)):
                    precision = "int8"
                strongly = mod.major >= 11 or bool(network.flags & (1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
                if strongly and config.flags & {"INT8", "FP16"}:
                    return None  # precision flags are not allowed on a strongly typed network
                if config.default_device_type.name == "DLA" and not 0 <= config.DLA_core < mod.gpu.dla_cores:
                    return None
                if config._timing is not None and not config._timing.data:
                    config._timing = _TimingCache(f"TIMING:{mod._device_key()}".encode(), mod._device_key())
                header = {"trt_version": mod.__version__, "precision": precision,
                          "version_compatible": "VERSION_COMPATIBLE" in config.flags,
                          "dla_core": config.DLA_core if config.default_device_type.name == "DLA" else None,
                          "hw": hw, "tf32": "TF32" in config.flags,
                          "profile": {k: [list(x) for x in v] for k, v in prof.shapes.items()},
                          "io": [[n, i, d.name] for n, i, d in network.io]}
                h = json.dumps(header).encode()
                return _HostMemory(MAGIC + len(h).to_bytes(4, "little") + h + network.onnx)

        self.Runtime = Runtime
        self.Builder = Builder

    def _device_key(self) -> str:
        return f"{self.gpu.name}/{self.__version__}"

    def _calibrate(self, calibrator: Any, network: _Network, profile: _Profile) -> bool:
        from scanside.engines.backends.tensorrt_engine import _import_cudart

        cudart = _import_cudart()
        cached = calibrator.read_calibration_cache()
        if cached:
            return True
        names = [n for n, i, _d in network.io if i]
        batch = calibrator.get_batch_size()
        if not isinstance(batch, int) or batch < 1:
            return False
        seen = 0
        while True:
            ptrs = calibrator.get_batch(names)
            if ptrs is None:
                break
            for n, p in zip(names, ptrs):
                opt = profile.shapes[n][1]
                host = np.empty(opt, np.float32)
                _check(cudart.cudaMemcpy(host.ctypes.data, int(p), host.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
                if not np.isfinite(host).all():
                    return False
            seen += 1
        if not seen:
            return False
        calibrator.write_calibration_cache(_HostMemory(f"TRT-{_version_number(self.__version__)}-EntropyCalibration2\n"
                                                        f"{names[0]}: 3c010a14\n".encode()))
        return True


def _version_number(v: str) -> int:
    a, b, c = (int(x) for x in v.split(".")[:3])
    return a * 10000 + b * 100 + c


def _op_types(onnx_bytes: bytes) -> set:
    import onnx

    return {n.op_type for n in onnx.load_from_string(onnx_bytes).graph.node}


# =============================================================================================
# installing them
# =============================================================================================
class FakeGPUEnv:
    """Puts the fakes into sys.modules (``tensorrt`` and/or ``cuda.bindings.runtime``) and takes them out
    again.  ``cudart=None`` leaves the real cuda bindings in place (bench/gpu_check.py on a GPU)."""

    def __init__(self, trt_version: Optional[str] = "10.3.0.26", gpu: Optional[FakeGPU] = None,
                 fake_cuda: bool = True) -> None:
        self.gpu = gpu or FakeGPU()
        self.trt = FakeTensorRT(trt_version, self.gpu) if trt_version else None
        self.cudart = FakeCudart(self.gpu) if fake_cuda else None
        self._saved: Dict[str, Any] = {}

    def _set(self, name: str, mod: Any) -> None:
        self._saved.setdefault(name, sys.modules.get(name))
        sys.modules[name] = mod

    def __enter__(self) -> "FakeGPUEnv":
        if self.trt is not None:
            self._set("tensorrt", self.trt)
        else:  # tensorrt must not import
            self._set("tensorrt", None)
        if self.cudart is not None:
            cuda = types.ModuleType("cuda")
            bindings = types.ModuleType("cuda.bindings")
            bindings.runtime = self.cudart  # type: ignore[attr-defined]
            cuda.bindings = bindings  # type: ignore[attr-defined]
            self._set("cuda", cuda)
            self._set("cuda.bindings", bindings)
            self._set("cuda.bindings.runtime", self.cudart)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, mod in self._saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
        self._saved = {}

    def leaks(self) -> Dict[str, int]:
        c = self.cudart
        return {} if c is None else {"device": len(c.device), "pinned": len(c.pinned), "streams": len(c.streams)}
