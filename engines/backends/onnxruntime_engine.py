"""ONNX Runtime back end: CPU by default; CUDA / TensorRT execution providers when this build has them.

Runs FP32 and INT8 Q/DQ ONNX files alike (Q/DQ is plain ONNX).  `describe()` reports the
providers the session actually uses (`session.get_providers()`), not the ones asked for.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from scanside.engines.base import ONNX_TO_NUMPY, Engine, EngineInfo, EngineUnavailable, ManifestMismatch, default_cache_root
from scanside.engines.manifest import ModelManifest

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _ort():
    try:
        import onnxruntime as ort
    except Exception as e:  # pragma: no cover - onnxruntime is a runtime dependency
        raise EngineUnavailable("onnxruntime", f"onnxruntime not importable: {e}") from e
    return ort


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, providers: Optional[Sequence[str]] = None, *, intra_op_threads: Optional[int] = None,
                 inter_op_threads: Optional[int] = None, graph_optimization: str = "all",
                 provider_options: Optional[Dict[str, Dict[str, Any]]] = None,
                 optimized_model_path: Optional[str] = None, log_severity: int = 3,
                 cpu_memory_arena: bool = False, allow_spinning: bool = False,
                 cache_dir: Optional[Path] = None) -> None:
        """providers: preference order, filtered by what this onnxruntime build offers (CPU is always
        appended last).  intra/inter_op_threads: None = onnxruntime's default (all cores).
        graph_optimization: disable | basic | extended | all.
        cpu_memory_arena: off by default: the arena keeps every 3D activation buffer after the first
        run (measured on the TAPS model: 1116 MB resident with it, 169 MB without, same run time), and a
        daemon that runs a model a few times an hour should give that memory back.
        allow_spinning: off by default: onnxruntime's pool threads otherwise busy-wait for more work after
        each run, taking the cores from whatever runs next (ingestion, another engine such as OpenVINO)."""
        super().__init__()
        if graph_optimization not in _OPT_LEVELS:
            raise ValueError(f"graph_optimization must be one of {list(_OPT_LEVELS)}")
        self.requested_providers = list(providers) if providers is not None else list(DEFAULT_PROVIDERS)
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.graph_optimization = graph_optimization
        self.provider_options = dict(provider_options or {})
        self.optimized_model_path = optimized_model_path
        self.log_severity = log_severity
        self.cpu_memory_arena = cpu_memory_arena
        self.allow_spinning = allow_spinning
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None  # None: scanside.engines.base.default_cache_root()
        self.session: Any = None
        self.path: Optional[Path] = None
        self.skipped_providers: Dict[str, str] = {}
        self._output_names: List[str] = []

    @classmethod
    def availability(cls) -> Tuple[bool, str]:
        try:
            ort = _ort()
        except EngineUnavailable as e:
            return False, e.reason
        return True, f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})"

    def _providers(self) -> List[Tuple[str, Dict[str, Any]]]:
        ort = _ort()
        available = set(ort.get_available_providers())
        chosen: List[Tuple[str, Dict[str, Any]]] = []
        self.skipped_providers = {}
        wanted = list(self.requested_providers)
        if "CPUExecutionProvider" not in wanted:
            wanted.append("CPUExecutionProvider")
        for p in wanted:
            if p not in available:
                self.skipped_providers[p] = "not in this onnxruntime build"
                continue
            opts = dict(self.provider_options.get(p, {}))
            if p == "TensorrtExecutionProvider":
                cache = (self.cache_dir or default_cache_root()) / "ort-trt-cache"
                opts.setdefault("trt_engine_cache_enable", True)
                opts.setdefault("trt_engine_cache_path", str(cache))
                opts.setdefault("trt_timing_cache_enable", True)
                opts.setdefault("trt_timing_cache_path", str(cache))
            chosen.append((p, opts))
        return chosen

    def load(self, manifest: ModelManifest, variant: Optional[str] = None, *, verify: bool = True) -> "OnnxRuntimeEngine":
        ort = _ort()
        variant, path = self._model_file(manifest, variant, verify)
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[self.graph_optimization])
        so.enable_cpu_mem_arena = self.cpu_memory_arena
        spin = "1" if self.allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if self.intra_op_threads is not None:
            so.intra_op_num_threads = int(self.intra_op_threads)
        if self.inter_op_threads is not None:
            so.inter_op_num_threads = int(self.inter_op_threads)
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if self.inter_op_threads > 1 else \
                ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = self.log_severity
        if self.optimized_model_path:
            so.optimized_model_filepath = self.optimized_model_path
        providers = self._providers()
        for p, _ in providers:
            if p == "TensorrtExecutionProvider":
                Path(dict(providers)[p]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        session = ort.InferenceSession(str(path), sess_options=so, providers=[p for p, _ in providers],
                                       provider_options=[o for _, o in providers])
        self._check_against_manifest(session, manifest, path)
        self.session = session
        self.manifest, self.variant, self.path = manifest, variant, path
        self._output_names = [o.name for o in manifest.outputs]
        return self

    @staticmethod
    def _check_against_manifest(session: Any, manifest: ModelManifest, path: Path) -> None:
        problems = []
        for kind, metas, specs in (("input", session.get_inputs(), manifest.inputs),
                                   ("output", session.get_outputs(), manifest.outputs)):
            got = {m.name: m for m in metas}
            for spec in specs:
                meta = got.get(spec.name)
                if meta is None:
                    problems.append(f"{kind} {spec.name!r} not in the ONNX file (it has {list(got)})")
                    continue
                dt = ONNX_TO_NUMPY.get(meta.type)
                if dt != spec.dtype:
                    problems.append(f"{kind} {spec.name!r}: ONNX type {meta.type}, manifest {spec.dtype}")
                if len(meta.shape) != spec.rank:
                    problems.append(f"{kind} {spec.name!r}: ONNX rank {len(meta.shape)} {meta.shape}, "
                                    f"manifest rank {spec.rank} {spec.shape}")
                else:
                    for a, (m_dim, s_dim) in enumerate(zip(meta.shape, spec.shape)):
                        if isinstance(m_dim, int) and isinstance(s_dim, int) and m_dim != s_dim:
                            problems.append(f"{kind} {spec.name!r} axis {a}: ONNX {m_dim}, manifest {s_dim}")
            if kind == "input":
                extra = [n for n in got if n not in {s.name for s in specs}]
                if extra:
                    problems.append(f"ONNX inputs not in the manifest: {extra}")
        if problems:
            raise ManifestMismatch(f"{manifest.ref}: {path.name} does not match its manifest: " + "; ".join(problems))

    def _run(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        outs = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, outs))

    @property
    def providers_used(self) -> List[str]:
        return list(self.session.get_providers()) if self.session is not None else []

    def describe(self) -> EngineInfo:
        ort = _ort()
        m = self._require_loaded()
        used = self.providers_used
        device = "cpu"
        if used and used[0] == "TensorrtExecutionProvider":
            device = "cuda (TensorRT EP)"
        elif used and used[0] == "CUDAExecutionProvider":
            device = "cuda"
        so = self.session.get_session_options()
        return EngineInfo(
            backend=self.backend, model=m.ref, variant=self.variant, precision=self._loaded_file().precision,
            device=device,
            library_versions={"onnxruntime": ort.__version__, "numpy": np.__version__,
                              "python": platform.python_version()},
            providers=used,
            threads={"intra_op": so.intra_op_num_threads or None, "inter_op": so.inter_op_num_threads or None},
            extra={"file": str(self.path), "graph_optimization": self.graph_optimization,
                   "skipped_providers": dict(self.skipped_providers), "cpu": platform.processor() or platform.machine()},
        )

    def close(self) -> None:
        self.session = None
        super().close()
