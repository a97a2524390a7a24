"""Where calibration and parity data come from (real / simulated DICOM), and the store's gate for real exams:
an INT8 variant whose parity was measured on simulated data only is not loaded with parity_data="real"."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scanside.converters.calibration_data import CalibrationSet, build_set, file_origin
from scanside.converters.parity import parity_report, record, task_metrics
from scanside.engines.base import EngineUnavailable
from scanside.engines.manifest import ModelManifest
from scanside.engines.store import ModelStore, parity_refusal
from scanside.agent.cli.taps import taps_manifest

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "realdata" / "prostate" / "ProstateX-0218"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real DICOM not here ({REAL}; see ../shared/realdata/README.md)")


def test_an_empty_fp32_reference_cannot_pass() -> None:
    """The TAPS finding: FP32 finds no gland on a phantom, INT8 finds none either -- that is no agreement."""
    m = taps_manifest()
    empty = np.full((2, 1, 40, 32, 16), -5.0, np.float32)
    for got in (empty, empty * 0.999, np.zeros_like(empty)):  # even an identical output
        e = task_metrics(m, empty, got, CalibrationSet(empty))
        assert e["informative"] is False and e["loss"] == 1.0 and e["fp32_empty_samples"] == 2
        assert parity_refusal(m.model_copy(update={"parity": {"variants": {"int8_u8s8": {
            **e, "sha256": "a" * 64, "data_origin": "real"}}}}), "int8_u8s8", "int8_qdq_u8s8", "a" * 64, 0.02)
    # one sample with foreground is enough to measure: Dice is then over the pooled masks
    ref = empty.copy()
    ref[0, 0, 8:24, 8:24, 4:12] = 5.0
    e = task_metrics(m, ref, ref + 0.01, CalibrationSet(ref))
    assert e["loss"] < 1e-6 and e["fp32_empty_samples"] == 1


def test_origin_summary_counts_series_and_exams() -> None:
    x = np.zeros((4, 1, 2, 2, 2), np.float32)
    cs = CalibrationSet(x, ["T2WI_nan"] * 4, ["s1", "s1", "s2", "s3"], origins=["real", "real", "real", "simulated"],
                        studies=["e1", "e1", "e1", "e2"])
    s = cs.origin_summary()
    assert s == {"samples": 4, "series": 3, "exams": 2, "real_series": 2, "real_exams": 1, "simulated_series": 1,
                 "simulated_exams": 1, "origin": "mixed"}
    assert cs.subset([0, 1]).origin_summary()["origin"] == "real"
    assert cs.subset([3]).origin_summary()["origin"] == "simulated"
    assert CalibrationSet(x).origin_summary()["origin"] == "unknown"  # an older set without origins


def test_simulator_files_are_simulated(t2w_exams: list, tmp_path: Path) -> None:
    f = next(p for p in Path(t2w_exams[0]).rglob("*.dcm"))
    assert file_origin(f) == "simulated"
    assert file_origin(tmp_path / "missing.dcm") == "real"  # unreadable: not the simulator's


@needs_real
def test_real_files_are_real_and_the_set_says_so(tiny_model, t2w_exams: list, tmp_path: Path) -> None:
    f = next(p for p in REAL.rglob("*.dcm"))
    assert file_origin(f) == "real"
    cs = build_set(tiny_model, [REAL, t2w_exams[0]])
    s = cs.origin_summary()
    assert s["origin"] == "mixed" and s["real_series"] == 1 and s["simulated_series"] == 1 and s["exams"] == 2
    back = CalibrationSet.load(cs.save(tmp_path / "set.npz"))
    assert back.origins == cs.origins and back.studies == cs.studies


@needs_real
def test_store_runs_int8_on_real_exams_only_with_real_parity(tiny_model, t2w_exams: list, tmp_path: Path) -> None:
    from scanside.converters.calibrate import calibrate

    m = tiny_model
    r = calibrate(m, build_set(m, t2w_exams[:2]), variants=["int8_u8s8"], select_ops=False)
    assert r.manifest.files["int8_u8s8"].calibration["data_origin"]["origin"] == "simulated"
    m = r.manifest.model_copy(update={"default_variant": "int8_u8s8"})
    m.save(m.root)
    m = ModelManifest.load(m.root)
    sim = record(m, parity_report(m, build_set(m, t2w_exams[2:]), variants=["int8_u8s8"], threads=1, openvino=False,
                                  tensorrt=False))
    e = sim.parity["variants"]["int8_u8s8"]
    assert e["data_origin"] == "simulated" and sim.parity["data"]["simulated_series"] == 2
    kw = dict(preference=["onnxruntime"], engine_options={"onnxruntime": {"intra_op_threads": 1}},
              int8_tolerance=1.0)  # the tiny model's loss is not what this test is about
    root = m.root.parent.parent
    # the simulator / demo: simulated parity is accepted
    eng, sel = ModelStore(root, parity_data="any", **kw).open("tiny3d")
    eng.close()
    assert sel.variant == "int8_u8s8"
    # real exams: refused, FP32 runs, and the selection says why
    real_store = ModelStore(root, parity_data="real", **kw)
    eng, sel = real_store.open("tiny3d")
    eng.close()
    assert sel.variant == "fp32" and "simulated data only" in sel.reason and "convert calibrate" in sel.reason
    with pytest.raises(EngineUnavailable, match="simulated data only"):
        real_store.open("tiny3d", variant="int8_u8s8")
    # parity on the real exam: now it may run on real exams
    rep = parity_report(sim, build_set(sim, [REAL]), variants=["int8_u8s8"], threads=1, openvino=False, tensorrt=False)
    assert rep["data"]["origin"] == "real" and rep["data"]["real_exams"] == 1
    record(sim, rep)
    eng, sel = ModelStore(root, parity_data="real", **kw).open("tiny3d")
    eng.close()
    assert sel.variant == "int8_u8s8"


def test_unrecorded_origin_is_not_real() -> None:
    m = taps_manifest()
    entry = {"sha256": "b" * 64, "loss": 0.0, "metric": "dice_vs_fp32", "value": 1.0}  # a report from before origins
    m = m.model_copy(update={"parity": {"variants": {"int8_sym": entry}}})
    assert parity_refusal(m, "int8_sym", "int8_qdq_sym", "b" * 64, 0.02) is None
    assert "unrecorded" in parity_refusal(m, "int8_sym", "int8_qdq_sym", "b" * 64, 0.02, "real")
    with pytest.raises(ValueError, match="parity_data"):
        ModelStore([], parity_data="sometimes")


def test_config_default_is_real() -> None:
    from scanside.agent.runtime.config import AgentConfig, load_config

    assert AgentConfig().engines.parity_data == "real"
    assert load_config(**{"engines.parity_data": "any"}).engines.parity_data == "any"


@needs_real
def test_convert_calibrate_on_a_sites_exams_is_what_the_agent_runs(tiny_model, t2w_exams: list, capsys) -> None:
    """The documented way (docs/int8-calibration.md): `scanside convert calibrate --data DIR` then `convert parity
    --data DIR` on the site's own exams; the daemon's store (parity_data real) then loads the INT8 file."""
    import json

    from scanside.agent.cli.convert import main

    root = str(tiny_model.root.parent.parent)
    assert main(["convert", "--store", root, "calibrate", "tiny3d", "--data", str(REAL), "--variants", "int8_u8s8",
                 "--no-select-ops"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data_origin"]["origin"] == "real" and out["data_origin"]["real_exams"] == 1
    # parity on simulated exams only: recorded, and the command says the agent will not use it on real exams
    assert main(["convert", "--store", root, "parity", "tiny3d", "--data", str(t2w_exams[0]), "--no-openvino",
                 "--threads", "1"]) == 0
    assert "simulated data only" in capsys.readouterr().err
    store = ModelStore(root, user_dir=None, preference=["onnxruntime"], parity_data="real", int8_tolerance=1.0)
    with pytest.raises(EngineUnavailable, match="simulated data only"):
        store.open("tiny3d", variant="int8_u8s8")
    assert main(["convert", "--store", root, "parity", "tiny3d", "--data", str(REAL), "--no-openvino",
                 "--threads", "1"]) == 0
    assert "measured on real data" in capsys.readouterr().err
    eng, sel = store.open("tiny3d", variant="int8_u8s8")
    eng.close()
    assert sel.precision == "int8_qdq_u8s8"
