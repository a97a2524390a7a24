"""csPCa metrics: AUROC, AP and ranking score through picai-eval, calibration (ECE), lesion detection.

picai-eval (PyPI ``picai-eval``) is the PI-CAI challenge's evaluation: lesion candidates are
extracted from each likelihood map (``report_guided_annotation.extract_lesion_candidates``,
dynamic threshold, as PI-CAI does), matched to the ground-truth csPCa lesion masks by IoU >= 0.1;
AP is lesion-level, AUROC is case-level and the ranking score is (AUROC + AP) / 2. The case-level
prediction is the model's exam probability (not the map maximum).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np


def ece(probs: Sequence[float], labels: Sequence[int], n_bins: int = 10) -> float:
    """Expected calibration error with equal-width bins: sum_b |b|/n * |mean(label) - mean(prob)|."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.size == 0:
        return float("nan")
    bins = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.sum() / p.size * abs(y[sel].mean() - p[sel].mean())
    return float(total)


def picai_metrics(likelihoods: List[np.ndarray], targets: List[np.ndarray], case_probs: Sequence[float],
                  case_labels: Sequence[int]) -> Dict[str, Any]:
    """AUROC (case), AP (lesion) and ranking score via picai-eval."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):  # both packages print a citation banner on import
        from picai_eval import evaluate
        from picai_eval.metrics import Metrics
        from report_guided_annotation import extract_lesion_candidates

    ids = [f"case{i:05d}" for i in range(len(likelihoods))]
    det = evaluate(y_det=[np.asarray(lk, dtype=np.float32) for lk in likelihoods],
                   y_true=[np.asarray(t, dtype=np.int32) for t in targets], subject_list=ids,
                   y_det_postprocess_func=lambda pred: extract_lesion_candidates(pred)[0], num_parallel_calls=1)
    m = Metrics(lesion_results=det.lesion_results,
                case_target={i: int(v) for i, v in zip(ids, case_labels)},
                case_pred={i: float(v) for i, v in zip(ids, case_probs)})
    auroc, ap = float(m.auroc), float(m.AP)
    return {"auroc": auroc, "ap": ap, "ranking_score": (auroc + ap) / 2.0, "num_lesions": int(m.num_lesions),
            "map_auroc": float(det.auroc)}


def operating_point(probs: Sequence[float], labels: Sequence[int], threshold: float) -> Dict[str, Any]:
    p = np.asarray(probs) >= threshold
    y = np.asarray(labels).astype(bool)
    tp, fn = int((p & y).sum()), int((~p & y).sum())
    tn, fp = int((~p & ~y).sum()), int((p & ~y).sum())
    return {"threshold": threshold, "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None, "tp": tp, "fn": fn, "tn": tn, "fp": fp}


def lesion_detection(cases: List[Dict[str, Any]], min_diameter_mm: float = 8.0) -> Dict[str, Any]:
    """cases: [{"lesions": [{"centre": xyz, "max_diameter": mm, "cspca": bool}], "findings": [xyz...], "label": 0|1}].

    A csPCa lesion (largest diameter >= min_diameter_mm) is detected when a finding's centre lies within
    max(5 mm, its largest radius) of the lesion's centre; the centre error is the distance to the nearest
    finding. Findings matching no csPCa lesion are false positives."""
    errors, detected, n_les, fp, fp_neg, n_neg = [], 0, 0, 0, 0, 0
    for c in cases:
        f = np.asarray(c["findings"], dtype=np.float64).reshape(-1, 3)
        used = np.zeros(len(f), dtype=bool)
        for les in c["lesions"]:
            if not les["cspca"] or les["max_diameter"] < min_diameter_mm:
                continue
            n_les += 1
            if len(f) == 0:
                continue
            d = np.linalg.norm(f - np.asarray(les["centre"]), axis=1)
            j = int(np.argmin(d))
            if d[j] <= max(5.0, les["max_diameter"] / 2.0):
                detected += 1
                errors.append(float(d[j]))
                used[j] = True
        # findings near any csPCa lesion (even a second finding on it) are not false positives
        for j in np.flatnonzero(~used):
            near = any(np.linalg.norm(f[j] - np.asarray(les["centre"])) <= max(5.0, les["max_diameter"] / 2.0)
                       for les in c["lesions"] if les["cspca"])
            if not near:
                fp += 1
                if not c["label"]:
                    fp_neg += 1
        n_neg += int(not c["label"])
    e = np.asarray(errors)
    return {
        "lesions": n_les, "detected": detected,
        "lesion_sensitivity": detected / n_les if n_les else None,
        "centre_error_median_mm": float(np.median(e)) if e.size else None,
        "centre_error_p90_mm": float(np.percentile(e, 90)) if e.size else None,
        "centre_within_5mm": float((e <= 5.0).mean()) if e.size else None,
        "fp_findings": fp, "fp_findings_per_negative_exam": fp_neg / n_neg if n_neg else None,
    }
