"""Is an image model's input inside the range it was validated on? An input-statistics distance.

A model trained and validated on one kind of image (the simulator's phantoms, or one site's scans)
answers with confidence on anything, including images it has never seen the like of: real prostate
MRI gave the simulator-trained csPCa model probability 0.98 and findings outside the gland (issue 18).
So before its answer is used, the prepared input (what the network sees, after resampling, cropping
and normalisation) is described by a few statistics per channel, and compared with the same
statistics of held-out inputs of the validated kind:

* intensity distribution shape: the 1/5/25/50/75/95/99th percentiles of the normalised channel;
* texture and sharpness: mean in-plane gradient magnitude, mean through-plane difference, and the
  share of high-frequency energy (Laplacian over gradient), which tell a noisy, sharp or smooth
  image apart from a phantom even when the histogram matches;
* how the channels relate: the correlation of every pair of channels (T2W / ADC / high b).

Score: the largest |z| of any statistic against the validation set's mean and standard deviation
(an explainable distance: the reason names the statistics that are out). The threshold is fitted on
held-out inputs (``fit_input_range``); a score above it means "outside the validated range": the
result is NOT_ASSESSED with that reason, never a confident guess. Numpy only (runtime path).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from pydantic import BaseModel, Field

FILE_NAME = "input_range.json"  # beside the model's manifest.json
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
_STD_FLOOR = 1e-3  # a statistic that never varied in validation must not turn every difference infinite


def input_features(x: np.ndarray, channels: Sequence[str]) -> Dict[str, float]:
    """Statistics of a prepared input (C, d0, d1, d2), d0 the slice axis; names are "<channel> <statistic>"."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[0] != len(channels):
        raise ValueError(f"input of shape {x.shape} for channels {list(channels)}")
    out: Dict[str, float] = {}
    for c, name in enumerate(channels):
        a = x[c]
        for p, v in zip(PERCENTILES, np.percentile(a, PERCENTILES)):
            out[f"{name} intensity p{p}"] = float(v)
        g1, g2 = np.diff(a, axis=1), np.diff(a, axis=2)
        grad = float(np.mean(np.abs(g1)) + np.mean(np.abs(g2))) / 2.0
        out[f"{name} in-plane gradient"] = grad
        out[f"{name} through-plane difference"] = float(np.mean(np.abs(np.diff(a, axis=0)))) if a.shape[0] > 1 else 0.0
        lap = np.diff(a, n=2, axis=1)[:, :, 1:-1] + np.diff(a, n=2, axis=2)[:, 1:-1, :]  # in-plane Laplacian
        out[f"{name} high-frequency share"] = float(np.mean(np.abs(lap))) / (2.0 * grad + 1e-6)
    flat = x.reshape(len(channels), -1)
    for i in range(len(channels)):
        for j in range(i + 1, len(channels)):
            a, b = flat[i], flat[j]
            sa, sb = float(a.std()), float(b.std())
            r = float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb)) if sa > 0 and sb > 0 else 0.0
            out[f"{channels[i]}-{channels[j]} correlation"] = r
    return out


class RangeCheck(BaseModel):
    """One input against the validated range."""

    score: float = Field(description="largest |z| of any input statistic against the validation set")
    threshold: float
    in_range: bool
    in_range_confidence: float = Field(
        description="share of the validation inputs that score at least as far out as this one (1: typical, 0: beyond all)")
    outside: List[Tuple[str, float]] = Field(default_factory=list, description="statistics beyond the threshold, with their z")

    def reason(self) -> str:
        parts = ", ".join(f"{n} {z:+.1f} SD" for n, z in self.outside[:3])
        return (f"inputs outside the model's validated range: {parts or 'input statistics'} "
                f"(distance {self.score:.1f}, validated up to {self.threshold:.1f})")


class InputRange(BaseModel):
    """The validated range of a model's inputs (``input_range.json`` beside its manifest)."""

    channels: List[str]
    features: List[str]
    mean: List[float]
    std: List[float]
    threshold: float
    validation_scores: List[float] = Field(default_factory=list, description="scores of the held-out validation inputs")
    fitted_on: Dict[str, object] = Field(default_factory=dict, description="what the range and threshold were fitted on")

    def check(self, x: np.ndarray) -> RangeCheck:
        return self.check_features(input_features(x, self.channels))

    def check_features(self, feats: Dict[str, float]) -> RangeCheck:
        v = np.array([feats.get(f, np.nan) for f in self.features], dtype=np.float64)
        z = (v - np.asarray(self.mean)) / np.maximum(np.asarray(self.std), _STD_FLOOR)
        z = np.where(np.isfinite(z), z, 1e6)  # a statistic that cannot be computed is out of range
        score = float(np.max(np.abs(z))) if len(z) else 0.0
        order = np.argsort(-np.abs(z))
        outside = [(self.features[i], float(z[i])) for i in order if abs(z[i]) > self.threshold]
        vs = np.asarray(self.validation_scores, dtype=np.float64)
        conf = float(np.mean(vs >= score)) if len(vs) else (1.0 if score <= self.threshold else 0.0)
        return RangeCheck(score=round(score, 3), threshold=self.threshold, in_range=score <= self.threshold,
                          in_range_confidence=round(conf, 3), outside=[(n, round(z, 2)) for n, z in outside])

    def save(self, root: Union[str, Path]) -> Path:
        path = Path(root) / FILE_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, root: Union[str, Path, None]) -> Optional["InputRange"]:
        """The model's range, None when it has none (a model without one is not range-checked: its results
        say so)."""
        if root is None:
            return None
        path = Path(root) / FILE_NAME
        if not path.is_file():
            return None
        return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))


def fit_input_range(fit: Sequence[Dict[str, float]], validation: Sequence[Dict[str, float]], channels: Sequence[str],
                    margin: float = 1.25, fitted_on: Optional[Dict[str, object]] = None) -> InputRange:
    """Mean and SD of each statistic from the ``fit`` inputs; the threshold ``margin`` x the largest score of
    the separate ``validation`` inputs (held out from the fit, so that it is not the fit set's own spread)."""
    if len(fit) < 3 or not validation:
        raise ValueError("need at least 3 fit inputs and 1 validation input")
    names = sorted(fit[0])
    m = np.array([[f[n] for n in names] for f in fit], dtype=np.float64)
    rng = InputRange(channels=list(channels), features=names, mean=m.mean(0).tolist(),
                     std=np.maximum(m.std(0, ddof=1), _STD_FLOOR).tolist(), threshold=float("inf"),
                     fitted_on=dict(fitted_on or {}))
    scores = [rng.check_features(f).score for f in validation]
    return rng.model_copy(update={"threshold": round(float(margin * max(scores)), 3),
                                  "validation_scores": [round(s, 3) for s in scores]})
