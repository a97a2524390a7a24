"""TensorRT back end.  Everything that needs no GPU runs everywhere (compatibility rules on plain
device descriptions, plan selection, dtype mapping, lazy import); the real engine tests are
marked gpu and skip unless tensorrt, cuda-python and a CUDA device are present."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from scanside.engines.base import EngineError
from scanside.engines.manifest import ModelManifest, ShapeRange, TensorRTPlan, sha256_file
from scanside.engines.backends.tensorrt_engine import CudaDevice, TensorRTEngine, check_plan_compatibility, check_shape_in_profile, \
    parse_version, probe_cuda_device, probe_tensorrt, select_plan, trt_dtype_to_numpy
from tests.engines._tiny import install_tiny, sample_input, tiny_manifest_dict

SHA = "a" * 64
H100 = CudaDevice.from_dict({"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "total_memory_bytes": 80 << 30})
A4000 = CudaDevice.from_dict({"name": "NVIDIA RTX A4000", "compute_capability": [8, 6], "total_memory_bytes": 16 << 30})
A10 = CudaDevice(0, "NVIDIA A10", (8, 6), 24 << 30)
ORIN = CudaDevice(0, "Orin", (8, 7), 32 << 30, integrated=True)
T4 = CudaDevice(0, "Tesla T4", (7, 5), 16 << 30)
P100 = CudaDevice(0, "Tesla P100", (6, 0), 16 << 30)


V100 = CudaDevice(0, "Tesla V100", (7, 0), 16 << 30)
ORIN_NANO = CudaDevice(0, "Orin Nano", (8, 7), 8 << 30, integrated=True, dla_cores=0)
ORIN_AGX = CudaDevice(0, "Orin AGX", (8, 7), 32 << 30, integrated=True, dla_cores=2)
X86, TEGRA = "linux-x86_64", "linux-aarch64-tegra"


def plan(**kw) -> TensorRTPlan:
    base = dict(path="m.plan", sha256=SHA, trt_version="10.3.0", compute_capability="8.6", gpu_name="NVIDIA RTX A4000",
                platform=X86)
    base.update(kw)
    return TensorRTPlan(**base)


def _host(device) -> str:
    return TEGRA if device is not None and device.integrated else X86


@pytest.mark.parametrize("p, device, runtime, ok, why", [
    (plan(), A4000, "10.3.0", True, "can run"),
    (plan(trt_version="10.3.0.26"), A4000, "10.3.0.26", True, "can run"),
    (plan(trt_version="10.3.0.26"), A4000, "10.3.0.30", False, "needs the same major.minor.patch.build"),
    (plan(), A4000, "10.4.0", False, "needs the same major.minor.patch.build"),
    (plan(), A4000, "11.4.1", False, "needs the same major.minor.patch.build"),
    (plan(version_compatible=True), A4000, "10.7.0", True, "version-compatible"),
    (plan(version_compatible=True), A4000, "11.4.1", True, "version-compatible"),  # 10 -> 11
    (plan(version_compatible=True, trt_version="8.6.1"), A4000, "10.3.0", True, "version-compatible"),  # 8 -> 10
    (plan(version_compatible=True, trt_version="8.6.1"), A4000, "11.0.0", False, "only 8 -> 10 and 10 -> 11"),
    (plan(version_compatible=True, trt_version="8.6.1"), A4000, "9.2.0", False, "only 8 -> 10 and 10 -> 11"),
    (plan(version_compatible=True, trt_version="10.7.0"), A4000, "10.3.0", False, "cannot run on older"),
    (plan(version_compatible=True, trt_version="8.5.3"), A4000, "10.3.0", False, "< 8.6"),
    (plan(platform=TEGRA), ORIN, "10.3.0", False, "compute capability 8.6 (hardware compatibility NONE), GPU Orin is 8.7"),
    (plan(), A10, "10.3.0", True, "can run"),  # other GPU model, same SM: runs (TensorRT warns)
    (plan(hardware_compatibility="same_compute_capability"), H100, "10.3.0", False, "is 9.0"),
    (plan(hardware_compatibility="ampere_plus"), H100, "10.3.0", True, "ampere_plus"),
    # an x86 AMPERE_PLUS plan on an Orin: another platform, and JetPack has no hardware compatibility
    (plan(hardware_compatibility="ampere_plus"), ORIN, "10.3.0", False, "not portable across platforms"),
    (plan(hardware_compatibility="ampere_plus", platform=TEGRA), ORIN, "10.3.0", False, "not supported on JetPack"),
    (plan(platform="linux-aarch64"), H100, "10.3.0", False, "not portable across platforms"),  # SBSA plan on x86
    (plan(hardware_compatibility="ampere_plus", compute_capability="7.5"), T4, "10.3.0", False, "(< 8.0)"),
    (plan(hardware_compatibility="ampere_plus", compute_capability="7.5"), A4000, "10.3.0", False, "built on compute capability 7.5"),
    (plan(compute_capability="6.0"), P100, "10.3.0", False, "needs >= 7.0"),
    (plan(compute_capability="7.0"), V100, "10.3.0", True, "can run"),  # Volta: TensorRT 10.0-10.4
    (plan(compute_capability="7.0", trt_version="10.5.0"), V100, "10.5.0", False, "needs >= 7.5"),
    (plan(min_device_memory_bytes=40 << 30), A4000, "10.3.0", False, "device memory"),
    (plan(compute_capability="8.7", dla_core=0, platform=TEGRA), ORIN, "10.3.0", True, "can run"),  # DLA count unknown
    (plan(compute_capability="8.7", dla_core=1, platform=TEGRA), ORIN_AGX, "10.3.0", True, "can run"),
    (plan(compute_capability="8.7", dla_core=2, platform=TEGRA), ORIN_AGX, "10.3.0", False, "has 2 DLA core(s)"),
    (plan(compute_capability="8.7", dla_core=0, platform=TEGRA), ORIN_NANO, "10.3.0", False, "has 0 DLA core(s)"),
    (plan(compute_capability="8.7", dla_core=0, platform=TEGRA, version_compatible=True), ORIN_AGX, "11.2.0", False,
     "no DLA support"),
    (plan(compute_capability="8.7", dla_core=0, platform=TEGRA, version_compatible=True), ORIN_AGX, "11.4.1", True,
     "can run"),
    (plan(dla_core=0), A4000, "10.3.0", False, "has 0 DLA core(s)"),
    (plan(), None, "10.3.0", False, "no CUDA device"),
    (plan(), A4000, None, False, "tensorrt not importable"),
])
def test_plan_compatibility(p: TensorRTPlan, device, runtime, ok: bool, why: str) -> None:
    c = check_plan_compatibility(p, device, runtime, _host(device))
    assert c.ok is ok, c.reason
    assert why in c.reason
    assert bool(c) is ok


def test_compatibility_notes() -> None:
    c = check_plan_compatibility(plan(), A10, "10.3.0", X86)
    assert any("built on NVIDIA RTX A4000, running on NVIDIA A10" in n for n in c.notes)
    c = check_plan_compatibility(plan(trt_version="10.3"), A4000, "10.3.0.26", X86)
    assert c.ok and any("build number not recorded" in n for n in c.notes)
    c = check_plan_compatibility(plan(platform=None), A4000, "10.3.0", X86)
    assert c.ok and any("names no build platform" in n for n in c.notes)
    c = check_plan_compatibility(plan(trt_version="10.3.0.26"), A4000, "10.3.0.26", X86)
    assert c.ok and c.notes == []


def _manifest(plans) -> ModelManifest:
    d = tiny_manifest_dict(SHA)
    d["plans"] = [p.model_dump() for p in plans]
    return ModelManifest.model_validate(d)


def test_select_plan_first_compatible_with_reasons() -> None:
    m = _manifest([plan(path="orin.plan", compute_capability="8.7", trt_version="10.3.0"),
                   plan(path="a4000-int8.plan", precision="int8_qdq_sym"),
                   plan(path="a4000.plan")])
    chosen, reasons = select_plan(m, A4000, "10.3.0", host_platform=X86)
    assert chosen is not None and chosen.path == "a4000-int8.plan"
    assert reasons == [("orin.plan", reasons[0][1])] and "8.7" in reasons[0][1]
    chosen, reasons = select_plan(m, A4000, "10.3.0", precision="fp32", host_platform=X86)
    assert chosen.path == "a4000.plan" and len(reasons) == 2
    chosen, reasons = select_plan(m, H100, "11.4.1", host_platform=X86)
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
    mod = importlib.reload(sys.modules["scanside.engines.backends.tensorrt_engine"])
    ok, why = mod.TensorRTEngine.availability()
    assert ok is HAVE_GPU
    if not ok:
        assert "tensorrt not importable" in why or "cuda-python" in why or "CUDA" in why


@pytest.mark.skipif(HAVE_GPU, reason="tensorrt and a GPU are present")
def test_engine_load_without_tensorrt_raises_unavailable(tmp_path: Path) -> None:
    from scanside.engines.base import EngineUnavailable
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
    from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine
    from scanside.engines.store import ModelStore
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


# ---- the TensorRT and CUDA call sites, through fakes built to the real signatures ------------------------
# (tests/engines/fake_tensorrt.py names the headers and sources each signature was checked against)
from tests.engines.fake_tensorrt import FakeGPU, FakeGPUEnv  # noqa: E402

NO_LEAKS = {"device": 0, "pinned": 0, "streams": 0}


def _tiny_with_plan(tmp_path: Path, **options) -> ModelManifest:
    """The tiny model with an FP32 plan built by scanside.converters.tensorrt_build through the fakes (inside a FakeGPUEnv)."""
    from scanside.converters.tensorrt_build import BuildOptions, build_plan
    m = install_tiny(tmp_path / "models")
    opts = dict(precision="fp32", opt={"N": 2}, max={"N": 8})
    opts.update(options)
    updated, _report = build_plan(m, BuildOptions(**opts))
    return ModelManifest.load(updated.root)


def _ort(m: ModelManifest, x: np.ndarray) -> np.ndarray:
    from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine
    with OnnxRuntimeEngine(providers=["CPUExecutionProvider"]).load(m) as e:
        return e.run({"x": x})["logits"]


def test_fake_gpu_load_warmup_run_grow_close(tmp_path: Path) -> None:
    from scanside.engines.backends.tensorrt_engine import plan_platform
    with FakeGPUEnv("10.3.0.26") as env:
        m = _tiny_with_plan(tmp_path)
        rec = m.plans[0]
        assert rec.trt_version == "10.3.0.26"  # all four parts: the standard runtime needs them
        assert rec.platform == plan_platform(CudaDevice(0, "x", (8, 6))) and rec.gpu_name == "NVIDIA RTX A4000"
        eng = TensorRTEngine().load(m)
        eng.warmup()  # the profile's opt shape, batch 2
        mallocs = len([c for c in env.cudart.calls if c.startswith("cudaMalloc(")])
        x3 = sample_input(3)
        np.testing.assert_allclose(eng.run({"x": x3})["logits"], _ort(m, x3), rtol=1e-5, atol=1e-6)
        grown = len([c for c in env.cudart.calls if c.startswith("cudaMalloc(")])
        assert grown > mallocs  # batch 3 > 2: input and output buffers grew
        x1 = sample_input(1, seed=7)
        np.testing.assert_allclose(eng.run({"x": x1})["logits"], _ort(m, x1), rtol=1e-5, atol=1e-6)
        assert len([c for c in env.cudart.calls if c.startswith("cudaMalloc(")]) == grown  # smaller fits
        x8 = sample_input(8, seed=3)
        np.testing.assert_allclose(eng.run({"x": x8})["logits"], _ort(m, x8), rtol=1e-5, atol=1e-6)
        info = eng.describe()
        assert info.backend == "tensorrt" and "sm 8.6" in info.device
        assert info.library_versions["cuda_runtime"] == "12.6" and info.precision == "fp32"
        with pytest.raises(Exception, match="outside the plan's profile"):
            eng.run({"x": sample_input(9)})
        eng.close()
        assert env.leaks() == NO_LEAKS  # every pinned and device buffer and the stream returned
        eng.close()  # twice is harmless


def test_fake_gpu_concurrent_runs_share_one_context(tmp_path: Path) -> None:
    """One context, one stream, one set of buffers: runs from several threads must not interleave."""
    import threading
    with FakeGPUEnv("10.3.0.26") as env:
        m = _tiny_with_plan(tmp_path)
        inputs = [sample_input(b, seed=b) for b in (1, 5, 2, 8)]
        want = [_ort(m, x) for x in inputs]
        errors: list = []
        with TensorRTEngine().load(m) as eng:
            def worker(i: int) -> None:
                for _ in range(15):
                    got = eng.run({"x": inputs[i]})["logits"]
                    if not np.allclose(got, want[i], rtol=1e-5, atol=1e-6):
                        errors.append((i, got.shape))
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert errors == []
        assert env.leaks() == NO_LEAKS


def test_fake_gpu_dla_core_set_before_deserializing(tmp_path: Path) -> None:
    from scanside.converters.tensorrt_build import BuildRefused
    orin = FakeGPU(name="Orin", cc=(8, 7), integrated=True, dla_cores=2)
    with FakeGPUEnv("10.3.0.26", orin) as env:
        m = _tiny_with_plan(tmp_path, dla_core=1)
        assert m.plans[0].dla_core == 1 and m.plans[0].platform.endswith("-tegra")
        assert m.plans[0].profiles[0]["x"].min == m.plans[0].profiles[0]["x"].max  # DLA: static shapes
        env.trt.events.clear()
        with TensorRTEngine().load(m) as eng:
            assert env.trt.events == ["runtime.DLA_core=1", "deserialize_cuda_engine"]
            assert eng.run({"x": sample_input(2)})["logits"].shape == (2, 2)
    nano = FakeGPU(name="Orin Nano", cc=(8, 7), integrated=True, dla_cores=0)
    with FakeGPUEnv("10.3.0.26", nano):
        with pytest.raises(BuildRefused, match="has 0 DLA core"):
            _tiny_with_plan(tmp_path / "nano", dla_core=0)
        from scanside.engines.base import EngineUnavailable
        with pytest.raises(EngineUnavailable, match="has 0 DLA core"):  # the Orin AGX plan on an Orin Nano
            TensorRTEngine().load(m)


def test_fake_gpu_version_compatible_plan_on_the_next_major(tmp_path: Path) -> None:
    with FakeGPUEnv("10.3.0.26"):
        m = _tiny_with_plan(tmp_path, version_compatible=True)
    with FakeGPUEnv("11.4.0.106") as env:
        env.trt.events.clear()
        with TensorRTEngine().load(m) as eng:  # deserializing needs engine_host_code_allowed
            assert eng.compat.ok and "version-compatible" in eng.compat.reason
            assert eng.run({"x": sample_input(2)})["logits"].shape == (2, 2)
    with FakeGPUEnv("10.3.0.30"):  # a standard plan: the build number must match too
        m2 = _tiny_with_plan(tmp_path / "std")
    with FakeGPUEnv("10.3.0.26"):
        from scanside.engines.base import EngineUnavailable
        with pytest.raises(EngineUnavailable, match="major.minor.patch.build"):
            TensorRTEngine().load(m2)


def test_fake_gpu_store_chooses_tensorrt_and_runs_it(tmp_path: Path) -> None:
    from scanside.engines.store import ModelStore
    with FakeGPUEnv("10.3.0.26") as env:
        m = _tiny_with_plan(tmp_path)
        store = ModelStore(tmp_path / "models", user_dir=None, preference=["tensorrt", "onnxruntime"])
        sel = store.explain("tiny3d")
        assert sel.backend == "tensorrt" and sel.precision == "fp32", sel.summary()
        engine, sel = store.open("tiny3d", warmup=True)
        with engine:
            assert engine.backend == "tensorrt" and type(engine).__name__ == "TensorRTEngine"
            np.testing.assert_allclose(engine.run({"x": sample_input(2)})["logits"], _ort(m, sample_input(2)),
                                       rtol=1e-5, atol=1e-6)
        assert env.leaks() == NO_LEAKS


def test_fake_gpu_driver_runtime_mismatch_is_said_clearly(tmp_path: Path, capsys, caplog) -> None:
    """cuda-bindings 13 (CUDA 13 runtime) on a CUDA 12 driver (JetPack 6): every call fails with
    cudaErrorInsufficientDriver; the store says why and `scanside models show` prints it as a problem."""
    from scanside.agent.cli.models import main
    from scanside.engines.store import ModelStore
    with FakeGPUEnv("10.3.0.26"):
        _tiny_with_plan(tmp_path)
    jetpack6 = FakeGPU(name="Orin", cc=(8, 7), integrated=True, driver=12060, runtime=13000)
    with FakeGPUEnv("10.3.0.26", jetpack6):
        sel = ModelStore(tmp_path / "models", user_dir=None, preference=["tensorrt", "onnxruntime"]).explain("tiny3d")
        assert sel.backend == "onnxruntime"
        why = sel.skipped["tensorrt"]
        assert "cudaErrorInsufficientDriver" in why and "driver/runtime mismatch" in why
        assert "supports CUDA 12.6, cuda-python is built for CUDA 13.0 (needs driver >= 580.65.06)" in why
        assert any(r.levelname == "WARNING" and "driver/runtime mismatch" in r.getMessage() for r in caplog.records)
        assert main(["models", "--store", str(tmp_path / "models"), "show", "tiny3d"]) == 0
        out = capsys.readouterr().out
        assert "GPU PROBLEM: driver/runtime mismatch" in out and "pip install 'cuda-python>=12,<13'" in out
    with FakeGPUEnv("10.3.0.26"):  # a matching pair: no problem line
        assert main(["models", "--store", str(tmp_path / "models"), "show", "tiny3d"]) == 0
        out = capsys.readouterr().out
        assert "GPU PROBLEM" not in out and "cuda_driver 12.6" in out and "sm 8.6" in out


def test_fake_gpu_failures_are_errors_not_crashes(tmp_path: Path, monkeypatch) -> None:
    from scanside.engines.base import EngineError
    from scanside.engines.backends.tensorrt_engine import _cuda_call
    with FakeGPUEnv("10.3.0.26") as env:
        m = _tiny_with_plan(tmp_path)
        with pytest.raises(EngineError, match="cudaErrorInvalidValue"):
            _cuda_call(env.cudart.cudaFree(12345))
        # TensorRT refuses a tensor address: said, not ignored
        eng = TensorRTEngine().load(m)
        monkeypatch.setattr(type(eng._context), "set_tensor_address", lambda self, name, memory: False)
        with pytest.raises(EngineError, match="refused the device address"):
            eng.run({"x": sample_input(2)})
        assert all(not queued for queued in env.cudart.streams.values())  # the input copy was not left queued
        monkeypatch.undo()
        eng.close()
        # pinned allocation fails after the device one: the device buffer is given back
        env.gpu.fail_malloc_host = True
        eng = TensorRTEngine().load(m)
        with pytest.raises(EngineError, match="cudaErrorMemoryAllocation"):
            eng.run({"x": sample_input(2)})
        eng.close()
        env.gpu.fail_malloc_host = False
        assert env.leaks() == NO_LEAKS
        # a plan TensorRT cannot deserialize
        m.resolve(m.plans[0].path).write_bytes(b"garbage")
        with pytest.raises(EngineError, match="could not deserialize"):
            TensorRTEngine().load(m, verify=False)


def test_gpu_extras_pin_one_cuda_major() -> None:
    """TensorRT wheels and cuda-python must target the same CUDA major (an uncapped cuda-python pulls the CUDA 13
    runtime, which a CUDA 12 driver -- JetPack 6 -- cannot run)."""
    import re as _re
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from packaging.requirements import Requirement
    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for key, cuda in (("gpu", 12), ("gpu-cu13", 13)):
        reqs = {Requirement(r).name: Requirement(r).specifier for r in extras[key]}
        trt = [n for n in reqs if n.startswith("tensorrt")]
        assert trt == [f"tensorrt-cu{cuda}"], reqs  # not the `tensorrt` metapackage: it picks a CUDA itself
        cp = reqs["cuda-python"]
        assert f"{cuda}.9" in cp and f"{cuda + 1}.0" not in cp and f"{cuda - 1}.9" not in cp, cp
        assert not reqs[trt[0]].contains("12.0") and reqs[trt[0]].contains("10.3.0") and reqs[trt[0]].contains("11.4.0")
        assert _re.search(r"<\s*%d\b" % (cuda + 1), str(cp))


def test_fake_gpu_what_the_engine_refuses(tmp_path: Path, monkeypatch) -> None:
    from scanside.engines.base import EngineUnavailable, InputValidationError, ManifestMismatch
    from scanside.engines.backends.tensorrt_engine import gpu_report, probe_cuda_device
    with FakeGPUEnv("10.3.0.26") as env:
        m = _tiny_with_plan(tmp_path)
        # a plan whose I/O is not the manifest's
        other = m.model_copy(update={"outputs": [m.outputs[0].model_copy(update={"name": "probs"})]})
        with pytest.raises(ManifestMismatch, match="output 'probs' not in the plan"):
            TensorRTEngine().load(other)
        with TensorRTEngine().load(m) as eng:
            ctx = type(eng._context)
            monkeypatch.setattr(ctx, "execute_async_v3", lambda self, stream_handle: False)
            with pytest.raises(EngineError, match="execute_async_v3 failed"):
                eng.run({"x": sample_input(2)})
            monkeypatch.setattr(ctx, "set_input_shape", lambda self, name, shape: False)
            with pytest.raises(InputValidationError, match="TensorRT refused shape"):
                eng.run({"x": sample_input(2)})
        monkeypatch.setattr(env.cudart, "cudaGetDeviceCount", lambda: (env.cudart.cudaError_t.cudaSuccess, 0))
        assert probe_cuda_device(0) == (None, "no CUDA device")
        with pytest.raises(EngineUnavailable, match="no CUDA device"):
            TensorRTEngine().load(m)
        monkeypatch.undo()
        assert probe_cuda_device(1)[1] == "CUDA device 1 requested, 1 present"
        assert gpu_report()["problem"] is None
    with FakeGPUEnv("10.3.0.26", FakeGPU(driver=0)):
        assert gpu_report()["problem"] == "no NVIDIA driver is loaded (cudaDriverGetVersion returned 0)"
    with FakeGPUEnv(None):  # cuda-python present, tensorrt not
        assert TensorRTEngine.availability()[0] is False and "tensorrt not importable" in gpu_report()["tensorrt"]
