"""TensorRT plan building: the decisions that need no GPU (version branches, profiles, calibration
cache format, plan records, the parity gate on plans) run everywhere; the build itself is skipped
with the reason when tensorrt or a CUDA device is missing."""
from __future__ import annotations

import json
import struct

import pytest

from scanside.converters.tensorrt_build import BuildOptions, BuildRefused, add_plan, build_mode, cache_matches, float_to_hex, \
    hex_to_float, layer_precisions, parse_trt_version, plan_record, profile_shapes, ranges_to_scales, \
    read_calibration_cache, skip_reason, trt_version_number, write_calibration_cache
from scanside.engines.manifest import ModelFile, ModelManifest
from scanside.engines.store import ModelStore
from scanside.agent.cli.taps import taps_manifest
from scanside.engines.backends.tensorrt_engine import CudaDevice


def _with_sym(m: ModelManifest) -> ModelManifest:
    files = dict(m.files)
    files["int8_sym"] = ModelFile(path="model_v1.int8_sym.onnx", sha256="0" * 64, precision="int8_qdq_sym")
    return m.model_copy(update={"files": files})


def test_version_branches() -> None:
    m = _with_sym(taps_manifest())
    t11 = build_mode("11.4.1", "int8_qdq", m)
    assert t11.strongly_typed and t11.builder_flags == () and not t11.use_calibrator
    assert t11.source_variant == "int8_sym" and t11.manifest_precision == "int8_qdq_sym"
    assert build_mode("11.4.1", "fp32", m).strongly_typed
    for p in ("fp16", "int8_implicit"):
        with pytest.raises(BuildRefused, match="removed"):
            build_mode("11.0.0", p, m)
    t10 = build_mode("10.3.0", "int8_implicit", m)  # JetPack 6
    assert t10.use_calibrator and set(t10.builder_flags) == {"INT8", "FP16"} and not t10.strongly_typed
    assert t10.source_variant == "fp32" and any("deprecated" in n for n in t10.notes)
    assert build_mode("10.3.0", "fp16", m).builder_flags == ("FP16",)
    assert build_mode("10.3.0", "int8_qdq", m).strongly_typed
    assert "2-D" in " ".join(build_mode("10.3.0", "int8_qdq", m, dla=True).notes)
    with pytest.raises(BuildRefused, match="TensorRT 10 or 11"):
        build_mode("8.6.1", "fp32", m)
    with pytest.raises(BuildRefused, match="no symmetric Q/DQ"):
        build_mode("10.3.0", "int8_qdq", taps_manifest())
    with pytest.raises(BuildRefused, match="precision must be"):
        build_mode("10.3.0", "int4", m)


def test_profiles_from_the_manifest() -> None:
    m = taps_manifest()  # input [batch_size, 1, 128, 128, 32]
    p = profile_shapes(m, opt={"batch_size": 2}, max_={"batch_size": 4})
    assert p["input"].min == [1, 1, 128, 128, 32] and p["input"].opt == [2, 1, 128, 128, 32]
    assert p["input"].max == [4, 1, 128, 128, 32]
    s = profile_shapes(m, opt={"batch_size": 2}, max_={"batch_size": 4}, static=True)  # DLA: static only
    assert s["input"].min == s["input"].opt == s["input"].max == [2, 1, 128, 128, 32]
    with pytest.raises(BuildRefused, match="opt <= max"):
        profile_shapes(m, opt={"batch_size": 4}, max_={"batch_size": 2})
    free = m.model_copy(update={"inputs": [m.inputs[0].model_copy(update={"shape": ["n", 1, None, None, None]})]})
    assert profile_shapes(free)["input"].opt == [1, 1, 128, 128, 32]  # free spatial dims: the window roi


def test_calibration_cache_format(tmp_path) -> None:
    assert trt_version_number("10.3.0") == 100300 and trt_version_number("8.6.1") == 8601
    assert trt_version_number("10.14.1.48") == 101401 and parse_trt_version("11.4") == (11, 4, 0)
    assert float_to_hex(1.0) == "3f800000" and hex_to_float("3c010a14") == pytest.approx(0.00787, rel=1e-3)
    scales = {"input": 0.0208, "conv1_out": 1.5e-3, "z": 0.0}
    data = write_calibration_cache(scales, "10.3.0")
    assert data.splitlines()[0] == b"TRT-100300-EntropyCalibration2"
    ver, alg, back = read_calibration_cache(data)
    assert ver == 100300 and alg == "EntropyCalibration2"
    for k, v in scales.items():  # float32 exact
        assert back[k] == struct.unpack(">f", struct.pack(">f", v))[0]
    assert cache_matches(data, "10.3.0") and not cache_matches(data, "10.3.1") and not cache_matches(b"junk", "10.3.0")
    # a cache written by TensorRT itself (names with spaces and brackets) parses
    _, _, s = read_calibration_cache("TRT-8401-EntropyCalibration2\ninput: 3caa54fc\n(Unnamed Layer* 64) [Shuffle]_output: 0\n")
    assert s["input"] == pytest.approx(0.0208, rel=1e-3) and s["(Unnamed Layer* 64) [Shuffle]_output"] == 0.0
    for bad in ("", "TRT-x-Entropy\n", "TRT-100300-EntropyCalibration2\ninput 3caa54fc\n",
                "TRT-100300-EntropyCalibration2\ninput: xyz\n"):
        with pytest.raises(ValueError):
            read_calibration_cache(bad)
    with pytest.raises(ValueError):
        write_calibration_cache({"a": float("nan")}, "10.3.0")


def test_scales_from_the_onnxruntime_ranges(calibrated_tiny) -> None:
    r, _cal, _held = calibrated_tiny
    raw = json.loads(r.ranges_path.read_text())
    scales = ranges_to_scales(r.ranges_path)
    assert "x" in scales and len(scales) >= 3
    data = raw.get("data", raw)
    lo, hi = data["x"]["lowest"]["data"][0], data["x"]["highest"]["data"][0]
    assert scales["x"] == pytest.approx(max(abs(lo), abs(hi)) / 127.0, rel=1e-6)
    _, _, back = read_calibration_cache(write_calibration_cache(scales, "10.3.0"))
    assert set(back) == set(scales)


def test_layer_precision_report() -> None:
    # Format/Datatype strings as TensorRT writes them (the descriptions trt-engine-explorer maps); never
    # "Half"/"Float", which are weight types, not tensor formats
    info = json.dumps({"Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution", "Outputs": [{"Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}]},
        {"Name": "conv2", "LayerType": "CaskConvolution", "Outputs": [{"Format/Datatype": "Channel major INT8 format where column stride % 32 == 0"}]},
        {"Name": "conv3d_2", "LayerType": "CaskConvolution", "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "norm", "LayerType": "Normalization", "Outputs": [{"Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "idx", "LayerType": "Shuffle", "Outputs": [{"Format/Datatype": "Row major linear Int32"}]},
        {"Name": "mask", "LayerType": "Shuffle", "Outputs": [{"Format/Datatype": "Row major linear BOOL"}]},
        {"Name": "odd", "LayerType": "Reformat", "Outputs": [{"Format/Datatype": "Unknown format"}]},
    ], "Bindings": ["input", "output"]})
    rep = layer_precisions(info)
    assert rep["layers"] == 7 and rep["conv_not_int8"] == ["conv3d_2"]
    assert rep["by_output_precision"] == {"INT8": 2, "FP32": 1, "FP16": 1, "INT32": 1, "BOOL": 1, "unknown": 1}
    assert layer_precisions({"Layers": ["conv1", "conv2"]})["by_output_precision"] == {"unknown": 2}
    # TensorRT 11 splits the field in two ("I/O Tensors" replaces "Bindings"; DataType holds the type name)
    info11 = {"Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution",
         "Outputs": [{"Name": "c1", "DataType": "Int8", "Format": "Thirty-two wide channel vectorized row major Int8 format"}]},
        {"Name": "conv2", "LayerType": "CaskConvolution", "Outputs": [{"Name": "c2", "DataType": "Half", "Format": "Row major linear FP16 format (kLINEAR)"}]},
        {"Name": "head", "LayerType": "CaskGemm", "Outputs": [{"Name": "y", "DataType": "Float", "Format": "Row major linear FP32 format (kLINEAR)"}]},
    ], "I/O Tensors": [{"Name": "x", "IOMode": "Input", "DataType": "Float"}]}
    rep = layer_precisions(info11)
    assert rep["by_output_precision"] == {"INT8": 1, "FP16": 1, "FP32": 1} and rep["conv_not_int8"] == ["conv2"]


def test_plan_record_in_the_manifest_and_gated(calibrated_tiny, tmp_path) -> None:
    r, _cal, _held = calibrated_tiny
    m = r.manifest
    plan_file = m.root / "model.trt103.sm87.int8_qdq.plan"
    plan_file.write_bytes(b"not a real plan, only hashed here")
    mode = build_mode("10.3.0", "int8_qdq", m)
    rec = plan_record(m, plan_file, mode, "10.3.0", "Orin", "8.7", profile_shapes(m, opt={"N": 2}, max_={"N": 8}),
                      BuildOptions(), layer_report={"by_output_precision": {"Int8": 2}, "conv_not_int8": ["c"]})
    assert rec.path == plan_file.name and rec.trt_version == "10.3.0" and rec.precision == "int8_qdq_sym"
    assert rec.source_variant == "int8_sym" and rec.profiles[0]["x"].max == [8, 1, 8, 8, 4]
    assert "not in INT8" in rec.notes
    m2 = add_plan(m, rec)
    assert len(add_plan(m2, rec).plans) == 1  # rebuilding replaces
    m2.save(m.root)
    try:
        orin = CudaDevice(0, "Orin", (8, 7), integrated=True)
        store = ModelStore(m.root.parent.parent, tensorrt_probe=lambda: ("10.3.0", orin, "test"))
        sel = store.explain("tiny3d")  # the INT8 plan has no parity report: TensorRT is skipped, ORT used
        assert sel.backend == "onnxruntime" and "no parity report" in sel.skipped["tensorrt"]
        p = {"variants": {f"plan:{rec.path}": {"sha256": rec.sha256, "loss": 0.001}}}
        m2.model_copy(update={"parity": p}).save(m.root)
        sel = store.explain("tiny3d")
        assert sel.backend == "tensorrt" and sel.precision == "int8_qdq_sym"
    finally:
        m.save(m.root)
        plan_file.unlink()


def test_build_on_a_gpu(calibrated_tiny) -> None:
    why = skip_reason()
    if why:
        pytest.skip(f"TensorRT plan build needs tensorrt and a CUDA GPU: {why}")
    from scanside.converters.tensorrt_build import build_plan

    r, _cal, _held = calibrated_tiny
    updated, report = build_plan(r.manifest, BuildOptions(precision="int8_qdq", opt={"N": 1}, max={"N": 4}),
                                 save_manifest=False)
    assert updated.plans[-1].source_variant == "int8_sym" and report["layers"] > 0


def test_tensorrt_bound_qdq_has_no_int32_dequantize(calibrated_tiny) -> None:
    """TensorRT's dequantize layer refuses INT32 input (onnx/onnx-tensorrt#850): the symmetric variant keeps
    its biases FP32; the CPU variant keeps onnxruntime's INT32 biases (so the check can see them)."""
    from scanside.converters.tensorrt_build import int32_dequantize_nodes

    r, _cal, _held = calibrated_tiny
    m = r.manifest
    assert int32_dequantize_nodes(m.file_path("int8_sym")) == []
    assert m.files["int8_sym"].calibration["quantize_bias"] is False
    assert len(int32_dequantize_nodes(m.file_path("int8_u8s8"))) >= 1  # Conv and Gemm biases


def test_shipped_tensorrt_bound_files_have_no_int32_dequantize() -> None:
    """Every TensorRT-bound Q/DQ file the store ships, in every version (a later version may ship FP32 only)."""
    from scanside.converters.tensorrt_build import int32_dequantize_nodes

    store = ModelStore(user_dir=None)
    checked = []
    for manifest in sorted(p for root in store.roots for p in root.glob("*/*/manifest.json")):
        m = store.resolve(f"{manifest.parent.parent.name}@{manifest.parent.name}")
        for k, f in m.files.items():
            if f.precision == "int8_qdq_sym":
                assert int32_dequantize_nodes(m.file_path(k)) == [], f"{m.ref} {k}: INT32 DequantizeLinear"
                checked.append(m.ref)
    assert {"cspca-reference/1.3.0", "sequence-classifier/1.4.0"} <= set(checked), checked


# ---- the build's TensorRT call sites, through fakes built to the real signatures ---------------------------
# (tests/engines/fake_tensorrt.py names the headers and sources each signature was checked against)
def _model_copy(calibrated_tiny, tmp_path) -> ModelManifest:
    import shutil
    r, _cal, _held = calibrated_tiny
    dest = tmp_path / "models" / r.manifest.name / r.manifest.version
    shutil.copytree(r.manifest.root, dest)
    return ModelManifest.load(dest)


def _plan_header(path) -> dict:
    from tests.engines.fake_tensorrt import MAGIC
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    return json.loads(data[12:12 + int.from_bytes(data[8:12], "little")])


@pytest.mark.parametrize("version", ["10.3.0.26", "11.4.0.106"])
def test_fake_build_int8_qdq(calibrated_tiny, tmp_path, version: str) -> None:
    from scanside.converters.tensorrt_build import build_plan
    from tests.engines.fake_tensorrt import FakeGPUEnv
    m = _model_copy(calibrated_tiny, tmp_path)
    with FakeGPUEnv(version) as env:
        updated, rep = build_plan(m, BuildOptions(precision="int8_qdq", opt={"N": 2}, max={"N": 4}))
        assert env.leaks()["device"] == 0
    rec = updated.plans[-1]
    assert rec.precision == "int8_qdq_sym" and rec.source_variant == "int8_sym" and rec.trt_version == version
    assert rec.profiles[0]["x"].opt == [2, 1, 8, 8, 4] and rec.profiles[0]["x"].max == [4, 1, 8, 8, 4]
    assert rep["by_output_precision"] == {"INT8": rep["layers"]} and rep["conv_not_int8"] == []
    assert ModelManifest.load(m.root).plans[-1] == rec  # recorded in the saved manifest
    assert _plan_header(m.resolve(rec.path))["hw"] == "NONE"


def test_fake_build_refuses_int32_dequantize(calibrated_tiny, tmp_path, monkeypatch) -> None:
    """A Q/DQ file with onnxruntime's INT32 biases (QuantizeBias on) is what TensorRT's parser refuses."""
    import scanside.converters.tensorrt_build as tb
    from tests.engines.fake_tensorrt import FakeGPUEnv
    m = _model_copy(calibrated_tiny, tmp_path)
    files = dict(m.files)
    files["int8_sym"] = files["int8_u8s8"].model_copy(update={"precision": "int8_qdq_sym"})
    m = m.model_copy(update={"files": files})
    with FakeGPUEnv("10.3.0.26"):
        with pytest.raises(BuildRefused, match=r"DequantizeLinear node\(s\) over INT32"):
            tb.build_plan(m, BuildOptions(precision="int8_qdq"), save_manifest=False)
        monkeypatch.setattr(tb, "int32_dequantize_nodes", lambda path: [])  # without the check: the parser says it
        with pytest.raises(BuildRefused, match="only activation types allowed"):
            tb.build_plan(m, BuildOptions(precision="int8_qdq"), save_manifest=False)


def test_fake_build_hardware_compatibility(calibrated_tiny, tmp_path) -> None:
    from scanside.converters.tensorrt_build import build_plan
    from tests.engines.fake_tensorrt import FakeGPU, FakeGPUEnv
    m = _model_copy(calibrated_tiny, tmp_path)
    same_cc = BuildOptions(precision="fp32", hardware_compatibility="same_compute_capability")
    with FakeGPUEnv("10.3.0.26"):  # no HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY before 10.9
        with pytest.raises(BuildRefused, match="needs TensorRT >= 10.9"):
            build_plan(m, same_cc, save_manifest=False)
    with FakeGPUEnv("10.9.0.34"):
        updated, _ = build_plan(m, same_cc, save_manifest=False)
        assert updated.plans[-1].hardware_compatibility == "same_compute_capability"
        assert _plan_header(m.resolve(updated.plans[-1].path))["hw"] == "SAME_COMPUTE_CAPABILITY"
    ampere = BuildOptions(precision="fp32", hardware_compatibility="ampere_plus")
    with FakeGPUEnv("10.3.0.26", FakeGPU(name="Tesla T4", cc=(7, 5))):
        with pytest.raises(BuildRefused, match="Ampere or newer build GPU"):
            build_plan(m, ampere, save_manifest=False)
    with FakeGPUEnv("10.3.0.26", FakeGPU(name="Orin", cc=(8, 7), integrated=True, dla_cores=2)):
        with pytest.raises(BuildRefused, match="not supported on JetPack"):
            build_plan(m, ampere, save_manifest=False)
    with FakeGPUEnv("10.3.0.26"):
        updated, _ = build_plan(m, ampere, save_manifest=False)
        assert updated.plans[-1].hardware_compatibility == "ampere_plus"


def test_fake_build_timing_cache_from_another_device_keeps_the_plan(calibrated_tiny, tmp_path) -> None:
    from scanside.converters.tensorrt_build import build_plan
    from tests.engines.fake_tensorrt import FakeGPU, FakeGPUEnv
    m = _model_copy(calibrated_tiny, tmp_path)
    timing = tmp_path / "timing.cache"
    with FakeGPUEnv("10.3.0.26", FakeGPU(name="NVIDIA RTX A4000")):
        _, rep = build_plan(m, BuildOptions(precision="fp32", timing_cache=timing), save_manifest=False)
        assert rep["notes"] == [] and timing.read_bytes() == b"TIMING:NVIDIA RTX A4000/10.3.0.26"
    with FakeGPUEnv("10.3.0.26", FakeGPU(name="NVIDIA A10")):  # same SM, another device: set_timing_cache False
        updated, rep = build_plan(m, BuildOptions(precision="fp32", timing_cache=timing), save_manifest=False)
        assert m.resolve(updated.plans[-1].path).is_file()
        assert any("from another device" in n for n in rep["notes"])
        assert timing.read_bytes() == b"TIMING:NVIDIA A10/10.3.0.26"  # replaced by this device's
        assert "from another device" in updated.plans[-1].notes
        bad = tmp_path / "a-directory"
        bad.mkdir()
        updated, rep = build_plan(m, BuildOptions(precision="fp32", timing_cache=bad), save_manifest=False)
        assert m.resolve(updated.plans[-1].path).is_file() and any("not saved" in n for n in rep["notes"])


def test_fake_build_implicit_int8_on_tensorrt_10(calibrated_tiny, tmp_path) -> None:
    import numpy as np
    from scanside.converters.tensorrt_build import build_plan
    from tests.engines.fake_tensorrt import FakeGPUEnv
    m = _model_copy(calibrated_tiny, tmp_path)
    _r, cal, _held = calibrated_tiny
    x = np.asarray(cal.inputs, dtype=np.float32)
    cache = tmp_path / "calib" / "trt.cache"
    from scanside.converters.tensorrt_build import calibration_batches, profile_shapes
    wrong = [{"x": x[:1]}]  # batch 1, the calibration profile's opt is 2
    right = calibration_batches(x, "x", profile_shapes(m, opt={"N": 2}, max_={"N": 4}))
    assert len(right) == len(x) // 2 and all(b["x"].shape == (2, 1, 8, 8, 4) for b in right)
    with pytest.raises(BuildRefused, match="per sample"):
        calibration_batches(x[:, :, :4], "x", profile_shapes(m, opt={"N": 2}))
    opts = dict(precision="int8_implicit", opt={"N": 2}, max={"N": 4}, calibration_cache=cache)
    with FakeGPUEnv("10.3.0.26") as env:
        with pytest.raises(BuildRefused, match=r"opt shape is \[2, 1, 8, 8, 4\]"):
            build_plan(m, BuildOptions(calibration_batches=wrong, **opts), save_manifest=False)
        with pytest.raises(BuildRefused, match="needs calibration batches"):
            build_plan(m, BuildOptions(**opts), save_manifest=False)
        updated, _rep = build_plan(m, BuildOptions(calibration_batches=right, **opts), save_manifest=False)
        assert env.leaks()["device"] == 0  # the calibrator's device buffers were freed
        assert updated.plans[-1].precision == "int8_implicit"  # not a Q/DQ plan
        assert cache.read_bytes().startswith(b"TRT-100300-EntropyCalibration2")
        # the cache of this TensorRT version is enough on the next build
        updated, _rep = build_plan(m, BuildOptions(**opts), save_manifest=False)
        assert updated.plans[-1].precision == "int8_implicit"


def test_fake_build_fp32_is_fp32_and_checks_the_engine(calibrated_tiny, tmp_path, monkeypatch) -> None:
    from scanside.converters.tensorrt_build import build_plan
    from tests.engines.fake_tensorrt import FakeGPUEnv
    m = _model_copy(calibrated_tiny, tmp_path)
    with FakeGPUEnv("10.3.0.26") as env:
        updated, rep = build_plan(m, BuildOptions(precision="fp32"), save_manifest=False)
        plan = m.resolve(updated.plans[-1].path)
        assert _plan_header(plan)["tf32"] is False and "TF32 off" in updated.plans[-1].notes
        assert rep["by_output_precision"] == {"FP32": rep["layers"]} and len(rep["conv_not_int8"]) == 1
        plan.unlink()
        monkeypatch.setattr(env.trt.Runtime, "deserialize_cuda_engine", lambda self, serialized_engine: None)
        with pytest.raises(BuildRefused, match="cannot deserialize"):
            build_plan(m, BuildOptions(precision="fp32"), save_manifest=False)
        assert plan.is_file()  # written before anything else could fail


def test_dla_refused_on_tensorrt_11_0_to_11_3() -> None:
    m = _with_sym(taps_manifest())
    for v in ("11.0.0", "11.3.0"):
        with pytest.raises(BuildRefused, match="no DLA support"):
            build_mode(v, "int8_qdq", m, dla=True)
    assert build_mode("11.4.1", "int8_qdq", m, dla=True).source_variant == "int8_sym"
    assert build_mode("10.3.0", "int8_implicit", m).manifest_precision == "int8_implicit"


def test_fake_convert_trt_implicit_int8_from_dicom(tiny_model, t2w_exams, tmp_path, capsys) -> None:
    """`scanside convert trt --precision int8_implicit --data ...`: calibration batches at the profile's opt shape."""
    from scanside.agent.cli.convert import main
    from tests.engines.fake_tensorrt import FakeGPUEnv
    root = tiny_model.root.parent.parent
    args = ["convert", "--store", str(root), "trt", "tiny3d", "--precision", "int8_implicit", "--opt", "N=2",
            "--max", "N=4", "--calibration-cache", str(tmp_path / "trt.cache")]
    for d in t2w_exams:
        args += ["--data", str(d)]
    with FakeGPUEnv("10.3.0.26") as env:
        assert main(args) == 0, capsys.readouterr().err
        assert env.leaks()["device"] == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["precision"] == "int8_implicit" and out["plan"]["profiles"][0]["x"]["opt"] == [2, 1, 8, 8, 4]
    assert (tmp_path / "trt.cache").read_bytes().startswith(b"TRT-100300-")
    assert ModelManifest.load(tiny_model.root).plans[-1].precision == "int8_implicit"
    with FakeGPUEnv("11.4.0.106"):  # TensorRT 11 has no implicit INT8: one clear line, exit 1
        assert main(args) == 1
        assert "removed implicit INT8 calibration" in capsys.readouterr().err
