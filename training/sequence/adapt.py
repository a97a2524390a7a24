"""Site adaptation from header labels: `scanside models adapt sequence-classifier --from-state DIR | --from DIR`.

At a site the header labels are right almost always and the images are the site's own, so the
site's completed series teach the image model what this scanner's images look like:

1. Series: the agent's state (``--from-state``: the completed series in STATE_DIR/state.sqlite, their
   headers as ingested) or a DICOM folder (``--from``), each summarised as the daemon does
   (scanside.agent.dicom.series.split_parts / summarise). A series is used when its header rule is confident
   (``--min-header-confidence``, default 0.9: Philips T2W without a fat-suppression tag, for one, is
   not) and it reaches the model (the runtime path: select_frames -> load_volume -> prepare).
2. Whole exams are held out (``--holdout-fraction`` of the studies by a hash of their UID, at least one):
   no series of a held-out exam is trained on.
3. The candidate is fine-tuned from the current version's ONNX weights on the site's training exams
   mixed with simulated exams rendered fresh (``--replay-exams``, so that the simulated classes are
   not forgotten), then exported with the same preprocessing.
4. Promotion: the candidate is written into the user model store (``--user-dir``, default
   $SCANSIDE_USER_MODELS_DIR, which the agent searches) only if it beats the current version on the site's held-out exams
   (more series right, or as many with a higher mean probability of the right class) and stays within
   ``--max-sim-drop`` (0.5 points) of it on a simulated check set rendered fresh (``--sim-exams``).
   Otherwise nothing is written and the exit code is 3.
5. With ``--from-state`` the promotion is recorded as the site validation (scanside.agent.analysis.shadow, method
   adaptation_holdout) in the state folder, so the new version leaves shadow mode there.
6. Everything is recorded in the new version's manifest (metrics.adaptation) and model card: parent
   version, exams used and held out (hashed study UIDs), both models' held-out and simulated figures,
   the header-confidence threshold, the training run. The uncertainty gate is refitted on the
   candidate (temperature and feature statistics on the site's training series and the simulated
   replay, thresholds on the simulated check set), since fine-tuning moves the features.

Honest limits: the held-out exams measure the site's own protocol; a protocol the site never ran
is not tested by it. A header that is wrong in the same way on every exam teaches the model that
error: the header-confidence threshold and the hold-out are the guards.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from scanside.agent.schema.taxonomy import LABELS

log = logging.getLogger(__name__)

NAME = "sequence-classifier"
EXIT_KEPT_CURRENT = 3
SIM_CHECK_SEED0 = 650_000  # simulated check set: no training run uses these seeds
REPLAY_SEED0 = 5_000  # simulated replay: training-range seeds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default=NAME, help="current model NAME[@VERSION] (default sequence-classifier)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-state", dest="from_state", type=Path, metavar="STATE_DIR",
                     help="the agent's state directory (its state.sqlite): completed series, as ingested")
    src.add_argument("--from", dest="from_dicom", type=Path, metavar="DICOM_DIR", help="a folder of DICOM exams")
    p.add_argument("--min-header-confidence", type=float, default=0.9)
    p.add_argument("--holdout-fraction", type=float, default=0.3, help="share of exams held out (whole exams, at least one)")
    p.add_argument("--replay-exams", type=int, default=8, help="simulated exams mixed into fine-tuning")
    p.add_argument("--sim-exams", type=int, default=8, help="simulated exams of the check set")
    p.add_argument("--max-sim-drop", type=float, default=0.005, help="largest accepted loss on the simulated set (0.005 = 0.5 points)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--version", default=None, help="version to write (default: next patch of the current one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")


# --------------------------------------------------------------------------------------- site series
def series_from_state(state_dir: Path) -> List[Tuple[Any, Any]]:
    """(SeriesSummary, SeriesPart) of every completed series in the agent's state."""
    from scanside.agent.dicom.series import split_parts, summarise
    from scanside.agent.state.database import StateStore

    db = Path(state_dir) / "state.sqlite"
    if not db.is_file():
        raise FileNotFoundError(f"--from-state {state_dir}: no state.sqlite there")
    store = StateStore(db)
    try:
        out = []
        for row in store.all_series("complete"):
            for part in split_parts(store.series_headers(row["series_uid"])):
                out.append((summarise(part, int(row["revision"]), True, row["expected"]), part))
        return out
    finally:
        store.close()


def exam_id(study_uid: str) -> str:
    """A study's reference in records: a hash, never the UID."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:12]


def split_exams(study_uids: Sequence[str], fraction: float) -> set:
    """The held-out studies: the ``fraction`` with the lowest UID hash, at least one, never all."""
    uids = sorted(set(study_uids), key=lambda u: hashlib.sha256(u.encode()).hexdigest())
    if len(uids) < 2:
        return set()
    k = min(len(uids) - 1, max(1, int(round(fraction * len(uids)))))
    return set(uids[:k])


def site_samples(clf: Any, series: List[Tuple[Any, Any]], min_conf: float) -> Dict[str, Any]:
    """Prepared inputs and header labels of the confidently labelled series that reach the model."""
    from scanside.engines.tasks.image_label import ImageLabelError

    xs, ys, studies = [], [], []
    counts: Dict[str, int] = defaultdict(int)
    for s, part in series:
        if s.label_confidence < min_conf:
            counts["header_not_confident"] += 1
            continue
        try:
            vol, _ = clf.volume_of(part)
            xs.append(clf.prepare(vol).astype(np.float32))
        except ImageLabelError as e:
            counts[f"unusable_{e.reason}"] += 1
            continue
        ys.append(LABELS.index(s.label))
        studies.append(s.study_uid)
        counts["used"] += 1
    return {"x": np.stack(xs) if xs else np.zeros((0,)), "y": np.asarray(ys, np.int64), "study": np.asarray(studies),
            "counts": dict(counts)}


def sim_samples(seeds: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Freshly rendered simulated exams through the training render path (every vendor style)."""
    from scanside.training.sequence.data import LABEL_INDEX, exam_samples
    from scanside.training.sequence.protocols import VENDORS

    xs, ys = [], []
    for i, s in enumerate(seeds):
        for label, arr, _ in exam_samples(int(s), VENDORS[i % len(VENDORS)], "train"):
            xs.append(arr.astype(np.float32))
            ys.append(LABEL_INDEX[label])
    return np.stack(xs), np.asarray(ys, np.int64)


def compare(p_cur: np.ndarray, p_new: np.ndarray, y: np.ndarray) -> Dict[str, Any]:
    """Held-out comparison: series right by each, and the mean probability of the right class (the tie-break)."""
    r = np.arange(len(y))
    return {"n": int(len(y)), "current_right": int((p_cur.argmax(1) == y).sum()), "candidate_right": int((p_new.argmax(1) == y).sum()),
            "current_p_true": round(float(p_cur[r, y].mean()), 4) if len(y) else None,
            "candidate_p_true": round(float(p_new[r, y].mean()), 4) if len(y) else None}


def beats(c: Dict[str, Any]) -> bool:
    if c["n"] == 0:
        return False
    if c["candidate_right"] != c["current_right"]:
        return c["candidate_right"] > c["current_right"]
    return c["candidate_p_true"] > c["current_p_true"]


def _next_patch(store: Any, base_version: str) -> str:
    from scanside.engines.manifest import semver_key

    have = set(store.versions(NAME))
    major, minor, patch = semver_key(base_version)[:3]
    patch += 1
    while f"{major}.{minor}.{patch}" in have:
        patch += 1
    return f"{major}.{minor}.{patch}"


def adapt(args: argparse.Namespace, store: Any) -> Dict[str, Any]:
    import torch

    from scanside.engines.tasks.image_label import ImageClassifier
    from scanside.engines.store import ModelStore
    from scanside.training.sequence.export import export_model, load_from_onnx, write_card
    from scanside.training.sequence.model import n_params
    from scanside.training.sequence.real import read_series
    from scanside.training.sequence.train import fit, predict
    from scanside.training.sequence.uncertainty import (fit_class_ranges, fit_gate, input_channels, input_statistics,
                                                        install_gate, statistic_names)

    torch.set_num_threads(args.threads)
    t0 = time.time()
    if store.user_dir is None:
        raise SystemExit("models adapt writes into the user model store: pass `models --user-dir DIR` or set "
                         "SCANSIDE_USER_MODELS_DIR (the agent must search the same folder)")
    base = store.resolve(args.name)
    clf = ImageClassifier(store, base.ref, variant="fp32")
    if args.from_state is not None:
        series, source = series_from_state(args.from_state), f"agent state {args.from_state}"
    else:
        series, source = read_series(args.from_dicom)[0], f"DICOM folder {args.from_dicom}"
    site = site_samples(clf, series, args.min_header_confidence)
    held = split_exams(site["study"].tolist(), args.holdout_fraction)
    h = np.isin(site["study"], list(held)) if held else np.zeros(len(site["y"]), bool)
    summary: Dict[str, Any] = {
        "parent": base.ref, "source": source, "series_seen": len(series), "series": site["counts"],
        "min_header_confidence": args.min_header_confidence,
        "exams_train": sorted({exam_id(u) for u in site["study"][~h]}), "exams_holdout": sorted(exam_id(u) for u in held),
    }
    if not held or h.all() or not h.any():
        summary.update(decision="kept_current", reason=f"need at least two exams with confident series (have "
                       f"{len(set(site['study'].tolist()))})")
        return summary
    x_site, y_site = site["x"], site["y"]
    x_rep, y_rep = sim_samples(range(REPLAY_SEED0 + args.seed * 100, REPLAY_SEED0 + args.seed * 100 + args.replay_exams)) \
        if args.replay_exams else (np.zeros((0,) + x_site.shape[1:], np.float32), np.zeros(0, np.int64))
    x_sim, y_sim = sim_samples(range(SIM_CHECK_SEED0, SIM_CHECK_SEED0 + args.sim_exams))
    model = load_from_onnx(base.file_path("fp32"))
    x_tr = np.concatenate([x_site[~h], x_rep]) if len(x_rep) else x_site[~h]
    y_tr = np.concatenate([y_site[~h], y_rep]) if len(y_rep) else y_site[~h]
    res = fit(model, x_tr, y_tr, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, freeze_bn=True)
    p_cur_h, p_cur_s = clf.probabilities(x_site[h]), clf.probabilities(x_sim)
    version = args.version or _next_patch(store, base.version)
    tmp = Path(tempfile.mkdtemp(prefix="scanside-adapt-"))
    try:
        training = {"mode": f"site adaptation of {base.ref}", "samples": int(len(y_tr)), "site_samples": int((~h).sum()),
                    "replay_samples": int(len(y_rep)), "epochs": res.epochs, "steps": res.steps, "lr": args.lr,
                    "seconds_fit": round(res.seconds, 1), "threads": args.threads, "params": n_params(model)}
        cand = export_model(model, version, store_root=tmp, training=training)
        cclf = ImageClassifier(ModelStore([tmp], user_dir=None), cand.ref, variant="fp32")
        p_new_h, p_new_s = cclf.probabilities(x_site[h]), cclf.probabilities(x_sim)
        site_cmp = compare(p_cur_h, p_new_h, y_site[h])
        acc_cur, acc_new = float((p_cur_s.argmax(1) == y_sim).mean()), float((p_new_s.argmax(1) == y_sim).mean())
        sim = {"n": int(len(y_sim)), "seeds": f"{SIM_CHECK_SEED0}..{SIM_CHECK_SEED0 + args.sim_exams - 1}",
               "current_accuracy": round(acc_cur, 4), "candidate_accuracy": round(acc_new, 4)}
        ok_site, ok_sim = beats(site_cmp), acc_new >= acc_cur - args.max_sim_drop
        summary.update(candidate=cand.ref, holdout=site_cmp, simulated=sim, training=training,
                       beats_current_on_site=ok_site, within_sim_tolerance=ok_sim, max_sim_drop=args.max_sim_drop)
        if not (ok_site and ok_sim):
            why = [] if ok_site else ["does not beat the current version on the site's held-out exams"]
            why += [] if ok_sim else [f"loses {acc_cur - acc_new:.3f} on the simulated set (> {args.max_sim_drop})"]
            summary.update(decision="kept_current", reason="; ".join(why))
            return summary
        # refit the gate on the candidate's own features (fine-tuning moved them)
        with torch.no_grad():
            model.eval()
            x_fit = np.concatenate([x_tr, x_sim])
            feats = np.concatenate([model.features(torch.from_numpy(x_fit[i:i + 64])).numpy() for i in range(0, len(x_fit), 64)])
        probs = np.concatenate([predict(model, x_tr), p_new_s])
        groups = np.concatenate([np.zeros(len(y_tr), int), 1 + np.arange(len(y_sim))])  # half B: the check set
        fields, means, whiten = fit_gate(probs, feats, np.concatenate([y_tr, y_sim]), groups, n_classes=len(LABELS))
        # the class input ranges of the site: fitted on the training series, thresholds from the held-out
        # site exams and the simulated check set (the parent's ranges, fitted on simulated series only, would
        # call the site's own series unlike anything validated)
        chans = input_channels(cand)
        x_rng = np.concatenate([x_tr, x_site[h], x_sim])
        ranges = fit_class_ranges(input_statistics(x_rng, chans), statistic_names(chans),
                                  np.concatenate([y_tr, y_site[h], y_sim]), np.arange(len(x_rng)) >= len(x_tr),
                                  list(LABELS), chans, f"site adaptation of {base.ref}")
        fields["report"]["class_input_ranges"] = {lab: r.threshold for lab, r in ranges.ranges.items()}
        cand = install_gate(cand, fields, means, whiten,
                            f"site adaptation: {len(y_tr)} training series (site and replay) fit, {len(y_sim)} simulated check series set the thresholds",
                            ranges if ranges.ranges else None)
        metrics = dict(cand.metrics)
        metrics["adaptation"] = {**summary, "decision": "promoted", "measured_at": _now()}
        data = (f"{base.ref} ({base.training_data or 'see its card'}), then fine-tuned at this site on "
                f"{int((~h).sum())} series of {len(summary['exams_train'])} of its own exams, labelled by their headers, "
                f"with {len(y_rep)} simulated replay series. Training run: {', '.join(f'{k}={v}' for k, v in training.items())}")
        cand = cand.model_copy(update={"metrics": metrics, "training_data": data}).set_root(cand.root)
        cand.save(cand.root)
        write_card(cand, Path(cand.root))
        dest = Path(store.user_dir) / cand.name / cand.version
        if dest.exists():
            summary.update(decision="kept_current", reason=f"{dest} exists; pass another --version")
            return summary
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(cand.root, dest)
        summary.update(decision="promoted", written=str(dest), seconds=round(time.time() - t0, 1))
        if args.from_state is not None:  # the hold-out validated it on this site's own exams: it leaves shadow mode
            from scanside.agent.analysis.shadow import FILE_NAME, SiteValidation, record_validation

            v = record_validation(Path(args.from_state) / FILE_NAME, SiteValidation(
                model=cand.name, version=cand.version, method="adaptation_holdout", by="scanside models adapt",
                exams=len(held), note=f"held-out series {site_cmp['candidate_right']}/{site_cmp['n']} right "
                                      f"(parent {base.ref}: {site_cmp['current_right']})"))
            summary["site_validation"] = v.model_dump()
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _now() -> str:
    from scanside.training.sequence.export import now_iso

    return now_iso()


def adaptation_card_section(m: Any) -> List[str]:
    a = (m.metrics or {}).get("adaptation")
    if not a:
        return []
    ho, sim = a.get("holdout", {}), a.get("simulated", {})
    return ["", "## Site adaptation",
            f"- Parent version {a['parent']}; fine-tuned on the header labels (confidence >= {a['min_header_confidence']}) of "
            f"{a['source'].split(' ')[0]} {a['source'].split(' ', 1)[-1].split(' ')[0]} data: {len(a['exams_train'])} training exam(s) "
            f"{', '.join(a['exams_train'])}; held out whole: {len(a['exams_holdout'])} exam(s) {', '.join(a['exams_holdout'])} "
            "(hashed study UIDs).",
            f"- Held-out series of the site: {ho.get('candidate_right')} of {ho.get('n')} right (parent {ho.get('current_right')}); "
            f"mean probability of the right class {ho.get('candidate_p_true')} (parent {ho.get('current_p_true')}).",
            f"- Simulated check set ({sim.get('n')} series, seeds {sim.get('seeds')}): accuracy {sim.get('candidate_accuracy')} "
            f"(parent {sim.get('current_accuracy')}; promotion allows a loss of at most {a.get('max_sim_drop')}).",
            f"- Series seen {a.get('series_seen')}: {a.get('series')}. Promoted {a.get('measured_at')}."]


def run(args: argparse.Namespace, store: Any = None) -> int:
    """`scanside models adapt` entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if store is None:
        from scanside.engines.store import store_from_args

        store = store_from_args(args)
    summary = adapt(args, store)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        for k, v in summary.items():
            print(f"{k}: {v}")
    return 0 if summary.get("decision") == "promoted" else EXIT_KEPT_CURRENT
