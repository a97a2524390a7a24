"""Phantom anatomy and MR physics renderer: determinism, anatomy, contrast, geometry, DWI/ADC, DCE, SNR."""
from __future__ import annotations

import numpy as np
import pytest

from scanside.simulator.model import SeriesSpec
from scanside.simulator.phantom import CSPCA_MAX_ADC, CSPCA_MIN_DIAMETER_MM, is_cspca, make_phantom
from scanside.simulator.physics import PROSTATE_TISSUES, Tissue, tissue_params
from scanside.simulator.render import Artifacts, fit_adc, render_series

CLEAN = Artifacts(noise_scale=0.0, bias_field=0.0, motion_blur=0.0)
NO_BIAS = Artifacts(bias_field=0.0, motion_blur=0.0)
# EPI without its geometric distortion: DWI pixels stay where the phantom's truth masks are
UNDISTORTED = Artifacts(epi_distortion_mm=0.0)

T2_AX = SeriesSpec(kind="t2w", description="t2_tse_tra", matrix=(192, 192), fov_mm=(180, 180), n_slices=20,
                   tr_ms=4500, te_ms=100)
DWI = SeriesSpec(kind="dwi", description="ep2d_diff", matrix=(96, 96), fov_mm=(200, 200), n_slices=20,
                 slice_thickness_mm=3.0, tr_ms=5000, te_ms=75, fat_sat=True, b_values=[50, 800, 1400])


@pytest.fixture(scope="module")
def ph_cs():
    """A csPCa phantom with one big significant lesion (searched deterministically)."""
    for seed in range(100, 200):
        ph = make_phantom(seed, cspca=True, n_lesions=1)
        les = ph.lesions[0]
        if min(les.diameters_mm) >= 9.0:
            return ph
    raise AssertionError("no phantom with a large significant lesion in 100 seeds")


def _pixel_lps(img) -> np.ndarray:
    r = np.asarray(img.orientation[:3])
    c = np.asarray(img.orientation[3:])
    rows, cols = img.pixels.shape
    i = np.arange(rows)[:, None, None] * img.pixel_spacing[0]
    j = np.arange(cols)[None, :, None] * img.pixel_spacing[1]
    return np.asarray(img.position)[None, None, :] + j * r + i * c


def _lookup(ph, vol, lps) -> np.ndarray:
    idx = np.rint(ph.world_to_index(lps)).astype(int)
    nz, ny, nx = vol.shape
    ok = ((idx[..., 0] >= 0) & (idx[..., 0] < nx) & (idx[..., 1] >= 0) & (idx[..., 1] < ny)
          & (idx[..., 2] >= 0) & (idx[..., 2] < nz))
    out = np.full(idx.shape[:-1], -2, dtype=np.int32)  # -2: outside the phantom grid
    out[ok] = vol[idx[..., 2][ok], idx[..., 1][ok], idx[..., 0][ok]]
    return out


def pure_truth(ph, img, thickness, vol=None, margin=1.5):
    """Per pixel: the phantom value (labels or lesion ids) where the whole voxel neighbourhood agrees, else -1."""
    vol = ph.labels if vol is None else vol
    r = np.asarray(img.orientation[:3])
    c = np.asarray(img.orientation[3:])
    n = np.cross(r, c)
    p = _pixel_lps(img)
    ref = _lookup(ph, vol, p)
    for d in (r * margin, -r * margin, c * margin, -c * margin, n * thickness / 2, -n * thickness / 2):
        ref = np.where(_lookup(ph, vol, p + d) == ref, ref, -1)
    return ref


def stack_truth(ph, series, thickness, vol=None):
    return np.stack([pure_truth(ph, im, thickness, vol) for im in series.images])


def test_phantom_deterministic_and_seed_dependent():
    a, b, c = make_phantom(7), make_phantom(7), make_phantom(8)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.lesion_masks, b.lesion_masks)
    assert a.lesions == b.lesions and a.prostate_center_lps_mm == b.prostate_center_lps_mm
    assert not np.array_equal(a.labels, c.labels)
    rs1 = render_series(a, T2_AX, 3.0, np.random.default_rng(1))
    rs2 = render_series(b, T2_AX, 3.0, np.random.default_rng(1))
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(rs1.images, rs2.images))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_anatomy(seed):
    ph = make_phantom(seed)
    assert ph.labels.dtype == np.uint8 and ph.lesion_masks.dtype == np.int16
    assert ph.labels.shape == ph.lesion_masks.shape
    assert 15.0 <= ph.prostate_volume_ml <= 90.0
    pm = ph.mask(*PROSTATE_TISSUES)
    assert pm.sum() * ph.voxel_mm**3 / 1000.0 == pytest.approx(ph.prostate_volume_ml)

    def centroid(*t):
        zyx = np.argwhere(ph.mask(*t)).mean(axis=0)
        return ph.index_to_world(zyx[::-1])

    pc = np.asarray(ph.prostate_center_lps_mm)
    assert np.allclose(centroid(*PROSTATE_TISSUES), pc, atol=1.0)
    pz, tz = centroid(Tissue.PZ), centroid(Tissue.TZ)
    assert pz[1] > tz[1] + 2.0  # PZ posterior of TZ (+y = posterior)
    sv = centroid(Tissue.SEMINAL_VESICLE)
    assert sv[2] > pc[2] + 10 and sv[1] > pc[1]  # superior and posterior
    assert centroid(Tissue.BLADDER)[2] > pc[2] + 15  # bladder above the gland
    assert centroid(Tissue.RECTUM)[1] > pc[1] + 10  # rectum behind it
    for t in (Tissue.FAT, Tissue.MUSCLE, Tissue.BONE_MARROW, Tissue.BONE_CORTEX, Tissue.VESSEL):
        assert ph.mask(t).any(), t
    # lesions: inside the gland, labelled, and their ground truth centre lies in the prostate
    assert ph.lesion_masks.max() == len(ph.lesions)
    assert np.all(pm[ph.lesion_masks > 0])
    assert np.array_equal(ph.lesion_masks > 0, ph.mask(Tissue.LESION))
    for k, les in enumerate(ph.lesions, 1):
        x, y, z = np.rint(ph.world_to_index(les.center_lps_mm)).astype(int)
        assert pm[z, y, x], les
        assert ph.lesion_masks[z, y, x] in (0, k)
        assert les.cspca == is_cspca(les.diameters_mm, les.adc)
        assert 3.5 <= max(les.diameters_mm) <= 20.5
    assert ph.cspca == any(les.cspca for les in ph.lesions)


def test_forced_cases_and_rule():
    for seed in range(3):
        pos = make_phantom(seed, cspca=True)
        assert pos.cspca and any(
            max(les.diameters_mm) >= CSPCA_MIN_DIAMETER_MM and les.adc <= CSPCA_MAX_ADC for les in pos.lesions)
        neg = make_phantom(seed, cspca=False, n_lesions=2)
        assert not neg.cspca and len(neg.lesions) == 2
        assert not any(les.cspca for les in neg.lesions)
        assert len(make_phantom(seed, n_lesions=0).lesions) == 0
    zones = [les.zone for s in range(12) for les in make_phantom(s, n_lesions=3).lesions]
    assert 0.45 <= zones.count("PZ") / len(zones) <= 0.9  # ~70% PZ
    with pytest.raises(ValueError):
        make_phantom(0, cspca=True, n_lesions=0)


@pytest.mark.parametrize("plane,iop,normal", [
    ("axial", (1, 0, 0, 0, 1, 0), (0, 0, 1)),
    ("sagittal", (0, 1, 0, 0, 0, -1), (-1, 0, 0)),
    ("coronal", (1, 0, 0, 0, 0, -1), (0, 1, 0)),
])
def test_geometry(plane, iop, normal):
    ph = make_phantom(5)
    spec = SeriesSpec(kind="t2w", description="g", plane=plane, n_slices=7, slice_thickness_mm=3.5,
                      slice_gap_mm=0.5, fov_mm=(160, 200), matrix=(64, 80), center_offset_mm=(2.0, -3.0, 4.0))
    rs = render_series(ph, spec, 3.0, np.random.default_rng(0))
    assert len(rs.images) == 7
    pos = np.array([im.position for im in rs.images])
    assert np.allclose(np.diff(pos, axis=0), 4.0 * np.asarray(normal, dtype=float))
    for k, im in enumerate(rs.images):
        assert im.slice_index == k
        assert np.allclose(im.orientation, iop)
        assert im.pixel_spacing == pytest.approx((160 / 64, 200 / 80))
        assert im.pixels.shape == (64, 80) and im.pixels.dtype == np.float32 and im.pixels.min() >= 0
    # the slab centre (middle of the pixel grid, middle slice) is the prostate centre + offset
    centres = np.array([_pixel_lps(im)[[0, -1]][:, [0, -1]].reshape(4, 3).mean(axis=0) for im in rs.images])
    expect = np.asarray(ph.prostate_center_lps_mm) + np.array([2.0, -3.0, 4.0])
    assert np.allclose(centres.mean(axis=0), expect, atol=1e-6)
    # partial coverage shifts the slab along the normal by the fraction of its extent
    sh = render_series(ph, spec, 3.0, np.random.default_rng(0), Artifacts(partial_coverage=0.5))
    d = np.array([im.position for im in sh.images]) - pos
    assert np.allclose(np.abs(d @ np.asarray(normal, dtype=float)), 0.5 * 7 * 4.0)


def test_t2_contrast_and_fat_sat():
    ph = make_phantom(11)
    rs = render_series(ph, T2_AX, 3.0, np.random.default_rng(0), CLEAN)
    fs = render_series(ph, T2_AX.model_copy(update={"kind": "t2w_fs", "fat_sat": True}), 3.0,
                       np.random.default_rng(0), CLEAN)
    px = np.stack([im.pixels for im in rs.images])
    pf = np.stack([im.pixels for im in fs.images])
    lab = stack_truth(ph, rs, T2_AX.slice_thickness_mm)

    def med(a, t):
        m = lab == int(t)
        assert m.sum() > 20, t
        return float(np.median(a[m]))

    assert med(px, Tissue.BLADDER) > med(px, Tissue.PZ) > med(px, Tissue.TZ) > med(px, Tissue.MUSCLE)
    assert med(px, Tissue.FAT) > 2 * med(px, Tissue.MUSCLE)  # fat bright on TSE
    assert med(pf, Tissue.FAT) < 0.15 * med(px, Tissue.FAT)  # and suppressed with FS
    assert med(pf, Tissue.FAT) < med(pf, Tissue.PZ)
    assert med(pf, Tissue.PZ) == pytest.approx(med(px, Tissue.PZ), rel=0.02)  # water unaffected


def test_dwi_structure_and_directions():
    ph = make_phantom(2)
    spec = DWI.model_copy(update={"n_slices": 4, "matrix": (48, 48), "n_directions": 3, "b_values": [0, 800, 1400]})
    rs = render_series(ph, spec, 3.0, np.random.default_rng(0))
    assert len(rs.images) == 3 * 4
    assert all(im.direction is None and im.derived is None for im in rs.images)
    assert [im.b_value for im in rs.images] == [0.0] * 4 + [800.0] * 4 + [1400.0] * 4
    rd = render_series(ph, spec, 3.0, np.random.default_rng(0), emit_directions=True)
    assert len(rd.images) == 4 + 2 * (4 + 3 * 4)
    dirs = [im.direction for im in rd.images if im.direction is not None]
    assert len(dirs) == 2 * 3 * 4 and np.allclose(np.linalg.norm(dirs, axis=1), 1.0)
    assert all(im.direction is None for im in rd.images if im.b_value == 0.0)
    # the trace images do not depend on whether directions are written
    tr = [im.pixels for im in rd.images if im.direction is None]
    assert all(np.array_equal(a.pixels, b) for a, b in zip(rs.images, tr))


def test_dwi_decay_and_lesion_hyperintense(ph_cs):
    rs = render_series(ph_cs, DWI, 3.0, np.random.default_rng(0), UNDISTORTED)
    n = DWI.n_slices
    stacks = {b: np.stack([im.pixels for im in rs.images[i * n:(i + 1) * n]]) for i, b in enumerate(DWI.b_values)}
    first = type(rs)(spec=rs.spec, images=rs.images[:n])
    les_id = stack_truth(ph_cs, first, 3.0, vol=ph_cs.lesion_masks)
    lab = stack_truth(ph_cs, first, 3.0)
    zone = Tissue.PZ if ph_cs.lesions[0].zone == "PZ" else Tissue.TZ
    pz = lab == int(Tissue.PZ)
    les = les_id == 1
    assert les.sum() >= 5
    means = [float(stacks[b][pz].mean()) for b in DWI.b_values]
    assert means[0] > means[1] > means[2]  # decays with b
    zm = lab == int(zone)
    assert stacks[1400][les].mean() > 1.3 * stacks[1400][zm].mean()  # lesion bright at high b


def test_adc_map_matches_truth(ph_cs):
    spec = DWI.model_copy(update={"kind": "adc", "b_values": [50, 800]})
    rs = render_series(ph_cs, spec, 3.0, np.random.default_rng(0), UNDISTORTED)
    assert all(im.derived == "ADC" and im.b_value is None for im in rs.images)
    adc = np.stack([im.pixels for im in rs.images])
    lab = stack_truth(ph_cs, rs, 3.0)
    les = stack_truth(ph_cs, rs, 3.0, vol=ph_cs.lesion_masks) == 1
    pz_true = tissue_params(3.0)[Tissue.PZ].adc
    pz_med = float(np.median(adc[lab == int(Tissue.PZ)]))
    les_med = float(np.median(adc[les]))
    assert pz_med == pytest.approx(pz_true, rel=0.15)
    assert les_med == pytest.approx(ph_cs.lesions[0].adc, rel=0.2)
    assert les_med < 0.8 * pz_med
    assert float(np.median(adc[lab == int(Tissue.BLADDER)])) > 2000 if (lab == int(Tissue.BLADDER)).any() else True
    air = (lab == int(Tissue.BACKGROUND)) | (lab == int(Tissue.RECTAL_GAS))
    assert air.sum() > 20 and np.mean(adc[air] == 0) > 0.98  # air masked (a few noise speckles survive)


def test_fit_adc_recovers_exponential():
    b = [0.0, 500.0, 1000.0]
    adc_true = np.array([[500.0, 1500.0], [2500.0, 1000.0]], dtype=np.float32)
    S = np.stack([100.0 * np.exp(-bb * adc_true * 1e-6) for bb in b]).astype(np.float32)
    adc, ln_s0, fg = fit_adc(S, b)
    assert fg.all() and np.allclose(adc, adc_true, rtol=1e-3)
    assert np.allclose(np.exp(ln_s0), 100.0, rtol=1e-3)


def test_calc_bvalue(ph_cs):
    spec = DWI.model_copy(update={"kind": "calc_bvalue", "b_values": [2000]})
    rs = render_series(ph_cs, spec, 3.0, np.random.default_rng(0), UNDISTORTED)
    assert all(im.derived == "CALC_BVALUE" and im.b_value == 2000.0 for im in rs.images)
    px = np.stack([im.pixels for im in rs.images])
    les = stack_truth(ph_cs, rs, 3.0, vol=ph_cs.lesion_masks) == 1
    pz = stack_truth(ph_cs, rs, 3.0) == int(Tissue.PZ)
    assert np.median(px[les]) > 1.5 * np.median(px[pz])


def test_dce_lesion_enhances_early(ph_cs):
    spec = SeriesSpec(kind="dce", description="t1_vibe_dyn", matrix=(96, 96), fov_mm=(200, 200), n_slices=16,
                      tr_ms=4.0, te_ms=1.5, flip_angle_deg=15, fat_sat=True, n_phases=24, temporal_resolution_s=8.0)
    rs = render_series(ph_cs, spec, 3.0, np.random.default_rng(0), UNDISTORTED)
    assert len(rs.images) == 16 * 24
    assert [im.temporal_index for im in rs.images[::16]] == list(range(24))
    assert rs.images[16 * 3].trigger_time_ms == pytest.approx(3 * 8000.0)
    first = type(rs)(spec=spec, images=rs.images[:16])
    les = stack_truth(ph_cs, first, 3.0, vol=ph_cs.lesion_masks) == 1
    pz = stack_truth(ph_cs, first, 3.0) == int(Tissue.PZ)
    px = np.stack([im.pixels for im in rs.images]).reshape(24, 16, 96, 96)
    curve_l = px[:, les].mean(axis=1)
    curve_p = px[:, pz].mean(axis=1)
    rel_l = curve_l / curve_l[:2].mean() - 1
    rel_p = curve_p / curve_p[:2].mean() - 1
    assert abs(rel_l[0]) < 0.1 and abs(rel_p[0]) < 0.1  # baseline before arrival
    assert int(np.argmax(rel_l)) < int(np.argmax(rel_p))  # earlier peak
    assert rel_l[5] > 2 * rel_p[5]  # stronger early enhancement (~30 s after arrival)
    assert curve_l[-1] < curve_l.max() * 0.95  # washout
    assert curve_p[-1] >= curve_p.max() * 0.9  # normal PZ: slow, persistent


def test_snr_3t_vs_15t():
    ph = make_phantom(3)
    spec = T2_AX.model_copy(update={"n_slices": 8})
    snr = {}
    for b0 in (1.5, 3.0):
        rs = render_series(ph, spec, b0, np.random.default_rng(0), NO_BIAS)
        lab = stack_truth(ph, rs, 3.0)
        px = np.stack([im.pixels for im in rs.images])
        m = lab == int(Tissue.MUSCLE)
        snr[b0] = px[m].mean() / px[m].std()
    assert snr[3.0] > 1.5 * snr[1.5]


def test_other_kinds_render():
    ph = make_phantom(1)
    loc = SeriesSpec(kind="localizer", description="localizer", plane="sagittal", n_slices=3, slice_thickness_mm=8,
                     slice_gap_mm=12, fov_mm=(400, 400), matrix=(128, 128), tr_ms=8, te_ms=3, flip_angle_deg=20)
    t1 = SeriesSpec(kind="t1", description="t1_tse_tra", n_slices=5, matrix=(128, 128), tr_ms=600, te_ms=12,
                    flip_angle_deg=90)
    for spec in (loc, t1):
        rs = render_series(ph, spec, 1.5, np.random.default_rng(0))
        px = np.stack([im.pixels for im in rs.images])
        assert len(rs.images) == spec.n_slices and np.isfinite(px).all() and px.max() > 50
    # T1: fat bright
    rs = render_series(ph, t1, 1.5, np.random.default_rng(0), CLEAN)
    lab = stack_truth(ph, rs, 3.0)
    px = np.stack([im.pixels for im in rs.images])
    assert np.median(px[lab == int(Tissue.FAT)]) > 2 * np.median(px[lab == int(Tissue.MUSCLE)])
