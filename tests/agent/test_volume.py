"""scanside.agent.dicom.volume: DICOM frames -> Volume. Real files (pydicom, pydicom-data, nibabel test data)
and synthetic series with exactly known geometry."""
from __future__ import annotations

import gzip
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from scanside.agent.dicom.header import FrameRef
from scanside.agent.dicom.volume import Volume, VolumeError, load_volume

MR = "1.2.840.10008.5.1.4.1.1.4"
ENH_MR = "1.2.840.10008.5.1.4.1.1.4.1"


# ---------------------------------------------------------------------------------------
# synthetic writers
# ---------------------------------------------------------------------------------------


def _base(sop_class: str, rows: int, cols: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    return ds


def _save(ds: Dataset, path: Path) -> str:
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def write_classic(tmp: Path, pixels, positions, iop, ps=(0.5, 0.7), slope=1.0, intercept=0.0, **extra) -> list[str]:
    paths = []
    for k, (img, pos) in enumerate(zip(pixels, positions)):
        ds = _base(MR, *img.shape)
        ds.ImagePositionPatient = [float(x) for x in pos]
        ds.ImageOrientationPatient = [float(x) for x in iop]
        ds.PixelSpacing = [float(x) for x in ps]
        ds.SliceThickness = 3.0
        ds.RescaleSlope = slope[k] if isinstance(slope, (list, tuple)) else slope
        ds.RescaleIntercept = intercept
        ds.InstanceNumber = k + 1
        for key, v in extra.items():
            setattr(ds, key, v)
        ds.PixelData = np.ascontiguousarray(img.astype(np.uint16)).tobytes()
        paths.append(_save(ds, tmp / f"IM{k:04d}.dcm"))
    return paths


def oblique_iop(deg_x: float = 15.0, deg_z: float = 10.0) -> np.ndarray:
    """Row/column cosines of an axial plane tilted about x then z (orthonormal)."""
    ax, az = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rot = rz @ rx
    return np.concatenate([rot[:, 0], rot[:, 1]])


def _geometry(iop, n, step, origin):
    r, c = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(r, c)
    return [np.asarray(origin) + k * step * normal for k in range(n)], normal


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------------------
# synthetic classic
# ---------------------------------------------------------------------------------------


def test_classic_oblique_shuffled_sort_spacing_affine(tmp_path, rng):
    iop = oblique_iop(15, 10)
    n, rows, cols, step = 7, 12, 10, 3.3
    origin = np.array([-40.0, 25.0, 60.0])
    pos, normal = _geometry(iop, n, step, origin)
    imgs = [rng.integers(0, 4000, (rows, cols)).astype(np.uint16) for _ in range(n)]
    paths = write_classic(tmp_path, imgs, pos, iop, ps=(0.5, 0.7), slope=0.5, intercept=-10.0)
    order = list(range(n))
    random.Random(3).shuffle(order)
    vol = load_volume([FrameRef(path=paths[k]) for k in order])

    assert vol.array.dtype == np.float32 and vol.shape == (n, rows, cols)
    np.testing.assert_allclose(vol.array, np.stack(imgs).astype(np.float32) * 0.5 - 10.0)
    np.testing.assert_allclose(vol.spacing, (step, 0.5, 0.7), atol=1e-6)
    expected = np.eye(4)
    expected[:3, 0] = iop[:3] * 0.7  # column index: along the row cosine, column spacing
    expected[:3, 1] = iop[3:] * 0.5  # row index: along the column cosine, row spacing
    expected[:3, 2] = normal * step
    expected[:3, 3] = origin
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    np.testing.assert_allclose(vol.slice_positions, [p @ normal for p in pos], atol=1e-6)
    assert not vol.irregular_spacing and vol.warnings == []
    # every voxel centre maps to its slice's IPP + in-plane offsets
    k, i, j = 4, 3, 2
    world = vol.affine @ [j, i, k, 1]
    np.testing.assert_allclose(world[:3], pos[k] + j * 0.7 * iop[:3] + i * 0.5 * iop[3:], atol=1e-6)
    assert vol.plane == "axial" and vol.axcodes == "SPL"
    assert 14.9 < vol.obliquity_deg < 20


def test_classic_slices_written_descending_are_sorted_ascending(tmp_path, rng):
    iop = np.array([1.0, 0, 0, 0, 1.0, 0])
    pos = [np.array([0, 0, 10.0 - 3 * k]) for k in range(5)]  # descending z
    imgs = [np.full((4, 4), k, np.uint16) for k in range(5)]
    paths = write_classic(tmp_path, imgs, pos, iop)
    vol = load_volume([FrameRef(path=p) for p in paths])
    np.testing.assert_allclose(vol.array[:, 0, 0], [4, 3, 2, 1, 0])
    np.testing.assert_allclose(vol.affine[:3, 3], [0, 0, -2.0])
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, 3.0])


def test_classic_per_slice_rescale(tmp_path):
    iop = [1.0, 0, 0, 0, 1.0, 0]
    pos = [(0, 0, 2.0 * k) for k in range(3)]
    imgs = [np.full((4, 4), 10, np.uint16) for _ in range(3)]
    paths = write_classic(tmp_path, imgs, pos, iop, slope=[1.0, 2.0, 3.0])
    vol = load_volume([FrameRef(path=p) for p in paths])
    np.testing.assert_allclose(vol.array[:, 0, 0], [10, 20, 30])


def test_irregular_spacing_is_flagged(tmp_path):
    iop = [1.0, 0, 0, 0, 1.0, 0]
    pos = [(0, 0, z) for z in (0.0, 3.0, 6.0, 12.0, 15.0)]  # one slice missing
    imgs = [np.zeros((4, 4), np.uint16) for _ in pos]
    paths = write_classic(tmp_path, imgs, pos, iop)
    vol = load_volume([FrameRef(path=p) for p in paths])
    assert vol.irregular_spacing
    assert any("irregular" in w for w in vol.warnings)
    np.testing.assert_allclose(vol.spacing[0], 3.0)
    np.testing.assert_allclose(vol.slice_positions, [0, 3, 6, 12, 15])


def test_errors_mixed_orientation_size_duplicate_missing(tmp_path):
    for sub in "abcd":
        (tmp_path / sub).mkdir()
    a = write_classic(tmp_path / "a", [np.zeros((4, 4))], [(0, 0, 0)], [1.0, 0, 0, 0, 1, 0])
    b = write_classic(tmp_path / "b", [np.zeros((4, 4))], [(0, 0, 3)], [1.0, 0, 0, 0, 0, -1])
    with pytest.raises(VolumeError) as e:
        load_volume([FrameRef(path=a[0]), FrameRef(path=b[0])])
    assert e.value.reason == "mixed_orientation"

    c = write_classic(tmp_path / "c", [np.zeros((5, 4))], [(0, 0, 3)], [1.0, 0, 0, 0, 1, 0])
    with pytest.raises(VolumeError) as e:
        load_volume([FrameRef(path=a[0]), FrameRef(path=c[0])])
    assert e.value.reason == "mixed_size"

    d = write_classic(tmp_path / "d", [np.zeros((4, 4))] * 2, [(0, 0, 0), (0, 0, 0)], [1.0, 0, 0, 0, 1, 0])
    with pytest.raises(VolumeError) as e:
        load_volume([FrameRef(path=p) for p in d])
    assert e.value.reason == "duplicate_position"

    ds = pydicom.dcmread(a[0])
    del ds.ImagePositionPatient
    ds.save_as(str(tmp_path / "nogeo.dcm"))
    with pytest.raises(VolumeError) as e:
        load_volume([FrameRef(path=str(tmp_path / "nogeo.dcm"))])
    assert e.value.reason == "missing_geometry"

    with pytest.raises(VolumeError) as e:
        load_volume([])
    assert e.value.reason == "no_frames"


# ---------------------------------------------------------------------------------------
# synthetic enhanced multi-frame
# ---------------------------------------------------------------------------------------


def write_enhanced(path: Path, pixels: np.ndarray, positions, iop, ps=(0.8, 0.9), slopes=None) -> str:
    n, rows, cols = pixels.shape
    ds = _base(ENH_MR, rows, cols)
    ds.NumberOfFrames = n
    shared = Dataset()
    po = Dataset()
    po.ImageOrientationPatient = [float(x) for x in iop]
    shared.PlaneOrientationSequence = Sequence([po])
    pm = Dataset()
    pm.PixelSpacing = [float(x) for x in ps]
    pm.SliceThickness = 2.0
    shared.PixelMeasuresSequence = Sequence([pm])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for k in range(n):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [float(x) for x in positions[k]]
        item.PlanePositionSequence = Sequence([pp])
        if slopes is not None:
            pvt = Dataset()
            pvt.RescaleSlope = slopes[k]
            pvt.RescaleIntercept = 1.0
            pvt.RescaleType = "US"
            item.PixelValueTransformationSequence = Sequence([pvt])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    return _save(ds, path)


def test_enhanced_per_frame_geometry_and_rescale(tmp_path, rng):
    iop = oblique_iop(-20, 5)
    n = 6
    pos, normal = _geometry(iop, n, 2.5, (10.0, -5.0, 30.0))
    order = [3, 0, 5, 1, 4, 2]  # frames stored out of spatial order
    pix = rng.integers(0, 1000, (n, 8, 9)).astype(np.uint16)
    slopes = [1.0, 2.0, 0.5, 1.5, 3.0, 1.0]
    p = write_enhanced(tmp_path / "enh.dcm", pix, [pos[k] for k in order], iop, slopes=slopes)
    vol = load_volume([FrameRef(path=p, frame_index=i) for i in range(n)])
    assert vol.shape == (n, 8, 9)
    expected = pix.astype(np.float32) * np.asarray(slopes, np.float32)[:, None, None] + 1.0
    inv = np.argsort(order)  # spatial slice s is frame inv[s]
    np.testing.assert_allclose(vol.array, expected[inv], rtol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 3], pos[0], atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 2], normal * 2.5, atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 0], iop[:3] * 0.9, atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 1], iop[3:] * 0.8, atol=1e-6)

    # a subset of frames (e.g. one b-value of a multi-b file)
    sub = load_volume([FrameRef(path=p, frame_index=i) for i in (0, 2, 4)])
    assert sub.shape[0] == 3
    np.testing.assert_allclose(sorted(sub.slice_positions), sub.slice_positions)
    with pytest.raises(VolumeError) as e:
        load_volume([FrameRef(path=p, frame_index=n)])
    assert e.value.reason == "bad_frame_index"

    # a decode cache shared across calls (the b-values of one file): decoded once
    cache: dict = {}
    a = load_volume([FrameRef(path=p, frame_index=i) for i in (0, 1, 2)], cache=cache)
    ds_a = cache[p][0]
    b = load_volume([FrameRef(path=p, frame_index=i) for i in (3, 4, 5)], cache=cache)
    assert len(cache) == 1 and cache[p][0] is ds_a
    assert a.shape[0] == b.shape[0] == 3


# ---------------------------------------------------------------------------------------
# synthetic mosaic
# ---------------------------------------------------------------------------------------


def test_mosaic_unpacks_known_slices(tmp_path, rng):
    n, r, c = 7, 6, 5
    m = 3  # ceil(sqrt(7))
    slices = rng.integers(1, 500, (n, r, c)).astype(np.uint16)
    mosaic = np.zeros((m * r, m * c), np.uint16)
    for k in range(n):
        mosaic[(k // m) * r:(k // m + 1) * r, (k % m) * c:(k % m + 1) * c] = slices[k]
    iop = oblique_iop(12, 0)
    rcos, ccos = iop[:3], iop[3:]
    ps = (2.0, 2.5)
    first = np.array([-30.0, -20.0, 5.0])  # true position of tile 0's voxel (0, 0)
    # Siemens writes the position as if the whole mosaic were one image centred on the slab
    mos_pos = first - (ccos * ps[0] * (m * r - r) / 2 + rcos * ps[1] * (m * c - c) / 2)
    ds = _base(MR, m * r, m * c)
    ds.Manufacturer = "SIEMENS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND", "MOSAIC"]
    ds.ImagePositionPatient = list(map(float, mos_pos))
    ds.ImageOrientationPatient = list(map(float, iop))
    ds.PixelSpacing = list(ps)
    ds.SpacingBetweenSlices = 3.5
    ds.SliceThickness = 3.0
    ds.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
    ds.add_new((0x0019, 0x100A), "US", n)
    ds.PixelData = mosaic.tobytes()
    p = _save(ds, tmp_path / "mosaic.dcm")
    vol = load_volume([FrameRef(path=p)])
    assert vol.shape == (n, r, c)
    np.testing.assert_array_equal(vol.array, slices.astype(np.float32))
    np.testing.assert_allclose(vol.affine[:3, 3], first, atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 2], np.cross(rcos, ccos) * 3.5, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, (3.5, 2.0, 2.5), atol=1e-6)


# ---------------------------------------------------------------------------------------
# real files nobody here wrote
# ---------------------------------------------------------------------------------------

NIB_DATA = Path(__import__("nibabel").__file__).parent / "nicom" / "tests" / "data"


def _gunzip(name: str, tmp: Path) -> str:
    src = NIB_DATA / name
    if not src.exists():
        pytest.skip(f"nibabel test file {name} not installed")
    dst = tmp / name[:-3]
    with gzip.open(src) as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g)
    return str(dst)


def _nib_single_slice_affine(w) -> np.ndarray:
    """nibabel's affine for one classic image as (col, row, slice): nibabel's single-image
    slice normal is column_cosine x row_cosine, the DICOM one row x column: negate it."""
    a = w.affine[:, [1, 0, 2, 3]].copy()
    a[:3, 2] *= -1
    return a


def _nib_wrapper(path: str):
    from nibabel.nicom import dicomwrappers as dw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dw.wrapper_from_data(pydicom.dcmread(path))


@pytest.mark.parametrize("name", ["siemens_dwi_1000.dcm.gz", "siemens_dwi_0.dcm.gz"])
def test_real_siemens_mosaic_matches_nibabel(tmp_path, name):
    p = _gunzip(name, tmp_path)
    vol = load_volume([FrameRef(path=p)])
    w = _nib_wrapper(p)
    assert vol.shape == (48, 128, 128)
    # nibabel's affine maps (row, col, slice); ours (col, row, slice): swap the first two columns
    np.testing.assert_allclose(vol.affine, w.affine[:, [1, 0, 2, 3]], atol=1e-4)
    np.testing.assert_allclose(vol.spacing, (3.0, 1.796875, 1.796875), atol=1e-4)
    assert vol.plane == "axial" and vol.axcodes == "SPL"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = w.get_data()  # (rows, cols, slices)
    np.testing.assert_allclose(vol.array, np.transpose(ref, (2, 0, 1)))


def test_real_philips_enhanced_matches_nibabel(tmp_path):
    p = _gunzip("philips_mprage.dcm.gz", tmp_path)
    n = int(pydicom.dcmread(p, stop_before_pixels=True).NumberOfFrames)
    vol = load_volume([FrameRef(path=p, frame_index=i) for i in range(n)])
    w = _nib_wrapper(p)
    assert vol.shape == (176, 256, 256)
    assert vol.plane == "sagittal"
    nib_aff = w.affine  # (row, col, slice), nibabel's slice normal = -(row_cos x col_cos)
    # same voxel->world mapping once the slice axis is reversed
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, n - 1
    np.testing.assert_allclose(vol.affine, (nib_aff @ flip)[:, [1, 0, 2, 3]], atol=5e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = np.asarray(w.get_data(), dtype=np.float32)  # (rows, cols, slices), scaled
    np.testing.assert_allclose(vol.array, np.transpose(ref, (2, 0, 1))[::-1], rtol=1e-5)
    # (the pixels of this test file are zeroed: geometry is what it tests)


def test_real_mr_small_all_transfer_syntaxes_decode_alike():
    from pydicom.data import get_testdata_file

    ref = load_volume([FrameRef(path=get_testdata_file("MR_small.dcm"))])
    w = _nib_wrapper(get_testdata_file("MR_small.dcm"))
    np.testing.assert_allclose(ref.affine, _nib_single_slice_affine(w), atol=1e-5)
    names = [
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_padded.dcm",
    ]
    for name in names:
        vol = load_volume([FrameRef(path=get_testdata_file(name))])
        np.testing.assert_array_equal(vol.array, ref.array, err_msg=name)
        np.testing.assert_allclose(vol.affine, ref.affine, err_msg=name)


def _data_store(name: str) -> str:
    from pydicom.data import get_testdata_file

    try:
        p = get_testdata_file(name)
    except Exception:  # pragma: no cover - offline without pydicom-data
        p = None
    if not p or not os.path.exists(p):
        pytest.skip(f"{name} not available offline")
    return p


def test_real_philips_oblique_1024_lossless_j2k_equals_uncompressed():
    unc = load_volume([FrameRef(path=_data_store("MR2_UNCR.dcm"))])
    j2k = load_volume([FrameRef(path=_data_store("MR2_J2KR.dcm"))])
    np.testing.assert_array_equal(unc.array, j2k.array)
    w = _nib_wrapper(_data_store("MR2_UNCR.dcm"))
    np.testing.assert_allclose(unc.affine, _nib_single_slice_affine(w), atol=1e-4)
    ds = pydicom.dcmread(_data_store("MR2_UNCR.dcm"))
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(unc.array[0], expected, rtol=1e-6)
    assert unc.shape == (1, 1024, 1024)


def test_real_errors_truncated_and_no_geometry():
    from pydicom.data import get_testdata_file

    with pytest.raises(VolumeError) as e:
        load_volume([FrameRef(path=get_testdata_file("MR_truncated.dcm"))])
    assert e.value.reason == "unreadable_pixel_data"
    # enhanced MR without any functional groups: decodes, but has no geometry
    with pytest.raises(VolumeError) as e:
        load_volume([FrameRef(path=_data_store("emri_small.dcm"))])
    assert e.value.reason == "missing_geometry"


def test_to_nifti_is_ras_and_consistent():
    from pydicom.data import get_testdata_file

    vol = load_volume([FrameRef(path=get_testdata_file("MR_small.dcm"))])
    img = vol.to_nifti()
    assert img.shape == (64, 64, 1)
    lps = vol.affine @ [3, 5, 0, 1]
    ras = img.affine @ [3, 5, 0, 1]
    np.testing.assert_allclose(ras[:3], lps[:3] * [-1, -1, 1])
    assert img.get_fdata()[3, 5, 0] == vol.array[0, 5, 3]
    assert isinstance(Volume.from_array_affine(vol.array, vol.array_affine), Volume)
