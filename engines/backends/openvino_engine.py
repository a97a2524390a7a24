"""OpenVINO back end (CPU): the same ONNX and INT8 Q/DQ files as ONNX Runtime, compiled by OpenVINO.

Optional extra `openvino` (the OpenVINO runtime from PyPI).  On x86 CPUs without VNNI it is the
fastest CPU path measured here (bench/bench_cpu.py): OpenVINO fuses Q/DQ pairs into real INT8
convolutions and its 3-D convolution kernels beat ONNX Runtime's MLAS on FP32 too.

Options: PERFORMANCE_HINT (LATENCY by default: one request, all threads on it), INFERENCE_NUM_THREADS,
ENABLE_CPU_PINNING, INFERENCE_PRECISION_HINT (f32 by default so FP32 parity holds on CPUs whose
OpenVINO default would be bf16), and CACHE_DIR: compiled models are cached on disk (default
$SCANSIDE_CACHE_DIR/openvino, i.e. ~/.cache/scanside/openvino) so a restart imports the compiled blob
instead of recompiling.  Dynamic dims named in the manifest (e.g. "batch") are made dynamic in the
OpenVINO model even when the ONNX file fixed them.
"""
from __future__ import annotations

import platform
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from scanside.engines.base import Engine, EngineInfo, EngineUnavailable, ManifestMismatch, default_cache_root
from scanside.engines.manifest import ModelManifest

#: OpenVINO element type names -> numpy dtype names
OV_TO_NUMPY = {"f32": "float32", "f16": "float16", "f64": "float64", "i8": "int8", "u8": "uint8",
               "i16": "int16", "i32": "int32", "i64": "int64", "boolean": "bool"}
HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")


def _ov() -> Any:
    try:
        import openvino as ov
    except Exception as e:
        raise EngineUnavailable("openvino", f"openvino not importable ({e}); pip install 'scanside[openvino]'") from e
    return ov


def default_cache_dir() -> Path:
    return default_cache_root() / "openvino"


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "x86", "i686", "i386")


class OpenVinoEngine(Engine):
    backend = "openvino"

    def __init__(self, device: str = "CPU", *, threads: Optional[int] = None, pinning: Optional[bool] = None,
                 hint: str = "LATENCY", inference_precision: Optional[str] = "f32",
                 cache_dir: "Optional[str | Path]" = None, cache: bool = True,
                 config: Optional[Dict[str, Any]] = None) -> None:
        """threads: INFERENCE_NUM_THREADS (None: OpenVINO's choice, all physical cores).
        pinning: ENABLE_CPU_PINNING (None: OpenVINO's default).  hint: PERFORMANCE_HINT.
        inference_precision: INFERENCE_PRECISION_HINT (None: OpenVINO's default for the CPU).
        cache_dir/cache: where compiled models are kept (cache=False: never cached).
        config: any further OpenVINO properties, passed to compile_model as is."""
        super().__init__()
        hint = hint.upper()
        if hint not in HINTS:
            raise ValueError(f"hint must be one of {list(HINTS)}")
        if threads is not None and int(threads) < 1:
            raise ValueError("threads must be >= 1")
        self.device = device
        self.threads = int(threads) if threads is not None else None
        self.pinning = pinning
        self.hint = hint
        self.inference_precision = inference_precision
        self.cache_dir: Optional[Path] = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) \
            if cache else None
        self.extra_config = dict(config or {})
        self.compiled: Any = None
        self.path: Optional[Path] = None
        self.compile_seconds: Optional[float] = None
        self.reshaped: Dict[str, str] = {}
        self._request: Any = None
        self._lock = threading.Lock()
        self._outputs: List[Tuple[str, Any]] = []

    @classmethod
    def availability(cls) -> Tuple[bool, str]:
        try:
            ov = _ov()
        except EngineUnavailable as e:
            return False, e.reason
        try:
            devices = ov.Core().available_devices
        except Exception as e:  # pragma: no cover - broken install
            return False, f"openvino {ov.get_version()}: no devices ({e})"
        if "CPU" not in devices:
            return False, f"openvino {ov.get_version()}: no CPU device (devices {devices})"
        return True, f"openvino {ov.get_version()} ({', '.join(devices)})"

    def compile_config(self) -> Dict[str, Any]:
        cfg: Dict[str, Any] = {"PERFORMANCE_HINT": self.hint}
        if self.threads is not None:
            cfg["INFERENCE_NUM_THREADS"] = self.threads
        if self.pinning is not None:
            cfg["ENABLE_CPU_PINNING"] = bool(self.pinning)
        if self.inference_precision:
            cfg["INFERENCE_PRECISION_HINT"] = self.inference_precision
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            cfg["CACHE_DIR"] = str(self.cache_dir)
        cfg.update(self.extra_config)
        return cfg

    def load(self, manifest: ModelManifest, variant: Optional[str] = None, *, verify: bool = True) -> "OpenVinoEngine":
        ov = _ov()
        variant, path = self._model_file(manifest, variant, verify)
        core = ov.Core()
        model = core.read_model(str(path))
        self._check_and_reshape(ov, model, manifest, path)
        t0 = time.perf_counter()
        try:
            compiled = core.compile_model(model, self.device, self.compile_config())
        except RuntimeError as e:
            raise EngineUnavailable("openvino", f"{manifest.ref}: compile on {self.device} failed: {e}") from e
        self.compile_seconds = time.perf_counter() - t0
        self.compiled = compiled
        self._request = compiled.create_infer_request()
        self._outputs = [(o.name, compiled.output(o.name)) for o in manifest.outputs]
        self.manifest, self.variant, self.path = manifest, variant, path
        return self

    def _check_and_reshape(self, ov: Any, model: Any, manifest: ModelManifest, path: Path) -> None:
        """Names, dtypes and ranks as in the manifest; manifest dynamic dims made dynamic."""
        problems: List[str] = []
        new_shapes: Dict[str, Any] = {}
        self.reshaped = {}
        for kind, ports, specs in (("input", model.inputs, manifest.inputs), ("output", model.outputs, manifest.outputs)):
            by_name: Dict[str, Any] = {}
            for p in ports:
                for n in p.get_names():
                    by_name[n] = p
            for spec in specs:
                port = by_name.get(spec.name)
                if port is None:
                    problems.append(f"{kind} {spec.name!r} not in the model (it has {sorted(by_name)})")
                    continue
                dt = OV_TO_NUMPY.get(port.get_element_type().get_type_name())
                if dt != spec.dtype:
                    problems.append(f"{kind} {spec.name!r}: OpenVINO type {port.get_element_type()}, manifest {spec.dtype}")
                ps = port.get_partial_shape()
                if ps.rank.is_dynamic or ps.rank.get_length() != spec.rank:
                    problems.append(f"{kind} {spec.name!r}: rank of {ps} differs from manifest {spec.shape}")
                    continue
                if kind != "input":
                    continue
                want = []
                changed = False
                for a, (d, s) in enumerate(zip(ps, spec.shape)):
                    if isinstance(s, int):
                        if d.is_static and d.get_length() != s:
                            problems.append(f"input {spec.name!r} axis {a}: model {d.get_length()}, manifest {s}")
                        want.append(ov.Dimension(s) if d.is_dynamic else d)
                        changed = changed or d.is_dynamic
                    else:
                        want.append(ov.Dimension(-1))
                        changed = changed or d.is_static
                if changed:
                    new_shapes[port] = ov.PartialShape(want)
                    self.reshaped[spec.name] = f"{ps} -> {new_shapes[port]}"
        if problems:
            raise ManifestMismatch(f"{manifest.ref}: {path.name} does not match its manifest: " + "; ".join(problems))
        if new_shapes:
            model.reshape(new_shapes)

    def _run(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        # zero-copy in and out (the request is synchronous and held under the lock while the
        # arrays are alive); the one copy made is the result handed back, which outlives the request
        with self._lock:
            res = self._request.infer(inputs, share_inputs=True, share_outputs=True)
            return {name: np.array(res[port], copy=True) for name, port in self._outputs}

    def cached_blobs(self) -> List[Path]:
        """Compiled-model blobs in the cache dir (empty when caching is off)."""
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return []
        return sorted(self.cache_dir.glob("*.blob"))

    def describe(self) -> EngineInfo:
        ov = _ov()
        m = self._require_loaded()

        def prop(name: str) -> Any:
            try:
                v = self.compiled.get_property(name)
            except Exception:
                return None
            return v if isinstance(v, (int, float, bool, str)) or v is None else str(v)

        threads = prop("INFERENCE_NUM_THREADS")
        return EngineInfo(
            backend=self.backend, model=m.ref, variant=self.variant, precision=self._loaded_file().precision,
            device=f"{self.device} ({prop('FULL_DEVICE_NAME') or _device_name(ov, self.device)})",
            library_versions={"openvino": str(ov.get_version()), "numpy": np.__version__,
                              "python": platform.python_version()},
            providers=[f"openvino:{self.device}"],
            threads={"inference": threads if isinstance(threads, int) else self.threads},
            extra={"file": str(self.path), "performance_hint": prop("PERFORMANCE_HINT") or self.hint,
                   "cpu_pinning": prop("ENABLE_CPU_PINNING"), "num_streams": prop("NUM_STREAMS"),
                   "inference_precision": prop("INFERENCE_PRECISION_HINT"),
                   "cache_dir": str(self.cache_dir) if self.cache_dir is not None else None,
                   "compile_seconds": round(self.compile_seconds or 0.0, 4), "reshaped": dict(self.reshaped),
                   "cpu": platform.processor() or platform.machine()},
        )

    def close(self) -> None:
        self._request = None
        self.compiled = None
        super().close()


def _device_name(ov: Any, device: str) -> str:
    try:
        return str(ov.Core().get_property(device, "FULL_DEVICE_NAME"))
    except Exception:
        return "?"
