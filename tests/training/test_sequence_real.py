"""The sequence classifier on real DICOM through the daemon's path (scanside.training.sequence.real), and its
uncertainty gate (scanside.engines.tasks.image_label, scanside.training.sequence.uncertainty)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from scanside.engines.tasks.image_label import ImageClassifier, UncertaintyGate, calibrated, ood_distance
from scanside.training.sequence.real import FIVE, read_labels, summarise_rows, would_alert
from scanside.training.sequence.uncertainty import confidence_threshold, ece, fit_gate, fit_ood, fit_temperature

REALDATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata" / "prostate"
PROSTATEX = REALDATA / "ProstateX-0218"
QIN_ADC = "1.3.6.1.4.1.14519.5.2.1.3671.7001.261913302903961139526297576821"


def test_temperature_scaling_keeps_the_argmax_and_fits_overconfidence():
    rng = np.random.default_rng(0)
    n, k = 2000, 6
    logits = rng.normal(0, 2, (n, k))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])  # p is calibrated by construction
    sharp = calibrated(p, 0.25)  # 4x over-confident
    t = fit_temperature(sharp, y)
    assert 3.0 < t < 5.5
    fixed = calibrated(sharp, t)
    assert (fixed.argmax(1) == sharp.argmax(1)).all()
    assert ece(fixed, y) < ece(sharp, y) / 3


def test_ood_distance_is_mahalanobis_to_the_nearest_class():
    rng = np.random.default_rng(1)
    cov = np.array([[4.0, 1.0], [1.0, 1.0]])
    f = np.concatenate([rng.multivariate_normal([0, 0], cov, 4000), rng.multivariate_normal([10, 0], cov, 4000)])
    y = np.repeat([0, 1], 4000)
    means, whiten = fit_ood(f, y, 3, shrink=0.0)
    probe = np.array([[10.0, 1.0], [0.0, 0.0], [5.0, 5.0]])
    d = ood_distance(probe, means, whiten)
    inv = np.linalg.inv(cov)
    expect0 = np.array([0.0, 1.0]) @ inv @ np.array([0.0, 1.0])
    assert d[0] == pytest.approx(expect0, rel=0.1)
    assert d[1] < 0.1
    assert d[2] > 20  # far from both classes; the absent class 2 is never nearest
    assert np.isfinite(d).all()


def test_confidence_threshold_is_the_lowest_that_reaches_the_target():
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.6, 0.5])
    right = np.array([1, 1, 1, 1, 0, 1], bool)
    assert confidence_threshold(conf, right, 0.99) == 0.8
    assert confidence_threshold(conf, right, 0.8) == 0.0
    assert confidence_threshold(conf, np.zeros(6, bool), 0.5) == 1.0


def test_fit_gate_flags_about_the_asked_quantile_of_held_out_series():
    rng = np.random.default_rng(2)
    n = 3000
    y = rng.integers(0, 3, n)
    feats = rng.normal(0, 1, (n, 8)) + 4 * np.eye(8)[y]
    probs = np.full((n, 3), 0.05)
    probs[np.arange(n), y] = 0.9
    fields, means, whiten = fit_gate(probs, feats, y, np.arange(n) // 10, n_classes=3, ood_quantile=0.98)
    assert 0.01 < fields["report"]["threshold_uncertain_rate"] < 0.04
    far = ood_distance(feats[:50] + 12, means, whiten)
    assert (far > fields["ood_threshold"]).all()
    # right 100 % of the time at p = 0.9: the fitted temperature sharpens (< 1), the gate never does
    assert fields["report"]["temperature_fitted"] < 1 and fields["temperature"] == 1.0
    sharp, _, _ = fit_gate(probs, feats, y, np.arange(n) // 10, n_classes=3, min_temperature=0.0)
    assert sharp["temperature"] == sharp["report"]["temperature_fitted"] < 1


def test_class_input_ranges_check_the_input_against_the_class_the_model_names():
    from scanside.training.sequence.uncertainty import exam_halves, fit_class_ranges, input_statistics, statistic_names

    rng = np.random.default_rng(4)
    channels = ["whole", "detail"]
    # class 0 smooth inputs, class 1 noisy ones; 20 exams of 3 series each
    xs, y, exam = [], [], []
    for e in range(20):
        for k in (0, 1, 1):
            base = np.cumsum(rng.normal(0, 1, (2, 4, 16, 16)), axis=-1) / 4
            xs.append((base + (rng.normal(0, 1.0, base.shape) if k else 0)).astype(np.float32))
            y.append(k)
            exam.append(e)
    stats = input_statistics(xs, channels)
    ranges = fit_class_ranges(stats, statistic_names(channels), np.array(y), exam_halves(np.array(exam)),
                              ["smooth", "noisy", "absent"], channels, "test")
    assert set(ranges.ranges) == {"smooth", "noisy"}  # a class without held-out series gets no range
    assert ranges.check(xs[0], "absent") is None
    assert ranges.check(xs[0], "smooth").in_range and ranges.check(xs[1], "noisy").in_range
    assert not ranges.check(xs[1], "smooth").in_range  # a noisy input is unlike the smooth class' inputs
    clf = ImageClassifier(engine=SimpleNamespace(manifest=SimpleNamespace(
        labels=["smooth", "noisy"], ref="m/1", preprocessing=object(), postprocessing={}, root=None, outputs=[]),
        backend="test"))
    clf._gate, clf._ranges = UncertaintyGate(), ranges
    p = np.array([0.95, 0.05])
    check = clf.input_check(xs[1], p)
    lab = clf.label_of(p, input_check=check)
    assert lab.uncertain and lab.predicted == "smooth" and "unlike the held-out smooth series" in lab.uncertain_reason
    assert lab.input_range_score > 1
    header = SimpleNamespace(label="noisy", label_confidence=0.99, b_values=[])
    assert not would_alert(header, lab)
    sure = clf.label_of(p, input_check=clf.input_check(xs[0], p))
    assert sure.label == "smooth" and sure.input_range_score <= 1


def test_gate_makes_labels_uncertain_and_silences_the_mismatch_rule():
    clf = ImageClassifier(engine=SimpleNamespace(manifest=SimpleNamespace(
        labels=["T2WI_nan", "T2WI_fs", "DWI_Low", "DWI_High", "ADC", "other"], ref="m/1", preprocessing=object(),
        postprocessing={}, root=None, outputs=[]), backend="test"))
    clf._gate = UncertaintyGate(temperature=2.0, min_confidence=0.5)
    p = np.array([0.9, 0.02, 0.02, 0.02, 0.02, 0.02])
    sure = clf.label_of(p)
    assert sure.label == "T2WI_nan" and sure.confidence < 0.9  # softened by T = 2
    unsure = clf.label_of(np.array([0.4, 0.35, 0.0625, 0.0625, 0.0625, 0.0625]))
    assert unsure.uncertain and unsure.predicted == "T2WI_nan" and "below" in unsure.uncertain_reason
    ood = clf.label_of(p, ood=1.5)
    assert ood.uncertain and "outside" in ood.uncertain_reason
    header = SimpleNamespace(label="ADC", label_confidence=0.99, b_values=[])
    clf._gate = UncertaintyGate(min_confidence=0.5)
    assert would_alert(header, clf.label_of(np.array([0.95, 0.01, 0.01, 0.01, 0.01, 0.01])))
    assert not would_alert(header, ood) and not would_alert(header, unsure)


def test_uncertain_answers_count_as_wrong_and_are_reported():
    rows = [dict(reference="ADC", image="ADC", predicted="ADC"), dict(reference="ADC", image="uncertain", predicted="ADC"),
            dict(reference="T2WI_nan", image="DWI_Low", predicted="DWI_Low"), dict(reference="other", image="other", predicted="other")]
    m = summarise_rows(rows)
    assert m["five_class"]["n"] == 3 and m["all"]["n"] == 4
    assert m["five_class"]["accuracy"] == pytest.approx(1 / 3)
    assert m["five_class"]["accuracy_argmax"] == pytest.approx(2 / 3)
    assert m["five_class"]["accuracy_confident"] == pytest.approx(1 / 2)
    assert m["five_class"]["confident_wrong"] == 1 and m["five_class"]["uncertain_rate"] == pytest.approx(1 / 3)


def test_reference_labels_file(tmp_path):
    labels = read_labels(Path(__file__).resolve().parents[2] / "training" / "sequence" / "realdata_labels.csv")
    assert labels[QIN_ADC] == "ADC"
    bad = tmp_path / "l.csv"
    bad.write_text("# c\nseries_uid,label\n1.2,T3\n")
    with pytest.raises(ValueError, match="T3"):
        read_labels(bad)


@pytest.mark.skipif(not PROSTATEX.is_dir(), reason=f"real DICOM not here ({REALDATA}): see /work/shared/realdata/README.md")
def test_real_evaluation_runs_the_daemon_path_on_the_real_exams():
    from scanside.engines.store import ModelStore
    from scanside.training.registry import EvaluateOptions
    from scanside.training.sequence.real import evaluate_real

    store = ModelStore()
    m = store.resolve("sequence-classifier")
    report = evaluate_real(store, m, EvaluateOptions(real=[REALDATA]))
    rows = report["series"]
    assert report["series_parts"] == len(rows) == 27 and len(report["exams"]) == 2
    assert not [r for r in rows if r.get("error")], "every real series must reach the model"
    t2 = [r for r in rows if r["description"].startswith("t2_tse")]
    assert len(t2) == 3 and {r["reference"] for r in t2} == {"T2WI_nan"}
    qin = [r for r in rows if r["reference_source"] == "labels file"]
    assert len(qin) == 1 and qin[0]["reference"] == "ADC"
    five = report["metrics"]["five_class"]
    assert five["n"] == sum(r["reference"] in FIVE for r in rows) == 16
    right = sum(r["image"] == r["reference"] for r in rows if r["reference"] in FIVE)
    assert five["accuracy"] == pytest.approx(right / 16)
    assert report["false_alerts"] == sum(bool(r["alert"]) and r["header"] == r["reference"] for r in rows)
    assert "description" in rows[0] and not any("PatientName" in str(v) for r in rows for v in r.values())


@pytest.mark.parametrize("texture", [False, True])
def test_intensity_augment_changes_contrast_but_keeps_order_and_zscore(monkeypatch, texture):
    import torch

    from scanside.training.sequence import train as T

    monkeypatch.setattr(T, "TEXTURE", texture)
    intensity_augment = T.intensity_augment
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 3, 16 * 8 * 8).reshape(1, 1, 16, 8, 8).repeat(4, 3, 1, 1, 1)
    y = intensity_augment(x, g, p=1.0)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert not torch.allclose(y, x, atol=1e-2)
    m, s = y.mean(dim=(2, 3, 4)), y.std(dim=(2, 3, 4))
    assert torch.allclose(m, torch.zeros_like(m), atol=1e-4) and torch.allclose(s, torch.ones_like(s), atol=1e-3)
    # the bright end stays bright: tissue order survives the gamma and the smooth field
    assert (y[..., -1, :, :].mean(dim=(-1, -2)) > y[..., 0, :, :].mean(dim=(-1, -2))).all()
    assert torch.equal(intensity_augment(x, g, p=0.0), x)
