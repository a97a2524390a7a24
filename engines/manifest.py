"""Model manifest: what a model is, what it expects, which files carry it and how to check them.

One ``manifest.json`` per model version, stored as
``<store root>/<name>/<version>/manifest.json`` beside its files (paths in the manifest are
relative to that directory).  The JSON schema is published with
``ModelManifest.model_json_schema()`` (see ``python -m scanside.agent.cli.models models schema``).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from scanside.engines.spec import PreprocessSpec

MANIFEST_FILENAME = "manifest.json"
SCHEMA_VERSION = 1

#: numpy dtype names accepted in a TensorSpec (ONNX/TensorRT/KServe names are mapped in scanside.engines.base)
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")

#: int8_implicit: a TensorRT 10 plan calibrated with IInt8EntropyCalibrator2 (no Q/DQ file behind it)
Precision = Literal["fp32", "fp16", "int8_qdq_sym", "int8_qdq_u8s8", "int8_implicit"]
Task = Literal["sequence_classification", "cspca_detection", "gland_segmentation", "other"]
HardwareCompatibility = Literal["none", "ampere_plus", "same_compute_capability"]
Dim = Union[int, str, None]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def semver_key(version: str) -> tuple:
    """Sort key for semantic versions (a release sorts after its pre-releases)."""
    m = _SEMVER_RE.match(version)
    if not m:
        raise ValueError(f"not a semantic version (MAJOR.MINOR.PATCH[-pre][+build]): {version!r}")
    major, minor, patch, pre, _build = m.groups()
    if pre is None:
        pre_key: tuple = ((1,),)
    else:
        pre_key = ((0,),) + tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (int(major), int(minor), int(patch), pre_key)


def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class IntegrityError(RuntimeError):
    """A model file is missing or its sha256 differs from the manifest's: it is never loaded."""

    def __init__(self, path: Path, expected: str, actual: Optional[str]):
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        if actual is None:
            msg = f"model file missing: {self.path} (manifest sha256 {expected})"
        else:
            msg = (f"model file refused, sha256 mismatch: {self.path}\n"
                   f"  manifest sha256: {expected}\n  file sha256:     {actual}")
        super().__init__(msg)


def verify_sha256(path: Union[str, Path], expected: str) -> str:
    """Hash *path* and compare with *expected*; raise IntegrityError naming the file and both hashes."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(path, expected, None)
    actual = sha256_file(path)
    if actual != expected.lower():
        raise IntegrityError(path, expected, actual)
    return actual


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    """One named input or output.  Dimensions: int = static, str = named dynamic
    (equal names must be equal sizes within one call), None = free dynamic."""

    name: str
    dtype: str = Field("float32", description="numpy dtype name: " + ", ".join(DTYPES))
    shape: List[Dim]
    description: Optional[str] = None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unsupported dtype {v!r}; one of {', '.join(DTYPES)}")
        return v

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: List[Dim]) -> List[Dim]:
        for d in v:
            if isinstance(d, int) and not isinstance(d, bool) and d < 0:
                raise ValueError("static dimensions must be >= 0; use null or a name for dynamic ones")
        return v

    @property
    def rank(self) -> int:
        return len(self.shape)

    def concrete_shape(self, dynamic: int = 1, bindings: Optional[Dict[str, int]] = None) -> Tuple[int, ...]:
        bindings = bindings or {}
        return tuple(d if isinstance(d, int) else bindings.get(d, dynamic) if isinstance(d, str) else dynamic
                     for d in self.shape)


class ModelFile(_Strict):
    """One runnable file of the model (ONNX), by variant name (e.g. 'fp32', 'int8_u8s8')."""

    path: str = Field(description="relative to the manifest's directory")
    sha256: str
    precision: Precision = "fp32"
    format: Literal["onnx"] = "onnx"
    size_bytes: Optional[int] = None
    opset: Optional[int] = None
    calibration: Optional[Dict[str, Any]] = Field(None, description="for INT8: dataset, method, samples, tool")
    notes: Optional[str] = None

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        v = v.lower()
        if not _SHA256_RE.match(v):
            raise ValueError("sha256 must be 64 hex digits")
        return v


class ShapeRange(_Strict):
    min: List[int]
    opt: List[int]
    max: List[int]


class TensorRTPlan(_Strict):
    """A serialized TensorRT engine and what it was built for."""

    path: str
    sha256: str
    trt_version: str = Field(description="TensorRT version the plan was built with, e.g. '10.3.0' or '11.4.1'")
    compute_capability: str = Field(description="GPU compute capability of the build device, e.g. '8.7'")
    precision: Precision = "fp32"
    hardware_compatibility: HardwareCompatibility = "none"
    version_compatible: bool = Field(False, description="built with BuilderFlag.VERSION_COMPATIBLE")
    source_variant: Optional[str] = Field(None, description="key of the ONNX file in `files` it was built from")
    gpu_name: Optional[str] = None
    platform: Optional[str] = Field(None, description="OS-architecture[-tegra] that built it, e.g. 'linux-x86_64', "
                                                      "'linux-aarch64-tegra' (plans are not portable across platforms)")
    profiles: List[Dict[str, ShapeRange]] = Field(default_factory=list,
                                                  description="optimization profiles: input name -> min/opt/max")
    min_device_memory_bytes: Optional[int] = None
    dla_core: Optional[int] = None
    built_at: Optional[str] = None
    notes: Optional[str] = None

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        v = v.lower()
        if not _SHA256_RE.match(v):
            raise ValueError("sha256 must be 64 hex digits")
        return v

    @field_validator("compute_capability")
    @classmethod
    def _cc(cls, v: str) -> str:
        if not re.match(r"^\d+\.\d+$", v):
            raise ValueError("compute_capability must look like '8.6'")
        return v

    @field_validator("trt_version")
    @classmethod
    def _trtv(cls, v: str) -> str:
        if not re.match(r"^\d+\.\d+(\.\d+){0,2}$", v):
            raise ValueError("trt_version must look like '10.3.0' (major.minor[.patch[.build]])")
        return v


class CspcaIO(_Strict):
    """How a csPCa detection model's tensors are read, declared by whoever exports it (a site's or vendor's
    model trained on real patients, e.g. a PI-CAI baseline).  The defaults describe the reference model
    (cspca-reference): one input ``input`` (channels = preprocessing.channels on one grid), a likelihood map
    ``likelihood`` already in 0..1 and an exam probability ``probability``.  A PI-CAI U-Net instead gives
    2-class logits (softmax, class 1 = csPCa) and no case output: its case-level likelihood is the maximum of
    the detection map, as in the PI-CAI evaluation."""

    input: str = Field("input", description="name of the model input that takes the stacked channels")
    detection_map: str = Field("likelihood", description="output holding the voxel detection map (N, C, *spatial)")
    detection_activation: Literal["none", "sigmoid", "softmax"] = Field(
        "none", description="none: the map is already a likelihood 0..1; sigmoid: logits; softmax: class logits "
        "over the channel axis")
    detection_channel: int = Field(0, ge=0, description="channel of the map that is csPCa (PI-CAI 2-class softmax: 1)")
    case_level: Literal["output", "map_max"] = Field(
        "output", description="output: the exam-level probability is the output `case_probability`; map_max: the "
        "maximum of the detection map (PI-CAI's case-level likelihood)")
    case_probability: str = Field("probability", description="output holding the exam-level probability (N, 1) or "
                                  "(N,) (case_level output)")
    case_activation: Literal["none", "sigmoid"] = "none"
    crop_on_gland: bool = Field(
        True, description="centre the preprocessing crop on the gland when the agent knows it; false: always the "
        "T2W field-of-view centre (PI-CAI models were trained on centre crops)")

    def decode(self, outputs: Dict[str, Any]) -> Tuple[Any, Any]:
        """Raw model outputs -> (likelihood map (N, 1, *spatial) float32 in 0..1, exam probability (N,) float64)."""
        import numpy as np

        # float32 throughout (NumPy keeps an array's dtype against Python floats; its stubs say float64)
        raw: np.ndarray = np.asarray(outputs[self.detection_map], dtype=np.float32)
        if self.detection_activation == "softmax":
            e = np.exp(raw - raw.max(axis=1, keepdims=True))
            raw = e / e.sum(axis=1, keepdims=True)
        elif self.detection_activation == "sigmoid":
            raw = 1.0 / (1.0 + np.exp(-np.clip(raw, -60.0, 60.0)))
        if self.detection_channel >= raw.shape[1]:
            raise ValueError(f"detection_channel {self.detection_channel} but {self.detection_map!r} has "
                             f"{raw.shape[1]} channel(s)")
        lk = np.ascontiguousarray(raw[:, self.detection_channel:self.detection_channel + 1], dtype=np.float32)
        if self.case_level == "map_max":
            prob = lk.reshape(len(lk), -1).max(axis=1).astype(np.float64)
        else:
            prob = np.asarray(outputs[self.case_probability], dtype=np.float64).reshape(len(lk), -1)[:, 0]
            if self.case_activation == "sigmoid":
                prob = 1.0 / (1.0 + np.exp(-np.clip(prob, -60.0, 60.0)))
        return lk, prob


class ModelManifest(_Strict):
    """Everything the agent needs to know about one version of one model."""

    schema_version: int = SCHEMA_VERSION
    name: str = Field(description="lower-case identifier, e.g. 'prostate-gland-taps'")
    version: str = Field(description="semantic version, e.g. '1.1.2'")
    task: Task
    description: Optional[str] = None
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    preprocessing: Optional[PreprocessSpec] = None
    labels: Optional[List[str]] = Field(None, description="class names in output order (classifiers)")
    files: Dict[str, ModelFile] = Field(description="variant -> ONNX file")
    default_variant: Optional[str] = Field(None, description="variant used when none is asked for (else 'fp32')")
    plans: List[TensorRTPlan] = Field(default_factory=list)
    postprocessing: Dict[str, Any] = Field(default_factory=dict)
    training_data: Optional[str] = None
    metrics: Dict[str, Any] = Field(default_factory=dict)
    license: Optional[str] = None
    source: Optional[str] = None
    parity: Optional[Dict[str, Any]] = Field(None, description="filled by the parity converter")
    model_card: Optional[str] = Field(None, description="path of a model card (markdown), relative")
    cspca: Optional[CspcaIO] = Field(None, description="csPCa detection models: how the outputs are read "
                                     "(default: the reference model's likelihood/probability)")

    _root: Optional[Path] = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("name must be lower-case letters, digits, '.', '_' or '-' (max 64)")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        semver_key(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ModelManifest":
        if not self.files:
            raise ValueError("files: at least one model file is required")
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [s.name for s in specs]
            if not names:
                raise ValueError(f"{kind}: at least one tensor is required")
            if len(set(names)) != len(names):
                raise ValueError(f"{kind}: duplicate tensor names {names}")
        if self.default_variant is not None and self.default_variant not in self.files:
            raise ValueError(f"default_variant {self.default_variant!r} not in files {sorted(self.files)}")
        for p in self.plans:
            if p.source_variant is not None and p.source_variant not in self.files:
                raise ValueError(f"plan {p.path}: source_variant {p.source_variant!r} not in files")
            for prof in p.profiles:
                for tname in prof:
                    if tname not in {s.name for s in self.inputs}:
                        raise ValueError(f"plan {p.path}: profile names unknown input {tname!r}")
        for path in [f.path for f in self.files.values()] + [p.path for p in self.plans]:
            pp = Path(path)
            if pp.is_absolute() or ".." in pp.parts:
                raise ValueError(f"file path must be relative and inside the model directory: {path!r}")
        if self.cspca is not None:
            self._check_cspca(self.cspca)
        return self

    def _check_cspca(self, io: CspcaIO) -> None:
        """A declared csPCa interface must name this model's tensors and fit its preprocessing."""
        if self.task != "cspca_detection":
            raise ValueError(f"cspca: only for task cspca_detection, not {self.task!r}")
        ins, outs = {s.name: s for s in self.inputs}, {s.name: s for s in self.outputs}
        if io.input not in ins:
            raise ValueError(f"cspca.input {io.input!r} is not an input of the model ({sorted(ins)})")
        for field_name in ("detection_map", "case_probability"):
            name = getattr(io, field_name)
            if (field_name == "detection_map" or io.case_level == "output") and name not in outs:
                raise ValueError(f"cspca.{field_name} {name!r} is not an output of the model ({sorted(outs)})")
        if outs[io.detection_map].rank < 5:
            raise ValueError(f"cspca.detection_map {io.detection_map!r} must be (N, C, d0, d1, d2)")
        channels = outs[io.detection_map].shape[1]
        if isinstance(channels, int) and io.detection_channel >= channels:
            raise ValueError(f"cspca.detection_channel {io.detection_channel} but the map has {channels} channel(s)")
        if self.preprocessing is None:
            raise ValueError("cspca: a csPCa model needs its preprocessing declared (preprocessing)")
        want = ins[io.input].shape
        n_in = self.preprocessing.n_input_channels
        if len(want) != 5 or (isinstance(want[1], int) and want[1] != n_in):
            raise ValueError(f"input {io.input!r} has shape {want}; the preprocessing stacks {n_in} channel(s) "
                             f"{self.preprocessing.channels} into (N, {n_in}, d0, d1, d2)")
        shape = self.preprocessing.shape
        if shape is not None and all(isinstance(d, int) for d in want[2:]) and tuple(want[2:]) != tuple(shape):
            raise ValueError(f"input {io.input!r} takes {want[2:]} voxels but the preprocessing makes {list(shape)}")

    def cspca_io(self) -> CspcaIO:
        """The declared csPCa interface, or the reference model's (defaults)."""
        return self.cspca if self.cspca is not None else CspcaIO()

    # ---- convenience -------------------------------------------------------------------------
    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def root(self) -> Optional[Path]:
        """Directory the manifest was loaded from (file paths are relative to it)."""
        return self._root

    def set_root(self, root: Union[str, Path, None]) -> "ModelManifest":
        self._root = Path(root) if root is not None else None
        return self

    def resolve(self, relpath: str) -> Path:
        if self._root is None:
            raise ValueError(f"{self.ref}: manifest has no root directory; load it from a file or set_root()")
        return self._root / relpath

    def pick_variant(self, variant: Optional[str] = None) -> str:
        if variant is None:
            variant = self.default_variant or ("fp32" if "fp32" in self.files else next(iter(self.files)))
        if variant not in self.files:
            raise KeyError(f"{self.ref}: no file variant {variant!r}; have {sorted(self.files)}")
        return variant

    def file_path(self, variant: Optional[str] = None) -> Path:
        return self.resolve(self.files[self.pick_variant(variant)].path)

    def input_spec(self, name: str) -> TensorSpec:
        for s in self.inputs:
            if s.name == name:
                return s
        raise KeyError(name)

    # ---- JSON ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Union[str, Path]) -> "ModelManifest":
        """Load a manifest.json (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILENAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
        m = cls.model_validate(data)
        return m.set_root(path.parent)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True) + "\n"

    def save(self, path: Union[str, Path]) -> Path:
        """Write to *path* (a file, or a directory that gets manifest.json); sets root."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / MANIFEST_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)
        self.set_root(path.parent)
        return path


def manifest_json_schema() -> Dict[str, Any]:
    schema = ModelManifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://scanside.invalid/schemas/model-manifest-v{SCHEMA_VERSION}.json"
    return schema


def tensor_specs_from_onnx(path: Union[str, Path]) -> Tuple[List[TensorSpec], List[TensorSpec], int]:
    """Read input/output specs and the default-domain opset from an ONNX file (needs `onnx`)."""
    import onnx  # optional (test/convert extra)
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def spec(vi: Any) -> TensorSpec:
        tt = vi.type.tensor_type
        dtype = str(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims: List[Dim] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        return TensorSpec(name=vi.name, dtype=dtype, shape=dims)

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    ins = [spec(v) for v in model.graph.input if v.name not in inits]
    outs = [spec(v) for v in model.graph.output]
    return ins, outs, opset
