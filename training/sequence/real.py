"""Evaluate the sequence classifier on real DICOM, the way the daemon runs it.

    scanside models evaluate sequence-classifier --real DIR [--labels CSV] [--json] [--write]

Every file under DIR goes the agent's runtime path: scanside.agent.dicom.header.read_header -> one acquisition per
SeriesInstanceUID -> scanside.agent.dicom.series.split_parts / summarise (the header label and its confidence), all
by scanside.agent.dicom.exam_reader.read_exams, and its classifier_inputs ->
scanside.engines.tasks.image_label.ImageClassifier.classify (select_frames -> scanside.agent.dicom.volume.load_volume ->
scanside.engines.preprocess.prepare -> the store's engine -> the model's uncertainty gate), then
ImageClassifier.with_physics across each exam's series (the diffusion physics, as the daemon). Nothing here
reads pixels another way.

Reference: the header label (at a site the header is right almost always), unless a labels CSV
(``series_uid[#part],label``; lines starting with # are comments) names the series. The repository's
``realdata_labels.csv`` holds the one correction ../shared/realdata needs (its README: the QIN GE ADC
map carries a b-value tag and must be ADC). Reported per series, per exam and per class:

* ``five_class``: the series whose reference is one of the five sequence classes (T2WI_nan, T2WI_fs,
  DWI_Low, DWI_High, ADC), the issue's figure; ``all``: with `other` too. ``accuracy`` counts an
  `uncertain` answer as wrong; ``accuracy_confident`` is over the confident answers only and
  ``uncertain_rate`` says how many were withheld.
* ``false_alerts``: series whose header label is right and that would raise LABEL_MISMATCH (the
  analysis rule: image label confident, not uncertain, disagreeing with a confident header).
"""
from __future__ import annotations

import csv
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union


from scanside.agent.schema.taxonomy import LABELS

log = logging.getLogger(__name__)

FIVE = ("T2WI_nan", "T2WI_fs", "DWI_Low", "DWI_High", "ADC")
DEFAULT_LABELS = Path(__file__).with_name("realdata_labels.csv")
#: what the real-data figures label a series with (recorded beside them in the manifest)
LABELS_MEASURED = ("the daemon's: the network with its uncertainty gate, then the diffusion physics across each exam's series "
                   "(an ADC map it does not confirm is uncertain)")
LABELS_BEFORE_PHYSICS = "the network with its uncertainty gate (measured before the diffusion physics)"
#: the issue's target on real series (five classes)
REAL_TARGET = {"accuracy": 0.95}


def read_labels(path: Optional[Path]) -> Dict[str, str]:
    """``series_uid[#part] -> label`` from a CSV (header row ``series_uid,label``; # comments)."""
    if path is None or not Path(path).is_file():
        return {}
    out: Dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        rows = csv.DictReader(line for line in fh if line.strip() and not line.lstrip().startswith("#"))
        for i, r in enumerate(rows, 2):
            uid, lab = (r.get("series_uid") or "").strip(), (r.get("label") or "").strip()
            if lab not in LABELS:
                raise ValueError(f"{path}:{i}: unknown label {lab!r}")
            out[uid] = lab
    return out


def read_series(folders: Union[Path, Sequence[Path]]) -> Tuple[List[Tuple[Any, Any]], Dict[str, int]]:
    """(SeriesSummary, SeriesPart) of every series the daemon would classify under ``folders``
    (scanside.agent.dicom.exam_reader.read_exams, the daemon's read path; classifier_inputs, its selection) and the
    count of files not used, by reason."""
    from scanside.agent.dicom.exam_reader import classifier_inputs, read_exams

    out: List[Tuple[Any, Any]] = []
    skipped: Dict[str, int] = {}
    for exam in read_exams(folders):
        chosen = {s.series_id for s in classifier_inputs(exam.summaries())}
        out += [(es.summary, es.part) for es in exam.series if es.series_id in chosen]
        skipped = exam.skipped
    return out, dict(skipped)


def would_alert(summary: Any, image: Any) -> bool:
    """Would the daemon raise LABEL_MISMATCH ([analysis] defaults)? Its own rule, not a copy."""
    from scanside.agent.analysis.analysis import raises_mismatch
    from scanside.agent.runtime.config import AnalysisConfig

    return raises_mismatch(summary, image, AnalysisConfig())


def _exam_key(study_uid: str) -> str:
    return hashlib.sha1(study_uid.encode()).hexdigest()[:8]  # no UIDs in reports


def classify_series(clf: Any, series: List[Tuple[Any, Any]], labels: Dict[str, str]) -> List[dict]:
    """One row per series: the classifier on each series' volume, then the diffusion physics across the
    series of each exam (ImageClassifier.with_physics, as the daemon does once the exam's series are in)."""
    from scanside.engines.tasks.image_label import ImageLabelError, series_name

    rows: List[dict] = []
    by_exam: Dict[str, List[Tuple[Any, Any]]] = {}
    for s, part in series:
        by_exam.setdefault(s.study_uid, []).append((s, part))
    for exam in by_exam.values():
        volumes: Dict[str, Any] = {}
        images: Dict[str, Any] = {}
        failed: Dict[str, str] = {}
        for s, part in exam:
            try:
                vol, _ = clf.volume_of(part)
                images[s.series_id] = clf.classify(vol)
                volumes[s.series_id] = vol
            except ImageLabelError as e:
                failed[s.series_id] = e.reason
        names = {s.series_id: series_name(s) for s, _ in exam}
        images = clf.with_physics(images, volumes, names)
        for s, _ in exam:
            ref = labels.get(s.series_id, labels.get(s.series_uid))
            row = dict(exam=_exam_key(s.study_uid), series_number=s.series_number, description=s.series_description,
                       part=s.part, plane=s.plane, header=s.label, header_confidence=s.label_confidence,
                       reference=ref or s.label, reference_source="labels file" if ref else "header")
            img = images.get(s.series_id)
            if img is None:
                row.update(image=None, predicted=None, confidence=None, error=failed.get(s.series_id), alert=False)
            else:
                row.update(image=img.label, predicted=img.predicted, confidence=round(img.confidence, 4),
                           ood_score=img.ood_score, uncertain_reason=img.uncertain_reason, diffusion=img.diffusion,
                           alert=would_alert(s, img))
            rows.append(row)
    return rows


def summarise_rows(rows: List[dict]) -> Dict[str, Any]:
    from scanside.training.common import classification_metrics

    idx = {lab: i for i, lab in enumerate(LABELS)}
    out: Dict[str, Any] = {}
    for name, keep in (("five_class", lambda r: r["reference"] in FIVE), ("all", lambda r: True)):
        rs = [r for r in rows if keep(r)]
        if not rs:
            continue
        # an uncertain or failed answer counts as wrong: as `other` (or T2WI_nan when the truth is other)
        y = [idx[r["reference"]] for r in rs]
        yp = [idx[r["image"]] if r.get("image") in idx else (idx["T2WI_nan"] if r["reference"] == "other" else idx["other"])
              for r in rs]
        m = classification_metrics(y, yp, LABELS)
        conf = [r for r in rs if r.get("image") in idx]
        m["accuracy_confident"] = (sum(r["image"] == r["reference"] for r in conf) / len(conf)) if conf else None
        m["accuracy_argmax"] = sum(r.get("predicted") == r["reference"] for r in rs) / len(rs)
        m["uncertain_rate"] = 1 - len(conf) / len(rs)
        m["confident_wrong"] = sum(r["image"] != r["reference"] for r in conf)
        out[name] = m
    return out


def evaluate_real(store: Any, manifest: Any, options: Any) -> dict:
    """scanside.training.registry evaluator on real DICOM (``options.real``)."""
    from scanside.engines.tasks.image_label import ImageClassifier

    folders = [Path(p) for p in (options.real if isinstance(options.real, (list, tuple)) else [options.real])]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"--real {folder}: not a folder")
    labels = read_labels(getattr(options, "labels", None) or DEFAULT_LABELS)
    t0 = time.time()
    series, skipped = read_series(folders)
    clf = ImageClassifier(store, manifest.ref, variant=options.variant)
    rows = classify_series(clf, series, labels)
    metrics = summarise_rows(rows)
    exams: Dict[str, dict] = {}
    for r in rows:
        e = exams.setdefault(r["exam"], {"series": 0, "right": 0, "uncertain": 0, "false_alerts": 0})
        e["series"] += 1
        e["right"] += r.get("image") == r["reference"]
        e["uncertain"] += r.get("image") == "uncertain"
        e["false_alerts"] += bool(r["alert"] and r["header"] == r["reference"])
    five = metrics.get("five_class", {})
    report = {
        "model": manifest.ref, "backend": clf.backend, "real": " ".join(str(f) for f in folders), "series_parts": len(rows),
        "skipped_files": skipped, "seconds": round(time.time() - t0, 1), "floor": REAL_TARGET,
        "passed": bool(five) and five["accuracy"] >= REAL_TARGET["accuracy"],
        "metrics": {k: {kk: v[kk] for kk in ("n", "accuracy", "kappa", "accuracy_argmax", "accuracy_confident",
                                             "uncertain_rate", "confident_wrong")} for k, v in metrics.items()},
        "per_class": {k: v["per_class"] for k, v in metrics.items()},
        "confusion": {k: v["confusion"] for k, v in metrics.items()},
        "false_alerts": sum(e["false_alerts"] for e in exams.values()),
        "exams": exams, "series": rows,
    }
    if options.write:
        write_real(manifest, report)
        report["written"] = str(manifest.root)
    return report


def write_real(manifest: Any, report: dict) -> None:
    """Real-data figures -> manifest.metrics['real'] (keyed by folder name) and the model card."""
    from scanside.engines.manifest import ModelManifest
    from scanside.training.sequence.export import now_iso, write_card

    metrics = dict(manifest.metrics)
    real = dict(metrics.get("real_data") or {})
    real[" + ".join(Path(f).name for f in report["real"].split(" "))] = {
        "measured_at": now_iso(), "command": f"scanside models evaluate {manifest.name} --real {report['real']} --write",
        "series_parts": report["series_parts"], "exams": len(report["exams"]), "false_alerts": report["false_alerts"],
        "labels": LABELS_MEASURED,
        "subsets": report["metrics"],
        "errors": [{k: r.get(k) for k in ("description", "part", "reference", "image", "predicted", "confidence")}
                   for r in report["series"] if r.get("image") != r["reference"]],
    }
    metrics["real_data"] = real
    m = manifest.model_copy(update={"metrics": metrics})
    m.set_root(manifest.root)
    m.save(Path(manifest.root))
    write_card(ModelManifest.load(Path(manifest.root)), Path(manifest.root))


def real_card_section(m: Any) -> List[str]:
    """Model card lines for the real-data figures (next to the simulated ones)."""
    real = (m.metrics or {}).get("real_data") or {}
    if not real:
        return ["", "## Real scans", "Not yet measured on real DICOM (`scanside models evaluate "
                f"{m.name} --real DIR --write`)."]
    lines = ["", "## Real scans",
             "Measured through the daemon's own path on real DICOM no training run used. Reference: the header "
             "label, corrected where training/sequence/realdata_labels.csv says. `uncertain` counts as wrong in "
             "`accuracy`:", ""]
    for name, r in real.items():
        for subset, v in r["subsets"].items():
            conf = v.get("accuracy_confident")
            lines.append(f"- {name}, {subset}: n={v['n']}, accuracy {v['accuracy']:.3f} (most probable class "
                         f"{v['accuracy_argmax']:.3f}), uncertain {v['uncertain_rate']:.0%}, accuracy when confident "
                         f"{'n/a' if conf is None else f'{conf:.3f}'}, confident and wrong {v['confident_wrong']}")
        lines.append(f"- {name}: false LABEL_MISMATCH alerts {r['false_alerts']} on {r['exams']} exam(s); "
                     f"`{r['command']}` ({r['measured_at']}); labels: {r.get('labels', LABELS_BEFORE_PHYSICS)}")
    return lines
