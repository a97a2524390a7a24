"""scanside.engines.tasks.cspca: finding extraction on synthetic maps, and the shipped model on simulated exams."""
from __future__ import annotations

import numpy as np
import pytest

from scanside.engines.tasks.cspca import CspcaInputError, CspcaModel, extract_findings
from scanside.agent.dicom.volume import Volume
from scanside.engines.preprocess import model_grid
from scanside.training.cspca.spec import CSPCA_SPEC


def _grid(origin=(-20.0, 35.0, 12.0)):
    # an axial T2W-like volume (SPL) -> the model grid, off-centre in LPS
    arr_aff = np.zeros((4, 4))
    arr_aff[:3, 0] = [0, 0, 3.0]  # slice axis -> superior
    arr_aff[:3, 1] = [0, 0.625, 0]  # rows -> posterior
    arr_aff[:3, 2] = [0.625, 0, 0]  # cols -> left
    arr_aff[:3, 3] = origin
    arr_aff[3, 3] = 1
    vol = Volume.from_array_affine(np.zeros((24, 256, 256), np.float32), arr_aff)
    return model_grid(vol, CSPCA_SPEC)


def _paint(lk, grid, centre, semi_ax, angle_deg=0.0, peak=0.9):
    """Filled ellipsoid in LPS mm: semi-axes (a along rotated x, b along rotated y, c along z)."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = grid.index_to_lps(idx) - np.asarray(centre)
    t = np.deg2rad(angle_deg)
    u = xyz[:, 0] * np.cos(t) + xyz[:, 1] * np.sin(t)
    v = -xyz[:, 0] * np.sin(t) + xyz[:, 1] * np.cos(t)
    rho = (u / semi_ax[0]) ** 2 + (v / semi_ax[1]) ** 2 + (xyz[:, 2] / semi_ax[2]) ** 2
    inside = (rho <= 1.0).reshape(grid.shape)
    lk[inside] = np.maximum(lk[inside], peak * (1.0 - 0.3 * rho.reshape(grid.shape)[inside]))


def test_extract_findings_centres_and_axes():
    grid = _grid()
    c0 = grid.center_lps()
    lk = np.zeros(grid.shape, np.float32)
    a = (c0[0] + 18.0, c0[1] - 10.0, c0[2] + 1.5)
    b = (c0[0] - 15.0, c0[1] + 12.0, c0[2] - 9.0)
    _paint(lk, grid, a, (9.0, 5.0, 6.0), angle_deg=30.0, peak=0.95)  # 18 x 10 mm in-plane, rotated
    _paint(lk, grid, b, (5.0, 5.0, 4.5), peak=0.8)  # 10 mm round
    lk += np.random.default_rng(0).uniform(0, 0.2, lk.shape).astype(np.float32)  # background below threshold
    fs = extract_findings(lk, grid, lesion_threshold=0.5, min_peak=0.5, min_volume_mm3=30.0)
    assert len(fs) == 2
    f1, f2 = fs  # sorted by likelihood
    assert f1.likelihood > f2.likelihood
    assert np.linalg.norm(np.subtract(f1.center_lps_mm, a)) < 1.0
    assert np.linalg.norm(np.subtract(f2.center_lps_mm, b)) < 1.0
    assert f1.long_axis_mm == pytest.approx(18.0, abs=1.6)
    assert f1.short_axis_mm == pytest.approx(10.0, abs=1.6)
    assert f2.long_axis_mm == pytest.approx(10.0, abs=1.6)
    assert f2.short_axis_mm == pytest.approx(10.0, abs=1.6)
    assert f1.volume_ml == pytest.approx(4 / 3 * np.pi * 9 * 5 * 6 / 1000, rel=0.35)


def test_touching_lesions_are_two_findings_and_noise_splits_none():
    grid = _grid()
    c0 = grid.center_lps()
    a = (c0[0] - 5.0, c0[1], c0[2])
    b = (c0[0] + 5.0, c0[1] + 1.0, c0[2])
    lk = np.zeros(grid.shape, np.float32)
    _paint(lk, grid, a, (6.0, 6.0, 6.0), peak=0.95)
    _paint(lk, grid, b, (6.0, 6.0, 6.0), peak=0.85)  # overlaps a: the map stays >= 0.65 between them
    joined = extract_findings(lk, grid, split_dynamic=0.0)
    assert len(joined) == 1  # without splitting: one finding between the two lesions
    fs = extract_findings(lk, grid, split_dynamic=0.1)
    assert len(fs) == 2
    assert np.linalg.norm(np.subtract(fs[0].center_lps_mm, a)) < 1.5
    assert np.linalg.norm(np.subtract(fs[1].center_lps_mm, b)) < 1.5
    assert fs[0].volume_ml + fs[1].volume_ml == pytest.approx(joined[0].volume_ml, rel=1e-6)  # no voxel lost
    # a single lesion with voxel noise of 0.2 inside it stays one finding
    one = np.zeros(grid.shape, np.float32)
    _paint(one, grid, a, (7.0, 6.0, 6.0), peak=0.8)
    one += np.random.default_rng(1).uniform(0, 0.2, one.shape).astype(np.float32)
    assert len(extract_findings(one, grid, split_dynamic=0.1)) == 1


def test_extract_findings_thresholds_and_empty():
    grid = _grid()
    lk = np.zeros(grid.shape, np.float32)
    assert extract_findings(lk, grid) == []
    _paint(lk, grid, grid.center_lps(), (2.0, 2.0, 1.6), peak=0.9)  # tiny blob: below min volume
    assert extract_findings(lk, grid, min_volume_mm3=200.0) == []
    with pytest.raises(ValueError):
        extract_findings(np.zeros((2, 2, 2), np.float32), grid)


@pytest.fixture(scope="module")
def model():
    m = CspcaModel()
    yield m
    m.close()


def test_predict_rejects_bad_input(model):
    with pytest.raises(CspcaInputError) as e:
        model.predict({"T2W": Volume(np.zeros((4, 8, 8), np.float32), np.eye(4))})
    assert e.value.reason == "missing_channel"
    empty = Volume(np.zeros((0, 8, 8), np.float32), np.eye(4))
    with pytest.raises(CspcaInputError):
        model.predict({"T2W": empty, "ADC": empty, "HBV": empty})


def _large_lesion_seed() -> int:
    from scanside.simulator.phantom import make_phantom

    for s in range(500, 600):
        ph = make_phantom(s, n_lesions=1, cspca=True)
        if max(ph.lesions[0].diameters_mm) >= 14.0:
            return s
    raise AssertionError("no seed with a large lesion")


@pytest.mark.slow
def test_predict_finds_large_lesion(model, tmp_path):
    from scanside.simulator.scanner import simulate_exam
    from scanside.training.cspca.evaluate import exam_volumes

    seed = _large_lesion_seed()
    gt = simulate_exam("siemens", tmp_path / "pos", seed, profile="prostate-bpmri", n_lesions=1, cspca=True)
    simulate_exam("ge", tmp_path / "neg", seed + 1, profile="prostate-bpmri", n_lesions=0, cspca=False)
    pos = model.predict(exam_volumes(tmp_path / "pos"))
    neg = model.predict(exam_volumes(tmp_path / "neg"))
    assert pos.probability > neg.probability
    assert pos.findings, "no finding on an exam with a large csPCa lesion"
    les = np.asarray(gt.lesions[0].center_lps_mm)
    d = min(np.linalg.norm(np.subtract(f.center_lps_mm, les)) for f in pos.findings)
    assert d <= 5.0, f"nearest finding {d:.1f} mm from the lesion centre"
    assert pos.likelihood.shape == tuple(pos.grid.shape) == tuple(CSPCA_SPEC.shape)
