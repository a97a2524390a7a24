"""Fit the sequence classifier's uncertainty gate on held-out data and store it with the model.

    python -m scanside.training.sequence.uncertainty sequence-classifier@1.5.0 [--exams 64] [--seed 500000]

Held-out exams (simulator seeds no training run uses: training 1000.., this 500000.., evaluation
>= 900000, tests >= 700000) are rendered through the training render path (the runtime's
preprocessing) and run through the model store's engine. They are split by exam in two halves:

* half A fits the temperature (minimum negative log-likelihood of softmax(log p / T)) and the
  out-of-distribution statistics: the class means of the pooled features and one shared covariance
  (shrunk towards its mean variance so 96 dimensions are well conditioned from a few hundred series);
  the score is the squared Mahalanobis distance to the nearest class mean;
* half B sets the thresholds the fit has not seen: the OOD threshold at the ``--ood-quantile`` of its
  scores (so about 0.5 % of in-distribution series read `uncertain`), and the confidence threshold as
  the lowest calibrated confidence above which half B's accuracy reaches ``--target-accuracy``;
* per class, the range of the prepared input's statistics (scanside.engines.tasks.input_range: intensity
  percentiles, gradient, high-frequency share, channel correlations): mean and SD from half A's series of
  that class, threshold 1.25x the largest distance of half B's (``class_input_range.json``). At run time an
  input is checked against the class the model names.

The result goes into manifest.postprocessing["uncertainty"] (scanside.engines.tasks.image_label.UncertaintyGate) and
``uncertainty.npz`` beside it (sha256 in the manifest); the model card says what it was fitted on.
Needs a model with a features output (sequence-classifier >= 1.5.0).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from scanside.engines.tasks.image_label import ClassInputRanges, UncertaintyGate, calibrated, ood_distance
from scanside.engines.tasks.input_range import fit_input_range, input_features

log = logging.getLogger(__name__)

STATS_FILE = "uncertainty.npz"
RANGES_FILE = "class_input_range.json"
SEED0 = 500_000


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """T > 0 minimising the negative log-likelihood of softmax(log p / T) on (probs, y)."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        p = calibrated(probs, float(np.exp(log_t)))
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))

    r = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    return float(np.exp(r.x))


def fit_ood(features: np.ndarray, y: np.ndarray, n_classes: int, shrink: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Class means (K, F) and the whitening matrix W (F, F) with |W d|^2 = d' S^-1 d for the shared,
    shrunk covariance S. A class absent from the data gets a mean no feature row can be near."""
    f = np.asarray(features, np.float64)
    dim = f.shape[1]
    means = np.full((n_classes, dim), 1e6)
    for k in range(n_classes):
        if (y == k).any():
            means[k] = f[y == k].mean(0)
    d = f - means[y]
    cov = d.T @ d / max(1, len(f) - n_classes)
    cov = (1 - shrink) * cov + shrink * (np.trace(cov) / dim) * np.eye(dim)
    chol = np.linalg.cholesky(cov)
    return means, np.linalg.inv(chol)


def confidence_threshold(conf: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest threshold c such that the series with confidence >= c are right at least ``target`` of
    the time (0 where all are)."""
    order = np.argsort(-conf)
    acc = np.cumsum(correct[order]) / np.arange(1, len(conf) + 1)
    ok = np.nonzero(acc >= target)[0]
    if len(ok) == 0:
        return 1.0
    if ok[-1] == len(conf) - 1:
        return 0.0
    return float(conf[order][ok[-1]])


def fit_gate(probs: np.ndarray, feats: np.ndarray, y: np.ndarray, exam: np.ndarray, *, n_classes: int,
             ood_quantile: float = 0.995, target_accuracy: float = 0.995,
             min_temperature: float = 1.0) -> tuple[Dict[str, Any], np.ndarray, np.ndarray]:
    """(gate fields, means, whiten) from held-out outputs, split by exam into a fit half and a threshold half.

    The temperature is kept >= ``min_temperature`` (1: never sharper than the model itself): held-out
    simulated series are where the model is right, so a temperature fitted there sharpens it (1.4.0,
    trained with label smoothing: T = 0.47), and on real series, where it is wrong far more often, the
    sharpened wrong answers crossed the LABEL_MISMATCH threshold (false alerts on ProstateX-0218: 3 -> 4)."""
    half_b = exam_halves(exam)
    a, b = ~half_b, half_b
    t_fit = fit_temperature(probs[a], y[a])
    t = max(t_fit, min_temperature)
    means, whiten = fit_ood(feats[a], y[a], n_classes)
    score_b = ood_distance(feats[b], means, whiten)
    thr = float(np.quantile(score_b, ood_quantile))
    pb = calibrated(probs[b], t)
    conf_b, pred_b = pb.max(1), pb.argmax(1)
    c = confidence_threshold(conf_b, pred_b == y[b], target_accuracy)
    flagged = (score_b > thr) | (conf_b < c)
    fields = {"temperature": round(t, 4), "min_confidence": round(c, 4), "ood_threshold": thr,
              "report": {"fit_series": int(a.sum()), "threshold_series": int(b.sum()), "temperature_fitted": round(t_fit, 4),
                         "min_temperature": min_temperature,
                         "threshold_uncertain_rate": round(float(flagged.mean()), 4),
                         "threshold_accuracy_confident": round(float((pred_b == y[b])[~flagged].mean()), 4) if (~flagged).any() else None,
                         "ece_before": round(ece(probs[b], y[b]), 4), "ece_after": round(ece(pb, y[b]), 4),
                         "ood_quantile": ood_quantile, "target_accuracy": target_accuracy}}
    return fields, means, whiten


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of the top-class confidence (equal-width bins)."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(float((pred[m] == y[m]).mean()) - float(conf[m].mean()))
    return float(total)


def input_channels(m: Any) -> List[str]:
    """Names of the prepared input's channels: the whole field of view and its detail views."""
    spec = m.preprocessing
    return [spec.channels[0]] + [f"detail {v.spacing_mm[-1]:g} mm" for v in spec.detail_views]


def statistic_names(channels: Sequence[str]) -> List[str]:
    """The input statistics' names, in the column order of ``input_statistics``."""
    return sorted(input_features(np.zeros((len(channels), 4, 8, 8), np.float32), channels))


def input_statistics(xs: Sequence[np.ndarray], channels: Sequence[str]) -> np.ndarray:
    """(N, F) input statistics of prepared inputs, columns in ``statistic_names`` order."""
    names = statistic_names(channels)
    return np.array([[f[n] for n in names] for f in (input_features(np.asarray(x, np.float32), channels) for x in xs)],
                    np.float64)


def exam_halves(exam: np.ndarray) -> np.ndarray:
    """True for the series of every other exam: the half that sets thresholds (fit_gate's split)."""
    return np.isin(exam, np.unique(exam)[1::2])


def fit_class_ranges(stats: np.ndarray, names: Sequence[str], y: np.ndarray, threshold_half: np.ndarray,
                     labels: Sequence[str], channels: Sequence[str], fitted_on: str, min_fit: int = 10,
                     min_threshold: int = 5) -> ClassInputRanges:
    """Per class with enough series (``min_fit`` to fit, ``min_threshold`` in ``threshold_half``): the input range
    from the series outside ``threshold_half``, its threshold from those in it. A class with fewer gets no
    range (it is not range-checked): a few series give no spread to measure against."""
    ranges = {}
    for k, lab in enumerate(labels):
        fit = [dict(zip(names, r)) for r in stats[(y == k) & ~threshold_half]]
        val = [dict(zip(names, r)) for r in stats[(y == k) & threshold_half]]
        if len(fit) >= min_fit and len(val) >= min_threshold:
            ranges[lab] = fit_input_range(fit, val, channels, fitted_on={"class": lab, "fit_series": len(fit),
                                                                         "threshold_series": len(val), "data": fitted_on})
    return ClassInputRanges(channels=list(channels), ranges=ranges)


def heldout_inputs(clf: Any, seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Render the held-out exams (both protocol variants, every vendor style) and run the model: raw
    probabilities, features, labels, exam seed and the prepared input's statistics (N, F; columns:
    ``statistic_names``) per series."""
    from scanside.training.sequence.data import LABEL_INDEX, exam_samples
    from scanside.training.sequence.protocols import VENDORS

    engine = clf.load()
    m = clf.manifest
    feat_name = _feature_output(m)
    xs: List[np.ndarray] = []
    ys: List[int] = []
    exams: List[int] = []
    for i, s in enumerate(seeds):
        for label, arr, _ in exam_samples(int(s), VENDORS[i % len(VENDORS)], "heldout" if i % 3 == 2 else "train"):
            xs.append(arr)
            ys.append(LABEL_INDEX[label])
            exams.append(int(s))
    probs, feats = [], []
    for i in range(0, len(xs), 32):
        out = engine.run({m.inputs[0].name: np.stack(xs[i:i + 32]).astype(np.float32)})
        probs.append(np.asarray(out[m.outputs[0].name], np.float64))
        feats.append(np.asarray(out[feat_name], np.float64))
    stats = input_statistics(xs, input_channels(m))
    return np.concatenate(probs), np.concatenate(feats), np.asarray(ys), np.asarray(exams), stats


def _feature_output(m: Any) -> str:
    names = [o.name for o in m.outputs]
    if "features" not in names:
        raise SystemExit(f"{m.ref} has no `features` output (outputs {names}): export it with scanside.training.sequence.export >= 1.5.0")
    return "features"


def install_gate(manifest: Any, fields: Dict[str, Any], means: np.ndarray, whiten: np.ndarray, fitted_on: str,
                 ranges: Optional[ClassInputRanges] = None) -> Any:
    """Write uncertainty.npz (and the class input ranges) beside the manifest and the gate into its
    postprocessing; returns the saved manifest."""
    from scanside.engines.manifest import ModelManifest, sha256_file

    root = Path(manifest.root)
    np.savez(root / STATS_FILE, means=means.astype(np.float32), whiten=whiten.astype(np.float32))
    ranges_fields: Dict[str, Any] = {}
    if ranges is not None:
        (root / RANGES_FILE).write_text(ranges.model_dump_json(indent=1) + "\n", encoding="utf-8")
        ranges_fields = {"class_ranges_file": RANGES_FILE, "class_ranges_sha256": sha256_file(root / RANGES_FILE)}
    gate = UncertaintyGate(temperature=fields["temperature"], min_confidence=fields["min_confidence"],
                           feature_output=_feature_output(manifest), stats_file=STATS_FILE,
                           stats_sha256=sha256_file(root / STATS_FILE), ood_threshold=fields["ood_threshold"],
                           fitted_on=fitted_on, **ranges_fields)
    post = dict(manifest.postprocessing)
    post["uncertainty"] = {**gate.model_dump(), "report": fields.get("report", {})}
    m = manifest.model_copy(update={"postprocessing": post})
    m.set_root(root)
    m.save(root)
    return ModelManifest.load(root)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from scanside.engines.tasks.image_label import ImageClassifier
    from scanside.engines.store import ModelStore

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="NAME@VERSION in the store")
    ap.add_argument("--store", type=Path, action="append", default=None)
    ap.add_argument("--exams", type=int, default=64)
    ap.add_argument("--seed", type=int, default=SEED0)
    ap.add_argument("--ood-quantile", type=float, default=0.995)
    ap.add_argument("--target-accuracy", type=float, default=0.995)
    ap.add_argument("--min-temperature", type=float, default=1.0, help="never sharpen below this (see fit_gate)")
    ap.add_argument("--outputs", type=Path, default=None,
                    help="npz of the held-out outputs: read when it exists (a refit renders nothing), else written")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    store = ModelStore(args.store or None, user_dir=None)
    manifest = store.resolve(args.model)
    clf = ImageClassifier(store, manifest.ref, variant="fp32")
    seeds = list(range(args.seed, args.seed + args.exams))
    if args.outputs is not None and args.outputs.is_file():
        with np.load(args.outputs) as z:
            if str(z["model"]) != manifest.files["fp32"].sha256 or "stats" not in z:
                raise SystemExit(f"{args.outputs} holds another model's outputs, or none of its input statistics")
            probs, feats, y, exams, stats = z["probs"], z["feats"], z["y"], z["exams"], z["stats"]
    else:
        probs, feats, y, exams, stats = heldout_inputs(clf, seeds)
        if args.outputs is not None:
            args.outputs.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.outputs, probs=probs, feats=feats, y=y, exams=exams, stats=stats,
                     model=manifest.files["fp32"].sha256)
    fields, means, whiten = fit_gate(probs, feats, y, exams, n_classes=len(manifest.labels or []),
                                     ood_quantile=args.ood_quantile, target_accuracy=args.target_accuracy,
                                     min_temperature=args.min_temperature)
    fitted_on = (f"{len(y)} series of {args.exams} held-out simulated exams (seeds {args.seed}..{args.seed + args.exams - 1}, "
                 f"every third the held-out protocol variant), split by exam: half fits T and the feature statistics, "
                 f"half sets the thresholds")
    channels = input_channels(manifest)
    ranges = fit_class_ranges(stats, statistic_names(channels), y, exam_halves(exams), list(manifest.labels or []),
                              channels, fitted_on)
    fields["report"]["class_input_ranges"] = {lab: r.threshold for lab, r in ranges.ranges.items()}
    m = install_gate(manifest, fields, means, whiten, fitted_on, ranges)
    from scanside.training.sequence.export import write_card

    write_card(m, Path(m.root))
    print(json.dumps({"model": m.ref, **fields}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
