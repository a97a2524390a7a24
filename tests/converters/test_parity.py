"""Parity reports and the agent's INT8 parity gate (scanside.engines.store)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from scanside.converters.calibrate import calibrate
from scanside.converters.parity import auroc, dice, parity_report, record, task_metrics
from scanside.converters.calibration_data import CalibrationSet
from scanside.engines.base import EngineUnavailable
from scanside.engines.manifest import ModelManifest
from scanside.engines.store import ModelStore, parity_refusal
from scanside.agent.cli.taps import taps_manifest


def test_metrics_by_hand() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 voxels
    b[1:3] = True  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert auroc([0.1, 0.2], [1, 1]) is None


def test_dense_metric_is_dice_of_postprocessed_masks() -> None:
    m = taps_manifest()  # gaussian 2.5, sigmoid, threshold 0.55
    ref = np.full((1, 1, 40, 32, 16), -5.0, np.float32)
    ref[0, 0, 8:24, 8:24, 4:12] = 5.0
    same = task_metrics(m, ref, ref + 0.01, CalibrationSet(ref))
    assert same["metric"] == "dice_vs_fp32" and same["loss"] < 1e-6
    empty = np.full_like(ref, -5.0)  # nothing segmented: Dice 1.0 is vacuous, and an empty reference cannot pass
    e = task_metrics(m, empty, empty * 0.9, CalibrationSet(ref))
    assert e["value"] == 1.0 and e["informative"] is False and e["loss"] == 1.0
    shifted = np.roll(ref, 8, axis=2)  # half the blob moved
    d = task_metrics(m, ref, shifted, CalibrationSet(ref))
    assert 0.3 < d["value"] < 0.7 and d["loss"] == pytest.approx(1 - d["value"])


def test_report_per_variant_and_recorded(calibrated_tiny, tmp_path: Path) -> None:
    r, _cal, held = calibrated_tiny
    root = tmp_path / "models"
    shutil.copytree(r.manifest.root.parent.parent, root)
    m = ModelManifest.load(root / "tiny3d" / "1.0.0")
    rep = parity_report(m, held, threads=1)
    from scanside.converters.parity import openvino_unavailable

    ov_keys = set() if openvino_unavailable() else {"openvino:fp32", "openvino:int8_sym", "openvino:int8_u8s8"}
    assert set(rep["variants"]) == {"int8_sym", "int8_u8s8"} | ov_keys and rep["tensorrt"].startswith("skipped")
    for key, e in rep["variants"].items():
        # each entry is measured on its own back end, on the very file it names
        assert e["backend"] == ("openvino" if key.startswith("openvino:") else "onnxruntime")
        assert e["sha256"] == m.files[key.split(":")[-1]].sha256
        if key == "openvino:fp32":
            assert e["max_abs_diff"] < 1e-3 and e["loss"] == 0
            continue
        assert e["metric"] == "accuracy" and e["labelled"] == len(held)
        assert 0 < e["max_abs_diff"] < 1 and e["mean_abs_diff"] <= e["max_abs_diff"]
        assert 0 <= e["loss"] <= 1
    m2 = record(m, rep)
    again = ModelManifest.load(m2.root)
    assert again.parity["variants"]["int8_u8s8"]["loss"] == rep["variants"]["int8_u8s8"]["loss"]


def _store_with(m: ModelManifest, tmp_path: Path, **kw) -> ModelStore:
    return ModelStore(m.root.parent.parent, engine_options={"onnxruntime": {"intra_op_threads": 1}},
                      preference=["onnxruntime"], **kw)


def test_gate_refuses_int8_without_parity(calibrated_tiny, tmp_path: Path) -> None:
    r, _cal, held = calibrated_tiny
    root = tmp_path / "models"
    shutil.copytree(r.manifest.root.parent.parent, root)
    m = ModelManifest.load(root / "tiny3d" / "1.0.0")
    m = m.model_copy(update={"default_variant": "int8_u8s8", "parity": None})
    m.save(root / "tiny3d" / "1.0.0")
    m = ModelManifest.load(root / "tiny3d" / "1.0.0")
    store = _store_with(m, tmp_path)
    # explicit INT8 without a report: refused with the reason
    with pytest.raises(EngineUnavailable, match="no parity report"):
        store.open("tiny3d", variant="int8_u8s8")
    # default INT8 without a report: FP32 is used instead, and the selection says why
    eng, sel = store.open("tiny3d")
    with eng:
        assert sel.variant == "fp32" and "refused" in sel.reason
    # with an in-tolerance report it loads
    m = record(m, parity_report(m, held, threads=1))
    eng, sel = store.open("tiny3d")
    with eng:
        assert sel.variant == "int8_u8s8" and sel.precision == "int8_qdq_u8s8"
    loss = m.parity["variants"]["int8_u8s8"]["loss"]
    # a stricter tolerance than the measured loss refuses it (when the loss is not exactly 0, fake one)
    if loss == 0:
        p = dict(m.parity)
        p["variants"] = {**p["variants"], "int8_u8s8": {**p["variants"]["int8_u8s8"], "loss": 0.3}}
        m = m.model_copy(update={"parity": p})
        m.save(m.root)
        loss = 0.3
    strict = _store_with(m, tmp_path, int8_tolerance=loss / 2)
    with pytest.raises(EngineUnavailable, match="exceeds the tolerance"):
        strict.open("tiny3d", variant="int8_u8s8")
    off = _store_with(m, tmp_path, int8_tolerance=None)
    eng, sel = off.open("tiny3d", variant="int8_u8s8")
    eng.close()


def test_gate_refuses_a_requantized_file(calibrated_tiny, tmp_path: Path) -> None:
    r, cal, held = calibrated_tiny
    root = tmp_path / "models"
    shutil.copytree(r.manifest.root.parent.parent, root)
    m = ModelManifest.load(root / "tiny3d" / "1.0.0")
    m = record(m, parity_report(m, held, threads=1))
    assert parity_refusal(m, "int8_sym", "int8_qdq_sym", m.files["int8_sym"].sha256, 1.0) is None
    # recalibrating with another method writes new files: their old reports no longer count
    r2 = calibrate(m, cal, method="percentile", select_ops=False)
    m2 = r2.manifest
    assert "int8_sym" not in (m2.parity or {}).get("variants", {})
    assert "no parity report" in parity_refusal(m2, "int8_sym", "int8_qdq_sym", m2.files["int8_sym"].sha256, 1.0)
    stale = m.parity["variants"]["int8_sym"]
    m3 = m2.model_copy(update={"parity": {"variants": {"int8_sym": stale}}})
    if stale["sha256"] != m2.files["int8_sym"].sha256:
        assert "another file" in parity_refusal(m3, "int8_sym", "int8_qdq_sym", m2.files["int8_sym"].sha256, 1.0)
    assert parity_refusal(m3, "fp32", "fp32", m2.files["fp32"].sha256, 0.0) is None  # FP32 is never gated
