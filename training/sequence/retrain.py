"""Retrain on a site's data: `scanside models train sequence --data DIR --labels CSV`.

* ``--data``: a folder of DICOM series (any depth; unreadable files are skipped and counted).
* ``--labels``: CSV with columns ``series_uid,label`` and optionally ``split`` (train | holdout).
  ``series_uid`` is a SeriesInstanceUID, or ``UID#part`` for one part of a split series (the agent's
  series id, e.g. ``1.2.3#b1400`` or ``1.2.3#adc``); a plain UID labels all its parts. Labels: the
  taxonomy (T2WI_nan, T2WI_fs, DWI_Low, DWI_High, ADC, other). Parts with no label are ignored.
* Every labelled part goes the runtime path (scanside.engines.tasks.image_label: select_frames -> load_volume ->
  scanside.engines.preprocess.prepare with the current model's spec). Series without a ``split`` are put in
  the held-out part by a hash of their UID (``--holdout-fraction``), so all parts of one series
  stay together.
* The candidate is fine-tuned from the current version's ONNX weights (or trained from scratch with
  ``--from-scratch``), exported, and both are scored on the held-out part through ONNX Runtime. The
  new version is written only if it is not worse (accuracy and Cohen's kappa each >= the current
  model's); otherwise the current version stays and the exit code is 3.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from scanside.agent.schema.taxonomy import LABELS

log = logging.getLogger(__name__)

NAME = "sequence-classifier"
EXIT_KEPT_CURRENT = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="folder of DICOM series")
    p.add_argument("--labels", type=Path, required=True, help="CSV: series_uid,label[,split]")
    p.add_argument("--base", default=NAME, help="current model NAME[@VERSION] to fine-tune and compare with")
    p.add_argument("--version", default=None, help="version to write (default: next minor of the current one)")
    p.add_argument("--out-store", type=Path, default=None, help="store root to write to (default: the first store root)")
    p.add_argument("--holdout-fraction", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--from-scratch", action="store_true", help="train a fresh model instead of fine-tuning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")


def read_labels(path: Path) -> Dict[str, Tuple[str, Optional[str]]]:
    out: Dict[str, Tuple[str, Optional[str]]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = csv.DictReader(fh)
        if not rows.fieldnames or "series_uid" not in rows.fieldnames or "label" not in rows.fieldnames:
            raise ValueError(f"{path}: needs columns series_uid,label[,split]; has {rows.fieldnames}")
        for i, r in enumerate(rows, 2):
            uid, lab = (r.get("series_uid") or "").strip(), (r.get("label") or "").strip()
            split = (r.get("split") or "").strip().lower() or None
            if not uid:
                continue
            if lab not in LABELS:
                raise ValueError(f"{path}:{i}: unknown label {lab!r}; one of {', '.join(LABELS)}")
            if split not in (None, "train", "holdout"):
                raise ValueError(f"{path}:{i}: split must be train or holdout, not {split!r}")
            out[uid] = (lab, split)
    return out


def scan_parts(data: Path) -> Tuple[list, int]:
    """All series parts under ``data`` as the daemon reads them (scanside.agent.dicom.exam_reader) and the count of files not
    used (unreadable, not DICOM, duplicates)."""
    from scanside.agent.dicom.exam_reader import read_exams

    exams = read_exams(data)
    if not exams:  # nothing readable: every file was skipped
        return [], sum(1 for p in Path(data).rglob("*") if p.is_file())
    return [es.part for exam in exams for es in exam.series], sum(exams[0].skipped.values())


def _in_holdout(uid: str, fraction: float) -> bool:
    h = int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def _next_version(store, name: str, base_version: Optional[str]) -> str:
    from scanside.engines.manifest import semver_key

    have = set(store.versions(name))
    major, minor = (1, 0) if base_version is None else semver_key(base_version)[:2]
    v = f"{major}.{minor + 1}.0"
    while v in have:
        minor += 1
        v = f"{major}.{minor + 1}.0"
    return v


def _score(clf, x: np.ndarray, y: np.ndarray) -> dict:
    from scanside.training.common import classification_metrics

    probs = clf.probabilities(x) if len(x) else np.zeros((0, len(LABELS)))
    labels = list(clf.manifest.labels)
    return classification_metrics(y.tolist(), probs.argmax(1).tolist(), labels)


def train(args: argparse.Namespace, store: Any = None) -> int:
    """scanside.training.registry trainer entry point (the store comes from the `models` options)."""
    import torch

    from scanside.engines.tasks.image_label import ImageClassifier, ImageLabelError
    from scanside.engines.store import ModelNotFound, ModelStore
    from scanside.training.sequence.export import NAME as MODEL_NAME, export_model, load_from_onnx
    from scanside.training.sequence.model import SeqResNet3d, n_params
    from scanside.training.sequence.data import CHANNEL, PREPROCESS
    from scanside.training.sequence.train import fit
    from scanside.engines.preprocess import prepare as _prep

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if store is None:
        from scanside.engines.store import store_from_args

        store = store_from_args(args)
    t0 = time.time()
    try:
        base = store.resolve(args.base)
    except ModelNotFound:
        base = None
    if base is None and not args.from_scratch:
        print(f"error: no current model {args.base!r} to fine-tune; pass --from-scratch", flush=True)
        return 2
    labels = read_labels(args.labels)
    parts, skipped = scan_parts(args.data)
    clf_cur = ImageClassifier(store, base.ref) if base else None
    xs: List[np.ndarray] = []
    ys: List[int] = []
    hold: List[bool] = []
    unusable = 0
    for part in parts:
        lab = labels.get(part.series_id) or labels.get(part.series_uid)
        if lab is None:
            continue
        label, split = lab
        try:
            if clf_cur is not None:
                vol, _ = clf_cur.volume_of(part)
                x = clf_cur.prepare(vol)
            else:
                vol, _ = ImageClassifier(engine=None).volume_of(part)
                x, _ = _prep({CHANNEL: vol}, PREPROCESS)
        except ImageLabelError as e:
            log.warning("part %s: %s", part.key or "-", e.reason)
            unusable += 1
            continue
        xs.append(x.astype(np.float32))
        ys.append(LABELS.index(label))
        hold.append(split == "holdout" if split else _in_holdout(part.series_uid, args.holdout_fraction))
    if not xs:
        print("error: no labelled series found (check --labels against the series UIDs in --data)", flush=True)
        return 2
    x, y, h = np.stack(xs), np.asarray(ys, dtype=np.int64), np.asarray(hold)
    if h.all() or not h.any():
        print(f"error: need both a training and a held-out part (train {int((~h).sum())}, holdout {int(h.sum())})")
        return 2
    t_prep = time.time() - t0
    model = (SeqResNet3d(in_channels=PREPROCESS.n_input_channels) if args.from_scratch or base is None
             else load_from_onnx(base.file_path()))
    res = fit(model, x[~h], y[~h], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
              freeze_bn=not (args.from_scratch or base is None))
    version = args.version or _next_version(store, MODEL_NAME, base.version if base else None)
    out_root = Path(args.out_store) if args.out_store else store.roots[0]
    tmp = Path(tempfile.mkdtemp(prefix="scanside-retrain-"))
    try:
        training = {"mode": "scratch" if args.from_scratch or base is None else f"fine-tune from {base.ref}",
                    "data": str(args.data), "samples": int((~h).sum()), "holdout": int(h.sum()),
                    "epochs": res.epochs, "steps": res.steps, "params": n_params(model),
                    "seconds_fit": round(res.seconds, 1), "seconds_prepare": round(t_prep, 1)}
        cand = export_model(model, version, store_root=tmp, training=training)
        clf_new = ImageClassifier(ModelStore([tmp], user_dir=None), cand.ref)
        m_new = _score(clf_new, x[h], y[h])
        m_cur = _score(clf_cur, x[h], y[h]) if clf_cur else None
        not_worse = m_cur is None or (m_new["accuracy"] >= m_cur["accuracy"] and m_new["kappa"] >= m_cur["kappa"] - 1e-9)
        summary = {
            "decision": "written" if not_worse else "kept_current", "current": base.ref if base else None,
            "candidate": cand.ref, "files_skipped": skipped, "parts_unusable": unusable,
            "train_samples": int((~h).sum()), "holdout_samples": int(h.sum()),
            "holdout_current": _brief(m_cur), "holdout_candidate": _brief(m_new),
            "seconds": round(time.time() - t0, 1),
        }
        if not_worse:
            metrics = dict(cand.metrics)
            metrics["retrain"] = {**summary, "holdout_candidate_full": m_new, "training": training}
            cand = cand.model_copy(update={"metrics": metrics}).set_root(cand.root)
            cand.save(cand.root)
            dest = out_root / cand.name / cand.version
            if dest.exists():
                print(f"error: {dest} exists; pass another --version", flush=True)
                return 2
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(cand.root, dest)
            summary["written"] = str(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            print(f"{k}: {v}")
    return 0 if not_worse else EXIT_KEPT_CURRENT


def _brief(m: Optional[dict]) -> Optional[dict]:
    if m is None:
        return None
    return {"n": m["n"], "accuracy": round(m["accuracy"], 6), "kappa": round(m["kappa"], 6)}
