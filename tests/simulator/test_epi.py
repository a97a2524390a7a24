"""Echo-planar imaging in the simulator: what tells a DWI from a turbo spin echo at the same contrast."""
from __future__ import annotations

import numpy as np
import pytest

from scanside.simulator.model import SeriesSpec
from scanside.simulator.phantom import make_phantom
from scanside.simulator.render import (FAT_WATER_SHIFT_PPM, GAMMA_MHZ_PER_T, Artifacts, _epi, _shift_along, render_series,
                              slab_geometry)

QUIET = dict(noise_scale=0.0, bias_field=0.0, motion_blur=0.0, texture=0.0)
NO_EPI = dict(epi_ghost=0.0, epi_distortion_mm=0.0, epi_bandwidth_hz=0.0, epi_blur_px=0.0)
B0 = SeriesSpec(kind="dwi", description="ep2d_diff", matrix=(96, 96), fov_mm=(200, 200), n_slices=6,
                slice_thickness_mm=3.0, tr_ms=5000, te_ms=75, fat_sat=True, b_values=[0])


def test_a_displacement_moves_signal_along_phase_and_keeps_its_total():
    vol = np.zeros((1, 40, 30), dtype=np.float32)
    vol[0, 10, 5] = 1.0
    moved = _shift_along(vol, np.full(vol.shape, 3.0, dtype=np.float32), ax=1, wrap=False)
    assert moved[0, 13, 5] == pytest.approx(1.0) and moved.sum() == pytest.approx(1.0)
    # a stretching field (displacement growing along phase) spreads the signal and keeps its sum
    ramp = np.broadcast_to((0.5 * np.arange(40, dtype=np.float32))[None, :, None], vol.shape).copy()
    blob = np.zeros_like(vol)
    blob[0, 10:20, 5] = 1.0
    stretched = _shift_along(blob, ramp, ax=1, wrap=False)
    assert (stretched[0, :, 5] > 0.01).sum() > 10
    assert stretched.sum() == pytest.approx(blob.sum(), rel=0.1)


def test_residual_fat_lands_shifted_by_its_chemical_shift_and_wraps():
    ph = make_phantom(3)
    geom = slab_geometry(B0, np.asarray(ph.prostate_center_lps_mm))
    n, r, c = len(geom.positions), geom.rows, geom.cols
    water = np.zeros((1, n, r, c), dtype=np.float32)
    fat = np.zeros_like(water)
    fat[0, 2, 90, 40] = 1.0  # near the end of the phase axis (rows, axial): the shift wraps around
    bw = 25.0
    art = Artifacts(**{**NO_EPI, "epi_bandwidth_hz": bw})
    out = _epi(water, fat, geom, "axial", art, 3.0, np.zeros(3), np.zeros((3, n, r, c), np.float32),
               np.random.default_rng(0))
    shift = FAT_WATER_SHIFT_PPM * GAMMA_MHZ_PER_T * 3.0 / bw  # ~17 pixels at 3 T
    row = int(np.argmax(out[0, 2, :, 40]))
    assert row in {int(np.floor(90 + shift)) % r, int(np.ceil(90 + shift)) % r,
                   int(np.floor(90 - shift)) % r, int(np.ceil(90 - shift)) % r}
    assert abs(((row - 90 + r / 2) % r) - r / 2) == pytest.approx(shift, abs=1.0)
    assert out[0, 2, 90, 40] == 0.0 and out.sum() == pytest.approx(1.0)


def test_dwi_carries_an_n2_ghost_and_a_turbo_spin_echo_does_not():
    ph = make_phantom(3)
    ghost = 0.03
    quiet = render_series(ph, B0, 3.0, np.random.default_rng(0), Artifacts(**QUIET, **NO_EPI))
    ghosted = render_series(ph, B0, 3.0, np.random.default_rng(0), Artifacts(**QUIET, **{**NO_EPI, "epi_ghost": ghost}))
    a = np.stack([im.pixels for im in quiet.images])
    g = np.stack([im.pixels for im in ghosted.images])
    # the ghost is the image itself moved half the field of view along phase (rows for axial)
    np.testing.assert_allclose(g, a + ghost * np.roll(a, a.shape[1] // 2, axis=1), rtol=1e-4, atol=1e-3)
    tse = SeriesSpec(kind="t2w_fs", description="t2_tse_fs", matrix=(96, 96), fov_mm=(200, 200), n_slices=6,
                     tr_ms=5000, te_ms=75, fat_sat=True)
    t = np.stack([im.pixels for im in render_series(ph, tse, 3.0, np.random.default_rng(0),
                                                    Artifacts(**QUIET)).images])
    tf = np.stack([im.pixels for im in render_series(ph, tse, 3.0, np.random.default_rng(0),
                                                     Artifacts(**QUIET, epi_ghost=0.3, epi_bandwidth_hz=10.0,
                                                               epi_distortion_mm=3.0)).images])
    np.testing.assert_array_equal(t, tf)  # EPI settings do not touch a turbo spin echo


def test_default_dwi_is_distorted_but_stays_on_the_gland():
    """The default (mild) exam: the gland's DWI moves by about a millimetre, far less than a pixel would show."""
    ph = make_phantom(3)
    spec = B0.model_copy(update={"n_slices": 12})
    plain = np.stack([im.pixels for im in render_series(ph, spec, 3.0, np.random.default_rng(0),
                                                        Artifacts(**QUIET, **NO_EPI)).images])
    epi = np.stack([im.pixels for im in render_series(ph, spec, 3.0, np.random.default_rng(0),
                                                      Artifacts(**QUIET)).images])
    assert not np.allclose(plain, epi)
    centre = lambda v: np.array([(v * w).sum() / v.sum() for w in np.indices(v.shape)])  # noqa: E731
    half = 12  # pixels around the image centre, where the gland is
    sl = (slice(None), slice(48 - half, 48 + half), slice(48 - half, 48 + half))
    moved_px = np.linalg.norm(centre(epi[sl]) - centre(plain[sl]))
    assert moved_px < 1.5  # < 3 mm at 2 mm pixels


def test_the_adc_map_shares_the_distortion_of_its_dwi_acquisition():
    """The scanner computes ADC from the DWI it acquired: both carry the same geometric distortion."""
    ph = make_phantom(3)
    art = Artifacts(**{**QUIET, **NO_EPI, "epi_distortion_mm": 4.0})
    dwi = B0.model_copy(update={"b_values": [50, 800]})
    adc = dwi.model_copy(update={"kind": "adc"})
    # distinct series random states, as the scanner gives every series its own
    low = np.stack([im.pixels for im in render_series(ph, dwi, 3.0, np.random.default_rng(1), art).images[:6]])
    amap = np.stack([im.pixels for im in render_series(ph, adc, 3.0, np.random.default_rng(2), art).images])
    plain = np.stack([im.pixels for im in render_series(ph, dwi, 3.0, np.random.default_rng(1),
                                                        Artifacts(**QUIET, **NO_EPI)).images[:6]])
    fg = lambda v: v >= 0.06 * np.percentile(v, 99)  # noqa: E731 - the ADC fit's foreground rule
    # the map's foreground is exactly the distorted b50's, not the undistorted one's
    np.testing.assert_array_equal(amap > 0, fg(low))
    assert (fg(plain) != fg(low)).sum() > 50
