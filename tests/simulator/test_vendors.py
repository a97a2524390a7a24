"""Vendor writer unit tests on hand-built RenderedSeries (no renderer involved)."""
from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from nibabel.nicom import csareader

from scanside.simulator.model import SeriesSpec
from scanside.simulator.vendors import get_writer, make_study_context
from scanside.simulator.vendors.common import series_scale, to_stored
from tests.simulator.fakes import fake_series

DWI = dict(kind="dwi", n_slices=9, matrix=(64, 64), fov_mm=(200.0, 200.0), fat_sat=True, te_ms=70.0)


def _write(vendor, spec, tmp_path, *, adc=False, **kw):
    ctx = make_study_context(vendor, 11)
    files = get_writer(vendor).write_series(fake_series(spec, adc=adc), ctx, tmp_path / spec.description,
                                            series_number=5, series_uid=ctx.uid("series", 5), **kw)
    return ctx, files, [pydicom.dcmread(f.path) for f in files]


def _private(ds, group, creator, elem):
    blk = ds.private_block(group, creator)
    return ds[blk.get_tag(elem)].value


@pytest.mark.parametrize("vendor", ["siemens", "siemens-xa", "ge", "philips"])
def test_files_parse_and_carry_patient_study(vendor, tmp_path):
    spec = SeriesSpec(description="t2", kind="t2w", n_slices=5, matrix=(64, 48))
    ctx, files, dss = _write(vendor, spec, tmp_path)
    n_img = sum(f.n_images for f in files)
    assert n_img == 5
    for ds in dss:
        arr = ds.pixel_array
        assert arr.shape[-2:] == (64, 48)
        assert ds.PatientName == ctx.patient_name and ds.PatientID == ctx.patient_id
        assert ds.StudyInstanceUID == ctx.study_uid and ds.Modality == "MR"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert float(ds.MagneticFieldStrength) == 3.0
    if vendor == "siemens-xa":
        assert dss[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1" and int(dss[0].NumberOfFrames) == 5
    else:
        assert all(d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" for d in dss)
        assert sorted(int(d.InstanceNumber) for d in dss) == [1, 2, 3, 4, 5]
        assert {int(d.ImagesInAcquisition) for d in dss} == {5}
        assert len({d.SOPInstanceUID for d in dss}) == 5


def test_pixels_round_trip_scaled(tmp_path):
    spec = SeriesSpec(description="t2", kind="t2w", n_slices=3, matrix=(32, 32))
    rs = fake_series(spec)
    ctx = make_study_context("siemens", 1)
    files = get_writer("siemens").write_series(rs, ctx, tmp_path, series_number=2, series_uid=ctx.uid(2))
    peak = max(float(im.pixels.max()) for im in rs.images)
    for f in files:
        stored = pydicom.dcmread(f.path).pixel_array.astype(float)
        expect = f.images[0].pixels * (0.95 * 4095 / peak)
        assert np.abs(stored - expect).max() <= 0.51
    assert to_stored(np.array([[1e9, -5.0]]), 1.0).tolist() == [[4095, 0]]


def test_siemens_dwi_private_and_csa(tmp_path):
    spec = SeriesSpec(description="ep2d_diff_TRACEW", b_values=[50.0, 800.0], **DWI)
    _, files, dss = _write("siemens", spec, tmp_path)
    assert len(dss) == 18
    for f, ds in zip(files, dss):
        b = f.images[0].b_value
        assert ds.SequenceName == f"*ep_b{int(b)}t"
        assert int(_private(ds, 0x0019, "SIEMENS MR HEADER", 0x0C)) == int(b)
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND"]
        assert ds.ScanOptions == ["PFP", "FS"]
        csa = csareader.get_csa_header(ds, "image")
        assert csareader.get_scalar(csa, "B_value") == int(b)
        assert np.allclose(csareader.get_vector(csa, "SliceNormalVector", 3), [0, 0, 1])
        assert csareader.get_csa_header(ds, "series")["n_tags"] > 10
    assert {int(d.ImagesInAcquisition) for d in dss} == {18}


def test_siemens_adc_and_calc_image_types(tmp_path):
    _, _, adc = _write("siemens", SeriesSpec(description="x_ADC", kind="adc", b_values=[50.0, 800.0], **{k: v for k, v in DWI.items() if k != "kind"}), tmp_path)
    assert list(adc[0].ImageType) == ["DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"]
    assert adc[0].pixel_array.max() > 1000  # ADC kept in 1e-6 mm^2/s
    _, _, calc = _write("siemens", SeriesSpec(description="x_CALC", kind="calc_bvalue", b_values=[1400.0], **{k: v for k, v in DWI.items() if k != "kind"}), tmp_path)
    assert "CALC_BVALUE" in calc[0].ImageType and int(_private(calc[0], 0x0019, "SIEMENS MR HEADER", 0x0C)) == 1400


def test_siemens_mosaic_matches_nibabel(tmp_path):
    import nibabel.nicom.dicomwrappers as dw

    spec = SeriesSpec(description="mosaic", b_values=[50.0, 800.0], **DWI)
    _, files, dss = _write("siemens", spec, tmp_path, mosaic=True)
    assert len(files) == 2 and all(f.n_images == 9 for f in files)
    ds = dss[1]
    assert "MOSAIC" in ds.ImageType and ds.pixel_array.shape == (192, 192)
    assert int(_private(ds, 0x0019, "SIEMENS MR HEADER", 0x0A)) == 9
    assert int(ds.ImagesInAcquisition) == 18
    csa = csareader.get_csa_header(ds)
    assert csareader.get_n_mosaic(csa) == 9 and csareader.get_scalar(csa, "B_value") == 800
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = dw.wrapper_from_data(ds)
        assert isinstance(w, dw.MosaicWrapper)
        assert np.allclose(w.image_position, files[1].images[0].position, atol=1e-3)
        assert w.image_shape == (64, 64, 9)
    # tile 4 (row 1, col 1) is slice 4
    scale = series_scale([im for f in files for im in f.images])
    tile = ds.pixel_array[64:128, 64:128]  # tile (row 1, col 1) of a 3x3 mosaic is slice 4
    assert files[1].images[4].slice_index == 4
    assert np.array_equal(tile, to_stored(files[1].images[4].pixels, scale))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vol = w.get_data()
    assert np.array_equal(vol[:, :, 4], tile)  # nibabel unpacks the same tile


def test_ge_bias_and_b0_without_standard_tag(tmp_path):
    spec = SeriesSpec(description="Ax DWI", b_values=[0.0, 1000.0, 1400.0], **DWI)
    _, files, dss = _write("ge", spec, tmp_path)
    seen = set()
    for f, ds in zip(files, dss):
        b = f.images[0].b_value
        slop = [int(v) for v in _private(ds, 0x0043, "GEMS_PARM_01", 0x39)]
        assert len(slop) == 4 and slop[0] == 1_000_000_000 + int(b) and slop[0] % 1_000_000_000 == int(b)
        if b == 0:
            assert "DiffusionBValue" not in ds
        else:
            assert float(ds.DiffusionBValue) == b
        assert ds.ScanningSequence == "EP" and "FS" in ds.ScanOptions
        assert _private(ds, 0x0019, "GEMS_ACQU_01", 0x9C) == "epi2"
        seen.add(b)
    assert seen == {0.0, 1000.0, 1400.0}


def test_ge_t2_carries_the_diffusion_trap(tmp_path):
    _, _, dss = _write("ge", SeriesSpec(description="Ax T2 FRFSE", kind="t2w", n_slices=3, matrix=(32, 32)), tmp_path)
    ds = dss[0]
    assert int(_private(ds, 0x0043, "GEMS_PARM_01", 0x39)[0]) == 1_000_000_000
    assert ds.ScanningSequence == "SE" and _private(ds, 0x0019, "GEMS_ACQU_01", 0x9C) == "fse-xl"
    assert "FS" not in ds.ScanOptions
    _, _, adc = _write("ge", SeriesSpec(description="ADC", kind="adc", b_values=[0.0, 1000.0], **{k: v for k, v in DWI.items() if k != "kind"}), tmp_path)
    assert list(adc[0].ImageType) == ["DERIVED", "PRIMARY", "ADC", "ADC"]


def test_philips_adc_appended_in_dwi_series(tmp_path):
    spec = SeriesSpec(description="DWI_SPAIR", b_values=[50.0, 1000.0, 1400.0], **DWI)
    _, files, dss = _write("philips", spec, tmp_path, adc=True)
    assert len(dss) == 4 * 9 and {d.SeriesInstanceUID for d in dss} == {dss[0].SeriesInstanceUID}
    adc = [d for d in dss if "ADC" in d.ImageType]
    dwi = [d for d in dss if "ADC" not in d.ImageType]
    assert len(adc) == 9 and all(d.DiffusionDirectionality == "ISOTROPIC" for d in adc)
    assert max(int(d.InstanceNumber) for d in dwi) < min(int(d.InstanceNumber) for d in adc)  # appended
    assert sorted({float(_private(d, 0x2001, "Philips Imaging DD 001", 0x03)) for d in dwi}) == [50.0, 1000.0, 1400.0]
    assert {_private(d, 0x2001, "Philips Imaging DD 001", 0x04) for d in dwi} == {"I"}
    assert {float(d.DiffusionBValue) for d in dwi} == {50.0, 1000.0, 1400.0}
    assert all(d.ScanOptions == "" for d in dss) and {int(d.ImagesInAcquisition) for d in dss} == {36}
    assert _private(dwi[0], 0x2005, "Philips MR Imaging DD 001", 0xB0) == 0.0


def test_xa_enhanced_per_frame_b_values(tmp_path):
    spec = SeriesSpec(description="ep2d_diff", b_values=[50.0, 800.0], **DWI)
    _, files, dss = _write("siemens-xa", spec, tmp_path)
    ds = dss[0]
    assert len(files) == 1 and int(ds.NumberOfFrames) == 18 and ds.SoftwareVersions == "syngo MR XA30"
    assert ds.pixel_array.shape == (18, 64, 64)
    assert ds.SpectrallySelectedSuppression == "FAT" and ds.PulseSequenceName == "*ep_b"
    bvals = [float(fg.MRDiffusionSequence[0].DiffusionBValue) for fg in ds.PerFrameFunctionalGroupsSequence]
    assert bvals == [im.b_value for im in files[0].images] and sorted(set(bvals)) == [50.0, 800.0]
    dirs = {fg.MRDiffusionSequence[0].DiffusionDirectionality for fg in ds.PerFrameFunctionalGroupsSequence}
    assert dirs == {"ISOTROPIC"}
    ptrs = [it.DimensionIndexPointer for it in ds.DimensionIndexSequence]
    assert 0x00189087 in ptrs
    for fg, im in zip(ds.PerFrameFunctionalGroupsSequence, files[0].images):
        assert fg.FrameContentSequence[0].InStackPositionNumber == im.slice_index + 1
        assert np.allclose([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient], im.position, atol=1e-3)
    _, _, adc = _write("siemens-xa", SeriesSpec(description="ADC", kind="adc", b_values=[50.0, 800.0], **{k: v for k, v in DWI.items() if k != "kind"}), tmp_path)
    assert list(adc[0].ImageType) == ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips", "siemens-xa"])
def test_dce_temporal_counting(vendor, tmp_path):
    spec = SeriesSpec(description="dce", kind="dce", n_slices=4, matrix=(32, 32), n_phases=3, temporal_resolution_s=10.0,
                      fat_sat=True, tr_ms=4.5, te_ms=1.8, flip_angle_deg=12.0)
    _, files, dss = _write(vendor, spec, tmp_path)
    if vendor == "siemens-xa":
        ds = dss[0]
        assert int(ds.NumberOfFrames) == 12 and int(ds.NumberOfTemporalPositions) == 3
        assert sorted({fg.FrameContentSequence[0].TemporalPositionIndex for fg in ds.PerFrameFunctionalGroupsSequence}) == [1, 2, 3]
        return
    assert len(dss) == 12
    assert {int(d.ImagesInAcquisition) for d in dss} == {4}
    assert {int(d.NumberOfTemporalPositions) for d in dss} == {3}
    assert sorted({int(d.TemporalPositionIdentifier) for d in dss}) == [1, 2, 3]
    if vendor != "philips":
        assert "FS" in dss[0].ScanOptions


def test_philips_enhanced_option(tmp_path):
    spec = SeriesSpec(description="DWI", b_values=[50.0, 1000.0], **DWI)
    _, files, dss = _write("philips", spec, tmp_path, adc=True, enhanced=True)
    ds = dss[0]
    assert int(ds.NumberOfFrames) == 27
    types = [tuple(fg.MRImageFrameTypeSequence[0].FrameType) for fg in ds.PerFrameFunctionalGroupsSequence]
    assert sum("ADC" in t for t in types) == 9


def test_study_context_deterministic_and_distinct():
    a, b, c = make_study_context("ge", 5), make_study_context("ge", 5), make_study_context("ge", 6)
    assert a == b and a.study_uid != c.study_uid and a.patient_id != c.patient_id
    assert a.patient_name.startswith("SIMULATED^PATIENT") and len(a.patient_birth_date) == 8
    assert make_study_context("ge", 5, key=("x",)).study_uid != a.study_uid
