"""ONNX Runtime engine on a real (tiny) 3-D ONNX model: FP32, INT8 Q/DQ variants, options, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.engines._tiny import install_tiny, sample_input
from scanside.engines.base import EngineError, InputValidationError, ManifestMismatch
from scanside.engines.manifest import ModelFile, ModelManifest, sha256_file
from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine


@pytest.fixture()
def tiny(tmp_path: Path) -> ModelManifest:
    return install_tiny(tmp_path / "models")


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    """onnx's own pure-python evaluator: an independent implementation of the same graph."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(onnx.load(str(path))).run(None, {"x": x})[0]


def test_fp32_matches_onnx_reference(tiny: ModelManifest) -> None:
    x = sample_input(4)
    with OnnxRuntimeEngine(intra_op_threads=1).load(tiny) as eng:
        out = eng.run({"x": x})
    assert list(out) == ["logits"]
    np.testing.assert_allclose(out["logits"], reference(tiny.file_path(), x), rtol=1e-5, atol=1e-5)


def test_describe_reports_actual_providers_and_threads(tiny: ModelManifest) -> None:
    eng = OnnxRuntimeEngine(intra_op_threads=2, inter_op_threads=1, graph_optimization="extended").load(tiny)
    info = eng.describe()
    import onnxruntime as ort
    assert info.providers == eng.session.get_providers()
    assert info.providers[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert info.providers == ["CPUExecutionProvider"] and info.device == "cpu"
        assert info.extra["skipped_providers"]["CUDAExecutionProvider"] == "not in this onnxruntime build"
    assert info.threads == {"intra_op": 2, "inter_op": 1}
    assert info.library_versions["onnxruntime"] == ort.__version__
    assert info.precision == "fp32" and info.model == "tiny3d/1.0.0"
    json.dumps(info.to_dict())
    eng.close()
    with pytest.raises(EngineError, match="no model loaded"):
        eng.run({"x": sample_input()})


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_optimization_levels_agree(tiny: ModelManifest, level: str) -> None:
    x = sample_input(2)
    with OnnxRuntimeEngine(graph_optimization=level, intra_op_threads=1).load(tiny) as eng:
        np.testing.assert_allclose(eng.run({"x": x})["logits"], reference(tiny.file_path(), x), rtol=1e-5, atol=1e-5)


def test_bad_options_and_inputs(tiny: ModelManifest) -> None:
    with pytest.raises(ValueError, match="graph_optimization"):
        OnnxRuntimeEngine(graph_optimization="max")
    eng = OnnxRuntimeEngine().load(tiny)
    eng.warmup(runs=2, dynamic=3)
    with pytest.raises(InputValidationError, match="axis 2 has size 9 but the model takes 8"):
        eng.run({"x": np.zeros((1, 1, 9, 8, 4), np.float32)})
    with pytest.raises(InputValidationError, match="dtype float64"):
        eng.run({"x": np.zeros((1, 1, 8, 8, 4))})
    with pytest.raises(KeyError, match="no file variant 'int8'"):
        OnnxRuntimeEngine().load(tiny, "int8")


def test_manifest_that_lies_about_the_file_is_refused(tiny: ModelManifest) -> None:
    d = json.loads(tiny.to_json())
    d["inputs"][0]["name"] = "image"
    d["outputs"][0]["shape"] = ["N", 3]
    lying = ModelManifest.model_validate(d).set_root(tiny.root)
    with pytest.raises(ManifestMismatch) as ei:
        OnnxRuntimeEngine().load(lying)
    msg = str(ei.value)
    assert "input 'image' not in the ONNX file" in msg and "ONNX inputs not in the manifest: ['x']" in msg
    assert "output 'logits' axis 1: ONNX 2, manifest 3" in msg


class _Reader:
    def __init__(self, n: int = 8) -> None:
        self.data = iter([{"x": sample_input(1, seed=100 + i)} for i in range(n)])

    def get_next(self):
        return next(self.data, None)


@pytest.mark.parametrize("variant, sym", [("int8_qdq_sym", True), ("int8_qdq_u8s8", False)])
def test_int8_qdq_variants_run_close_to_fp32(tiny: ModelManifest, variant: str, sym: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src = tiny.file_path()
    dst = tiny.root / f"model.{variant}.onnx"
    quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8 if sym else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=not sym, calibrate_method=CalibrationMethod.MinMax,
                    # the 3-D conv path is what matters here; ORT's Gemm(transB=1) Q/DQ was off by ~50%
                    # on this toy head (seen with onnxruntime 1.32), so the head stays FP32
                    op_types_to_quantize=["Conv", "Relu", "GlobalAveragePool"],
                    extra_options={"ActivationSymmetric": sym, "WeightSymmetric": True})
    import onnx
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(dst)).graph.node)
    files = dict(tiny.files)
    files[variant] = ModelFile(path=dst.name, sha256=sha256_file(dst), precision=variant)
    m = tiny.model_copy(update={"files": files})
    m.save(tiny.root)
    m = ModelManifest.load(tiny.root)
    x = np.stack([sample_input(1, seed=100 + i)[0] for i in range(4)])
    with OnnxRuntimeEngine(intra_op_threads=1).load(m, "fp32") as f32, \
            OnnxRuntimeEngine(intra_op_threads=1).load(m, variant) as q:
        a, b = f32.run({"x": x})["logits"], q.run({"x": x})["logits"]
        assert q.describe().precision == variant
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel < 0.1, rel  # toy model, 8 calibration samples: a smoke check that Q/DQ runs, not a parity report


def test_pool_threads_do_not_spin_unless_asked(tiny: ModelManifest) -> None:
    """A daemon's engine must not busy-wait after each run (it would take the cores from ingestion and
    from the next engine); the session carries the setting onnxruntime reads."""
    key = "session.intra_op.allow_spinning"
    with OnnxRuntimeEngine(intra_op_threads=2).load(tiny) as eng:
        assert eng.session.get_session_options().get_session_config_entry(key) == "0"
    with OnnxRuntimeEngine(intra_op_threads=2, allow_spinning=True).load(tiny) as eng:
        assert eng.session.get_session_options().get_session_config_entry(key) == "1"
