"""scanside.training.sequence.realism: textured, deformed phantoms render through the simulator's own per-class path with
physics kept across the sequences of one exam; EPI interpolation keeps the field of view."""
from __future__ import annotations

import numpy as np
import pytest

from scanside.simulator.model import SeriesSpec
from scanside.simulator.phantom import make_phantom
from scanside.simulator.physics import Tissue
from scanside.simulator.render import Artifacts, render_series
from scanside.training.sequence.realism import interpolate_epi, realistic_phantom

CLEAN = Artifacts(noise_scale=0.0, bias_field=0.0, motion_blur=0.0, texture=0.0, epi_distortion_mm=0.0,
                  epi_ghost=0.0, epi_blur_px=0.0)
ADC = SeriesSpec(kind="adc", description="adc", matrix=(128, 128), fov_mm=(200, 200), n_slices=6,
                 slice_thickness_mm=3.0, tr_ms=5000, te_ms=75, fat_sat=True, b_values=[0, 800])
T2 = SeriesSpec(kind="t2w", description="t2", matrix=(256, 256), fov_mm=(200, 200), n_slices=6, tr_ms=4500, te_ms=100)


@pytest.fixture(scope="module")
def pair():
    ph = make_phantom(700_123, n_lesions=0)
    return ph, realistic_phantom(ph, np.random.default_rng(3))


def test_texture_classes_keep_tissues_and_change_parameters(pair):
    ph, rp = pair
    assert rp.texture_props and rp.texture_map.shape == ph.labels.shape
    assert rp.n_classes == ph.n_classes + len(rp.texture_props)
    assert int(rp.classes.max()) < rp.n_classes
    # every texture class of a tissue sits on voxels of that tissue
    for j, p in enumerate(rp.texture_props, 1):
        sel = rp.texture_map == j
        if sel.any():
            assert np.all(rp.labels[sel] == p["tissue"])
    # the anatomy moved (deformation/septa) but the tissues are all still there, prostate about as large
    assert not np.array_equal(rp.labels, ph.labels)
    assert set(np.unique(ph.labels)) <= set(np.unique(rp.labels))
    pv = lambda p: int(np.isin(p.labels, [Tissue.PZ, Tissue.TZ]).sum())  # noqa: E731
    assert 0.8 < pv(rp) / pv(ph) < 1.25
    spread = np.std([p["t2"] for p in rp.texture_props])
    assert spread > 0.02


def test_textured_phantom_renders_texture_and_consistent_adc(pair):
    ph, rp = pair
    out = {}
    for name, p in (("flat", ph), ("real", rp)):
        adc = np.stack([im.pixels for im in render_series(p, ADC, 3.0, np.random.default_rng(0), CLEAN).images])
        t2 = np.stack([im.pixels for im in render_series(p, T2, 3.0, np.random.default_rng(0), CLEAN).images])
        out[name] = adc, t2
    def roughness(img, lo, hi):
        """Median neighbour difference over pixel pairs both in [lo, hi]: 0 inside flat compartments."""
        a, b = img[..., :-1], img[..., 1:]
        sel = (a > lo) & (a < hi) & (b > lo) & (b < hi)
        assert sel.sum() > 200
        return float(np.median(np.abs(a - b)[sel]))

    # soft-tissue ADC (1e-6 mm^2/s): flat compartments in the cartoon phantom, texture in the realistic one; the
    # ADC map is fitted from S(b) = S0 exp(-b ADC) of the same textured classes, so the texture is in it
    assert roughness(out["flat"][0], 900, 2200) < 1.0
    assert roughness(out["real"][0], 900, 2200) > 5.0
    t2_lo, t2_hi = np.percentile(out["flat"][1], [40, 95])
    assert roughness(out["real"][1], t2_lo, t2_hi) > roughness(out["flat"][1], t2_lo, t2_hi) + 1.0


def test_interpolate_epi_keeps_field_of_view(pair):
    ph, _ = pair
    ims = render_series(ph, ADC, 3.0, np.random.default_rng(0), CLEAN).images
    up = interpolate_epi(ims, 256)
    a, b = ims[0], up[0]
    assert b.pixels.shape == (256, 256)
    assert np.allclose(np.multiply(b.pixel_spacing, b.pixels.shape), np.multiply(a.pixel_spacing, a.pixels.shape))
    # same centre of the field of view
    def centre(im):
        o = np.asarray(im.orientation, float)
        r, cc = im.pixels.shape
        return (np.asarray(im.position) + (cc - 1) / 2 * im.pixel_spacing[1] * o[:3]
                + (r - 1) / 2 * im.pixel_spacing[0] * o[3:])
    assert np.allclose(centre(a), centre(b), atol=1e-6)
    assert float(b.pixels.min()) >= 0
    assert abs(float(b.pixels.mean()) - float(a.pixels.mean())) < 0.05 * float(a.pixels.mean())


def test_exam_samples_realism_keeps_protocol_and_labels():
    from scanside.training.sequence.data import exam_samples

    plain = list(exam_samples(700_002, "ge", realism=0.0))
    real = list(exam_samples(700_002, "ge", realism=1.0))
    assert [(lab, i["kind"], i["b_value"], i["matrix"]) for lab, _, i in plain] == \
        [(lab, i["kind"], i["b_value"], i["matrix"]) for lab, _, i in real]
    assert all(a.shape == b.shape and np.isfinite(b).all() for (_, a, _), (_, b, _) in zip(plain, real))
    assert np.mean([not np.allclose(a, b, atol=1e-2) for (_, a, _), (_, b, _) in zip(plain, real)]) > 0.9


def test_constants_sd_moves_whole_tissues_urine_keeps_free_water_adc(pair):
    ph, _ = pair
    mean = lambda p, t, k: np.exp(np.mean([np.log(q[k]) for q in p.texture_props if q["tissue"] == t]))  # noqa: E731
    same = realistic_phantom(ph, np.random.default_rng(5))
    wide = [realistic_phantom(ph, np.random.default_rng(s), constants_sd=0.3) for s in (5, 6, 7)]
    # without constants_sd a tissue's sub-classes centre on its table value; with it whole tissues move per exam
    assert abs(np.log(mean(same, Tissue.MUSCLE, "t2"))) < 0.15
    assert max(abs(np.log(mean(w, Tissue.MUSCLE, "t2"))) for w in wide) > 0.1
    assert all(abs(np.log(mean(w, Tissue.BLADDER, "adc"))) < 0.3 for w in wide)


def test_pelvis_has_a_real_pelvis_fat_and_bright_tse_fat(pair):
    from scanside.training.sequence.realism import fatten

    ph, _ = pair
    body = ph.labels != Tissue.BACKGROUND
    fat = lambda labels: float((labels == Tissue.FAT).sum() / body.sum())  # noqa: E731
    before = fat(ph.labels)
    fattened = fatten(ph.labels, np.random.default_rng(9), ph.voxel_mm, before + 0.15)
    assert abs(fat(fattened) - (before + 0.15)) < 0.01  # muscle turned to fat, nothing else touched
    changed = fattened != ph.labels
    assert np.all(ph.labels[changed] == Tissue.MUSCLE) and np.all(fattened[changed] == Tissue.FAT)
    assert np.array_equal(fatten(ph.labels, np.random.default_rng(9), ph.voxel_mm, before - 0.05), ph.labels)
    # the real pelvis: fat 35-60 % of the body, fat's T2 lengthened (bright fat on turbo spin echo)
    t2 = lambda p: np.exp(np.mean([np.log(q["t2"]) for q in p.texture_props if q["tissue"] == Tissue.FAT]))  # noqa: E731
    plain = realistic_phantom(ph, np.random.default_rng(9))
    pelvis = realistic_phantom(ph, np.random.default_rng(9), pelvis=True)
    assert fat(pelvis.labels) >= min(0.33, fat(plain.labels))
    assert t2(pelvis) > 1.2 * t2(plain)


def test_pelvis_artifacts_leave_suppressed_fat_speckled_in_the_adc_map(pair):
    from scanside.training.sequence.realism import pelvis_artifacts

    ph, _ = pair
    noisy = CLEAN.model_copy(update=dict(noise_scale=1.0))
    def blank_fraction(art):
        adc = np.stack([im.pixels for im in render_series(ph, ADC, 3.0, np.random.default_rng(0), art).images])
        t2 = np.stack([im.pixels for im in render_series(ph, T2.model_copy(update=dict(matrix=(128, 128))), 3.0,
                                                         np.random.default_rng(0), CLEAN).images])
        body = t2 > 0.05 * float(t2.max())  # the body, fat included (bright on T2W)
        return float((adc[body] == 0).mean())

    plain = blank_fraction(noisy)
    pelvis = blank_fraction(noisy.model_copy(update=pelvis_artifacts(np.random.default_rng(1))["adc"]))
    assert pelvis < plain - 0.05  # the simulator blanks the suppressed fat; many scanners fit it


def test_fit_adc_blanks_below_its_thresholds_only():
    from scanside.simulator.render import fit_adc

    s0 = np.array([1000.0, 40.0, 8.0, 2.0])  # tissue, suppressed fat, two noise-level pixels (sigma 2)
    S = np.stack([s0, s0 * np.exp(-800e-6 * np.array([1500.0, 30.0, 0.0, 0.0]))])
    _, _, fg = fit_adc(S, [0.0, 800.0], noise_floor=3 * 2.0)  # the simulator's default: 6 % and 3 sigmas
    assert fg.tolist() == [True, False, False, False]
    _, _, fg = fit_adc(S, [0.0, 800.0], noise_floor=1.5 * 2.0, mask_fraction=0.01)
    assert fg.tolist() == [True, True, False, False]  # fat fitted (speckled on a noisy map), air still blank


def test_pelvis_artifacts_make_t2w_noisier_and_epi_fat_speckled():
    from scanside.training.sequence.realism import pelvis_artifacts

    for seed in range(20):
        a = pelvis_artifacts(np.random.default_rng(seed))
        assert a["t2w"] is a["t2w_fs"] and 1.5 <= a["t2w"]["noise_scale"] <= 3.5  # one factor per exam
        assert a["dwi"] is a["adc"] is a["calc_bvalue"]  # the DWI and its ADC map agree
        assert a["adc"]["adc_mask_noise"] < Artifacts().adc_mask_noise
        assert a["adc"]["adc_mask_fraction"] < Artifacts().adc_mask_fraction
        assert a["dwi"]["epi_fat_residual"] > Artifacts().epi_fat_residual
