"""scanside.engines.preprocess: reorient, resample, crop/pad, normalise, prepare, sliding window."""
from __future__ import annotations

import numpy as np
import pytest

from scanside.agent.dicom.volume import Volume
from scanside.engines.preprocess import (
    Grid,
    crop_or_pad,
    importance_map,
    model_grid,
    normalize,
    prepare,
    reorient,
    resample,
    resample_to_reference,
    sliding_window,
)
from scanside.engines.spec import PreprocessSpec, WindowSpec


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    ax, ay, az = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# array-axis directions (slice normal, column cosine, row cosine) of straight acquisitions
AXIAL = np.array([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]]).T  # S, P, L  ("SPL")
SAGITTAL = np.array([[-1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]).T  # R, I, P (IOP 0,1,0,0,0,-1)


def make_volume(shape, spacing, rot=np.eye(3), center=(0.0, 0.0, 0.0), fn=None, base=AXIAL) -> Volume:
    """A volume whose array axes (slice, row, col) run along rot @ base (columns), centred on
    `center` (LPS); voxel values = fn(LPS of the voxel centre)."""
    shape = tuple(shape)
    aff = np.eye(4)
    aff[:3, :3] = (rot @ base) * np.asarray(spacing, float)
    c_idx = (np.asarray(shape, float) - 1) / 2
    aff[:3, 3] = np.asarray(center, float) - aff[:3, :3] @ c_idx
    if fn is None:
        arr = np.zeros(shape, np.float32)
    else:
        idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
        arr = fn(idx @ aff[:3, :3].T + aff[:3, 3]).astype(np.float32)
    return Volume.from_array_affine(arr, aff)


def ramp(xyz):
    return 100.0 + 2.0 * xyz[..., 0] - 1.5 * xyz[..., 1] + 0.7 * xyz[..., 2]


def _world(grid: Grid) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), -1).astype(float)
    return grid.index_to_lps(idx)


def _interior(shape, margin):
    return tuple(slice(margin[a], shape[a] - margin[a]) for a in range(3))


# ---------------------------------------------------------------------------------------


def test_volume_affine_conventions():
    v = make_volume((4, 5, 6), (3.0, 0.5, 0.7), rotation(10, 0, 5))
    np.testing.assert_allclose(v.spacing, (3.0, 0.5, 0.7))
    np.testing.assert_allclose(v.affine[:, 0], v.array_affine[:, 2])  # contract: (col, row, slice)
    g = Grid.of(v)
    ijk = np.array([[1, 2, 3], [0, 0, 0]])
    np.testing.assert_allclose(g.lps_to_index(g.index_to_lps(ijk)), ijk, atol=1e-9)


def test_resample_preserves_extent_and_maps_points():
    rot = rotation(12, -8, 20)
    v = make_volume((10, 40, 30), (3.0, 0.5, 0.7), rot, center=(5, -10, 20), fn=ramp)
    r = resample(v, (1.5, 1.0, 0.35))
    assert r.shape == (20, 20, 60)
    np.testing.assert_allclose(r.spacing, (1.5, 1.0, 0.35), atol=1e-9)
    np.testing.assert_allclose(np.asarray(r.shape) * r.spacing, np.asarray(v.shape) * v.spacing)
    np.testing.assert_allclose(r.center_lps(), v.center_lps(), atol=1e-9)
    np.testing.assert_allclose(r.direction, v.direction, atol=1e-12)
    # FOV edges coincide: the corner of voxel 0 is the same point
    corner = lambda vol: vol.array_affine[:3, :3] @ [-0.5, -0.5, -0.5] + vol.array_affine[:3, 3]
    np.testing.assert_allclose(corner(r), corner(v), atol=1e-9)
    # linear interpolation reproduces a linear field exactly at every interior voxel
    expected = ramp(_world(Grid.of(r)))
    inner = _interior(r.shape, (1, 1, 1))
    np.testing.assert_allclose(r.array[inner], expected[inner], rtol=1e-5, atol=1e-3)


def test_resample_known_point_lands_on_right_voxel():
    v = make_volume((9, 21, 21), (3.0, 1.0, 1.0))
    p = np.array([3.0, -4.0, 6.0])
    ijk = np.round(Grid.of(v).lps_to_index(p)).astype(int)
    v.array[tuple(ijk)] = 1000.0
    r = resample(v, (1.5, 0.5, 0.5), order=0)
    hot = np.argwhere(r.array == 1000.0)
    centre = Grid.of(r).index_to_lps(hot.mean(0))
    np.testing.assert_allclose(centre, Grid.of(v).index_to_lps(ijk), atol=1e-6)


def test_reorient_round_trip_and_values_follow_world():
    v = make_volume((6, 7, 8), (3.0, 0.6, 0.8), rotation(5, 3, -4), fn=ramp)
    assert v.axcodes == "SPL"
    for codes in ("RAI", "LPS", "PIR", "ASL"):
        o = reorient(v, codes)
        assert o.axcodes == codes
        np.testing.assert_allclose(o.array, ramp(_world(Grid.of(o))), rtol=1e-5, atol=1e-3)
        back = reorient(o, "SPL")
        np.testing.assert_array_equal(back.array, v.array)
        np.testing.assert_allclose(back.affine, v.affine, atol=1e-9)


def test_resample_to_reference_other_orientation_and_fov():
    ref = make_volume((12, 64, 64), (3.0, 0.5, 0.5), rotation(10, 0, 0), center=(0, 0, 0))
    # a sagittal acquisition (slices run left-right) with coarser voxels and a shifted FOV
    mov = make_volume((20, 40, 40), (2.0, 1.2, 1.2), rotation(0, 5, 0), center=(15, -3, 4), fn=ramp, base=SAGITTAL)
    assert mov.plane == "sagittal"
    out = resample_to_reference(mov, ref)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.affine, ref.affine)
    world = _world(Grid.of(ref))
    src_idx = Grid.of(mov).lps_to_index(world)
    inside = np.all((src_idx >= 0) & (src_idx <= np.asarray(mov.shape) - 1), axis=-1)
    outside = np.any((src_idx < -0.5) | (src_idx > np.asarray(mov.shape) - 0.5), axis=-1)
    assert inside.sum() > 1000 and outside.sum() > 1000
    np.testing.assert_allclose(out.array[inside], ramp(world)[inside], rtol=1e-5, atol=1e-3)
    assert np.all(out.array[outside] == 0)


def test_crop_or_pad_center_and_point():
    v = make_volume((10, 20, 30), (2.0, 1.0, 1.0), fn=ramp)
    c = crop_or_pad(v, (4, 10, 40))  # crop two axes, pad the third
    assert c.shape == (4, 10, 40)
    g = Grid.of(c)
    np.testing.assert_allclose(c.array[:, :, 5:35], ramp(_world(g))[:, :, 5:35], rtol=1e-6)
    assert np.all(c.array[:, :, :5] == 0) and np.all(c.array[:, :, 35:] == 0)
    # centred (within half a voxel on each axis)
    assert np.all(np.abs(g.lps_to_index(v.center_lps()) - (np.asarray(c.shape) - 1) / 2) <= 0.5 + 1e-9)
    # around a point: the point's voxel becomes the window's centre voxel
    p = Grid.of(v).index_to_lps([7, 3, 25])
    cp = crop_or_pad(v, (5, 9, 11), center_lps=p)
    np.testing.assert_allclose(Grid.of(cp).lps_to_index(p), [2, 4, 5], atol=1e-9)
    assert cp.array[2, 4, 5] == v.array[7, 3, 25]


def test_normalize_statistics():
    rng = np.random.default_rng(1)
    a = rng.gamma(2.0, 100.0, (8, 32, 32)).astype(np.float32)
    a[0, 0, :5] = 1e6  # outliers
    z = normalize(a, "zscore_percentile", (0.5, 99.5))
    assert z.dtype == np.float32
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-4
    lo, hi = np.percentile(a, [0.5, 99.5])
    ref = np.clip(a, lo, hi)
    np.testing.assert_allclose(z, (ref - ref.mean()) / ref.std(), rtol=1e-4, atol=1e-4)
    b = a.copy()
    b[:, :8] = 0
    zn = normalize(b, "zscore_nonzero")
    assert np.all(zn[:, :8] == 0)
    nz = zn[b != 0]
    assert abs(float(nz.mean())) < 1e-4 and abs(float(nz.std()) - 1) < 1e-4
    np.testing.assert_array_equal(normalize(a, "none"), a)
    with pytest.raises(ValueError):
        normalize(a, "minmax")


def _sphere(center, radius, value=1000.0):
    center = np.asarray(center, float)

    def fn(xyz):
        return np.where(np.linalg.norm(xyz - center, axis=-1) <= radius, value, 10.0)

    return fn


def test_prepare_puts_one_point_at_one_place_in_every_channel():
    p = np.array([6.0, -12.0, 9.0])  # lesion (LPS)
    t2 = make_volume((24, 200, 200), (3.0, 0.5, 0.5), rotation(8, 0, 0), center=(0, 0, 0), fn=_sphere(p, 12.0))
    adc = make_volume((20, 80, 80), (3.6, 2.0, 2.0), rotation(-5, 4, 10), center=(4, -6, 3), fn=_sphere(p, 12.0))
    hbv = make_volume((30, 70, 60), (2.5, 1.5, 1.8), center=(-3, 2, 5), fn=_sphere(p, 12.0), base=SAGITTAL)
    spec = PreprocessSpec(channels=["T2WI_nan", "ADC", "DWI_High"], spacing_mm=(3.0, 0.5, 0.5), shape=(20, 160, 160))
    x, grid = prepare({"T2WI_nan": t2, "ADC": adc, "DWI_High": hbv}, spec)
    assert x.shape == (3, 20, 160, 160) and x.dtype == np.float32
    assert grid.axcodes == "SPL" and grid.shape == (20, 160, 160)
    np.testing.assert_allclose(grid.spacing, (3.0, 0.5, 0.5), atol=1e-9)
    for c in range(3):
        raw = x[c]
        hot = raw > (raw.max() + raw.min()) / 2
        assert hot.sum() > 100
        centroid = grid.index_to_lps(np.argwhere(hot).mean(0))
        assert np.linalg.norm(centroid - p) < 1.0, (c, centroid)
        assert abs(float(raw.mean())) < 1e-3 and abs(float(raw.std()) - 1) < 1e-3

    # crop around a point: that point lands on the centre voxel of the model grid
    spec_g = spec.model_copy(update={"crop": "gland", "shape": (8, 64, 64)})
    xg, gg = prepare({"T2WI_nan": t2, "ADC": adc, "DWI_High": hbv}, spec_g, center_lps=p)
    assert xg.shape == (3, 8, 64, 64)
    assert np.all(np.abs(gg.lps_to_index(p) - (np.asarray(gg.shape) - 1) / 2) <= 0.5 + 1e-6)
    with pytest.raises(ValueError):
        prepare({"T2WI_nan": t2, "ADC": adc, "DWI_High": hbv}, spec_g)
    with pytest.raises(KeyError):
        prepare({"T2WI_nan": t2}, spec)


def test_model_grid_without_shape_keeps_extent():
    t2 = make_volume((10, 100, 100), (3.0, 0.6, 0.6))
    spec = PreprocessSpec(channels=["T2WI_nan"], spacing_mm=(3.0, 0.5, 0.5), shape=None)
    g = model_grid(t2, spec)
    assert g.shape == (10, 120, 120)
    np.testing.assert_allclose(g.center_lps(), t2.center_lps(), atol=1e-9)


def _direct(fn, a):
    return fn(a[None])[0]


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_sliding_window_reproduces_direct_run_for_pointwise_linear_fn(blend):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(2, 13, 50, 45)).astype(np.float32)
    calls = []

    def fn(batch):
        calls.append(batch.shape[0])
        mix = np.array([[1.0, -2.0], [0.5, 0.25], [0.0, 3.0]], np.float32)  # 2 -> 3 channels
        return np.einsum("oc,bcxyz->boxyz", mix, batch) + 1.0

    out = sliding_window(fn, a, WindowSpec(roi=(8, 32, 32), overlap=0.5, blend=blend), batch_size=3)
    assert out.shape == (3, 13, 50, 45)
    np.testing.assert_allclose(out, _direct(fn, a), rtol=1e-5, atol=1e-5)
    assert max(calls) <= 3 and sum(calls) > 1


def test_sliding_window_smooth_fn_close_and_small_volume_padded():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    a = ndimage.gaussian_filter(rng.normal(size=(1, 16, 48, 48)), 3).astype(np.float32)

    def smooth(batch):
        return ndimage.uniform_filter(batch, size=(1, 1, 3, 3, 3), mode="nearest")

    out = sliding_window(smooth, a, WindowSpec(roi=(16, 32, 32), overlap=0.5))
    ref = _direct(smooth, a)
    # window borders differ only by the filter's edge handling, weighted down by the gaussian
    assert np.max(np.abs(out - ref)) < 0.1 * np.max(np.abs(ref))
    small = rng.normal(size=(1, 5, 20, 20)).astype(np.float32)
    out_small = sliding_window(lambda b: 2 * b, small, WindowSpec(roi=(8, 32, 32)))
    np.testing.assert_allclose(out_small, 2 * small, rtol=1e-6)


def test_importance_map_gaussian():
    w = importance_map((8, 16, 16), "gaussian", 0.125)
    assert w.shape == (8, 16, 16) and w.min() > 0
    assert w[4, 8, 8] == pytest.approx(1.0)
    assert w[0, 0, 0] < 0.01
