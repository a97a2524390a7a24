"""`scanside models train sequence --data DIR --labels CSV` end to end on a tiny simulated set:
the candidate is fine-tuned from the current ONNX, both are scored on the held-out part, and a new
version is written only if the candidate is not worse. Both outcomes by construction: correct
labels with a gentle fine-tune (written), and rotated training labels learnt hard (kept current)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from scanside.agent.schema.taxonomy import LABELS  # noqa: E402
from scanside.engines.store import ModelNotFound, ModelStore  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A store holding a copy of the shipped model, a DICOM folder of two exams and their truth."""
    from tests.training._exams import exam
    from scanside.training.sequence.evaluate import exam_parts

    try:
        shipped = ModelStore().resolve("sequence-classifier")
    except ModelNotFound:
        pytest.skip("sequence-classifier not in the model store")
    root = tmp_path_factory.mktemp("site")
    store = root / "store"
    shutil.copytree(shipped.root, store / shipped.name / shipped.version)
    data = root / "dicom"
    truth = []
    for split, (vendor, seed) in (("train", ("ge", 700_201)), ("holdout", ("siemens-xa", 700_202))):
        src = exam(vendor, seed)
        shutil.copytree(src, data / f"{vendor}-{seed}")
        for p in exam_parts(data / f"{vendor}-{seed}"):
            if p["label"]:
                truth.append((p["part"].series_id, p["label"], split))
    (data / "README.txt").write_text("not DICOM: skipped and counted")
    return store, data, truth, shipped.version


def _csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["series_uid", "label", "split"])
        w.writerows(rows)
    return path


def _train(store, data, labels, *extra):
    cmd = [sys.executable, "-m", "scanside.agent.cli", "models", "--store", str(store), "train", "sequence", "--data", str(data),
           "--labels", str(labels), "--json", "--threads", "2", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = proc.stdout[proc.stdout.find("{"):]
    assert out, proc.stderr[-3000:]
    return proc.returncode, json.loads(out)


def test_not_worse_candidate_is_written(site, tmp_path):
    store, data, truth, current = site
    labels = _csv(tmp_path / "labels.csv", truth)
    rc, rep = _train(store, data, labels, "--epochs", "1", "--lr", "1e-5", "--version", "9.1.0")
    assert rc == 0, rep
    assert rep["decision"] == "written" and rep["files_skipped"] >= 1
    assert rep["train_samples"] > 5 and rep["holdout_samples"] > 5
    assert rep["holdout_candidate"]["accuracy"] >= rep["holdout_current"]["accuracy"]
    s = ModelStore([store], user_dir=None)
    assert s.versions("sequence-classifier") == [current, "9.1.0"]
    m = s.resolve("sequence-classifier@9.1.0")
    assert all(c.ok for c in s.verify(m))
    assert m.metrics["retrain"]["decision"] == "written"


def test_worse_candidate_is_not_written(site, tmp_path):
    store, data, truth, current = site
    # rotate every training label to another class; held-out labels stay true
    rot = {lab: LABELS[(i + 1) % len(LABELS)] for i, lab in enumerate(LABELS)}
    rows = [(sid, rot[lab] if split == "train" else lab, split) for sid, lab, split in truth]
    labels = _csv(tmp_path / "bad.csv", rows)
    before = ModelStore([store], user_dir=None).versions("sequence-classifier")
    rc, rep = _train(store, data, labels, "--epochs", "12", "--lr", "3e-3", "--version", "9.2.0")
    assert rc == 3, rep
    assert rep["decision"] == "kept_current"
    assert rep["holdout_candidate"]["accuracy"] < rep["holdout_current"]["accuracy"]
    assert ModelStore([store], user_dir=None).versions("sequence-classifier") == before
    assert not (store / "sequence-classifier" / "9.2.0").exists()


def test_bad_labels_file_is_refused(site, tmp_path):
    store, data, truth, _ = site
    bad = tmp_path / "bad.csv"
    bad.write_text("series_uid,label\n1.2.3,T2W\n")
    proc = subprocess.run([sys.executable, "-m", "scanside.agent.cli", "models", "--store", str(store), "train", "sequence",
                           "--data", str(data), "--labels", str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unknown label" in (proc.stderr + proc.stdout)
