"""INT8 calibration of a real ONNX model on simulated-scanner DICOM: two Q/DQ variants from one pass."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from scanside.converters.calibrate import DEFAULT_MAX_REL_ERROR, RECIPES, calibrate, rel_error
from scanside.engines.manifest import ModelManifest, sha256_file


def _zero_point_types(path) -> set:
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    out = set()
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            out.add(onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[2]].data_type).name)
    return out


def test_two_variants_recorded_in_the_manifest(calibrated_tiny) -> None:
    r, cal, _held = calibrated_tiny
    m = ModelManifest.load(r.manifest.root)  # what was saved
    assert set(m.files) == {"fp32", "int8_sym", "int8_u8s8"}
    assert m.files["int8_sym"].precision == "int8_qdq_sym" and m.files["int8_u8s8"].precision == "int8_qdq_u8s8"
    for key in ("int8_sym", "int8_u8s8"):
        f = m.files[key]
        assert sha256_file(m.resolve(f.path)) == f.sha256
        c = f.calibration
        assert c["samples"] == len(cal) and c["series"] == 2 and c["method"] == "minmax"
        assert sha256_file(m.resolve(c["tensors"])) == c["tensors_sha256"]  # the tensors used are kept
        assert c["tensors_dtype"] == "float16"
        assert m.resolve(c["ranges"]).is_file()
    # one calibration: both variants quantized from the same ranges file
    assert m.files["int8_sym"].calibration["ranges"] == m.files["int8_u8s8"].calibration["ranges"]
    ranges = json.loads(m.resolve(m.files["int8_sym"].calibration["ranges"]).read_text())
    assert "x" in json.dumps(ranges)


def test_symmetric_variant_has_signed_activations(calibrated_tiny) -> None:
    r, _cal, _held = calibrated_tiny
    m = r.manifest
    assert _zero_point_types(m.file_path("int8_sym")) == {"int8"}  # S8 activations for TensorRT
    assert "uint8" in _zero_point_types(m.file_path("int8_u8s8"))  # U8 activations for the CPU
    ops = {n.op_type for n in onnx.load(str(m.file_path("int8_sym"))).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_op_type_selection_follows_its_measurements(calibrated_tiny) -> None:
    r, _cal, held = calibrated_tiny
    for key, sel in r.selections.items():
        assert set(sel.measured) == {"Conv", "Gemm"}  # the candidate types present in the graph
        for op, err in sel.measured.items():
            assert (op in sel.kept) == (err <= DEFAULT_MAX_REL_ERROR), (key, op, err)
        assert set(r.manifest.files[key].calibration["op_types_quantized"]) == set(sel.kept)
    # quantized outputs stay close to FP32 on held-out series
    m = r.manifest
    ref = ort.InferenceSession(str(m.file_path("fp32"))).run(None, {"x": held.inputs})[0]
    for key in r.variants:
        got = ort.InferenceSession(str(m.file_path(key))).run(None, {"x": held.inputs})[0]
        assert rel_error([ref.astype(np.float64)], [got.astype(np.float64)]) < 0.2


def test_bad_arguments(calibrated_tiny) -> None:
    r, cal, _ = calibrated_tiny
    with pytest.raises(ValueError, match="calibration method"):
        calibrate(r.manifest, cal, method="kl", save=False)
    with pytest.raises(ValueError, match="unknown variant"):
        calibrate(r.manifest, cal, variants=["int4"], save=False)
    with pytest.raises(ValueError, match="empty"):
        calibrate(r.manifest, cal.subset([]), save=False)
    assert set(RECIPES) == {"int8_sym", "int8_u8s8"}


def test_kept_tensors_are_what_was_calibrated_on(calibrated_tiny) -> None:
    from scanside.converters.calibration_data import CalibrationSet

    r, cal, _ = calibrated_tiny
    kept = CalibrationSet.load(r.tensors_path)
    with np.load(r.tensors_path) as z:
        assert z["inputs"].dtype == np.float16  # half the file, nothing lost: the set was rounded first
    assert kept.inputs.dtype == np.float32 and kept.sources == cal.sources and kept.labels == cal.labels
    np.testing.assert_array_equal(kept.inputs, cal.rounded_to_half().inputs)
    assert not np.array_equal(kept.inputs, cal.inputs)  # the rounding is real: the raw set is not float16-exact
    np.testing.assert_allclose(kept.inputs, cal.inputs, rtol=2.0 ** -11, atol=1e-7)


def test_save_is_lossless_either_way(tmp_path) -> None:
    from scanside.converters.calibration_data import CalibrationSet

    x = np.random.default_rng(0).normal(size=(2, 1, 4, 4, 4)).astype(np.float32)
    for arr, stored in ((x, np.float32), (x.astype(np.float16).astype(np.float32), np.float16),
                        (x * 1e5, np.float32)):  # beyond float16's range: neither rounded nor stored half
        s = CalibrationSet(arr, labels=["a", "b"], sources=["s1", "s2"], input_name="x")
        path = s.save(tmp_path / "c.npz")
        with np.load(path) as z:
            assert z["inputs"].dtype == stored
        np.testing.assert_array_equal(CalibrationSet.load(path).inputs, arr)
    big = CalibrationSet(x * 1e5, input_name="x")
    assert big.rounded_to_half() is big
