"""Image-based sequence label: one series' pixels -> the sequence classifier (ONNX, via the model
store) -> ImageLabel. No header field enters the model, so it can catch a mislabelled series; the
agent compares this label with scanside.agent.dicom.classify's header label.

One volume per logical series (scanside.agent.dicom.series.SeriesPart): ``select_frames`` keeps
* one orientation (the largest group; a 3-plane localizer -> one plane),
* one temporal phase of a dynamic series (the middle one of those present),
* one frame per slice position (the isotropic/trace image where directional ones share it).
Then scanside.agent.dicom.volume.load_volume -> scanside.engines.preprocess.prepare (the manifest's PreprocessSpec) ->
engine. Across the series of one exam, ``ImageClassifier.with_physics`` then lets the diffusion physics
(scanside.engines.tasks.diffusion) settle what pixels can prove: which series is an ADC map, which images decay
along it and by how much. Runtime dependencies only (numpy, onnxruntime through engines); no torch.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from pydantic import BaseModel, Field

from scanside.agent.dicom.frames import FrameSelectionError, select_frames
from scanside.agent.dicom.header import FrameInfo, FrameRef
from scanside.agent.dicom.volume import Volume, VolumeError, load_volume
from scanside.engines.manifest import ModelManifest
from scanside.engines.tasks.diffusion import DiffusionRole, diffusion_roles
from scanside.engines.tasks.input_range import InputRange, RangeCheck

log = logging.getLogger(__name__)

DEFAULT_MODEL = "sequence-classifier"


UNCERTAIN = "uncertain"


class ImageLabel(BaseModel):
    label: str = Field(description="the predicted class, or `uncertain` where the model's uncertainty gate says it "
                                   "does not know (calibrated confidence below its threshold, or input out of distribution)")
    confidence: float = Field(description="calibrated probability of `predicted` (temperature-scaled where the "
                                          "model carries a temperature)")
    probabilities: Dict[str, float]
    model: str = Field(description="name/version of the model")
    backend: str
    frames_used: Optional[int] = None
    predicted: Optional[str] = Field(None, description="the most probable class, also when `label` is uncertain")
    ood_score: Optional[float] = Field(None, description="feature distance to the training distribution divided by "
                                                         "its threshold (> 1: outside the validated range)")
    input_range_score: Optional[float] = Field(None, description="distance of the input's statistics from the held-out "
                                                                 "series of the predicted class, divided by its threshold (> 1: unlike them)")
    uncertain_reason: Optional[str] = None
    diffusion: Optional[str] = Field(None, description="what the diffusion physics across the series of its grid said "
                                                       "(scanside.engines.tasks.diffusion), where it placed the series")

    @property
    def uncertain(self) -> bool:
        return self.label == UNCERTAIN


class UncertaintyGate(BaseModel):
    """manifest.postprocessing["uncertainty"] (fitted on held-out data by scanside.training.sequence.uncertainty):
    temperature scaling of the probabilities and a class-conditional Mahalanobis distance on the
    model's pooled features (shared covariance, whitened by ``whiten``)."""

    temperature: float = Field(1.0, gt=0)
    min_confidence: float = Field(0.0, ge=0, le=1, description="calibrated confidence below which the label is uncertain")
    feature_output: Optional[str] = None
    stats_file: Optional[str] = Field(None, description="npz beside the manifest: means (K, F), whiten (F, F)")
    stats_sha256: Optional[str] = None
    ood_threshold: Optional[float] = Field(None, gt=0, description="squared distance above which the input is out of distribution")
    class_ranges_file: Optional[str] = Field(None, description="json beside the manifest: ClassInputRanges")
    class_ranges_sha256: Optional[str] = None
    fitted_on: str = ""

    def load_stats(self, root: Any) -> Optional[tuple[np.ndarray, np.ndarray]]:
        if not self.stats_file or self.ood_threshold is None:
            return None
        from pathlib import Path

        from scanside.engines.manifest import verify_sha256

        path = Path(root) / self.stats_file
        if self.stats_sha256:
            verify_sha256(path, self.stats_sha256)
        with np.load(path) as z:
            return np.asarray(z["means"], np.float64), np.asarray(z["whiten"], np.float64)

    def load_ranges(self, root: Any) -> Optional["ClassInputRanges"]:
        if not self.class_ranges_file or root is None:
            return None
        from pathlib import Path

        from scanside.engines.manifest import verify_sha256

        path = Path(root) / self.class_ranges_file
        if self.class_ranges_sha256:
            verify_sha256(path, self.class_ranges_sha256)
        return ClassInputRanges.model_validate_json(path.read_text(encoding="utf-8"))


class ClassInputRanges(BaseModel):
    """Per class, the range of the prepared input's statistics (scanside.engines.tasks.input_range) over held-out
    series of that class. The feature distance looks at what the network made of an input; this looks at the
    input itself: a real ADC map whose detail window has a dark tail no simulated ADC map has is unlike the
    ADC maps the model was validated on, however sure the network is (issue 18: such inputs were read
    as low-b DWI with 84-86 % confidence)."""

    channels: List[str]
    ranges: Dict[str, InputRange]

    def check(self, x: np.ndarray, label: str) -> Optional[RangeCheck]:
        """The input against the range of ``label``; None where that class has none."""
        r = self.ranges.get(label)
        return None if r is None else r.check(x)



def calibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) = softmax(logits / T): the constant that log p differs from the logits by cancels."""
    z = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ood_distance(features: np.ndarray, means: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each feature row to the nearest class mean, (N,)."""
    f = np.atleast_2d(np.asarray(features, np.float64))
    d = (f[:, None, :] - means[None, :, :]) @ whiten.T  # (N, K, F) whitened differences
    return (d ** 2).sum(-1).min(1)


class ImageLabelError(ValueError):
    """The series could not be classified from its images; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ImageClassifier:
    """Loads the sequence model lazily from a ModelStore (sha256-checked) and classifies series."""

    def __init__(self, store: Any = None, model: str = DEFAULT_MODEL, *, variant: Optional[str] = None,
                 engine: Any = None) -> None:
        self._store = store
        self.model_ref = model
        self.variant = variant
        self._engine = engine
        self._lock = threading.Lock()
        self.manifest: Optional[ModelManifest] = engine.manifest if engine is not None else None
        self.backend = engine.backend if engine is not None else None
        self._gate: Optional[UncertaintyGate] = None
        self._ood: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._ranges: Optional[ClassInputRanges] = None

    def load(self) -> Any:
        with self._lock:
            if self._engine is None:
                if self._store is None:
                    from scanside.engines.store import ModelStore, StoreDefaults
                    self._store = ModelStore.from_settings(StoreDefaults())  # the daemon passes its configured store
                engine, sel = self._store.open(self.model_ref, variant=self.variant)
                self._engine, self.manifest, self.backend = engine, engine.manifest, sel.backend
                if not self.manifest.labels or not self.manifest.preprocessing:
                    raise ImageLabelError("bad_model", f"{self.manifest.ref} has no labels or preprocessing")
            if self._gate is None:
                assert self.manifest is not None  # set with the engine (here or by the caller)
                self._load_gate(self.manifest)
        return self._engine

    def _load_gate(self, m: ModelManifest) -> None:
        raw = (m.postprocessing or {}).get("uncertainty")
        self._gate = UncertaintyGate.model_validate(raw) if raw else UncertaintyGate()
        self._ood = self._gate.load_stats(m.root) if raw and m.root else None
        self._ranges = self._gate.load_ranges(m.root)
        if self._ood is not None and self._gate.feature_output not in {o.name for o in m.outputs}:
            raise ImageLabelError("bad_model", f"{m.ref}: no output {self._gate.feature_output!r} for its OOD score")

    def _loaded(self) -> tuple[Any, ModelManifest, UncertaintyGate]:
        """The engine, its manifest and its uncertainty gate, loaded on first use."""
        engine = self.load()
        assert self.manifest is not None and self._gate is not None  # load set both or raised
        return engine, self.manifest, self._gate

    @property
    def gate(self) -> UncertaintyGate:
        return self._loaded()[2]

    # -- inputs ------------------------------------------------------------------------------
    def volume_of(self, source: Union[Volume, Any, Sequence[FrameRef]], frames: Optional[Sequence[FrameInfo]] = None,
                  cache: Optional[dict] = None) -> tuple[Volume, int]:
        if isinstance(source, Volume):
            return source, source.shape[0]
        if hasattr(source, "refs") and hasattr(source, "frames"):  # scanside.agent.dicom.series.SeriesPart
            refs, frames = list(source.refs), list(source.frames)
        else:
            refs = list(source)
        try:
            chosen = select_frames(refs, frames)
        except FrameSelectionError as e:
            raise ImageLabelError(e.reason, e.detail) from e
        try:
            return load_volume(chosen, cache=cache), len(chosen)
        except VolumeError as e:
            raise ImageLabelError(f"volume_{e.reason}", str(e)) from e
        except (OSError, ValueError) as e:
            raise ImageLabelError("unreadable_pixels", f"{type(e).__name__}: {e}") from e

    def prepare(self, volume: Volume) -> np.ndarray:
        """(C, d0, d1, d2) float32 model input for one volume."""
        from scanside.engines.preprocess import prepare

        spec = self._loaded()[1].preprocessing
        assert spec is not None  # load checked it
        if not np.isfinite(volume.array).all():
            volume = Volume.from_array_affine(np.nan_to_num(volume.array, nan=0.0, posinf=0.0, neginf=0.0),
                                              volume.array_affine)
        arr, _ = prepare({spec.channels[0]: volume}, spec)
        return arr

    # -- inference -----------------------------------------------------------------------------
    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, ...) prepared inputs -> (N, n_labels) probabilities (as the model gives them, uncalibrated)."""
        return self.outputs(batch)[0]

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(N, C, ...) prepared inputs -> raw probabilities (N, n_labels) and the OOD distance / threshold
        (N,), None where the model has no OOD statistics."""
        engine, m, gate = self._loaded()
        out = engine.run({m.inputs[0].name: np.ascontiguousarray(batch, dtype=np.float32)})
        probs = np.asarray(out[m.outputs[0].name], dtype=np.float64)
        # load_stats gives statistics only with a feature output and a threshold
        if self._ood is None or gate.feature_output is None or gate.ood_threshold is None:
            return probs, None
        dist = ood_distance(out[gate.feature_output], *self._ood)
        return probs, dist / float(gate.ood_threshold)

    def input_check(self, x: np.ndarray, probs: np.ndarray) -> Optional[RangeCheck]:
        """The prepared input (C, ...) against the held-out range of the class the model names; None where the
        model has no class ranges."""
        _, m, _ = self._loaded()
        if self._ranges is None:
            return None
        return self._ranges.check(x, list(m.labels or ())[int(np.argmax(probs))])

    def label_of(self, probs: np.ndarray, frames_used: Optional[int] = None, ood: Optional[float] = None,
                 input_check: Optional[RangeCheck] = None) -> ImageLabel:
        """One ImageLabel from raw probabilities, the OOD ratio and the input-range check of the predicted
        class: temperature-scaled, and `uncertain` above the OOD threshold, outside the class' input range or
        below the gate's calibrated confidence (none of them raises an alert)."""
        _, m, gate = self._loaded()
        labels = list(m.labels or ())  # not empty: load checked it
        p = calibrated(probs, gate.temperature) if gate.temperature != 1.0 else np.asarray(probs, np.float64)
        k = int(np.argmax(p))
        why = None
        if ood is not None and ood > 1.0:
            why = f"input outside the model's validated range (feature distance {ood:.1f}x its threshold)"
        elif input_check is not None and not input_check.in_range:
            parts = ", ".join(f"{n} {z:+.1f} SD" for n, z in input_check.outside[:3])
            why = (f"input unlike the held-out {labels[k]} series the model was validated on: {parts} "
                   f"(distance {input_check.score:.1f}, validated up to {input_check.threshold:.1f})")
        elif p[k] < gate.min_confidence:
            why = f"calibrated confidence {p[k]:.2f} below {gate.min_confidence:.2f}"
        return ImageLabel(label=UNCERTAIN if why else labels[k], predicted=labels[k], confidence=float(p[k]),
                          probabilities={lab: round(float(v), 6) for lab, v in zip(labels, p)},
                          model=m.ref, backend=str(self.backend), frames_used=frames_used,
                          ood_score=None if ood is None else round(float(ood), 4), uncertain_reason=why,
                          input_range_score=None if input_check is None
                          else round(input_check.score / max(input_check.threshold, 1e-9), 4))

    def classify(self, source: Union[Volume, Any, Sequence[FrameRef]], frames: Optional[Sequence[FrameInfo]] = None,
                 cache: Optional[dict] = None) -> ImageLabel:
        """A Volume, a SeriesPart or FrameRefs (with their FrameInfos, else headers are read) -> ImageLabel.
        Raises ImageLabelError for series that cannot be turned into one volume."""
        self.load()
        vol, n = self.volume_of(source, frames, cache)
        if min(vol.shape) < 1 or vol.array.size < 4:
            raise ImageLabelError("too_small", f"volume shape {vol.shape}")
        x = self.prepare(vol)[None]
        probs, ood = self.outputs(x)
        return self.label_of(probs[0], n, None if ood is None else float(ood[0]), self.input_check(x[0], probs[0]))

    def with_diffusion(self, label: ImageLabel, role: Optional[DiffusionRole], names: Optional[Mapping[str, str]] = None) -> ImageLabel:
        """The label once the diffusion physics has placed the series (scanside.engines.tasks.diffusion): an ADC
        map, or a high-b image by its measured b-step, is what the physics says, whatever the network made of it
        (the fit's correlation stands for the confidence); for the other images of a ladder the physics settles
        "diffusion-weighted" and the network tells low from high b, its calibrated probabilities of the two
        renormalised against the gate's threshold. No role: the label as it was."""
        if role is None:
            return label
        evidence = role.evidence(names)
        if role.kind == "ADC" or role.high_b:
            lab = "ADC" if role.kind == "ADC" else "DWI_High"
            return label.model_copy(update={"label": lab, "predicted": lab, "confidence": round(float(role.fit), 4),
                                            "uncertain_reason": None, "diffusion": evidence})
        low, high = label.probabilities.get("DWI_Low", 0.0), label.probabilities.get("DWI_High", 0.0)
        if low + high <= 1e-6 or (role.weak and low + high < WEAK_NEEDS_DWI):
            return label  # a weak place on a ladder is no evidence against a network that says otherwise
        lab = "DWI_Low" if low >= high else "DWI_High"
        conf = max(low, high) / (low + high)
        floor = self.gate.min_confidence
        why = None if conf >= floor else f"a diffusion-weighted image by its physics; low vs high b: confidence {conf:.2f} below {floor:.2f}"
        return label.model_copy(update={"label": UNCERTAIN if why else lab, "predicted": lab, "confidence": round(float(conf), 4),
                                        "uncertain_reason": why, "diffusion": evidence})

    def with_physics(self, labels: Mapping[str, ImageLabel], volumes: Mapping[str, Volume],
                     names: Optional[Mapping[str, str]] = None) -> Dict[str, ImageLabel]:
        """The labels of one exam's series (keyed by the caller) once the diffusion physics has looked at every
        grid two or more of them share: the daemon and every evaluation call this, so both label an exam
        the same way. An ADC map the physics does not confirm is `uncertain`: an ADC map is computed from
        diffusion images on its own grid, and a quantitative map named by the network alone is the call
        it gets wrong on real scans (real ProstateX: an axial T2 TSE read as ADC at 0.65)."""
        out = dict(labels)
        for keys in same_grid(volumes).values():
            roles = diffusion_roles({k: volumes[k].array for k in keys})
            for k, role in roles.items():
                if k in out:
                    out[k] = self.with_diffusion(out[k], role, names)
        for k, label in out.items():
            if label.label == "ADC" and label.diffusion is None:
                out[k] = label.model_copy(update={"label": UNCERTAIN, "uncertain_reason": UNCONFIRMED_ADC})
        return out


def series_name(summary: Any) -> str:
    """How the physics' evidence names a series (a SeriesSummary): "series 8 b0"."""
    number = summary.series_number if summary.series_number is not None else "?"
    return f"series {number}{(' ' + summary.part) if summary.part else ''}"


#: why an ADC map named by the network alone is withheld (ImageClassifier.with_physics)
UNCONFIRMED_ADC = ("ADC by the network alone: no diffusion images on its voxel grid decay along it (the physics that "
                   "proves a map could not test this one)")

#: a weak ladder member (scanside.engines.tasks.diffusion.DiffusionRole.weak) is taken as diffusion-weighted only
#: where the network's calibrated probabilities of low- and high-b DWI add up to at least this
WEAK_NEEDS_DWI = 0.5


#: volumes whose affines differ by at most this (mm) are one voxel grid: a derived map may write its position and
#: spacing with fewer digits than the images it was computed from
GRID_TOLERANCE_MM = 0.05


def same_grid(volumes: Mapping[str, Volume]) -> Dict[int, List[str]]:
    """Keys of volumes on one voxel grid (the same shape, affines within GRID_TOLERANCE_MM), for the grids two
    or more share: a diffusion acquisition's images and the maps fitted from them."""
    groups: List[tuple[Volume, List[str]]] = []
    for k, v in volumes.items():
        for first, keys in groups:
            if first.shape == v.shape and np.allclose(first.affine, v.affine, rtol=0.0, atol=GRID_TOLERANCE_MM):
                keys.append(k)
                break
        else:
            groups.append((v, [k]))
    return {i: keys for i, (_, keys) in enumerate(groups) if len(keys) > 1}
