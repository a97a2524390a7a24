"""Parity report: FP32 ONNX Runtime against each INT8 variant (and TensorRT plans where they can run) on
held-out data prepared like the agent prepares it.

Per variant: max / mean absolute output difference, relative L2 error, the task metric of the variant and
of FP32, and a single ``loss`` in [0, 1] that the agent's parity gate compares with
``[engines] int8_tolerance`` (scanside.engines.store.parity_refusal):

* dense outputs (segmentation, lesion maps; >= 3 spatial axes): Dice of the variant's mask against the
  FP32 mask (manifest postprocessing: gaussian sigma on logits, sigmoid, threshold); loss = 1 - Dice.
  Where the FP32 mask is empty on every sample the loss is 1: an empty reference cannot pass.
* class scores ([N, K], K >= 2): accuracy against the series' header labels where the manifest's labels
  name them, else top-1 agreement with FP32; loss = accuracy drop (or 1 - agreement).
* one score per sample ([N] or [N, 1]): AUROC against exam-level truth where it is known (both classes
  present), loss = AUROC drop; otherwise agreement of the thresholded score with FP32.

The report is written into the manifest's ``parity`` field, keyed by variant (``plan:<path>`` for plans),
with the sha256 of the file it was measured on: re-quantizing a file invalidates its report.  Each entry
also says what it was measured on (``data_origin``: real, simulated, mixed or unknown; the report's ``data``
counts the series and exams of each): the store runs an INT8 variant on real exams only on real-data parity.
"""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from scanside.converters.calibration_data import CalibrationSet
from scanside.engines.manifest import ModelManifest


# ------------------------------------------------------------------------------------------------
# metrics (plain numpy)
# ------------------------------------------------------------------------------------------------
def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def auroc(scores: Sequence[float], truth: Sequence[float]) -> Optional[float]:
    """Mann-Whitney AUROC with ties counted half; None unless both classes are present."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    keep = np.isfinite(t)
    s, t = s[keep], t[keep]
    pos, neg = s[t > 0.5], s[t <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def dense_mask(output: np.ndarray, post: Dict[str, Any]) -> np.ndarray:
    """(N, C, *spatial) logits/probabilities -> boolean mask, following the manifest's postprocessing."""
    from scipy import ndimage

    x = np.asarray(output, dtype=np.float32)
    sigma = float(post.get("gaussian_sigma") or 0.0)
    if sigma > 0:
        spatial = x.ndim - 2
        x = ndimage.gaussian_filter(x, sigma=(0.0, 0.0) + (sigma,) * spatial, mode="nearest")
    act = post.get("activation", "sigmoid")
    if act == "sigmoid":
        x = _sigmoid(x)
    elif act == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        x = e / e.sum(axis=1, keepdims=True)
        x = x[:, 1:] if x.shape[1] > 1 else x
    return x > float(post.get("threshold", 0.5))


def output_kind(manifest: ModelManifest) -> str:
    rank = manifest.outputs[0].rank
    if rank >= 4:
        return "dense"
    shape = manifest.outputs[0].shape
    if rank == 2 and isinstance(shape[1], int) and shape[1] >= 2:
        return "classes"
    return "score"


def task_metrics(manifest: ModelManifest, ref: np.ndarray, got: np.ndarray, cset: CalibrationSet) -> Dict[str, Any]:
    """Task metric of *got* (and of the FP32 *ref*) and the gate's loss."""
    kind = output_kind(manifest)
    post = dict(manifest.postprocessing or {})
    if kind == "dense":
        mr, mg = dense_mask(ref, post), dense_mask(got, post)
        per = [dice(a, b) for a, b in zip(mr, mg)]
        d = dice(mr, mg)
        out = {"metric": "dice_vs_fp32", "value": round(d, 6), "reference": 1.0, "loss": round(1.0 - d, 6),
               "per_sample_min": round(min(per), 6) if per else None,
               "fp32_foreground_voxels": int(mr.sum()), "foreground_voxels": int(mg.sum()),
               "fp32_empty_samples": int(sum(1 for a in mr if not a.any()))}
        if not mr.any():
            # nothing to compare: a variant that finds nothing would "agree" (TAPS int8_u8s8 calibrated on phantoms
            # capped every logit at 0 and passed on the raw-output error, then segmented nothing on real T2W)
            out["loss"] = 1.0
            out["informative"] = False
            out["note"] = ("FP32 mask empty on every sample: parity not measured (an empty reference cannot pass); "
                           "measure on held-out data where the model finds its target")
        return out
    if kind == "classes":
        pr, pg = ref.argmax(axis=1), got.argmax(axis=1)
        agreement = float((pr == pg).mean())
        names = list(manifest.labels or [])
        idx = [(i, names.index(lab)) for i, lab in enumerate(cset.labels) if lab in names]
        if idx:
            rows, want = np.array([i for i, _ in idx]), np.array([j for _, j in idx])
            acc_r = float((pr[rows] == want).mean())
            acc_g = float((pg[rows] == want).mean())
            return {"metric": "accuracy", "value": round(acc_g, 6), "reference": round(acc_r, 6),
                    "loss": round(max(0.0, acc_r - acc_g), 6), "agreement": round(agreement, 6), "labelled": len(idx)}
        return {"metric": "top1_agreement", "value": round(agreement, 6), "reference": 1.0,
                "loss": round(1.0 - agreement, 6), "labelled": 0}
    sr, sg = ref.reshape(len(ref), -1)[:, 0], got.reshape(len(got), -1)[:, 0]
    if post.get("activation") == "sigmoid":
        sr, sg = _sigmoid(sr), _sigmoid(sg)
    targets = cset.targets if cset.targets else [float("nan")] * len(sr)
    ar, ag = auroc(sr, targets), auroc(sg, targets)
    if ar is not None and ag is not None:
        return {"metric": "auroc", "value": round(ag, 6), "reference": round(ar, 6), "loss": round(max(0.0, ar - ag), 6)}
    thr = float(post.get("threshold", 0.5))
    agreement = float(((sr > thr) == (sg > thr)).mean())
    return {"metric": "decision_agreement", "value": round(agreement, 6), "reference": 1.0,
            "loss": round(1.0 - agreement, 6)}


def cspca_metrics(manifest: ModelManifest, ref: Dict[str, np.ndarray], got: Dict[str, np.ndarray],
                  cset: CalibrationSet) -> Dict[str, Any]:
    """csPCa detection (likelihood map + exam probability) of *got* against the FP32 *ref*:

    * exam level: AUROC of the probability against exam truth (simulator ground truth) for both, and the
      agreement of the csPCa decision (``decision_threshold``) with FP32;
    * lesion level: lesion candidates of the FP32 map (connected components of ``likelihood >
      lesion_threshold`` whose peak reaches ``min_peak``, as scanside.engines.tasks.cspca finds them) also found by the
      variant (overlapping component), and the variant's candidates FP32 does not have; Dice of the maps'
      lesion masks against FP32.

    loss = max(AUROC drop, 1 - decision agreement, 1 - lesion agreement): any exam decided differently or
    any lesion found by one and not the other counts."""
    post = dict(manifest.postprocessing or {})
    # read both as the agent reads them (scanside.engines.tasks.cspca.run_declared): likelihood map and exam probability
    io = manifest.cspca_io()
    ref, got = ({"likelihood": lk, "probability": p[:, None]} for lk, p in (io.decode(ref), io.decode(got)))
    map_name, prob_name = "likelihood", "probability"
    thr_map = float(post.get("lesion_threshold", 0.5))
    min_peak = float(post.get("min_peak", thr_map))
    thr_dec = float(post.get("decision_threshold", 0.5))
    out: Dict[str, Any] = {}
    losses: List[float] = []
    if prob_name is not None:
        pr = ref[prob_name].reshape(len(ref[prob_name]), -1)[:, 0].astype(np.float64)
        pg = got[prob_name].reshape(len(got[prob_name]), -1)[:, 0].astype(np.float64)
        targets = cset.targets if cset.targets else [float("nan")] * len(pr)
        ar, ag = auroc(pr, targets), auroc(pg, targets)
        agree = float(((pr >= thr_dec) == (pg >= thr_dec)).mean())
        out.update({"metric": "auroc" if ar is not None else "decision_agreement",
                    "value": round(ag if ag is not None else agree, 6),
                    "reference": round(ar if ar is not None else 1.0, 6),
                    "auroc": None if ag is None else round(ag, 6), "auroc_fp32": None if ar is None else round(ar, 6),
                    "exams_with_truth": int(np.isfinite(np.asarray(targets, dtype=np.float64)).sum()),
                    "decision_agreement": round(agree, 6),
                    "probability_max_abs_diff": round(float(np.abs(pg - pr).max()), 6)})
        if ar is not None and ag is not None:
            losses.append(max(0.0, ar - ag))
        losses.append(1.0 - agree)
    mr = np.asarray(ref[map_name], dtype=np.float32)
    mg = np.asarray(got[map_name], dtype=np.float32)
    ref_mask, got_mask = mr > thr_map, mg > thr_map
    found = missed = extra = 0
    for a_map, a_mask, b_map, b_mask in zip(mr, ref_mask, mg, got_mask):
        f, m = _candidates_overlapping(a_map[0], a_mask[0], b_mask[0], min_peak)
        found, missed = found + f, missed + m
        extra += _candidates_overlapping(b_map[0], b_mask[0], a_mask[0], min_peak)[1]
    total = found + missed + extra
    lesion_agreement = 1.0 if total == 0 else found / total
    d = dice(ref_mask, got_mask)
    out.update({"lesions_fp32": found + missed, "lesions_found": found, "lesions_missed": missed,
                "lesions_extra": extra, "lesion_agreement": round(lesion_agreement, 6),
                "map_dice_vs_fp32": round(d, 6), "map_max_abs_diff": round(float(np.abs(mg - mr).max()), 6)})
    if "metric" not in out:
        out.update({"metric": "lesion_agreement", "value": round(lesion_agreement, 6), "reference": 1.0})
    losses.append(1.0 - lesion_agreement)
    out["loss"] = round(max(losses), 6)
    out["loss_is"] = "max(AUROC drop, 1 - decision agreement, 1 - lesion agreement)"
    return out


def _candidates_overlapping(lk: np.ndarray, mask: np.ndarray, other: np.ndarray, min_peak: float) -> Tuple[int, int]:
    """Lesion candidates of *mask* (connected components whose peak in *lk* reaches *min_peak*): how many overlap
    *other* and how many do not.  Per-label reductions, not a pass over the map per component: a noisy map (an
    untrained or out-of-distribution model) has thousands of components."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n == 0:
        return 0, 0
    ids = np.arange(1, n + 1)
    strong = np.asarray(ndimage.maximum(lk, lab, ids)) >= min_peak
    hit = np.asarray(ndimage.maximum(other.astype(np.uint8), lab, ids)) > 0
    return int((strong & hit).sum()), int((strong & ~hit).sum())


# ------------------------------------------------------------------------------------------------
# running the variants
# ------------------------------------------------------------------------------------------------
def _run(engine: Any, manifest: ModelManifest, cset: CalibrationSet,
         desc: str = "parity") -> Tuple[Dict[str, np.ndarray], List[float]]:
    """Every output of *engine* over *cset*, one sample per call, and the time of each call."""
    from scanside.agent.service.progress import progress

    names = [o.name for o in manifest.outputs]
    outs: Dict[str, List[np.ndarray]] = {n: [] for n in names}
    times = []
    for feed in progress(cset.feeds(1), total=len(cset), desc=desc, unit="sample"):
        t0 = time.perf_counter()
        res = engine.run(feed)
        times.append(time.perf_counter() - t0)
        for n in names:
            outs[n].append(np.asarray(res[n], dtype=np.float32))
    return {n: np.concatenate(v, axis=0) for n, v in outs.items()}, times


def _ort_engine(manifest: ModelManifest, variant: str, threads: Optional[int]) -> Any:
    from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine(["CPUExecutionProvider"], intra_op_threads=threads).load(manifest, variant)


def _openvino_engine(manifest: ModelManifest, variant: str, threads: Optional[int]) -> Any:
    from scanside.engines.backends.openvino_engine import OpenVinoEngine

    return OpenVinoEngine(threads=threads, cache=False).load(manifest, variant)


def openvino_unavailable() -> Optional[str]:
    """Why OpenVINO entries cannot be measured here (None: they can)."""
    try:
        from scanside.engines.backends.openvino_engine import OpenVinoEngine, is_x86
    except ImportError as e:  # pragma: no cover - module always importable
        return f"scanside.engines.backends.openvino_engine: {e}"
    if not is_x86():
        return "not an x86 CPU"
    ok, why = OpenVinoEngine.availability()
    return None if ok else why


def _diffs(ref: np.ndarray, got: np.ndarray) -> Dict[str, float]:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    den = float(np.sqrt(np.sum(ref.astype(np.float64) ** 2)))
    return {"max_abs_diff": round(float(diff.max()), 6), "mean_abs_diff": round(float(diff.mean()), 6),
            "rel_l2": round(float(np.sqrt(np.sum(diff ** 2)) / den) if den > 0 else float("nan"), 6)}


def _compare(manifest: ModelManifest, ref: Dict[str, np.ndarray], got: Dict[str, np.ndarray],
             cset: CalibrationSet) -> Dict[str, Any]:
    first = manifest.outputs[0].name
    out: Dict[str, Any] = dict(_diffs(ref[first], got[first]))
    if len(manifest.outputs) > 1:
        out["outputs"] = {o.name: _diffs(ref[o.name], got[o.name]) for o in manifest.outputs}
    if manifest.task == "cspca_detection":
        out.update(cspca_metrics(manifest, ref, got, cset))
    else:
        out.update(task_metrics(manifest, ref[first], got[first], cset))
    return out


def tensorrt_plans_runnable(manifest: ModelManifest) -> Tuple[List[Any], str]:
    """Plans of *manifest* this machine can run, or why none."""
    from scanside.engines.backends.tensorrt_engine import check_plan_compatibility, probe_cuda_device, probe_tensorrt

    if not manifest.plans:
        return [], "no TensorRT plan in the manifest"
    version, why = probe_tensorrt()
    if version is None:
        return [], why
    dev, dwhy = probe_cuda_device(0)
    if dev is None:
        return [], dwhy
    ok = [p for p in manifest.plans if check_plan_compatibility(p, dev, version).ok]
    return ok, "" if ok else "no plan compatible with this GPU/TensorRT"


def parity_report(manifest: ModelManifest, held_out: CalibrationSet, *, variants: Optional[Sequence[str]] = None,
                  reference: str = "fp32", tensorrt: bool = True, threads: Optional[int] = None,
                  data_description: str = "", openvino: bool = True) -> Dict[str, Any]:
    """Run FP32 ONNX Runtime (the reference) and every other variant (default: all non-reference files) on
    *held_out* and compare.  With *openvino* (and OpenVINO importable on x86), every variant -- FP32
    included -- is also measured through the OpenVINO back end, recorded as ``openvino:<variant>``: the
    store's gate for an OpenVINO selection reads those entries, not the ONNX Runtime ones."""
    if len(held_out) == 0:
        raise ValueError("parity needs held-out samples")
    all_variants = list(variants or list(manifest.files))
    variants = [v for v in all_variants if v != reference]
    eng = _ort_engine(manifest, reference, threads)
    with eng:
        ref, ref_t = _run(eng, manifest, held_out)
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    report: Dict[str, Any] = {
        "created_at": now, "reference": reference, "reference_backend": "onnxruntime",
        "reference_sha256": manifest.files[reference].sha256,
        "data": {**held_out.origin_summary(),
                 "description": data_description or "held-out DICOM series, agent preprocessing"},
        "reference_median_latency_s": round(float(np.median(ref_t)), 4),
        "variants": {},
    }
    # each entry carries the origin of the data it was measured on (records of several runs are merged):
    # the store's gate for real exams reads it (scanside.engines.store.parity_refusal)
    origin = str(report["data"]["origin"])
    if manifest.task == "cspca_detection":  # the reference's own task metric, for context
        report["reference_metrics"] = {k: v for k, v in cspca_metrics(manifest, ref, ref, held_out).items()
                                       if k in ("auroc", "exams_with_truth", "lesions_fp32")}

    def measure(backend: str, v: str, make: Any) -> Dict[str, Any]:
        mf = manifest.files[v]
        with make(manifest, v, threads) as e:
            got, t = _run(e, manifest, held_out, desc=f"parity {backend} {v}")
        entry = {"backend": backend, "precision": mf.precision, "sha256": mf.sha256,
                 "median_latency_s": round(float(np.median(t)), 4), "data_origin": origin}
        entry.update(_compare(manifest, ref, got, held_out))
        return entry

    for v in variants:
        report["variants"][v] = measure("onnxruntime", v, _ort_engine)
    if openvino:
        why = openvino_unavailable()
        if why:
            report["openvino"] = f"skipped: {why}"
        else:
            import openvino as _ovpkg

            report["openvino"] = f"measured with openvino {_ovpkg.__version__}"
            ov_variants = [reference] + variants if reference in manifest.files else variants
            for v in ov_variants:
                report["variants"][f"openvino:{v}"] = measure("openvino", v, _openvino_engine)
    if tensorrt:
        plans, why = tensorrt_plans_runnable(manifest)
        if not plans:
            report["tensorrt"] = f"skipped: {why}"
        for plan in plans:
            from scanside.engines.backends.tensorrt_engine import TensorRTEngine

            eng = TensorRTEngine(plan_path=plan.path).load(manifest, plan.source_variant)
            with eng:
                got, t = _run(eng, manifest, held_out)
            entry = {"backend": "tensorrt", "precision": plan.precision, "sha256": plan.sha256, "data_origin": origin,
                     "trt_version": plan.trt_version, "compute_capability": plan.compute_capability,
                     "median_latency_s": round(float(np.median(t)), 4)}
            entry.update(_compare(manifest, ref, got, held_out))
            report["variants"][f"plan:{plan.path}"] = entry
    return report


def record(manifest: ModelManifest, report: Dict[str, Any], *, save: bool = True) -> ModelManifest:
    """Merge *report* into manifest.parity (entries of other variants are kept) and save."""
    old = dict(manifest.parity or {})
    merged = {**old, **report}  # keeps what the exporter recorded (e.g. torch vs ONNX Runtime)
    variants = dict(old.get("variants") or {})
    variants.update(report.get("variants") or {})
    merged["variants"] = variants
    root = manifest.root
    updated = manifest.model_copy(update={"parity": merged})
    if save and root is not None:
        updated.save(Path(root))
    return updated.set_root(root)
