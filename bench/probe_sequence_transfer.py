"""Transfer probe for sequence-classifier training recipes (issue 18): fine-tune the shipped weights with a
recipe on rendered simulated exams and score the result on the real series, without exporting anything.

    python bench/probe_sequence_transfer.py --exams 48 --epochs 6 --wide-intensity [--texture] [--realism 0.7]
        [--real ../shared/realdata/prostate] [--cache-dir var/seq-cache] [--save var/probe.pt]

Real series go the daemon's path up to the model input (scanside.training.sequence.real.read_series ->
ImageClassifier.prepare); they are scored, never trained on. The last shard of rendered exams (8 exams)
is the simulated validation (rendered without --realism, the simulator as the evaluation writes it). A recipe worth releasing then goes through scanside.training.sequence.train, a fresh
`scanside models evaluate` and `--real`. Prints one line per model state and appends the recipe with its
figures to bench/results/sequence_transfer.json (every recipe tried, kept or not).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    from scanside.engines.tasks.image_label import ImageClassifier
    from scanside.agent.schema.taxonomy import LABELS
    from scanside.training.sequence import train as T
    from scanside.training.sequence.data import build_dataset
    from scanside.training.sequence.export import load_from_onnx
    from scanside.training.sequence.real import DEFAULT_LABELS, FIVE, read_labels, read_series

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "realdata" / "prostate")
    ap.add_argument("--model", default="sequence-classifier")
    ap.add_argument("--exams", type=int, default=48, help="training-range exams rendered (seeds 1000..), the last 8 validate")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--wide-intensity", action="store_true")
    ap.add_argument("--texture", action="store_true")
    ap.add_argument("--realism", type=float, default=0.0,
                    help="fraction of training exams from the realistic phantom (scanside.training.sequence.data.REALISM)")
    ap.add_argument("--constants-sd", type=float, default=0.0,
                    help="with --realism: log-sd of per-exam tissue constants (scanside.training.sequence.data.REALISM_CONSTANTS_SD)")
    ap.add_argument("--pelvis", type=float, default=0.0,
                    help="with --realism: probability of a real pelvis (scanside.training.sequence.realism, ``pelvis``)")
    ap.add_argument("--replay-plain", action="store_true",
                    help="with --realism: train on the same seeds rendered by the plain simulator too (keeps its accuracy)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--save", type=Path, default=None, help="write the fine-tuned state_dict here")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "var" / "seq-cache")
    a = ap.parse_args()
    torch.set_num_threads(2)
    T.WIDE_INTENSITY, T.TEXTURE = a.wide_intensity, a.texture
    clf = ImageClassifier(model=a.model, variant="fp32")
    labels = read_labels(DEFAULT_LABELS)
    series, _ = read_series([a.real])
    xr = np.stack([clf.prepare(clf.volume_of(p)[0]) for _, p in series])
    yr = np.array([LABELS.index(labels.get(s.series_id, labels.get(s.series_uid)) or s.label) for s, _ in series])
    five = np.isin(yr, [LABELS.index(c) for c in FIVE])
    from scanside.training.sequence import data as D

    # validation: the last 8 seeds, clean simulator; training: the others, with the recipe's realism
    xv, yv, _ = build_dataset(range(1000 + a.exams - 8, 1000 + a.exams), "train", a.cache_dir, jobs=a.jobs)
    D.REALISM, D.REALISM_CONSTANTS_SD, D.REALISM_PELVIS_P = a.realism, a.constants_sd, a.pelvis
    xt, yt, _ = build_dataset(range(1000, 1000 + a.exams - 8), "train", a.cache_dir, jobs=a.jobs)
    if a.replay_plain and a.realism:
        D.REALISM = 0.0
        xp, yp, _ = build_dataset(range(1000, 1000 + a.exams - 8), "train", a.cache_dir, jobs=a.jobs)
        xt, yt = np.concatenate([xt, xp]), np.concatenate([yt, yp])
    x, y = np.concatenate([xt, xv]), np.concatenate([yt, yv])
    val = np.arange(len(y)) >= len(yt)
    model = load_from_onnx(clf.manifest.file_path("fp32"))

    def score(tag: str) -> dict:
        pv, pr = T.predict(model, x[val]).argmax(1), T.predict(model, xr).argmax(1)
        r = {"simulated_validation": round(float((pv == y[val]).mean()), 4), "simulated_n": int(val.sum()),
             "real_five_class": f"{int((pr == yr)[five].sum())}/{int(five.sum())}", "real_all": f"{int((pr == yr).sum())}/{len(yr)}"}
        print(f"{tag}: simulated validation {r['simulated_validation']:.4f} (n={r['simulated_n']}); real five-class "
              f"{r['real_five_class']}, all {r['real_all']}", flush=True)
        return r

    before = score(f"{clf.manifest.ref}")
    T.fit(model, x[~val], y[~val], epochs=a.epochs, lr=a.lr, freeze_bn=True, seed=0)
    after = score(f"fine-tuned ({a.epochs} epochs, lr {a.lr}, wide_intensity={a.wide_intensity}, texture={a.texture}, "
                  f"realism={a.realism}, constants_sd={a.constants_sd})")
    record(a, before, after)
    if a.save:
        a.save.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), a.save)
    return 0


def record(a: argparse.Namespace, before: dict, after: dict) -> None:
    import json
    import time

    out = ROOT / "bench" / "results" / "sequence_transfer.json"
    res = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    res["runs"].append({"command": "python bench/probe_sequence_transfer.py " + " ".join(sys.argv[1:]),
                        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "base": a.model,
                        "recipe": {"exams": a.exams, "epochs": a.epochs, "lr": a.lr, "realism": a.realism, "constants_sd": a.constants_sd, "pelvis": a.pelvis, "replay_plain": a.replay_plain,
                                   "wide_intensity": a.wide_intensity, "texture": a.texture},
                        "before": before, "after": after})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
