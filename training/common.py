"""Shared by the training packages: classification metrics (sklearn-free, numpy only), the record of a
training continued in stages, loading a saved checkpoint, the key of a rendered-data cache and the
model card's INT8 section."""
from __future__ import annotations

import hashlib
import importlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np


def run_jobs(fn: Callable[[Any], Any], todo: Sequence[Any], jobs: int = 1, desc: str = "simulating exams",
             unit: str = "exam") -> List[Any]:
    """fn over todo, in `jobs` worker processes when more than one, with progress on stderr
    (scanside.agent.service.progress: counts and an estimate; the evaluations spend minutes here)."""
    from scanside.agent.service.progress import progress

    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            return list(progress(ex.map(fn, todo), total=len(todo), desc=desc, unit=unit))
    return [fn(j) for j in progress(todo, desc=desc, unit=unit)]


#: the code a rendered training sample depends on, whatever the model: the simulator and the preprocessing
RENDER_SOURCES = ("scanside.simulator.phantom", "scanside.simulator.physics", "scanside.simulator.render", "scanside.simulator.model",
                  "scanside.simulator.protocols", "scanside.simulator.vendors.common", "scanside.engines.preprocess", "scanside.engines.spec")


def render_cache_key(*extra_modules: str, salt: str = "") -> str:
    """12 hex digits of the sha256 of RENDER_SOURCES, the given modules' source files and ``salt``: a
    cache of rendered samples keyed by it is rebuilt whenever the simulator, the preprocessing or the
    data generator changes, never silently reused."""
    h = hashlib.sha256(salt.encode())
    for name in (*RENDER_SOURCES, *extra_modules):
        h.update(name.encode())
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()[:12]


def confusion(y_true: Sequence[int], y_pred: Sequence[int], n: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        cm[int(t), int(p)] += 1
    return cm


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def cohen_kappa(cm: np.ndarray) -> float:
    n = cm.sum()
    if n == 0:
        return float("nan")
    po = np.trace(cm) / n
    pe = float((cm.sum(0) * cm.sum(1)).sum()) / (n * n)
    return 1.0 if pe == 1.0 else float((po - pe) / (1.0 - pe))


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> Dict[str, Any]:
    """Accuracy, Cohen's kappa, confusion matrix and one-vs-rest sensitivity, specificity, PPV,
    NPV and F1 per class (None where undefined, e.g. a class with no true cases)."""
    k = len(labels)
    cm = confusion(y_true, y_pred, k)
    n = int(cm.sum())
    per: Dict[str, Dict[str, Any]] = {}
    for i, lab in enumerate(labels):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = n - tp - fn - fp
        sens, ppv = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        per[lab] = {"support": int(tp + fn), "sensitivity": sens, "specificity": _ratio(tn, tn + fp), "ppv": ppv,
                    "npv": _ratio(tn, tn + fn), "f1": f1}
    return {"n": n, "accuracy": float(np.trace(cm) / n) if n else float("nan"), "kappa": cohen_kappa(cm),
            "per_class": per, "labels": list(labels), "confusion": cm.tolist()}


def metrics_markdown(m: Dict[str, Any], title: str = "") -> str:
    labels = m["labels"]
    out = [f"### {title}" if title else "", "",
           f"n = {m['n']}, accuracy = {m['accuracy']:.4f}, Cohen's kappa = {m['kappa']:.4f}", "",
           "| class | support | sensitivity | specificity | PPV | NPV | F1 |", "|---|---:|---:|---:|---:|---:|---:|"]
    f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for lab in labels:
        r = m["per_class"][lab]
        out.append(f"| {lab} | {r['support']} | {f(r['sensitivity'])} | {f(r['specificity'])} | {f(r['ppv'])} | "
                   f"{f(r['npv'])} | {f(r['f1'])} |")
    out += ["", "Confusion matrix (rows: truth, columns: prediction)", "",
            "| truth \\ pred | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for lab, row in zip(labels, m["confusion"]):
        out.append(f"| {lab} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(out) + "\n"


def merge_stages(summary: Dict[str, Any], init_path: Any, keep: Sequence[str], seconds: Sequence[str]) -> Dict[str, Any]:
    """A continued training (`--init model.pt`): the earlier stage(s) from init's train.json plus this one,
    with steps and `seconds` keys summed over all stages; a "recipe" in `keep` is joined with " && "."""
    import json
    from pathlib import Path

    prev_file = Path(init_path).parent / "train.json"
    prev = json.loads(prev_file.read_text()) if prev_file.is_file() else {}
    stages = list(prev.get("stages", [prev] if prev else [])) + [dict(summary)]
    out = dict(summary)
    out["stages"] = [{k: st.get(k) for k in keep} for st in stages]
    out["steps"] = sum(int(st.get("steps") or 0) for st in out["stages"])
    out["seconds"] = {k: round(sum(float((st.get("seconds") or {}).get(k, 0.0)) for st in out["stages"]), 1)
                      for k in seconds}
    if "recipe" in keep:
        out["recipe"] = " && ".join(str(st.get("recipe")) for st in out["stages"])
    return out


def load_checkpoint(path: Any, model_class: Any) -> Any:
    """A model saved by the training scripts ({"config": {"widths": ...}, "state_dict": ...}), in eval mode."""
    import torch

    ck = torch.load(str(path), map_location="cpu", weights_only=True)
    model = model_class(widths=tuple(ck["config"]["widths"]))
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model


def int8_card_section(m: Any) -> List[str]:
    """The model card's INT8 section, from what the manifest records (a ModelManifest): calibration, nodes
    kept FP32 and parity per back end; empty when the model has no INT8 variant."""
    int8 = {k: f for k, f in m.files.items() if f.calibration}
    if not int8:
        return []
    lines = ["", "## INT8 variants (CPU and TensorRT)"]
    for f in int8.values():
        c = f.calibration or {}
        kept = sorted(c.get("nodes_kept_fp32") or {})
        lines.append(f"- `{f.path}` ({f.precision}): {c.get('method', '?')} calibration on {c.get('data', '?')}; "
                     f"nodes kept FP32 (chosen by measurement): {', '.join(f'`{n}`' for n in kept) or 'none'}.")
    variants = (m.parity or {}).get("variants") or {}
    if variants:
        lines.append(f"- Parity against ONNX Runtime FP32 on {((m.parity or {}).get('data') or {}).get('description', 'held-out data')}:")
        for key, e in variants.items():
            extra = "".join(f", {label} {e[k]}" for k, label in (("decision_agreement", "decisions equal"),
                                                                   ("lesion_agreement", "lesions equal"),
                                                                   ("map_dice_vs_fp32", "map Dice")) if k in e)
            lines.append(f"  - {key}: {e.get('metric')} {e.get('value')} (FP32 {e.get('reference')}), loss {e.get('loss')}"
                         f"{extra}")
    lines.append(f"- Reproduce: `python -m scanside.converters.int8_release {m.name}` with the options in the "
                 "calibration record (simulates the exams under var/int8/).")
    return lines


# ------------------------------------------------------------------------------------------ real data
REAL_DATA_KEY = "real_data"  # manifest.metrics key of a real-data evaluation (scanside.engines.tasks.gland.REAL_DATA reads it)


def opaque(uid: str) -> str:
    """A short, stable, non-identifying key for a study or series in reports (no UIDs, no names)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


def record_real_data(manifest: Any, record: Dict[str, Any], write_card: Any) -> None:
    """Save a real-data evaluation into the manifest (metrics["real_data"]) and re-render the model card."""
    metrics = dict(manifest.metrics)
    metrics[REAL_DATA_KEY] = record
    m2 = manifest.model_copy(update={"metrics": metrics})
    m2.set_root(manifest.root)
    m2.save(Path(manifest.root))
    write_card(m2, Path(manifest.root))


def real_data_card_section(m: Any) -> List[str]:
    """'Measured on real scans' for a model card, from metrics["real_data"]; says so plainly when there is none."""
    rd = (getattr(m, "metrics", None) or {}).get(REAL_DATA_KEY)
    head = ["", "## Measured on real scans (not simulated)"]
    if not rd:
        return head + ["Not measured on real scans yet: `scanside models evaluate "
                       f"{m.name} --real DIR --write` records it here. Until then, do not rely on it for patients."]
    lines = head + [f"Measured {rd.get('measured_at', '?')} with `{rd.get('command', '?')}` on {rd.get('exams', '?')} "
                    f"real exam(s) ({rd.get('data', 'real DICOM')}), read through the daemon's own path "
                    "(scanside.agent.dicom.exam_reader). Reference: " + str(rd.get("reference", "the header labels")) + "."]
    for k, v in (rd.get("figures") or {}).items():
        lines.append(f"- {k}: {v}")
    if "usable" in rd:
        lines.append(f"- verdict: {'usable' if rd['usable'] else 'NOT usable'} on real exams"
                     f"{': ' + rd['summary'] if rd.get('summary') else ''}")
    return lines
