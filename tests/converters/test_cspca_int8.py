"""INT8 for the csPCa model: the task metric of the parity report, node-level FP32 choice by measurement,
and the committed cspca-reference INT8 variants (their parity entries, the store's choice, their outputs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scanside.converters.calibration_data import CalibrationSet
from scanside.converters.parity import cspca_metrics, openvino_unavailable
from scanside.engines.manifest import ModelManifest
from scanside.engines.store import PACKAGE_MODELS_DIR, ModelStore, parity_refusal

CSPCA = Path(ModelStore(PACKAGE_MODELS_DIR).resolve("cspca-reference").root)  # the shipped (newest) version


def _maps(n: int = 4) -> np.ndarray:
    m = np.zeros((n, 1, 6, 16, 16), np.float32)
    for i in range(n):
        m[i, 0, 2:4, 3 + i:7 + i, 3:7] = 0.9  # one lesion per exam
    return m


def test_cspca_metrics_by_hand() -> None:
    m = ModelManifest.load(CSPCA)
    ref = {"likelihood": _maps(), "probability": np.array([[0.9], [0.2], [0.8], [0.1]], np.float32)}
    cset = CalibrationSet(np.zeros((4, 1)), targets=[1.0, 0.0, 1.0, 0.0])
    same = cspca_metrics(m, ref, {k: v.copy() for k, v in ref.items()}, cset)
    assert same["loss"] == 0 and same["auroc"] == same["auroc_fp32"] == 1.0 and same["lesions_fp32"] == 4
    # a lesion lost by the variant: lesion agreement 3/4 -> loss 0.25
    got = {k: v.copy() for k, v in ref.items()}
    got["likelihood"][1] = 0.0
    r = cspca_metrics(m, ref, got, cset)
    assert r["lesions_missed"] == 1 and r["lesion_agreement"] == pytest.approx(0.75) and r["loss"] == pytest.approx(0.25)
    # an extra lesion (peak above min_peak where FP32 has none) counts too
    got = {k: v.copy() for k, v in ref.items()}
    got["likelihood"][0, 0, 5, 12:15, 12:15] = 0.95
    assert cspca_metrics(m, ref, got, cset)["lesions_extra"] == 1
    # one exam decided differently (0.8 -> 0.3): decision agreement 3/4 and AUROC drops
    got = {k: v.copy() for k, v in ref.items()}
    got["probability"][2] = 0.15
    r = cspca_metrics(m, ref, got, cset)
    assert r["decision_agreement"] == pytest.approx(0.75) and r["auroc"] < 1.0 and r["loss"] == pytest.approx(0.25)


def test_node_selection_is_measured_and_recorded(calibrated_tiny, tmp_path: Path) -> None:
    import shutil

    from scanside.converters.calibrate import boundary_nodes, calibrate

    r, cal, _held = calibrated_tiny
    root = tmp_path / "models"
    shutil.copytree(r.manifest.root.parent.parent, root)
    m = ModelManifest.load(root / "tiny3d" / "1.0.0")
    cands = boundary_nodes(m.file_path("fp32"))
    assert cands and set(cands.values()) & {"first convolution", "last convolution"}
    r2 = calibrate(m, cal, variants=("int8_u8s8",), select_nodes_fp32=True, keep_fp32=())
    rec = ModelManifest.load(r2.manifest.root).files["int8_u8s8"].calibration
    meas = rec["node_measurements"]
    assert "all_quantized" in meas and all(f"fp32:{n}" in meas for n in cands)
    for n in cands:
        e = meas[f"fp32:{n}"]
        assert e["fp32_nodes"] == [n] and e["rel_error"] >= 0 and e["latency_s"] > 0 and "error_gain" in e
    # what was kept FP32 is exactly what the measurements justified, and the quantized file has no Q/DQ on it
    assert isinstance(rec["nodes_kept_fp32"], dict)
    for n, why in rec["nodes_kept_fp32"].items():
        assert "removes" in why or "sensitive" in why


def test_shipped_cspca_int8_variants_have_passing_parity_per_backend() -> None:
    m = ModelManifest.load(CSPCA)
    for v, precision in (("int8_sym", "int8_qdq_sym"), ("int8_u8s8", "int8_qdq_u8s8")):
        f = m.files[v]
        assert f.precision == precision and m.resolve(f.path).stat().st_size < 10 * 1024**2
        cal = f.calibration or {}
        assert "nodes_kept_fp32" in cal and "node_measurements" in cal  # the FP32 choice, with its measurements
        keys = [v] + ([] if openvino_unavailable() else [f"openvino:{v}"])
        for key in keys:
            e = m.parity["variants"][key]
            assert e["sha256"] == f.sha256 and e["metric"] == "auroc" and e["exams_with_truth"] >= 10
            # the store's gate (0.02): with 8 x 8 exam pairs one tied pair is already 0.0078 of AUROC;
            # every decision and every lesion must still be FP32's
            assert e["auroc_fp32"] - e["auroc"] <= 0.02 and e["decision_agreement"] == 1.0
            assert e["lesions_missed"] == 0 and e["lesions_extra"] == 0
            assert parity_refusal(m, key, precision, f.sha256, 0.02) is None


@pytest.mark.skipif(openvino_unavailable() is not None, reason=f"OpenVINO: {openvino_unavailable()}")
def test_store_default_runs_cspca_int8_on_openvino_close_to_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine

    monkeypatch.delenv("SCANSIDE_ENGINE_PREFERENCE", raising=False)
    store = ModelStore(engine_options={"openvino": {"threads": 1, "cache": False}})
    eng, sel = store.open("cspca-reference")
    m = store.resolve("cspca-reference")
    x = CalibrationSet.load(m.resolve(m.files["int8_sym"].calibration["tensors"]))  # the tensors it was calibrated on
    with eng, OnnxRuntimeEngine(["CPUExecutionProvider"], intra_op_threads=1).load(store.resolve("cspca-reference")) as ref:
        assert sel.backend == "openvino" and sel.variant in ("int8_sym", "int8_u8s8", "fp32")
        assert "parity report openvino:" in sel.reason
        diffs = []
        for feed in x.feeds(1):
            a, b = eng.run(feed), ref.run(feed)
            pa, pb = float(a["probability"][0, 0]), float(b["probability"][0, 0])
            diffs.append(abs(pa - pb))
            assert (pa >= 0.5) == (pb >= 0.5)  # the same csPCa decision
            assert ((a["likelihood"] > 0.5) == (b["likelihood"] > 0.5)).mean() > 0.99
        # the exam probability is a max over the map: a borderline exam (FP32 0.63) moves by up to ~0.12 under
        # INT8 (ONNX Runtime's symmetric variant by 0.09); the others by less than 0.02
        assert max(diffs) < 0.15 and sorted(diffs)[-2] < 0.03
