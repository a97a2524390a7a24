"""scanside.training.cspca: smoke training -> ONNX export with torch parity and a valid manifest; metrics;
the shipped model's held-out evaluation through `scanside models evaluate` against a stated floor."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from scanside.engines.manifest import ModelManifest  # noqa: E402
from scanside.training.cspca.metrics import ece, lesion_detection, operating_point, picai_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_smoke_training_exports_onnx_with_parity(tmp_path):
    import onnxruntime as ort

    from scanside.engines.store import ModelStore
    from scanside.training.cspca.export import export
    from scanside.training.cspca.spec import CSPCA_SPEC
    from scanside.training.cspca.train import train

    s = train(cases=3, minutes=5.0, out=str(tmp_path / "run"), batch=2, cache_dir=str(tmp_path / "cache"),
              max_steps=2, widths=(4, 8, 16), log=lambda *_: None)
    assert s["steps"] == 2 and s["cases"] == 3
    assert np.isfinite(s["final_loss"])
    m = export(tmp_path / "run" / "model.pt", tmp_path / "store", version="0.0.1")
    # manifest validates and is found by the store; model card beside it
    m2 = ModelManifest.load(m.root)
    assert m2.task == "cspca_detection" and m2.preprocessing == CSPCA_SPEC
    card = (m.root / "MODEL_CARD.md").read_text()
    assert card.count("not validated on patients") == 1
    # the card says how busy the machine was while it trained, from the load average the trainer recorded
    assert f"1-minute load average {s['loadavg']['start'][0]} at the start" in card
    assert ModelStore(tmp_path / "store").resolve("cspca-reference").version == "0.0.1"
    assert m.files["fp32"].size_bytes < 10 * 1024 * 1024
    # parity torch vs ONNX Runtime (batch 2: dynamic batch axis)
    assert m.parity["batch"] == 2
    assert m.parity["likelihood_max_abs_diff"] < 1e-4 and m.parity["probability_max_abs_diff"] < 1e-4
    sess = ort.InferenceSession(str(m.file_path()), providers=["CPUExecutionProvider"])
    x = np.zeros((3, 3) + tuple(CSPCA_SPEC.shape), np.float32)
    lk, p = sess.run(None, {"input": x})
    assert lk.shape == (3, 1) + tuple(CSPCA_SPEC.shape) and p.shape == (3, 1)


def test_ece_known_values():
    assert ece([0.9, 0.9, 0.1, 0.1], [1, 1, 0, 0]) == pytest.approx(0.1)
    assert ece([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)
    assert ece([0.95] * 2, [0, 0]) == pytest.approx(0.95)


def test_exam_head_fit_reaches_the_penalised_minimum_where_a_full_newton_step_overshoots():
    """Peak voxel logits of 8 training cases (from a 512-case run whose head came out a = 6260): plain
    Newton from (1, 0) overshoots into saturation here and ended at a = 124; the fit must stop at the
    one minimum of the ridge-penalised log-loss, as a general-purpose optimiser finds it."""
    from scipy.optimize import minimize

    from scanside.training.cspca.train import fit_exam_head

    peaks = np.array([31.0, -7.0, -2.7, -6.8, 4.8, 26.2, 27.8, 22.3])
    labels = np.array([1, 0, 0, 0, 0, 1, 1, 1])
    a, b = fit_exam_head(peaks, labels)
    X = np.stack([peaks, np.ones_like(peaks)], axis=1)

    def penalised(w):
        return np.sum(np.logaddexp(0, X @ w) - labels * (X @ w)) + 0.5 * (w @ w)

    ref = minimize(penalised, [1.0, 0.0], method="BFGS").x
    assert (a, b) == pytest.approx(tuple(ref), abs=1e-3)
    assert penalised(np.array([a, b])) <= penalised(ref) + 1e-9


def test_picai_metrics_separate_perfect_and_random():
    rng = np.random.default_rng(0)
    lks, tgts, labels = [], [], []
    for i in range(8):
        t = np.zeros((8, 16, 16), np.int32)
        lk = rng.uniform(0, 0.05, t.shape).astype(np.float32)
        if i % 2 == 0:
            t[3:6, 5:10, 5:10] = 1
            lk[3:6, 5:10, 5:10] = 0.9
        lks.append(lk)
        tgts.append(t)
        labels.append(int(i % 2 == 0))
    good = picai_metrics(lks, tgts, [0.9 if y else 0.1 for y in labels], labels)
    assert good["auroc"] == pytest.approx(1.0) and good["ap"] == pytest.approx(1.0)
    assert good["ranking_score"] == pytest.approx(1.0)
    bad = picai_metrics(lks, tgts, [0.1 if y else 0.9 for y in labels], labels)
    assert bad["auroc"] == pytest.approx(0.0)


def test_lesion_detection_and_operating_point():
    cases = [
        {"label": 1, "lesions": [{"centre": [0, 0, 0], "max_diameter": 12.0, "cspca": True}], "findings": [[3, 0, 0]]},
        {"label": 1, "lesions": [{"centre": [0, 0, 0], "max_diameter": 10.0, "cspca": True}], "findings": [[30, 0, 0]]},
        {"label": 0, "lesions": [{"centre": [5, 5, 5], "max_diameter": 12.0, "cspca": False}], "findings": [[5, 5, 5]]},
    ]
    r = lesion_detection(cases)
    assert r["lesions"] == 2 and r["detected"] == 1 and r["lesion_sensitivity"] == 0.5
    assert r["centre_error_median_mm"] == pytest.approx(3.0) and r["centre_within_5mm"] == 1.0
    assert r["fp_findings"] == 2 and r["fp_findings_per_negative_exam"] == 1.0
    op = operating_point([0.9, 0.2, 0.6], [1, 1, 0], 0.5)
    assert (op["sensitivity"], op["specificity"]) == (0.5, 0.0)


def test_touching_simulated_lesions_count_as_one_tumour_region_as_in_picai():
    """Evaluation exam 930016 holds two csPCa lesions that overlap and a separate non-significant one."""
    from scanside.simulator.phantom import make_phantom
    from scanside.training.cspca.evaluate import exam_plan, truth_lesions

    p = exam_plan(930016)
    ph = make_phantom(930016, n_lesions=p["n_lesions"], cspca=p["cspca"])
    truth = truth_lesions(ph)
    cs = [t for t in truth if t["cspca"]]
    assert [t["members"] for t in cs] == [[1, 2]]
    assert [t["members"] for t in truth if not t["cspca"]] == [[3]]
    both = np.isin(ph.lesion_masks, [1, 2])
    centroid = ph.index_to_world(np.argwhere(both)[:, ::-1].mean(0))
    assert np.allclose(cs[0]["centre"], centroid)
    assert cs[0]["max_diameter"] >= max(max(ph.lesions[0].diameters_mm), max(ph.lesions[1].diameters_mm))
    # each simulated lesion alone is one region: the same code on a single-lesion phantom keeps it whole
    single = make_phantom(930016, n_lesions=1, cspca=True)
    one = [t for t in truth_lesions(single) if t["cspca"]]
    assert len(one) == 1 and one[0]["max_diameter"] == pytest.approx(max(single.lesions[0].diameters_mm))


def _axial_grid(centre, spacing_zyx, shape=(20, 64, 64), phase=0.0):
    """An axial model grid (d0 = S, d1 = P, d2 = L) centred on ``centre``, shifted by ``phase`` voxels."""
    from scanside.engines.preprocess import Grid

    a = np.eye(4)
    a[:3, :3] = [[0, 0, spacing_zyx[2]], [0, spacing_zyx[1], 0], [spacing_zyx[0], 0, 0]]
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ (np.asarray(shape) / 2.0 - phase)
    return Grid(shape=shape, affine=a)


def test_lesions_the_model_grid_joins_count_as_one_region_as_picai_eval_sees_them():
    """Evaluation exam 1020016: two overlapping PZ csPCa lesions, and a TZ one 3.2 mm from them. On 1 mm
    voxels they are two regions; on a 3 x 1.5 x 1.5 mm grid whose slices fall between them the target
    picai_eval is given joins all three, and the lesion count follows it."""
    from scanside.simulator.phantom import make_phantom
    from scanside.training.cspca.data import lesion_target
    from scanside.training.cspca.evaluate import exam_plan, truth_lesions
    from scipy import ndimage

    p = exam_plan(1020016)
    ph = make_phantom(1020016, n_lesions=p["n_lesions"], cspca=p["cspca"])
    centre = np.mean([les.center_lps_mm for les in ph.lesions if les.cspca], axis=0)
    members = lambda grid: [t["members"] for t in truth_lesions(ph, grid) if t["cspca"]]  # noqa: E731
    assert members(None) == [[1, 2], [3]]
    assert members(_axial_grid(centre, (1.0, 1.0, 1.0))) == [[1, 2], [3]]
    coarse = _axial_grid(centre, (3.0, 1.5, 1.5), phase=0.5)
    assert ndimage.label(lesion_target(ph, coarse), structure=np.ones((3, 3, 3)))[1] == 1
    joined = [t for t in truth_lesions(ph, coarse) if t["cspca"]]
    assert [t["members"] for t in joined] == [[1, 2, 3]]
    assert np.allclose(joined[0]["centre"], ph.index_to_world(np.argwhere(ph.lesion_masks > 0)[:, ::-1].mean(0)))
    assert members(_axial_grid(centre, (3.0, 1.5, 1.5), phase=0.0)) == [[1, 2], [3]]  # these slices keep them apart


@pytest.mark.slow
def test_shipped_model_heldout_floor(tmp_path):
    """`scanside models evaluate cspca-reference --json` on 8 fresh exams (2 per vendor style, seeds never
    used in training) through the runtime DICOM path. Floor (training/cspca/evaluate.py FLOOR): AUROC >= 0.85,
    >= 75 % of detected csPCa lesion centres within 5 mm."""
    from scanside.training.cspca.evaluate import FLOOR

    out = subprocess.run([sys.executable, "-m", "scanside.agent.cli", "models", "evaluate", "cspca-reference", "--json",
                          "--exams-per-vendor", "2", "--seed", "910000", "--workdir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.stdout, out.stderr[-2000:]
    rep = json.loads(out.stdout)
    m = rep["metrics"]
    assert rep["exams"] == 8 and not rep["errors"]
    for k, v in FLOOR.items():
        assert m[k] is not None and m[k] >= v, (k, m[k], v)
    assert rep["passed"] is True and out.returncode == 0

    # a kept workdir is reused: the same exams scored again, none simulated again
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/ground_truth.json")}
    assert len(stamps) == 8
    again = subprocess.run([sys.executable, "-m", "scanside.agent.cli", "models", "evaluate", "cspca-reference", "--json",
                            "--exams-per-vendor", "2", "--seed", "910000", "--workdir", str(tmp_path)],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    rep2 = json.loads(again.stdout)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/ground_truth.json")} == stamps
    assert rep2["metrics"]["auroc"] == m["auroc"] and rep2["rows"] == rep["rows"]


def test_lesion_patches_see_every_lesion_equally_often():
    """A case with a 20-voxel-wide and a 3-voxel-wide lesion: lesion-centred patches hold the small one about
    as often as the large one (drawing a voxel over the whole mask would pick the large one ~99 % of the time)."""
    from scanside.training.cspca.train import PATCH, _patches, lesion_voxels

    D, H, W = PATCH[0], 96, 96
    y = np.zeros((1, D, H, W), np.uint8)
    y[0, 5:15, 5:25, 5:25] = 1  # large lesion, 4000 voxels
    y[0, 9:12, 80:83, 80:83] = 1  # small lesion, 27 voxels, far from the large one
    x = np.zeros((1, 3, D, H, W), np.float32)
    lesions = lesion_voxels(y)
    assert [len(v) for v in lesions[0]] == [4000, 27]
    rng = np.random.default_rng(0)
    _, yb = _patches(x, y, np.zeros(2000, dtype=int), rng, lesions)
    small = yb[:, 0, 9:12].reshape(len(yb), -1).sum(1) == 27
    large = yb.reshape(len(yb), -1).sum(1) > 27 * 2
    # half the patches are lesion-centred, split evenly between the two lesions
    assert 0.18 < small.mean() < 0.32 and 0.18 < large.mean() < 0.45
