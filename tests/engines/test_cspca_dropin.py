"""A site's own csPCa model dropped in (issue 18 item 8): the picai_baseline U-Net architecture, UNTRAINED (random
weights, a narrow width to keep the test cheap; the layout, shapes and interface are PI-CAI's), exported to ONNX,
imported with `scanside models import` and its declaration, then run by the agent in place of the reference
model: its triage path, the parity gate and the INT8 path.  Shapes and plumbing only, never accuracy."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from scanside.engines.manifest import ModelManifest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a simulated exam and 20 x 256 x 256 inputs on 2 cores

NARROW = (4, 8, 16, 32, 64, 128)  # picai_baseline's (32, ..., 1024) / 8: same topology, 64x fewer FLOPs
NAME = "picai-unet-untrained"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    from scanside.training.picai_unet import export

    out = tmp_path_factory.mktemp("picai")
    return export(out / "export", features=NARROW, seed=3)


@pytest.fixture(scope="module")
def store_dir(exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scanside.agent.cli import main

    onnx_path, decl = exported
    root = tmp_path_factory.mktemp("user-models")
    assert main(["models", "--user-dir", str(root), "import", str(onnx_path), "--declaration", str(decl)]) == 0
    return root


@pytest.fixture(scope="module")
def exam(tmp_path_factory: pytest.TempPathFactory):
    from scanside.simulator.protocols import build_exam
    from scanside.simulator.scanner import simulate_exam

    out = tmp_path_factory.mktemp("exam")
    spec = build_exam("prostate-bpmri", "siemens")  # the axial series triage reads: T2W, DWI, ADC, calculated b1400
    spec = spec.model_copy(update={"series": [s for s in spec.series if s.plane == "axial"]})
    return out, simulate_exam("siemens", out, seed=21, exam=spec, cspca=True)


def test_architecture_is_picai_baseline_and_the_onnx_matches_torch(exported) -> None:
    import onnxruntime as ort

    from scanside.training.picai_unet import PICAI_FEATURES, build_unet

    full = build_unet()  # picai_baseline's defaults
    keys = set(full.state_dict())
    # MONAI's module names, so that a picai_baseline checkpoint loads with --weights
    assert {"model.0.conv.weight", "model.0.adn.A.weight", "model.1.submodule.0.conv.weight",
            "model.2.conv.weight"} <= keys
    assert not any(k.startswith("model.2.adn") for k in keys)  # the top up layer is the convolution alone
    convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == list(PICAI_FEATURES)
    assert [tuple(c.stride) for c in convs] == [(2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2), (1, 1, 1)]
    onnx_path, _ = exported
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "input" and inp.shape[1:] == [3, 20, 256, 256]
    assert out.name == "logits" and out.shape[1:] == [2, 20, 256, 256]
    torch.manual_seed(3)
    net = build_unet(features=NARROW).eval()
    x = np.random.default_rng(0).normal(size=(1, 3, 20, 256, 256)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = sess.run(None, {"input": x})[0]
    assert got.shape == (1, 2, 20, 256, 256) and np.abs(got - want).max() < 1e-3


def test_declaration_is_checked_against_the_model(exported, tmp_path: Path, capsys) -> None:
    from scanside.agent.cli import main

    onnx_path, decl = exported
    good = json.loads(decl.read_text())
    bad_cases = {
        "detection_channel": ({**good, "cspca": {**good["cspca"], "detection_channel": 2}}, "detection_channel 2"),
        "channels": ({**good, "preprocessing": {**good["preprocessing"], "channels": ["T2W", "ADC"]}}, "stacks 2"),
        "shape": ({**good, "preprocessing": {**good["preprocessing"], "shape": [16, 128, 128]}}, "makes [16, 128, 128]"),
        "case output": ({**good, "cspca": {**good["cspca"], "case_level": "output"}}, "case_probability"),
        "task": ({**good, "task": "gland_segmentation"}, "only for task cspca_detection"),
    }
    for name, (d, why) in bad_cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(d))
        assert main(["models", "--store", str(tmp_path / "s"), "import", str(onnx_path), "--declaration", str(p)]) == 2
        assert why in capsys.readouterr().err, name
    assert not list((tmp_path / "s").rglob("manifest.json"))  # nothing half-imported


def _volumes(exam_dir: Path) -> dict:
    from scanside.converters.calibration_data import exam_channel_volumes, read_series

    return exam_channel_volumes(read_series([exam_dir], labels=["T2WI_nan", "T2WI_fs", "ADC", "DWI_High"]),
                                _spec())[0][2]


def _spec():
    from scanside.training.picai_unet import declaration

    from scanside.engines.spec import PreprocessSpec

    return PreprocessSpec.model_validate(declaration(NAME, "0.1.0", (20, 256, 256), NARROW, False)["preprocessing"])


def test_outputs_are_read_as_declared(store_dir: Path, exam) -> None:
    """Softmax class 1 is the map, the exam probability is its maximum, the crop is the T2W field-of-view centre
    (PI-CAI) whatever gland centre the agent passes."""
    from scanside.engines.tasks.cspca import CspcaModel
    from scanside.engines.preprocess import model_grid
    from scanside.engines.store import ModelStore

    model = CspcaModel(ModelStore([store_dir / "none"], user_dir=store_dir), NAME)
    vols = _volumes(exam[0])
    p = model.predict(vols, center_lps=(30.0, 30.0, 30.0))
    assert p.likelihood.shape == (20, 256, 256) and p.grid.shape == (20, 256, 256)
    assert np.allclose(p.grid.spacing, (3.0, 0.5, 0.5))
    assert np.allclose(p.grid.affine, model_grid(vols["T2W"], model.spec).affine)  # not moved to the "gland"
    assert 0.0 <= p.likelihood.min() and p.likelihood.max() <= 1.0
    assert p.probability == pytest.approx(float(p.likelihood.max()), abs=1e-6)
    raw = model.engine.run({"input": np.zeros((1, 3, 20, 256, 256), np.float32)})["logits"]
    lk, prob = model.manifest.cspca_io().decode({"logits": raw})
    e = np.exp(raw - raw.max(axis=1, keepdims=True))
    assert np.allclose(lk[:, 0], (e / e.sum(axis=1, keepdims=True))[:, 1], atol=1e-6)
    for f in p.findings:
        assert f.long_axis_mm >= f.short_axis_mm > 0 and f.volume_ml > 0 and 0.5 <= f.likelihood <= 1.0
    model.close()


def test_the_agent_triages_with_the_dropped_in_model(store_dir: Path, exam, tmp_path: Path, monkeypatch) -> None:
    from scanside.agent.runtime.config import load_config
    from scanside.agent.service.daemon import Agent

    monkeypatch.setenv("SCANSIDE_USER_MODELS_DIR", str(store_dir))
    folder, _truth = exam
    config = load_config(**{"watch.folder": str(folder), "state.dir": str(tmp_path / "state"), "output.stdout": False,
                            "watch.settle_s": 0.1, "series.quiet_period_s": 1.0, "analysis.image_label": False,
                            "gland.enabled": False, "analysis.cspca_model": NAME})
    agent = Agent(config).start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not agent.store.event_counts().get("triage_result"):
            time.sleep(0.2)
        events = agent.store.events_after(0, limit=10_000)
    finally:
        agent.stop()
    (triage,) = [e for e in events if e.type == "triage_result"]
    assert triage.model == f"{NAME}/0.1.0" and set(triage.inputs) == {"T2W", "ADC", "HBV"}
    assert 0.0 <= triage.probability <= 1.0
    dce = triage.thresholds["dce_advised_at_probability"]
    assert triage.recommendation == ("DCE_ADVISED" if triage.probability >= dce else "BPMRI_SUFFICIENT")
    for f in triage.findings:
        assert len(f.center_lps_mm) == 3 and f.long_axis_mm >= f.short_axis_mm > 0


def test_int8_path_and_parity_gate(store_dir: Path, exam, tmp_path: Path) -> None:
    import shutil

    from scanside.converters.calibrate import calibrate
    from scanside.converters.calibration_data import build_set
    from scanside.converters.parity import parity_report, record
    from scanside.engines.store import ModelStore

    root = tmp_path / "models"
    shutil.copytree(store_dir, root)
    m = ModelManifest.load(root / NAME / "0.1.0")
    cset = build_set(m, [exam[0]])
    assert cset.inputs.shape == (1, 3, 20, 256, 256) and cset.origin_summary()["origin"] == "simulated"
    r = calibrate(m, cset, variants=["int8_u8s8"], select_ops=False)
    rep = parity_report(r.manifest, cset, variants=["int8_u8s8"], threads=1, openvino=False, tensorrt=False)
    e = rep["variants"]["int8_u8s8"]
    # read through the declaration: class 1 of the softmax and the map's maximum, compared with FP32
    assert e["data_origin"] == "simulated" and 0.0 <= e["loss"] <= 1.0 and "probability_max_abs_diff" in e
    m = record(r.manifest, rep)
    kw = dict(preference=["onnxruntime"], int8_tolerance=1.0)
    eng, sel = ModelStore(root, user_dir=None, parity_data="any", **kw).open(NAME, variant="int8_u8s8")
    eng.close()
    assert sel.precision == "int8_qdq_u8s8"
    eng, sel = ModelStore(root, user_dir=None, parity_data="real", **kw).open(NAME)
    eng.close()
    assert sel.variant == "fp32"  # simulated-only parity: not for real exams
