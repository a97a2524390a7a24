"""scanside.engines.preprocess additions: orientation="acquisition", fit="resize" and antialias (used by
the sequence classifier: any plane, FOV and resolution into one array shape)."""
from __future__ import annotations

import numpy as np
import pytest

from scanside.engines.preprocess import Grid, antialias_for, model_grid, prepare, resized_grid
from scanside.engines.spec import PreprocessSpec
from tests.engines.test_preprocess import AXIAL, SAGITTAL, make_volume


def _spec(**kw):
    base = dict(channels=["x"], spacing_mm=(3.0, 3.0, 3.0), shape=(8, 32, 32), orientation="acquisition", fit="resize",
                normalize="none")
    base.update(kw)
    return PreprocessSpec(**base)


def test_defaults_keep_crop_behaviour():
    s = PreprocessSpec(channels=["x"], spacing_mm=(3.0, 0.5, 0.5), shape=(4, 8, 8))
    assert (s.orientation, s.fit, s.antialias) == ("axcodes", "crop", False)


@pytest.mark.parametrize("shape,spacing", [((24, 256, 256), (3.0, 0.625, 0.625)), ((3, 192, 160), (6.0, 1.4, 1.7)),
                                           ((40, 96, 128), (2.5, 2.0, 1.5))])
def test_resize_covers_the_whole_fov_in_the_requested_shape(shape, spacing):
    v = make_volume(shape, spacing)
    g = resized_grid(v, (8, 32, 32))
    assert g.shape == (8, 32, 32)
    extent_in = np.asarray(shape) * np.asarray(spacing)
    np.testing.assert_allclose(np.asarray(g.shape) * np.asarray(g.spacing), extent_in, rtol=1e-9)
    np.testing.assert_allclose(g.center_lps(), v.center_lps(), atol=1e-6)


def test_acquisition_orientation_keeps_array_axes_any_plane():
    for base in (AXIAL, SAGITTAL):
        v = make_volume((20, 128, 128), (3.0, 1.0, 1.0), base=base)
        g = model_grid(v, _spec())
        # axis 0 still runs along the slice normal, whatever the plane
        d0 = g.affine[:3, 0] / np.linalg.norm(g.affine[:3, 0])
        np.testing.assert_allclose(d0, base[:, 0], atol=1e-9)
        assert g.axcodes == v.axcodes
    # with the default orientation a sagittal series is reoriented to SPL instead
    gs = model_grid(make_volume((20, 128, 128), (3.0, 1.0, 1.0), base=SAGITTAL),
                    _spec(orientation="axcodes", axcodes="SPL"))
    assert gs.axcodes == "SPL"


def test_resize_samples_the_content():
    # a linear ramp along the column axis survives resizing (values at the new voxel centres)
    v = make_volume((10, 64, 64), (3.0, 1.0, 1.0), fn=lambda p: p[..., 0])
    arr, g = prepare({"x": v}, _spec(shape=(5, 16, 16)))
    lps = g.index_to_lps(np.stack(np.meshgrid(*[np.arange(s) for s in g.shape], indexing="ij"), -1))
    np.testing.assert_allclose(arr[0], lps[..., 0], atol=1e-3)


def test_antialias_reduces_noise_only_when_downsampling():
    rng = np.random.default_rng(0)
    noisy = make_volume((16, 256, 256), (3.0, 0.6, 0.6))
    noisy.array[:] = rng.standard_normal(noisy.array.shape).astype(np.float32)
    a_plain, _ = prepare({"x": noisy}, _spec(shape=(16, 64, 64)))
    a_aa, _ = prepare({"x": noisy}, _spec(shape=(16, 64, 64), antialias=True))
    assert a_plain[0].std() > 0.4  # linear point sampling keeps most of the white noise
    assert a_aa[0].std() < 0.5 * a_plain[0].std()  # prefiltered: averaged over ~4x4 pixels
    # upsampling: the prefilter is the identity
    small = make_volume((4, 32, 32), (3.0, 2.0, 2.0))
    g = resized_grid(small, (8, 64, 64))
    assert antialias_for(small.array, small.array_affine, g) is small.array


def test_resize_needs_a_shape():
    v = make_volume((4, 16, 16), (3.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        model_grid(v, _spec(shape=None))
    with pytest.raises(ValueError):
        resized_grid(Grid.of(v), (0, 4, 4))


def test_detail_view_keeps_the_acquired_resolution_the_resize_erases():
    """Channel 1 samples the centre at a fixed fine spacing: a fine and a coarse acquisition of
    the same object look alike after the whole-FOV resize but not in the detail view."""
    from scanside.engines.spec import DetailView

    rng = np.random.default_rng(3)
    spec = _spec(shape=(8, 32, 32), antialias=True, normalize="zscore_percentile",
                 detail_views=[DetailView(spacing_mm=(3.0, 0.8, 0.8))])
    assert spec.n_input_channels == 2

    def acquired(n, fov=160.0):
        v = make_volume((16, n, n), (3.0, fov / n, fov / n))
        return v.__class__.from_array_affine(rng.standard_normal(v.shape).astype(np.float32), v.array_affine)

    fine, coarse = acquired(256), acquired(96)
    xf, gf = prepare({"x": fine}, spec)
    xc, _ = prepare({"x": coarse}, spec)
    assert xf.shape == xc.shape == (2, 8, 32, 32)
    # the main channel is the plain resize of the first channel, unchanged by the extra view
    np.testing.assert_array_equal(xf[0], prepare({"x": fine}, _spec(shape=(8, 32, 32), antialias=True,
                                                                     normalize="zscore_percentile"))[0][0])
    hf_main = [float(np.abs(np.diff(x[0], axis=2)).mean()) for x in (xf, xc)]
    hf_detail = [float(np.abs(np.diff(x[1], axis=2)).mean()) for x in (xf, xc)]
    assert hf_main[0] == pytest.approx(hf_main[1], rel=0.25), "the resize already told them apart"
    assert hf_detail[0] > 1.5 * hf_detail[1], hf_detail
    # the detail grid is centred on the series at the requested spacing; the returned grid is the main one
    from scanside.engines.preprocess import detail_grid
    dg = detail_grid(fine, spec, spec.detail_views[0])
    np.testing.assert_allclose(dg.spacing, (3.0, 0.8, 0.8), atol=1e-9)
    np.testing.assert_allclose(dg.center_lps(), fine.center_lps(), atol=0.8)
    assert gf.shape == (8, 32, 32) and not np.allclose(gf.spacing, dg.spacing)
