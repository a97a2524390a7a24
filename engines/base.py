"""The one interface every inference back end implements, and input validation against the manifest."""
from __future__ import annotations

import abc
import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from scanside.engines.manifest import ModelFile, ModelManifest, TensorSpec, verify_sha256

# dtype names across the libraries we speak to; the manifest uses numpy names.
ONNX_TO_NUMPY = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool",
}
NUMPY_TO_KSERVE = {
    "float32": "FP32", "float16": "FP16", "float64": "FP64", "int8": "INT8", "uint8": "UINT8",
    "int16": "INT16", "int32": "INT32", "int64": "INT64", "bool": "BOOL",
}
KSERVE_TO_NUMPY = {v: k for k, v in NUMPY_TO_KSERVE.items()}
# tensorrt.DataType member names -> numpy (None: no numpy equivalent, the engine must not expose it)
TRT_TO_NUMPY: Dict[str, Optional[str]] = {
    "FLOAT": "float32", "HALF": "float16", "INT8": "int8", "UINT8": "uint8", "INT32": "int32",
    "INT64": "int64", "BOOL": "bool", "BF16": None, "FP8": None, "INT4": None, "FP4": None, "E8M0": None,
}


class EngineError(RuntimeError):
    """Base class for engine failures."""


class EngineUnavailable(EngineError):
    """The back end cannot run here (library missing, no device, incompatible plan); `reason` says why."""

    def __init__(self, backend: str, reason: str):
        self.backend = backend
        self.reason = reason
        super().__init__(f"{backend}: {reason}")


class ManifestMismatch(EngineError):
    """The model file (or remote model) does not match what its manifest says."""


class InputValidationError(EngineError, ValueError):
    """Inputs do not match the manifest's tensor specs."""


@dataclasses.dataclass
class EngineInfo:
    backend: str
    model: str
    variant: Optional[str]
    precision: Optional[str]
    device: str
    library_versions: Dict[str, str] = dataclasses.field(default_factory=dict)
    providers: List[str] = dataclasses.field(default_factory=list)
    threads: Dict[str, Optional[int]] = dataclasses.field(default_factory=dict)
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def default_cache_root() -> Path:
    """Where compiled-model caches live when no one says (the one place the engines read SCANSIDE_CACHE_DIR):
    a library default for the tools (scanside models / convert, bench); the agent passes [engines] cache_dir."""
    return Path(os.environ.get("SCANSIDE_CACHE_DIR", Path.home() / ".cache" / "scanside"))


def _fmt_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def validate_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, Any], *, model: str = "model",
                    cast_scalars: bool = False) -> Dict[str, np.ndarray]:
    """Check *inputs* against *specs*: names (none missing, none unknown), dtype, rank, static
    dims and named dynamic dims (same name -> same size).  Returns C-contiguous arrays.
    Every problem is collected and reported together."""
    problems: List[str] = []
    expected = {s.name: s for s in specs}
    missing = [n for n in expected if n not in inputs]
    unknown = [n for n in inputs if n not in expected]
    if missing:
        problems.append(f"missing input(s) {missing}")
    if unknown:
        problems.append(f"unknown input(s) {unknown}; the model takes {list(expected)}")
    out: Dict[str, np.ndarray] = {}
    bound: Dict[str, Tuple[int, str]] = {}
    for name, spec in expected.items():
        if name not in inputs:
            continue
        arr = inputs[name]
        if not isinstance(arr, np.ndarray):
            problems.append(f"input {name!r}: expected numpy.ndarray, got {type(arr).__name__}")
            continue
        if arr.dtype != np.dtype(spec.dtype):
            problems.append(f"input {name!r}: dtype {arr.dtype} but the model takes {spec.dtype}")
        if arr.ndim != spec.rank:
            problems.append(f"input {name!r}: rank {arr.ndim} (shape {list(arr.shape)}) but the model takes "
                            f"rank {spec.rank} {_fmt_shape(spec.shape)}")
        else:
            for axis, (want, got) in enumerate(zip(spec.shape, arr.shape)):
                if isinstance(want, int) and want != got:
                    problems.append(f"input {name!r}: axis {axis} has size {got} but the model takes {want} "
                                    f"(shape {list(arr.shape)} vs {_fmt_shape(spec.shape)})")
                elif isinstance(want, str):
                    if want in bound and bound[want][0] != got:
                        problems.append(f"input {name!r}: axis {axis} ({want!r}) has size {got} but "
                                        f"{bound[want][1]} gave {want!r} = {bound[want][0]}")
                    bound.setdefault(want, (got, f"input {name!r}"))
                if got == 0:
                    problems.append(f"input {name!r}: axis {axis} is empty")
        out[name] = np.ascontiguousarray(arr)
    if problems:
        raise InputValidationError(f"{model}: invalid inputs: " + "; ".join(problems))
    return out


class Engine(abc.ABC):
    """An inference back end.  Life cycle: construct (options) -> load(manifest, variant) ->
    warmup() -> run(...)* -> close().  Engines are also context managers."""

    backend: ClassVar[str] = "abstract"

    def __init__(self) -> None:
        self.manifest: Optional[ModelManifest] = None
        self.variant: Optional[str] = None

    # -- availability ---------------------------------------------------------------------------
    @classmethod
    def availability(cls) -> Tuple[bool, str]:
        """(True, versions) when the libraries this back end needs import here, else (False, why)."""
        return True, ""

    # -- life cycle -----------------------------------------------------------------------------
    @abc.abstractmethod
    def load(self, manifest: ModelManifest, variant: Optional[str] = None, *, verify: bool = True) -> "Engine":
        """Load the model.  With verify=True the file's sha256 is checked against the manifest."""

    @abc.abstractmethod
    def _run(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        m = self._require_loaded()
        feeds = validate_inputs(m.inputs, inputs, model=m.ref)
        return self._run(feeds)

    def warmup(self, runs: int = 1, dynamic: int = 1) -> None:
        """Run zeros through the model (dynamic dims = *dynamic*) so the first real call is not slow."""
        m = self._require_loaded()
        feeds = {s.name: np.zeros(self._warmup_shape(s, dynamic), dtype=s.dtype) for s in m.inputs}
        for _ in range(runs):
            self._run(feeds)

    def _warmup_shape(self, spec: TensorSpec, dynamic: int) -> Tuple[int, ...]:
        return spec.concrete_shape(dynamic)

    @abc.abstractmethod
    def describe(self) -> EngineInfo:
        ...

    def close(self) -> None:
        self.manifest = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- helpers --------------------------------------------------------------------------------
    def _require_loaded(self) -> ModelManifest:
        if self.manifest is None:
            raise EngineError(f"{self.backend}: no model loaded")
        return self.manifest

    def _loaded_file(self) -> ModelFile:
        """The manifest's entry for the loaded variant."""
        m = self._require_loaded()
        if self.variant is None:
            raise EngineError(f"{self.backend}: no model variant loaded")
        return m.files[self.variant]

    @staticmethod
    def _model_file(manifest: ModelManifest, variant: Optional[str], verify: bool) -> Tuple[str, Path]:
        variant = manifest.pick_variant(variant)
        mf = manifest.files[variant]
        path = manifest.resolve(mf.path)
        if verify:
            verify_sha256(path, mf.sha256)
        elif not path.is_file():
            raise FileNotFoundError(f"{manifest.ref}: model file missing: {path}")
        return variant, path
