"""OpenVINO back end: parity with ONNX Runtime, the compiled-model cache, and the store's choice."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="openvino not installed (pip install 'scanside[openvino]')")

from scanside.engines.base import EngineUnavailable, InputValidationError, ManifestMismatch  # noqa: E402
from scanside.engines.manifest import ModelManifest, sha256_file  # noqa: E402
from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine  # noqa: E402
from scanside.engines.backends.openvino_engine import OpenVinoEngine, is_x86  # noqa: E402
from scanside.engines.store import CPU_PREFERENCE, PACKAGE_MODELS_DIR, ModelStore  # noqa: E402
from tests.engines._tiny import build_tiny_onnx, install_tiny, sample_input, tiny_manifest_dict  # noqa: E402

needs_x86 = pytest.mark.skipif(not is_x86(), reason="the store prefers OpenVINO on x86 CPUs only")


def _ort(m: ModelManifest, variant: str = "fp32") -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(["CPUExecutionProvider"], intra_op_threads=1).load(m, variant)


def test_tiny_matches_onnxruntime_any_batch(tmp_path: Path) -> None:
    m = install_tiny(tmp_path / "models")
    with OpenVinoEngine(threads=1, cache_dir=tmp_path / "cache") as ov_eng, _ort(m) as ort_eng:
        ov_eng.load(m)
        ov_eng.warmup()
        for batch in (1, 3, 7):  # dynamic batch from the manifest ("N")
            x = {"x": sample_input(batch, seed=batch)}
            a, b = ov_eng.run(x)["logits"], ort_eng.run(x)["logits"]
            assert a.shape == (batch, 2) and a.dtype == np.float32
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        info = ov_eng.describe()
        assert info.backend == "openvino" and info.device.startswith("CPU")
        assert info.threads["inference"] == 1 and info.extra["performance_hint"] == "LATENCY"
        assert info.extra["cache_dir"] == str(tmp_path / "cache")
        assert info.library_versions["openvino"] == str(ov.get_version())
        with pytest.raises(InputValidationError, match="dtype float64"):
            ov_eng.run({"x": sample_input(1).astype(np.float64)})


def test_zero_copy_run_hands_back_results_of_its_own(tmp_path: Path) -> None:
    """Inputs and outputs are shared with the request (no copies in): a result must not change when
    the next call reuses the request, nor when the caller then overwrites its input array."""
    m = install_tiny(tmp_path / "models")
    with OpenVinoEngine(threads=1) as eng:
        eng.load(m)
        x1, x2 = sample_input(2, seed=1), sample_input(2, seed=2)
        first = eng.run({"x": x1})["logits"]
        kept = first.copy()
        second = eng.run({"x": x2})["logits"]
        x1[...] = 0.0
        np.testing.assert_array_equal(first, kept)
        assert not np.allclose(first, second)
        np.testing.assert_allclose(eng.run({"x": sample_input(2, seed=1)})["logits"], kept, rtol=1e-6)


def test_static_batch_onnx_made_dynamic_by_manifest(tmp_path: Path) -> None:
    """An ONNX file exported with batch 1 still takes any batch when the manifest names the dim."""
    import onnx

    src = build_tiny_onnx(tmp_path / "src.onnx")
    model = onnx.load(str(src))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(src))
    m = ModelStore(tmp_path / "models").install(
        ModelManifest.model_validate(tiny_manifest_dict(sha256_file(src))), {"model.onnx": src})
    with OpenVinoEngine(threads=1, cache=False).load(m) as eng:
        assert "x" in eng.reshaped
        assert eng.run({"x": sample_input(4)})["logits"].shape == (4, 2)


def test_manifest_mismatch_is_refused(tmp_path: Path) -> None:
    src = build_tiny_onnx(tmp_path / "src.onnx")
    d = tiny_manifest_dict(sha256_file(src))
    d["inputs"][0]["name"] = "image"
    m = ModelStore(tmp_path / "models").install(ModelManifest.model_validate(d), {"model.onnx": src})
    with pytest.raises(ManifestMismatch, match="'image' not in the model"):
        OpenVinoEngine(cache=False).load(m)


def test_compiled_model_cache_reused(tmp_path: Path) -> None:
    m = install_tiny(tmp_path / "models")
    cache = tmp_path / "ovcache"
    first = OpenVinoEngine(threads=1, cache_dir=cache).load(m)
    blobs = first.cached_blobs()
    assert blobs, "no compiled blob written to the cache dir"
    mtimes = {b: b.stat().st_mtime_ns for b in blobs}
    second = OpenVinoEngine(threads=1, cache_dir=cache).load(m)
    assert second.cached_blobs() == blobs and {b: b.stat().st_mtime_ns for b in blobs} == mtimes  # read, not rewritten
    x = {"x": sample_input(2)}
    np.testing.assert_array_equal(first.run(x)["logits"], second.run(x)["logits"])
    off = OpenVinoEngine(threads=1, cache=False).load(m)
    assert off.cached_blobs() == [] and off.describe().extra["cache_dir"] is None


def test_tampered_file_is_not_loaded(tmp_path: Path) -> None:
    from scanside.engines.manifest import IntegrityError

    m = install_tiny(tmp_path / "models")
    with open(m.resolve("model.onnx"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError):
        OpenVinoEngine(cache=False).load(m)


@pytest.mark.parametrize("name", ["sequence-classifier", "cspca-reference"])
def test_shipped_models_match_onnxruntime(name: str, tmp_path: Path) -> None:
    store = ModelStore(PACKAGE_MODELS_DIR)
    if not store.versions(name):
        pytest.skip(f"{name} not in {PACKAGE_MODELS_DIR}")
    m = store.resolve(name)
    rng = np.random.default_rng(3)
    feeds = {s.name: rng.standard_normal(s.concrete_shape(2)).astype(s.dtype) for s in m.inputs}
    with OpenVinoEngine(threads=2, cache_dir=tmp_path).load(m) as a, _ort(m) as b:
        got, ref = a.run(feeds), b.run(feeds)
    assert set(got) == {o.name for o in m.outputs}
    for k in ref:
        assert got[k].shape == ref[k].shape
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-3, atol=1e-4)
    if m.task == "sequence_classification":
        assert (got[m.outputs[0].name].argmax(1) == ref[m.outputs[0].name].argmax(1)).all()


# ---- store: selection order and reasons ---------------------------------------------------------------
def _with_int8(tmp_path: Path) -> ModelManifest:
    """The tiny model plus a real U8/S8 per-channel Q/DQ variant (onnxruntime.quantization), no parity yet."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    m = install_tiny(tmp_path / "models")
    root = Path(m.root)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": sample_input(4, seed=s)} for s in range(4)])

        def get_next(self):
            return next(self.it, None)

    q = root / "model.int8_u8s8.onnx"
    quantize_static(str(root / "model.onnx"), str(q), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    files = dict(m.files)
    files["int8_u8s8"] = files["fp32"].model_copy(update={"path": q.name, "sha256": sha256_file(q),
                                                          "precision": "int8_qdq_u8s8"})
    m2 = m.model_copy(update={"files": files, "default_variant": "int8_u8s8"})
    m2.save(root)
    return ModelManifest.load(root)


def _set_parity(m: ModelManifest, entries: dict) -> ModelManifest:
    m2 = m.model_copy(update={"parity": {"variants": entries}})
    m2.save(Path(m.root))
    return ModelManifest.load(Path(m.root))


@needs_x86
def test_store_prefers_openvino_on_x86(tmp_path: Path) -> None:
    install_tiny(tmp_path / "models")
    store = ModelStore(tmp_path / "models", preference=CPU_PREFERENCE,
                       engine_options={"openvino": {"threads": 1, "cache_dir": tmp_path / "c"}})
    eng, sel = store.open("tiny3d")
    with eng:
        assert sel.backend == "openvino" and isinstance(eng, OpenVinoEngine) and sel.variant == "fp32"
        assert sel.skipped == {"tensorrt": "no TensorRT plan in the manifest"}
        assert "CPU" in sel.reason and "1 threads" in sel.reason
        assert eng.run({"x": sample_input(2)})["logits"].shape == (2, 2)
    assert store.explain("tiny3d").backend == "openvino"
    # explicit preference without openvino -> onnxruntime as before
    assert ModelStore(tmp_path / "models", preference=["onnxruntime"]).explain("tiny3d").backend == "onnxruntime"


@needs_x86
def test_store_int8_needs_passing_openvino_parity(tmp_path: Path) -> None:
    m = _with_int8(tmp_path)
    sha = m.files["int8_u8s8"].sha256
    store = ModelStore(tmp_path / "models", preference=["openvino", "onnxruntime"],
                       engine_options={"openvino": {"threads": 1, "cache": False}})
    # no parity report: the default INT8 variant is refused -> OpenVINO runs fp32 and says why
    sel = store.explain("tiny3d")
    assert sel.backend == "openvino" and sel.variant == "fp32" and "no parity report" in sel.reason
    with pytest.raises(EngineUnavailable, match="openvino:int8_u8s8 has no parity report"):
        store.open("tiny3d", variant="int8_u8s8", preference=["openvino"])
    # a passing ONNX Runtime entry does not count for OpenVINO: refused, naming the missing OpenVINO entry
    ok = {"sha256": sha, "loss": 0.0, "metric": "accuracy", "value": 1.0, "backend": "onnxruntime"}
    m = _set_parity(m, {"int8_u8s8": ok})
    with pytest.raises(EngineUnavailable, match="openvino:int8_u8s8 has no parity report"):
        store.open("tiny3d", variant="int8_u8s8", preference=["openvino"])
    assert store.explain("tiny3d", preference=["onnxruntime"]).variant == "int8_u8s8"  # ORT judged on its own
    # a passing OpenVINO entry (measured on this file): OpenVINO loads the INT8 variant, output close to FP32
    m = _set_parity(m, {"int8_u8s8": ok, "openvino:int8_u8s8": dict(ok, backend="openvino")})
    eng, sel = store.open("tiny3d")
    with eng, OnnxRuntimeEngine(["CPUExecutionProvider"], intra_op_threads=1).load(m, "fp32") as ref:
        assert sel.backend == "openvino" and sel.variant == "int8_u8s8" and "openvino:int8_u8s8" in sel.reason
        x = {"x": sample_input(8, seed=11)}
        a, b = eng.run(x)["logits"], ref.run(x)["logits"]
        assert np.abs(a - b).max() < 0.25 * (np.abs(b).max() + 1e-6)
    # a failing OpenVINO entry: fp32 on OpenVINO (the default variant), refused when asked for, with the reason
    bad = dict(ok, loss=0.5, backend="openvino")
    m = _set_parity(m, {"int8_u8s8": ok, "openvino:int8_u8s8": bad})
    sel = store.explain("tiny3d")
    assert sel.backend == "openvino" and sel.variant == "fp32" and "exceeds the tolerance" in sel.reason
    with pytest.raises(EngineUnavailable, match="openvino:int8_u8s8: parity loss 0.5"):
        store.open("tiny3d", variant="int8_u8s8", preference=["openvino"])
    # ... while ONNX Runtime, judged on its own entry, still takes the INT8 variant
    assert store.explain("tiny3d", preference=["onnxruntime"]).variant == "int8_u8s8"
    # an OpenVINO entry measured on another file does not count
    m = _set_parity(m, {"openvino:int8_u8s8": dict(ok, sha256="0" * 64)})
    with pytest.raises(EngineUnavailable, match="another file"):
        store.open("tiny3d", variant="int8_u8s8", preference=["openvino"])


@needs_x86
def test_default_preference_openvino_only_where_its_parity_passes(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import scanside.engines.store as st

    monkeypatch.delenv("SCANSIDE_ENGINE_PREFERENCE", raising=False)
    order, why = st.default_preference()
    assert order == CPU_PREFERENCE and "openvino installed" in why
    m = _with_int8(tmp_path)
    fp_sha, q_sha = m.files["fp32"].sha256, m.files["int8_u8s8"].sha256
    store = ModelStore(tmp_path / "models", engine_options={"openvino": {"threads": 1, "cache": False}})
    assert store.auto_preference and store.preference == list(CPU_PREFERENCE)
    # no OpenVINO parity at all: the automatic order falls back to ONNX Runtime FP32 and says why
    sel = store.explain("tiny3d")
    assert sel.backend == "onnxruntime" and sel.variant == "fp32"
    assert "no variant has a passing OpenVINO parity report" in sel.skipped["openvino"]
    assert "openvino installed" in sel.order
    # OpenVINO FP32 measured and passing, INT8 failing: OpenVINO FP32
    ent = {"loss": 0.0, "metric": "accuracy", "value": 1.0, "backend": "openvino"}
    m = _set_parity(m, {"openvino:fp32": dict(ent, sha256=fp_sha, median_latency_s=0.2),
                        "openvino:int8_u8s8": dict(ent, sha256=q_sha, loss=0.3, median_latency_s=0.1)})
    sel = store.explain("tiny3d")
    assert (sel.backend, sel.variant) == ("openvino", "fp32") and "openvino:fp32" in sel.reason
    # both passing: the faster one (OpenVINO latency of the same parity run), and the reason says so
    m = _set_parity(m, {"openvino:fp32": dict(ent, sha256=fp_sha, median_latency_s=0.2),
                        "openvino:int8_u8s8": dict(ent, sha256=q_sha, median_latency_s=0.1)})
    eng, sel = store.open("tiny3d")
    with eng:
        assert (sel.backend, sel.variant) == ("openvino", "int8_u8s8") and isinstance(eng, OpenVinoEngine)
        assert "fastest OpenVINO variant" in sel.reason and "0.1 s vs 0.2 s" in sel.reason
    # an FP32 entry measured on another file (and no INT8 entry): ONNX Runtime, and the reason names it
    m = _set_parity(m, {"openvino:fp32": dict(ent, sha256="1" * 64)})
    sel = store.explain("tiny3d")
    assert sel.backend == "onnxruntime" and "another file" in sel.skipped["openvino"]
    # openvino not importable / not x86 / overridden: ONNX Runtime order, with the reason
    monkeypatch.setattr(st, "openvino_importable", lambda: False)
    order, why = st.default_preference()
    assert "openvino" not in order and "not installed" in why
    assert ModelStore(tmp_path / "models").explain("tiny3d").backend == "onnxruntime"
    monkeypatch.setenv("SCANSIDE_ENGINE_PREFERENCE", "onnxruntime")
    assert st.default_preference() == (("onnxruntime",), "SCANSIDE_ENGINE_PREFERENCE=onnxruntime")


def test_default_preference_not_x86(monkeypatch: pytest.MonkeyPatch) -> None:
    import scanside.engines.backends.openvino_engine as ove
    import scanside.engines.store as st

    monkeypatch.delenv("SCANSIDE_ENGINE_PREFERENCE", raising=False)
    monkeypatch.setattr(ove.platform, "machine", lambda: "aarch64")
    order, why = st.default_preference()
    assert order == st.DEFAULT_PREFERENCE and "not an x86 CPU (aarch64)" in why


def test_store_reports_why_openvino_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_tiny(tmp_path / "models")
    import scanside.engines.backends.openvino_engine as ove

    monkeypatch.setattr(ove.platform, "machine", lambda: "aarch64")
    sel = ModelStore(tmp_path / "models", preference=CPU_PREFERENCE).explain("tiny3d")
    assert sel.backend == "onnxruntime" and "not an x86 CPU (aarch64)" in sel.skipped["openvino"]


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="hint"):
        OpenVinoEngine(hint="fastest")
    with pytest.raises(ValueError, match="threads"):
        OpenVinoEngine(threads=0)
