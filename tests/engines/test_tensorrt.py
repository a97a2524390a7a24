"""TensorRT back end.  Everything that needs no GPU runs everywhere (compatibility rules on plain
device descriptions, plan selection, dtype mapping, lazy import); the real engine tests are
marked gpu and skip unless tensorrt, cuda-python and a CUDA device are present."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.base import EngineError
from engines.manifest import ModelManifest, ShapeRange, TensorRTPlan, sha256_file
from engines.tensorrt_engine import CudaDevice, TensorRTEngine, check_plan_compatibility, check_shape_in_profile, \
    parse_version, probe_cuda_device, probe_tensorrt, select_plan, trt_dtype_to_numpy
from tests.engines._tiny import install_tiny, sample_input, tiny_manifest_dict

SHA = "a" * 64
H100 = CudaDevice.from_dict({"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "total_memory_bytes": 80 << 30})
A4000 = CudaDevice.from_dict({"name": "NVIDIA RTX A4000", "compute_capability": [8, 6], "total_memory_bytes": 16 << 30})
A10 = CudaDevice(0, "NVIDIA A10", (8, 6), 24 << 30)
ORIN = CudaDevice(0, "Orin", (8, 7), 32 << 30, integrated=True)
T4 = CudaDevice(0, "Tesla T4", (7, 5), 16 << 30)
P100 = CudaDevice(0, "Tesla P100", (6, 0), 16 << 30)


def plan(**kw) -> TensorRTPlan:
    base = dict(path="m.plan", sha256=SHA, trt_version="10.3.0", compute_capability="8.6", gpu_name="NVIDIA RTX A4000")
    base.update(kw)
    return TensorRTPlan(**base)


@pytest.mark.parametrize("p, device, runtime, ok, why", [
    (plan(), A4000, "10.3.0", True, "can run"),
    (plan(trt_version="10.3.0.26"), A4000, "10.3.0.26", True, "can run"),
    (plan(trt_version="10.3.0.26"), A4000, "10.3.0.30", False, "needs the same version"),
    (plan(), A4000, "10.4.0", False, "needs the same version"),
    (plan(), A4000, "11.4.1", False, "needs the same version"),
    (plan(version_compatible=True), A4000, "10.7.0", True, "version-compatible"),
    (plan(version_compatible=True), A4000, "11.4.1", True, "version-compatible"),
    (plan(version_compatible=True, trt_version="10.7.0"), A4000, "10.3.0", False, "cannot run on older"),
    (plan(version_compatible=True, trt_version="8.5.3"), A4000, "10.3.0", False, "< 8.6"),
    (plan(), ORIN, "10.3.0", False, "compute capability 8.6 (hardware compatibility NONE), GPU Orin is 8.7"),
    (plan(), A10, "10.3.0", True, "can run"),  # other GPU model, same SM: runs (TensorRT warns)
    (plan(hardware_compatibility="same_compute_capability"), H100, "10.3.0", False, "is 9.0"),
    (plan(hardware_compatibility="ampere_plus"), H100, "10.3.0", True, "ampere_plus"),
    (plan(hardware_compatibility="ampere_plus"), ORIN, "10.3.0", True, "ampere_plus"),
    (plan(hardware_compatibility="ampere_plus", compute_capability="7.5"), T4, "10.3.0", False, "(< 8.0)"),
    (plan(hardware_compatibility="ampere_plus", compute_capability="7.5"), A4000, "10.3.0", False, "built on compute capability 7.5"),
    (plan(compute_capability="6.0"), P100, "10.3.0", False, "needs >= 7.5"),
    (plan(min_device_memory_bytes=40 << 30), A4000, "10.3.0", False, "device memory"),
    (plan(compute_capability="8.7", dla_core=0), ORIN, "10.3.0", True, "can run"),
    (plan(dla_core=0), A4000, "10.3.0", False, "no DLA"),
    (plan(), None, "10.3.0", False, "no CUDA device"),
    (plan(), A4000, None, False, "tensorrt not importable"),
])
def test_plan_compatibility(p: TensorRTPlan, device, runtime, ok: bool, why: str) -> None:
    c = check_plan_compatibility(p, device, runtime)
    assert c.ok is ok, c.reason
    assert why in c.reason
    assert bool(c) is ok


def test_compatibility_notes() -> None:
    c = check_plan_compatibility(plan(), A10, "10.3.0")
    assert any("built on NVIDIA RTX A4000, running on NVIDIA A10" in n for n in c.notes)
    c = check_plan_compatibility(plan(trt_version="10.3"), A4000, "10.3.0")
    assert c.ok and any("patch version not recorded" in n for n in c.notes)
    c = check_plan_compatibility(plan(version_compatible=True, trt_version="8.6.1"), A4000, "11.0.0")
    assert c.ok and any("one major apart" in n for n in c.notes)


def _manifest(plans) -> ModelManifest:
    d = tiny_manifest_dict(SHA)
    d["plans"] = [p.model_dump() for p in plans]
    return ModelManifest.model_validate(d)


def test_select_plan_first_compatible_with_reasons() -> None:
    m = _manifest([plan(path="orin.plan", compute_capability="8.7", trt_version="10.3.0"),
                   plan(path="a4000-int8.plan", precision="int8_qdq_sym"),
                   plan(path="a4000.plan")])
    chosen, reasons = select_plan(m, A4000, "10.3.0")
    assert chosen is not None and chosen.path == "a4000-int8.plan"
    assert reasons == [("orin.plan", reasons[0][1])] and "8.7" in reasons[0][1]
    chosen, reasons = select_plan(m, A4000, "10.3.0", precision="fp32")
    assert chosen.path == "a4000.plan" and len(reasons) == 2
    chosen, reasons = select_plan(m, H100, "11.4.1")
    assert chosen is None and len(reasons) == 3
    assert select_plan(_manifest([]), A4000, "10.3.0") == (None, [("-", "no TensorRT plan in the manifest")])


def test_plan_records_roundtrip_in_manifest(tmp_path: Path) -> None:
    p = plan(profiles=[{"x": ShapeRange(min=[1, 1, 8, 8, 4], opt=[2, 1, 8, 8, 4], max=[8, 1, 8, 8, 4])}],
             version_compatible=True, hardware_compatibility="ampere_plus", source_variant="fp32")
    m = _manifest([p])
    m.save(tmp_path)
    back = ModelManifest.load(tmp_path)
    assert back.plans[0] == p
    with pytest.raises(ValueError, match="profile names unknown input"):
        _manifest([plan(profiles=[{"image": ShapeRange(min=[1], opt=[1], max=[1])}])])


def test_shape_profile_check() -> None:
    prof = {"x": ShapeRange(min=[1, 1, 8, 8, 4], opt=[2, 1, 8, 8, 4], max=[8, 1, 8, 8, 4])}
    assert check_shape_in_profile(prof, "x", (4, 1, 8, 8, 4)) is None
    assert "axis 0 = 9 outside the plan's profile [1, 8]" in check_shape_in_profile(prof, "x", (9, 1, 8, 8, 4))
    assert "rank" in check_shape_in_profile(prof, "x", (1, 8, 8, 4))
    assert check_shape_in_profile(prof, "other", (1,)) is None


def test_dtype_mapping() -> None:
    assert trt_dtype_to_numpy("FLOAT") == np.float32
    assert trt_dtype_to_numpy("DataType.HALF") == np.float16
    assert trt_dtype_to_numpy("INT64") == np.int64 and trt_dtype_to_numpy("BOOL") == np.bool_

    class FakeEnumMember:  # what tensorrt.DataType members look like: they have a .name
        name = "INT8"
    assert trt_dtype_to_numpy(FakeEnumMember()) == np.int8
    with pytest.raises(EngineError, match="BF16 has no numpy equivalent"):
        trt_dtype_to_numpy("BF16")
    with pytest.raises(EngineError, match="unknown TensorRT data type"):
        trt_dtype_to_numpy("COMPLEX")
    assert parse_version("10.3.0.26") == (10, 3, 0, 26) and parse_version("11.4.1.post1") == (11, 4, 1)


def _have_trt_gpu() -> tuple:
    v, why = probe_tensorrt()
    if v is None:
        return False, why
    dev, dwhy = probe_cuda_device(0)
    return (dev is not None), dwhy


HAVE_GPU, GPU_WHY = _have_trt_gpu()


def test_module_imports_without_tensorrt_and_reports_why() -> None:
    mod = importlib.reload(sys.modules["engines.tensorrt_engine"])
    ok, why = mod.TensorRTEngine.availability()
    assert ok is HAVE_GPU
    if not ok:
        assert "tensorrt not importable" in why or "cuda-python" in why or "CUDA" in why


@pytest.mark.skipif(HAVE_GPU, reason="tensorrt and a GPU are present")
def test_engine_load_without_tensorrt_raises_unavailable(tmp_path: Path) -> None:
    from engines.base import EngineUnavailable
    m = install_tiny(tmp_path / "models")
    with pytest.raises(EngineUnavailable, match="tensorrt"):
        TensorRTEngine().load(m)


# ---- real TensorRT ----------------------------------------------------------------------------------
def _build_plan(onnx_path: Path, plan_path: Path) -> TensorRTPlan:
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 11:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if hasattr(
            trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 1, 8, 8, 4), (2, 1, 8, 8, 4), (8, 1, 8, 8, 4))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    assert blob is not None
    plan_path.write_bytes(bytes(blob))
    dev, _ = probe_cuda_device(0)
    return TensorRTPlan(path=plan_path.name, sha256=sha256_file(plan_path), trt_version=trt.__version__,
                        compute_capability=dev.cc, gpu_name=dev.name, source_variant="fp32",
                        profiles=[{"x": ShapeRange(min=[1, 1, 8, 8, 4], opt=[2, 1, 8, 8, 4], max=[8, 1, 8, 8, 4])}])


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason=f"tensorrt not importable / no CUDA device: {GPU_WHY}")
def test_tensorrt_engine_matches_onnxruntime(tmp_path: Path) -> None:
    from engines.onnxruntime_engine import OnnxRuntimeEngine
    from engines.store import ModelStore
    m = install_tiny(tmp_path / "models")
    p = _build_plan(m.file_path(), m.root / "tiny.plan")
    m = m.model_copy(update={"plans": [p]})
    m.save(m.root)
    m = ModelManifest.load(m.root)
    x = sample_input(3)
    with TensorRTEngine().load(m) as trt_eng, OnnxRuntimeEngine(providers=["CPUExecutionProvider"]).load(m) as ort_eng:
        trt_eng.warmup()
        a = trt_eng.run({"x": x})["logits"]
        b = ort_eng.run({"x": x})["logits"]
        info = trt_eng.describe()
        assert info.backend == "tensorrt" and "sm" in info.device
        assert trt_eng.run({"x": sample_input(8)})["logits"].shape == (8, 2)  # buffers grow
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    engine, sel = ModelStore(tmp_path / "models").open("tiny3d")
    with engine:
        assert sel.backend == "tensorrt", sel.summary()
