"""scanside.engines.tasks.gland: TAPS-style gland segmentation through the real preprocessing, sliding window and ONNX
Runtime (a one-layer ONNX with the TAPS interface for the geometry; the real TAPS model in one slow
test), post-processing and the slab coverage check."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from scanside.agent.schema.events import SlabGeometry
from scanside.engines.tasks.gland import GlandResult, GlandService, coverage, coverage_report, largest_component, postprocess, \
    segment_gland
from scanside.agent.dicom.volume import Volume
from scanside.engines.manifest import ModelFile, ModelManifest, sha256_file
from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine
from scanside.engines.preprocess import Grid
from scanside.engines.store import ModelStore
from scanside.agent.cli.taps import taps_manifest

CENTRE = np.array([5.0, -10.0, -8.0])  # LPS mm
RADII = np.array([20.0, 15.0, 12.0])  # mm along x (L), y (P), z (S)


def _bright_gland_volume() -> Volume:
    """Axial stack, 0.8 mm in plane, 3 mm slices, FOV centred on the origin; an ellipsoid of 3.0 in a body of 1.0."""
    n_s, n_r, n_c = 32, 200, 200
    aff = np.zeros((4, 4))
    aff[:3, 0] = [0, 0, 3.0]  # slice -> S
    aff[:3, 1] = [0, 0.8, 0]  # row -> P
    aff[:3, 2] = [0.8, 0, 0]  # col -> L
    aff[:3, 3] = -aff[:3, :3] @ ((np.array([n_s, n_r, n_c]) - 1) / 2)
    aff[3, 3] = 1
    idx = np.stack(np.meshgrid(np.arange(n_s), np.arange(n_r), np.arange(n_c), indexing="ij"), -1).astype(float)
    lps = idx @ aff[:3, :3].T + aff[:3, 3]
    inside = (((lps - CENTRE) / RADII) ** 2).sum(-1) <= 1
    arr = np.where(inside, 3.0, 1.0).astype(np.float32)
    return Volume.from_array_affine(arr, aff)


def _threshold_model(root: Path) -> ModelManifest:
    """The TAPS interface ([N,1,128,128,32] -> logits) as one 1x1x1 Conv: logits w * z + b, +3 in the
    ellipsoid and -3 outside (z-scored like the preprocessing does: zscore over non-zero voxels)."""
    arr = _bright_gland_volume().array
    m, sd = float(arr.mean()), float(arr.std())
    z_fg, z_bg = (3.0 - m) / sd, (1.0 - m) / sd
    w = 6.0 / (z_fg - z_bg)
    b = -w * (z_fg + z_bg) / 2
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = ["batch_size", 1, 128, 128, 32]
    g = helper.make_graph([helper.make_node("Conv", ["input", "w", "b"], ["output"], kernel_shape=[1, 1, 1])], "thr",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
                          [numpy_helper.from_array(np.full((1, 1, 1, 1, 1), w, np.float32), "w"),
                           numpy_helper.from_array(np.array([b], np.float32), "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = root / "thr.onnx"
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(src))
    m = taps_manifest()
    post = dict(m.postprocessing, gaussian_sigma=0.0)  # volumes exact to the voxel (TAPS' 2.5 erodes small shapes)
    m = m.model_copy(update={"name": "gland-threshold", "version": "1.0.0", "postprocessing": post,
                             "files": {"fp32": ModelFile(path="model.onnx", sha256=sha256_file(src), opset=17)}})
    return ModelStore(root / "models").install(m, {"model.onnx": src})


@pytest.fixture(scope="module")
def gland(tmp_path_factory: pytest.TempPathFactory) -> GlandResult:
    m = _threshold_model(tmp_path_factory.mktemp("gland"))
    with OnnxRuntimeEngine(["CPUExecutionProvider"], intra_op_threads=1).load(m) as eng:
        return segment_gland(eng, _bright_gland_volume())


def test_volume_and_centroid_in_patient_space(gland: GlandResult) -> None:
    assert gland.found and gland.windows == 1  # "center": one window
    truth_ml = 4 / 3 * np.pi * RADII.prod() / 1000  # 15.08 ml
    assert gland.volume_ml == pytest.approx(truth_ml, rel=0.15)
    assert np.allclose(gland.centroid_lps, CENTRE, atol=1.5)
    assert gland.grid.axcodes == "RAS" and np.allclose(gland.grid.spacing, (0.8, 0.8, 3.0))
    assert gland.qc["touches_edge"] is False
    assert gland.qc["volume_in_expected_range"] == (15.0 <= gland.volume_ml <= 80.0)  # TAPS qc range
    s = gland.summary()
    assert json.loads(json.dumps(s))["volume_ml"] == round(gland.volume_ml, 2)


def test_coverage_by_slab_and_field_of_view(gland: GlandResult) -> None:
    z0, z1 = CENTRE[2] - RADII[2], CENTRE[2] + RADII[2]
    full = SlabGeometry(normal=(0, 0, 1), center_lps_mm=tuple(CENTRE), start_mm=z0 - 5, end_mm=z1 + 5)
    assert coverage(gland, full) == 1.0
    half = SlabGeometry(normal=(0, 0, 1), center_lps_mm=tuple(CENTRE), start_mm=CENTRE[2], end_mm=z1 + 5)
    assert 0.35 < coverage(gland, half) < 0.65
    assert coverage(gland, SlabGeometry(normal=(0, 0, 1), center_lps_mm=(0, 0, 80), start_mm=60, end_mm=100)) == 0.0
    # a sagittal slab (normal along x) covering the left half of the gland
    sag = SlabGeometry(normal=(1, 0, 0), center_lps_mm=tuple(CENTRE), start_mm=CENTRE[0], end_mm=CENTRE[0] + 40)
    assert 0.35 < coverage(gland, sag) < 0.65
    # a volume's field of view
    vol = _bright_gland_volume()
    assert coverage(gland, vol) == 1.0
    small = Grid(shape=(10, 200, 200), affine=vol.array_affine.copy())  # first 10 slices = 30 mm from the bottom
    c = coverage(gland, small)
    assert c is not None and c < 0.5
    rep = coverage_report(gland, [half, full], threshold=0.95)
    assert [r["covers_gland"] for r in rep] == [False, True]
    assert coverage(gland, object()) is None


def test_postprocess_keeps_the_largest_component() -> None:
    logits = np.full((40, 40, 20), -6.0, np.float32)
    logits[5:20, 5:20, 5:15] = 6.0  # big
    logits[30:36, 30:36, 8:12] = 6.0  # small, separate
    mask = postprocess(logits, {"gaussian_sigma": 2.5, "threshold": 0.55})
    assert mask[12, 12, 10] and not mask[33, 33, 10]
    assert not postprocess(np.full((8, 8, 8), -6.0, np.float32), {}).any()
    two = np.zeros((5, 5, 5), bool)
    two[0, 0, 0] = two[4, 4, 4] = True
    assert largest_component(two).sum() == 1


def test_service_without_the_model_is_quietly_off(tmp_path: Path) -> None:
    svc = GlandService(ModelStore(tmp_path / "empty"))
    assert svc.segment(_bright_gland_volume()) is None and "no model" in svc.unavailable

    class Summary:
        label, plane = "ADC", "axial"

    assert svc.segment_series(Summary(), []) is None


@pytest.mark.slow
def test_real_taps_on_a_simulated_t2w(tmp_path: Path) -> None:
    """One centre window of the real TAPS model (lavlab-taps 1.1.2) on a simulated axial T2W series."""
    cache = Path(os.environ.get("SCANSIDE_CACHE_DIR", Path.home() / ".cache" / "scanside"))
    wheel = cache / "wheels" / "lavlab_taps-1.1.2-py3-none-any.whl"
    if not wheel.is_file():
        pytest.skip(f"TAPS wheel not cached at {wheel} (scanside models import-taps fetches it)")
    from scanside.converters.calibration_data import read_series
    from scanside.agent.cli.taps import import_taps
    from tests.converters._models import make_t2w_exams

    import_taps(tmp_path / "models", wheel)
    exam = make_t2w_exams(tmp_path / "exams", n=1)[0]
    truth = json.loads((exam / "ground_truth.json").read_text())
    series = read_series([exam])[0]
    svc = GlandService(ModelStore(tmp_path / "models", engine_options={"onnxruntime": {"intra_op_threads": 2}}))
    g = svc.segment(series.volume)
    svc.close()
    assert g is not None and g.windows == 1 and g.mask.shape == g.grid.shape
    assert g.volume_ml == pytest.approx(g.mask.sum() * np.prod(g.grid.spacing) / 1000)
    if not g.found:  # measured 2026-11: TAPS (trained on real MRI) segments nothing on the simulator's phantom
        pytest.xfail("TAPS finds no gland on the simulated T2W phantom (domain gap), pipeline ran end to end")
    # the phantom's prostate: the centroid lands near it (the model was trained on real MRI, so loose)
    assert np.linalg.norm(np.asarray(g.centroid_lps) - np.asarray(truth["prostate_center_lps_mm"])) < 20
