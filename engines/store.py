"""Model store: find a model's manifest, check its files, choose a back end, load it.

Layout (one or more roots, plus an optional user directory for bring-your-own ONNX):

    <root>/<name>/<version>/manifest.json
    <root>/<name>/<version>/<files named in the manifest>   (model.onnx, model.int8.onnx, *.plan, card.md)

`ModelStore.open("name")` resolves the latest version (semantic versioning), walks the back-end
preference order (default_preference(): tensorrt -> openvino -> onnxruntime on x86 with openvino
installed, OpenVINO only where its own parity entries pass; else tensorrt -> onnxruntime), and returns the loaded engine with a
`Selection` that says which back end was chosen and why each other one was skipped.  Every
model file is hashed and compared with the manifest before it is loaded; a mismatch raises
`IntegrityError` (naming the file and both hashes) and nothing is loaded -- a tampered file
is never silently replaced by another back end.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, Union

from scanside.engines.base import Engine, EngineError, EngineUnavailable
from scanside.engines.manifest import MANIFEST_FILENAME, IntegrityError, ModelFile, ModelManifest, semver_key, sha256_file, \
    tensor_specs_from_onnx, verify_sha256

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "openvino", "onnxruntime", "triton")
DEFAULT_PREFERENCE = ("tensorrt", "onnxruntime")
#: the order for x86 CPU sites with the `openvino` extra installed (OpenVINO before ONNX Runtime)
CPU_PREFERENCE = ("tensorrt", "openvino", "onnxruntime")
PACKAGE_MODELS_DIR = Path(__file__).resolve().parent / "models"



def openvino_importable() -> bool:
    """Whether the `openvino` package can be found (cheap: no import of the runtime)."""
    import importlib.util

    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def default_preference() -> Tuple[Tuple[str, ...], str]:
    """The back-end order a store uses when none is configured, and why: on x86 with the `openvino`
    package installed OpenVINO comes before ONNX Runtime (CPU_PREFERENCE) -- it is then still only used
    for a model whose OpenVINO parity entries pass (ModelStore._try_openvino); otherwise
    DEFAULT_PREFERENCE.  SCANSIDE_ENGINE_PREFERENCE (comma-separated back ends) overrides both."""
    env = os.environ.get("SCANSIDE_ENGINE_PREFERENCE", "").strip()
    if env:
        order = tuple(b.strip() for b in env.split(",") if b.strip())
        return order, f"SCANSIDE_ENGINE_PREFERENCE={env}"
    from scanside.engines.backends.openvino_engine import is_x86

    if not is_x86():
        return DEFAULT_PREFERENCE, f"not an x86 CPU ({platform.machine()}): OpenVINO is not preferred"
    if not openvino_importable():
        return DEFAULT_PREFERENCE, "openvino is not installed (pip install 'scanside[openvino]')"
    return CPU_PREFERENCE, "x86 CPU with openvino installed: OpenVINO before ONNX Runtime where its parity passes"


#: () -> (tensorrt version or None, CudaDevice or None, why) -- replaceable with plain data in tests
TensorRTProbe = Callable[[], Tuple[Optional[str], Any, str]]


def default_roots() -> List[Path]:
    env = os.environ.get("SCANSIDE_MODELS_DIR")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [PACKAGE_MODELS_DIR]


def default_user_dir() -> Optional[Path]:
    env = os.environ.get("SCANSIDE_USER_MODELS_DIR")
    return Path(env) if env else None


def _probe_tensorrt_machine() -> Tuple[Optional[str], Any, str]:
    from scanside.engines.backends.tensorrt_engine import probe_machine
    return probe_machine(0)


class StoreSettings(Protocol):
    """What ModelStore.from_settings reads (structurally: scanside.agent.runtime.config.EnginesConfig, or StoreDefaults).
    Read-only members, so a frozen dataclass satisfies it."""

    @property
    def models_dirs(self) -> Sequence[Path]: ...  # empty: the package's models (or SCANSIDE_MODELS_DIR for the dev tools)
    @property
    def user_models_dir(self) -> Optional[Path]: ...
    @property
    def preference(self) -> Sequence[str]: ...  # empty: automatic (default_preference())
    @property
    def int8_tolerance(self) -> Optional[float]: ...
    @property
    def parity_data(self) -> str: ...
    @property
    def cache_dir(self) -> Optional[Path]: ...


@dataclasses.dataclass(frozen=True)
class StoreDefaults:
    """Store settings for tools that have no agent configuration (the same defaults as [engines])."""

    models_dirs: Sequence[Path] = ()
    user_models_dir: Optional[Path] = None
    preference: Sequence[str] = ()
    int8_tolerance: Optional[float] = 0.02
    parity_data: str = "real"
    cache_dir: Optional[Path] = None


class ModelNotFound(LookupError):
    pass


#: default `[engines] int8_tolerance`: the largest parity loss (scanside.converters.parity: 1 - Dice against FP32,
#: accuracy or AUROC drop, or 1 - agreement) an INT8 variant may show and still be loaded
DEFAULT_INT8_TOLERANCE = 0.02
#: which parity data an INT8 variant needs: "real" (a parity entry measured on real DICOM, alone or mixed with
#: simulated) for real exams; "any" also accepts simulated-only or unrecorded origins (demo, simulator, benches)
PARITY_DATA = ("real", "any")
REAL_ORIGINS = ("real", "mixed")


def parity_refusal(manifest: ModelManifest, key: str, precision: str, sha256: str,
                   tolerance: Optional[float], parity_data: str = "any") -> Optional[str]:
    """Why an INT8 file/plan must not be loaded (None: it may).  *key* is the variant name, or
    ``plan:<path>`` for a TensorRT plan.  The manifest's parity report (scanside.converters.parity) must have an
    entry for *key*, measured on this very file (same sha256), whose loss is within *tolerance*; with
    *parity_data* "real" that entry must also have been measured on real DICOM (``data_origin`` real or
    mixed): a simulated-only report says nothing about real scans (TAPS INT8 calibrated on phantoms passed
    on phantoms and segmented nothing on real T2W).  tolerance None disables the gate; non-INT8
    precisions always pass."""
    if tolerance is None or not str(precision).startswith("int8"):
        return None
    entry = ((manifest.parity or {}).get("variants") or {}).get(key)
    if not isinstance(entry, dict):
        return (f"INT8 {key} has no parity report in the manifest (run `scanside convert parity "
                f"{manifest.name}@{manifest.version}`)")
    if str(entry.get("sha256", "")).lower() != sha256.lower():
        return f"INT8 {key}: parity report was measured on another file (sha256 differs); re-run parity"
    loss = entry.get("loss")
    if not isinstance(loss, (int, float)) or isinstance(loss, bool) or loss != loss:
        return f"INT8 {key}: parity report has no numeric loss"
    if loss > tolerance:
        return (f"INT8 {key}: parity loss {loss:g} ({entry.get('metric', '?')} {entry.get('value', '?')}) "
                f"exceeds the tolerance {tolerance:g}")
    if parity_data == "real" and entry.get("data_origin") not in REAL_ORIGINS:
        return (f"INT8 {key}: parity measured on {entry.get('data_origin') or 'unrecorded (older report)'} data only, "
                f"not on real DICOM; calibrate and check it on the site's own exams (`scanside convert calibrate "
                f"{manifest.name}@{manifest.version} --data DIR`, then `convert parity --data HELDOUT_DIR`)")
    return None


@dataclasses.dataclass
class Selection:
    model: str
    backend: Optional[str]
    variant: Optional[str]
    precision: Optional[str]
    reason: str = ""
    skipped: Dict[str, str] = dataclasses.field(default_factory=dict)
    #: the preference order walked and why it is that order
    order: str = ""

    def summary(self) -> str:
        head = f"{self.model}: {self.backend or 'no back end'}"
        if self.variant:
            head += f" [{self.variant}, {self.precision}]"
        if self.reason:
            head += f" -- {self.reason}"
        tail = "".join(f"\n  skipped {b}: {r}" for b, r in self.skipped.items())
        if self.order:
            tail += f"\n  order: {self.order}"
        return head + tail

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FileCheck:
    kind: str  # "file" | "plan" | "model_card"
    key: str
    path: str
    expected: Optional[str]
    actual: Optional[str]

    @property
    def ok(self) -> bool:
        return self.actual is not None and (self.expected is None or self.actual == self.expected)

    @property
    def status(self) -> str:
        if self.actual is None:
            return "MISSING"
        return "ok" if self.ok else "MISMATCH"


def parse_ref(ref: str, version: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """'name', 'name@1.2.3' or 'name/1.2.3' -> (name, version)."""
    for sep in ("@", "/"):
        if sep in ref:
            name, v = ref.split(sep, 1)
            if version is not None and version != v:
                raise ValueError(f"conflicting versions {v!r} and {version!r} for {name}")
            return name, v
    return ref, version


class ModelStore:
    def __init__(self, roots: Union[None, str, Path, Sequence[Union[str, Path]]] = None, *,
                 user_dir: Union[None, str, Path] = None, preference: Optional[Sequence[str]] = None,
                 engine_options: Optional[Dict[str, Dict[str, Any]]] = None,
                 tensorrt_probe: Optional[TensorRTProbe] = None,
                 int8_tolerance: Optional[float] = DEFAULT_INT8_TOLERANCE, parity_data: str = "any") -> None:
        """roots: store directories searched in order (first wins on a duplicate name/version).
        user_dir: bring-your-own models (searched after roots; `add_onnx` writes there).
        engine_options: per back end constructor keywords, e.g. {"onnxruntime": {"intra_op_threads": 2},
        "triton": {"url": "triton:8001"}} (triton is only tried when it has a url).
        tensorrt_probe: how to describe this machine for plan compatibility (default: import tensorrt,
        ask cuda-python); tests pass plain data.
        parity_data: "real" -- the daemon on real exams (`[engines] parity_data`) -- loads an INT8 variant only on
        parity measured on real DICOM; "any" (library default: benches, the simulator) accepts simulated data."""
        if roots is None:
            roots = default_roots()
        elif isinstance(roots, (str, Path)):
            roots = [roots]
        self.roots = [Path(r) for r in roots]
        self.user_dir = Path(user_dir) if user_dir is not None else default_user_dir()
        #: preference None: the automatic order (default_preference()); OpenVINO is then used only for variants
        #: whose `openvino:<variant>` parity entry passes, FP32 included
        self.auto_preference = preference is None
        self.preference_reason = "configured"
        if preference is None:
            preference, self.preference_reason = default_preference()
        unknown = [b for b in preference if b not in BACKENDS]
        if unknown:
            raise ValueError(f"unknown back end(s) {unknown}; known: {list(BACKENDS)}")
        self.preference = list(preference)
        self.engine_options = {k: dict(v) for k, v in (engine_options or {}).items()}
        self._tensorrt_probe = tensorrt_probe or _probe_tensorrt_machine
        self.problems: List[str] = []  # manifests that could not be read, duplicates
        # parity gate: INT8 files/plans without an in-tolerance parity report are refused (None: off)
        self.int8_tolerance = int8_tolerance
        if parity_data not in PARITY_DATA:
            raise ValueError(f"parity_data must be one of {PARITY_DATA}, got {parity_data!r}")
        self.parity_data = parity_data

    # ---- discovery -------------------------------------------------------------------------------
    @property
    def search_dirs(self) -> List[Path]:
        dirs = list(self.roots)
        if self.user_dir is not None and self.user_dir not in dirs:
            dirs.append(self.user_dir)
        return dirs

    @classmethod
    def from_settings(cls, settings: "StoreSettings", **kw: Any) -> "ModelStore":
        """The one way the agent, its CLI and the evaluations build a store: every store setting (the
        agent's `[engines]` section, scanside.agent.runtime.config.EnginesConfig, has these fields) is passed, so none is
        forgotten (the INT8 parity gate's tolerance, which parity data counts). kw: tests' and tools'
        extras (tensorrt_probe, engine_options)."""
        options = {k: dict(v) for k, v in (kw.pop("engine_options", None) or {}).items()}
        if settings.cache_dir is not None:
            options.setdefault("openvino", {}).setdefault("cache_dir", Path(settings.cache_dir) / "openvino")
            options.setdefault("onnxruntime", {}).setdefault("cache_dir", Path(settings.cache_dir))
        return cls(list(settings.models_dirs) or None, user_dir=settings.user_models_dir,
                   preference=list(settings.preference) or None, int8_tolerance=settings.int8_tolerance,
                   parity_data=settings.parity_data, engine_options=options, **kw)

    def scan(self) -> Dict[Tuple[str, str], ModelManifest]:
        found: Dict[Tuple[str, str], ModelManifest] = {}
        self.problems = []
        for root in self.search_dirs:
            if not root.is_dir():
                continue
            for mpath in sorted(root.glob(f"*/*/{MANIFEST_FILENAME}")):
                try:
                    m = ModelManifest.load(mpath)
                except Exception as e:
                    self.problems.append(f"{mpath}: unreadable manifest: {e}")
                    continue
                name_dir, version_dir = mpath.parent.parent.name, mpath.parent.name
                if (m.name, m.version) != (name_dir, version_dir):
                    self.problems.append(f"{mpath}: manifest says {m.ref} but lies in {name_dir}/{version_dir}; skipped")
                    continue
                key = (m.name, m.version)
                if key in found:
                    self.problems.append(f"{mpath}: duplicate of {found[key].root}; ignored")
                    continue
                found[key] = m
        for p in self.problems:
            log.warning("model store: %s", p)
        return found

    def list(self, name: Optional[str] = None) -> List[ModelManifest]:
        ms = [m for m in self.scan().values() if name is None or m.name == name]
        return sorted(ms, key=lambda m: (m.name, semver_key(m.version)))

    def versions(self, name: str) -> List[str]:
        return [m.version for m in self.list(name)]

    def resolve(self, ref: str, version: Optional[str] = None) -> ModelManifest:
        name, version = parse_ref(ref, version)
        ms = self.list(name)
        if not ms:
            names = sorted({m.name for m in self.list()})
            raise ModelNotFound(f"no model {name!r} in {[str(d) for d in self.search_dirs]}; available: {names}")
        if version is None:
            return ms[-1]
        for m in ms:
            if m.version == version:
                return m
        raise ModelNotFound(f"model {name!r} has no version {version!r}; available: {[m.version for m in ms]}")

    # ---- integrity ---------------------------------------------------------------------------------
    def verify(self, manifest: ModelManifest, *, variants: Optional[Iterable[str]] = None,
               plans: bool = True) -> List[FileCheck]:
        """Hash every file (or the given variants) and report; does not raise."""
        checks: List[FileCheck] = []
        keys = list(manifest.files) if variants is None else list(variants)
        entries: List[Tuple[str, str, str, Optional[str]]] = [("file", k, manifest.files[k].path, manifest.files[k].sha256)
                                                              for k in keys]
        if plans:
            entries += [("plan", f"plan[{i}]", p.path, p.sha256) for i, p in enumerate(manifest.plans)]
        for kind, key, rel, expected in entries:
            path = manifest.resolve(rel)
            actual = sha256_file(path) if path.is_file() else None
            checks.append(FileCheck(kind, key, str(path), expected, actual))
        if manifest.model_card:
            card = manifest.resolve(manifest.model_card)
            checks.append(FileCheck("model_card", "model_card", str(card), None, "present" if card.is_file() else None))
        return checks

    # ---- back-end choice ----------------------------------------------------------------------------
    def open(self, ref: Union[str, ModelManifest], version: Optional[str] = None, *, variant: Optional[str] = None,
             preference: Optional[Sequence[str]] = None, warmup: bool = False) -> Tuple[Engine, Selection]:
        """Load the model on the first back end in the preference order that can run it."""
        return self._choose(ref, version, variant, preference, load=True, warmup=warmup)  # type: ignore[return-value]  # load=True: an engine or an error, never None

    def explain(self, ref: Union[str, ModelManifest], version: Optional[str] = None, *, variant: Optional[str] = None,
                preference: Optional[Sequence[str]] = None) -> Selection:
        """Which back end `open` would choose and why, without loading (files are still hashed)."""
        return self._choose(ref, version, variant, preference, load=False, warmup=False)[1]

    def _choose(self, ref: Union[str, ModelManifest], version: Optional[str], variant: Optional[str],
                preference: Optional[Sequence[str]], *, load: bool, warmup: bool) -> Tuple[Optional[Engine], Selection]:
        m = ref if isinstance(ref, ModelManifest) else self.resolve(ref, version)
        order = list(preference) if preference is not None else self.preference
        skipped: Dict[str, str] = {}
        for backend in order:
            try:
                if backend == "openvino":
                    result = self._try_openvino(m, variant, load, auto=preference is None and self.auto_preference)
                else:
                    result = getattr(self, f"_try_{backend}")(m, variant, load)
            except IntegrityError:
                raise
            except (EngineUnavailable, EngineError, FileNotFoundError, KeyError, ImportError, OSError) as e:
                reason = e.reason if isinstance(e, EngineUnavailable) else f"{type(e).__name__}: {e}"
                skipped[backend] = reason
                continue
            if isinstance(result, str):
                skipped[backend] = result
                continue
            engine, used_variant, precision, reason = result
            sel = Selection(m.ref, backend, used_variant, precision, reason, skipped,
                            order=f"{' -> '.join(order)} ({self.preference_reason if preference is None else 'asked'})")
            if skipped:
                log.info("model store: %s", sel.summary())
            if engine is not None and warmup:
                engine.warmup()
            return engine, sel
        sel = Selection(m.ref, None, None, None, "no back end can run this model", skipped,
                        order=f"{' -> '.join(order)} ({self.preference_reason if preference is None else 'asked'})")
        if load:
            raise EngineUnavailable("store", sel.summary())
        return None, sel

    def _opts(self, backend: str) -> Dict[str, Any]:
        return dict(self.engine_options.get(backend, {}))

    def _try_tensorrt(self, m: ModelManifest, variant: Optional[str], load: bool) -> Any:
        if not m.plans:
            return "no TensorRT plan in the manifest"
        from scanside.engines.backends.tensorrt_engine import TensorRTEngine, check_plan_compatibility, select_plan
        trt_version, device, why = self._tensorrt_probe()
        if trt_version is not None and device is None:  # installed and a plan waiting, yet CUDA cannot run: loud
            log.warning("model store: %s has a TensorRT plan and TensorRT %s is installed, but %s", m.ref, trt_version, why)
        if trt_version is None or device is None:
            return why or "tensorrt/CUDA unavailable"
        opts = self._opts("tensorrt")
        gated = [(p, parity_refusal(m, f"plan:{p.path}", p.precision, p.sha256, self.int8_tolerance, self.parity_data))
                 for p in m.plans if variant is None or p.source_variant in (None, variant)]
        cands = m.model_copy(update={"plans": [p for p, why in gated if why is None]})
        plan, reasons = select_plan(cands, device, trt_version, opts.get("precision"))
        reasons = [(p.path, why) for p, why in gated if why is not None] + reasons
        if plan is None:
            return "; ".join(f"{p}: {r}" for p, r in reasons) or f"no plan for variant {variant!r}"
        verify_sha256(m.resolve(plan.path), plan.sha256)
        compat = check_plan_compatibility(plan, device, trt_version)
        if not load:
            return None, plan.source_variant, plan.precision, f"plan {plan.path}: {compat.reason}"
        opts["plan_path"] = plan.path
        engine = TensorRTEngine(**opts).load(m, variant, verify=False)
        return engine, plan.source_variant, plan.precision, f"plan {plan.path}: {compat.reason}"

    def _try_openvino(self, m: ModelManifest, variant: Optional[str], load: bool, auto: bool = False) -> Any:
        """OpenVINO on x86 CPUs.  An INT8 variant needs a passing parity report measured *through OpenVINO*
        (the manifest's ``openvino:<variant>`` entry, same file); an ONNX Runtime entry does not count,
        and a missing entry is refused.  In the automatic default order (``preference=None``) OpenVINO is
        only used for a variant whose OpenVINO entry passes -- FP32 included -- else ONNX Runtime runs it.
        Without an explicit variant the fastest passing variant (OpenVINO latency in the same parity run)
        is taken."""
        from scanside.engines.backends.openvino_engine import OpenVinoEngine, is_x86
        if not is_x86():
            return f"not an x86 CPU ({platform.machine()}); OpenVINO is only preferred on x86"
        ok, why = OpenVinoEngine.availability()
        if not ok:
            return why
        entries = (m.parity or {}).get("variants") or {}

        def refusal(v: str) -> Optional[str]:
            mf = m.files[v]
            key = f"openvino:{v}"
            if auto and not str(mf.precision).startswith("int8"):
                # default order: FP32 on OpenVINO too must have been compared with ONNX Runtime FP32
                tol = self.int8_tolerance if self.int8_tolerance is not None else DEFAULT_INT8_TOLERANCE
                r = parity_refusal(m, key, "int8", mf.sha256, tol)
                return None if r is None else r.replace(f"INT8 {key}", f"OpenVINO {v} ({mf.precision})", 1)
            return parity_refusal(m, key, mf.precision, mf.sha256, self.int8_tolerance, self.parity_data)

        note = ""
        if variant is not None:
            v = m.pick_variant(variant)
            refused = refusal(v)
            if refused:
                return refused
        else:
            cands: List[Tuple[float, str]] = []
            refusals: List[str] = []
            for v in m.files:
                r = refusal(v)
                if r is None:
                    lat = (entries.get(f"openvino:{v}") or {}).get("median_latency_s")
                    cands.append((float(lat) if isinstance(lat, (int, float)) else float("inf"), v))
                else:
                    refusals.append(r)
            default_v = m.pick_variant(None)
            timed = [c for c in cands if c[0] != float("inf")]
            if timed:
                lat, v = min(timed)
                base_v = "fp32" if "fp32" in m.files else default_v
                ref_lat = (entries.get(f"openvino:{base_v}") or {}).get("median_latency_s")
                e = entries.get(f"openvino:{v}") or {}
                note = (f"; fastest OpenVINO variant with a passing parity report openvino:{v} "
                        f"({e.get('metric', '?')} {e.get('value', '?')}, loss {e.get('loss', '?')}, "
                        f"{lat:g} s")
                note += f" vs {ref_lat:g} s for {base_v})" if isinstance(ref_lat, (int, float)) and v != base_v \
                    else ")"
            elif any(v == default_v for _, v in cands):
                v = default_v
            elif not auto and "fp32" in m.files:
                v = "fp32"
                if default_v != "fp32":
                    note = f"; default variant {default_v} refused ({refusal(default_v)}), fp32 used"
            else:
                return "no variant has a passing OpenVINO parity report: " + "; ".join(refusals)
            if self.parity_data == "real":  # say why a faster INT8 variant is not used on real exams
                note += "".join(f"; {r}" for r in refusals if "not on real DICOM" in r)
        if not note and f"openvino:{v}" in entries:
            note = f"; parity report openvino:{v}"
        mf: ModelFile = m.files[v]
        verify_sha256(m.resolve(mf.path), mf.sha256)
        if not load:
            return None, v, mf.precision, why + note
        engine = OpenVinoEngine(**self._opts("openvino")).load(m, v, verify=False)
        info = engine.describe()
        return engine, v, mf.precision, f"{info.device}, {info.threads.get('inference')} threads{note}"

    def _try_onnxruntime(self, m: ModelManifest, variant: Optional[str], load: bool) -> Any:
        from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine
        ok, why = OnnxRuntimeEngine.availability()
        if not ok:
            return why
        v = m.pick_variant(variant)
        mf: ModelFile = m.files[v]
        note = ""
        refused = parity_refusal(m, v, mf.precision, mf.sha256, self.int8_tolerance, self.parity_data)
        if refused:
            if variant is not None or "fp32" not in m.files:
                return refused
            log.warning("model store: %s: %s; using fp32", m.ref, refused)
            note = f"; default variant {v} refused ({refused}), fp32 used"
            v, mf = "fp32", m.files["fp32"]
        verify_sha256(m.resolve(mf.path), mf.sha256)
        if not load:
            return None, v, mf.precision, why + note
        engine = OnnxRuntimeEngine(**self._opts("onnxruntime")).load(m, v, verify=False)
        return engine, v, mf.precision, f"providers {engine.providers_used}{note}"

    def _try_triton(self, m: ModelManifest, variant: Optional[str], load: bool) -> Any:
        opts = self._opts("triton")
        if not opts.get("url"):
            return "no Triton/KServe URL configured (engine_options['triton']['url'])"
        from scanside.engines.backends.triton_engine import TritonEngine
        ok, why = TritonEngine.availability()
        if not ok:
            return why
        if not load:
            return None, variant, None, f"remote {opts['url']} (not contacted)"
        engine = TritonEngine(**opts).load(m, variant)
        return engine, variant, None, f"remote {opts['url']}"

    # ---- adding models ------------------------------------------------------------------------------
    def install(self, manifest: ModelManifest, sources: Dict[str, Union[str, Path]], *,
                root: Union[None, str, Path] = None, overwrite: bool = False) -> ModelManifest:
        """Copy *sources* (manifest-relative path -> file on disk) into <root>/<name>/<version>/, check each
        against the manifest's sha256, write the manifest, and return it loaded from its new home."""
        root = Path(root) if root is not None else self.roots[0]
        dest = root / manifest.name / manifest.version
        if (dest / MANIFEST_FILENAME).exists() and not overwrite:
            raise FileExistsError(f"{manifest.ref} already in {root}; pass overwrite=True to replace it")
        expected = {f.path: f.sha256 for f in manifest.files.values()}
        expected.update({p.path: p.sha256 for p in manifest.plans})
        dest.mkdir(parents=True, exist_ok=True)
        for rel, src in sources.items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(src).resolve() != target.resolve():
                tmp = target.with_name(target.name + ".tmp")
                shutil.copyfile(src, tmp)
                tmp.replace(target)
            if rel in expected:
                verify_sha256(target, expected[rel])
        for rel, sha in expected.items():
            verify_sha256(dest / rel, sha)
        manifest.save(dest / MANIFEST_FILENAME)
        return ModelManifest.load(dest / MANIFEST_FILENAME)

    def add_onnx(self, onnx_path: Union[str, Path], name: str, version: str, *, task: str = "other",
                 root: Union[None, str, Path] = None, overwrite: bool = False, **fields: Any) -> ModelManifest:
        """Bring your own ONNX: read its I/O from the file, write a manifest beside a copy of it in the user
        directory (or *root*).  Extra manifest fields (preprocessing, labels, postprocessing, license,
        source, ...) pass through **fields; explicit inputs/outputs override the ones read from the file."""
        onnx_path = Path(onnx_path)
        target_root = Path(root) if root is not None else (self.user_dir or self.roots[0])
        ins, outs, opset = tensor_specs_from_onnx(onnx_path)
        precision = fields.pop("precision", "fp32")
        data: Dict[str, Any] = {
            "name": name, "version": version, "task": task,
            "inputs": fields.pop("inputs", ins), "outputs": fields.pop("outputs", outs),
            "files": {"fp32" if precision == "fp32" else precision: ModelFile(
                path="model.onnx", sha256=sha256_file(onnx_path), precision=precision,
                size_bytes=onnx_path.stat().st_size, opset=opset)},
        }
        data.update(fields)
        manifest = ModelManifest.model_validate(data)
        return self.install(manifest, {"model.onnx": onnx_path}, root=target_root, overwrite=overwrite)


def store_from_args(args: Any) -> ModelStore:
    """The store of the command-line tools (`scanside models ...`, the evaluations, adaptation) from their
    --store / --user-dir / --prefer / --parity-data options: the one construction (ModelStore.from_settings)."""
    prefer = [b.strip() for b in (getattr(args, "prefer", None) or "").split(",") if b.strip()]
    roots = [args.store] if isinstance(args.store, (str, Path)) else list(args.store or [])
    return ModelStore.from_settings(StoreDefaults(models_dirs=[Path(r) for r in roots],
                                                  user_models_dir=Path(args.user_dir) if args.user_dir else None,
                                                  preference=prefer, parity_data=getattr(args, "parity_data", "real")))
