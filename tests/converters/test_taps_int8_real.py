"""Issue 18's INT8 finding on the real exam of ../shared/realdata, with the real TAPS model (lavlab-taps wheel):

* TAPS int8_u8s8 calibrated on simulated T2W finds no gland on the real axial T2W (on phantoms TAPS finds
  none, every calibrated range is negative and U8 caps the logits at 0); its parity on the real series says
  so (loss 1) and the store does not load it; on simulated windows FP32 finds nothing, and that empty
  reference no longer passes;
* calibrated on real T2W (the same exam's sagittal and coronal T2 TSE, so the axial series it is measured on
  stays held out) it keeps Dice >= 0.99 against FP32, its parity is recorded as real, and the store runs it.
Slow: two calibrations and parity runs of an 80 MB 3-D model on CPU."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from scanside.converters.calibrate import calibrate
from scanside.converters.calibration_data import build_set, read_series
from scanside.converters.parity import parity_report, record
from scanside.engines.base import EngineUnavailable
from scanside.engines.store import ModelStore

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "realdata" / "prostate" / "ProstateX-0218"
T2W = ("T2WI_nan", "T2WI_fs")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400),
              pytest.mark.skipif(not REAL.is_dir(), reason=f"real DICOM not here ({REAL}; see ../shared/realdata/README.md)")]


@pytest.fixture(scope="module")
def taps(tmp_path_factory: pytest.TempPathFactory):
    from scanside.agent.cli.taps import fetch_wheel, import_taps

    try:
        wheel = fetch_wheel()
    except RuntimeError as e:
        if os.environ.get("SCANSIDE_OFFLINE") == "1":
            pytest.skip(f"SCANSIDE_OFFLINE=1 and the lavlab-taps wheel is not cached: {e}")
        raise
    return lambda name: import_taps(tmp_path_factory.mktemp(name) / "models", wheel)


@pytest.fixture(scope="module")
def real_axial(taps):
    """The real axial T2W window with the most foreground: what parity is measured on."""
    m = taps("probe")
    held = build_set(m, None, series=read_series([REAL], labels=T2W, planes=("axial",)), windows_per_series=1)
    assert held.origin_summary()["origin"] == "real" and len(held) == 1
    return held


def _gate(m):
    return ModelStore(m.root.parent.parent, user_dir=None, preference=["onnxruntime"], parity_data="real",
                      engine_options={"onnxruntime": {"intra_op_threads": 2}})


def test_simulated_calibration_fails_on_real_t2w_and_is_refused(taps, real_axial, t2w_exams: list) -> None:
    m = taps("sim")
    sim = build_set(m, t2w_exams[:2], windows_per_series=1)
    r = calibrate(m, sim, variants=["int8_u8s8"], select_ops=False, threads=2)
    assert r.manifest.files["int8_u8s8"].calibration["data_origin"]["origin"] == "simulated"
    rep = parity_report(r.manifest, real_axial, variants=["int8_u8s8"], threads=2, openvino=False, tensorrt=False)
    e = rep["variants"]["int8_u8s8"]
    assert e["fp32_foreground_voxels"] > 1000  # FP32 finds the real gland ...
    assert e["foreground_voxels"] == 0 and e["loss"] == 1.0  # ... INT8 calibrated on phantoms finds nothing
    m = record(r.manifest, rep)
    with pytest.raises(EngineUnavailable, match="exceeds the tolerance"):
        _gate(m).open(m, variant="int8_u8s8")
    # on the simulated windows FP32 finds no gland either: that used to pass on the raw outputs, no longer
    own = parity_report(m, sim, variants=["int8_u8s8"], threads=2, openvino=False, tensorrt=False)
    e = own["variants"]["int8_u8s8"]
    assert e["fp32_foreground_voxels"] == 0 and e["informative"] is False and e["loss"] == 1.0
    shutil.rmtree(m.root.parent.parent, ignore_errors=True)


def test_real_calibration_keeps_the_gland_and_runs_on_real_exams(taps, real_axial) -> None:
    m = taps("real")
    other = read_series([REAL], labels=T2W, planes=("sagittal", "coronal"))
    cal = build_set(m, None, series=other, windows_per_series=1)
    assert cal.origin_summary()["real_series"] == 2 and not set(cal.sources) & set(real_axial.sources)
    r = calibrate(m, cal, variants=["int8_u8s8"], select_ops=False, threads=2)
    rep = parity_report(r.manifest, real_axial, variants=["int8_u8s8"], threads=2, openvino=False, tensorrt=False)
    e = rep["variants"]["int8_u8s8"]
    assert e["data_origin"] == "real" and e["fp32_foreground_voxels"] > 1000 and e["value"] >= 0.99, e
    m = record(r.manifest, rep)
    eng, sel = _gate(m).open(m, variant="int8_u8s8")
    eng.close()
    assert sel.precision == "int8_qdq_u8s8"
    shutil.rmtree(m.root.parent.parent, ignore_errors=True)
