"""Vendor rules on real DICOM that nobody here wrote: nibabel's and pydicom's test files, pydicom-data."""
from __future__ import annotations

import shutil

import pydicom
import pytest
from pydicom.data import get_testdata_file

from scanside.agent.dicom.classify import classify_header
from scanside.agent.dicom.header import HeaderError, read_header
from scanside.agent.dicom.series import split_parts


def test_siemens_dwi_b1000_from_private_tag_and_csa(nibabel_dicom, tmp_path):
    h = read_header(nibabel_dicom["siemens_dwi_1000"])
    assert h.vendor == "siemens" and h.is_mosaic
    (frame,) = h.frames
    assert frame.b_value == 1000 and frame.b_source == "Siemens (0019,100C)"
    assert frame.n_slices == 48 and h.n_images == 48  # NumberOfImagesInMosaic from the CSA header
    assert frame.direction == pytest.approx((0.99997449, 0.00505012, -0.00505012))
    # without (0019,100C) the CSA header alone must still give b=1000
    ds = pydicom.dcmread(nibabel_dicom["siemens_dwi_1000"])
    block = ds.private_block(0x0019, "SIEMENS MR HEADER")
    del ds[block.get_tag(0x0C)]
    del ds[block.get_tag(0x0E)]
    stripped = tmp_path / "csa_only.dcm"
    ds.save_as(stripped)
    frame = read_header(stripped).frames[0]
    assert frame.b_value == 1000 and frame.b_source == "Siemens CSA B_value"
    assert frame.direction == pytest.approx((0.99997449, 0.00505012, -0.00505012))


def test_siemens_dwi_b0_and_split_by_b(nibabel_dicom):
    h0 = read_header(nibabel_dicom["siemens_dwi_0"])
    h1 = read_header(nibabel_dicom["siemens_dwi_1000"])
    assert h0.frames[0].b_value == 0
    # both files are one series (same UID): assembly splits it into a b0 and a b1000 part
    assert h0.series_uid == h1.series_uid
    parts = {p.key: p for p in split_parts([h0, h1])}
    assert set(parts) == {"b0", "b1000"}
    assert classify_header(parts["b0"].headers, parts["b0"].frames).label == "DWI_Low"
    high = classify_header(parts["b1000"].headers, parts["b1000"].frames)
    assert high.label == "DWI_High" and high.b_value == 1000


def test_philips_enhanced_mprage_per_frame_geometry(nibabel_dicom):
    h = read_header(nibabel_dicom["philips_mprage"])
    assert h.vendor == "philips" and h.is_enhanced
    assert len(h.frames) == 176 and h.n_images == 176
    positions = {f.position for f in h.frames}
    assert len(positions) == 176  # every frame has its own PlanePositionSequence
    assert all(f.orientation is not None for f in h.frames)
    assert h.pixel_spacing is not None and h.echo_time is not None and h.repetition_time is not None
    label = classify_header([h], h.frames)
    assert label.label == "other" and label.other_kind == "T1"


@pytest.mark.parametrize("name", [
    "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
    "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_padded.dcm",
])
def test_mr_small_in_every_transfer_syntax(name):
    ref = read_header(get_testdata_file("MR_small.dcm"))
    h = read_header(get_testdata_file(name))
    assert (h.series_uid, h.rows, h.columns, h.frames[0].position) == (ref.series_uid, ref.rows, ref.columns, ref.frames[0].position)
    assert h.echo_time == ref.echo_time


def test_truncated_real_file_is_retryable_error():
    with pytest.raises(HeaderError) as exc:
        read_header(get_testdata_file("MR_truncated.dcm"))
    assert exc.value.reason == "truncated" and exc.value.retryable


def test_non_image_dicom_is_not_an_error_to_quarantine():
    with pytest.raises(HeaderError) as exc:
        read_header(get_testdata_file("test-SR.dcm"))
    assert exc.value.reason == "no_pixel_data"


def test_deflated_file_is_checked_by_inflating(tmp_path):
    h = read_header(get_testdata_file("image_dfl.dcm"))
    assert h.rows > 0
    raw = open(get_testdata_file("image_dfl.dcm"), "rb").read()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[: len(raw) - 200])
    with pytest.raises(HeaderError) as exc:
        read_header(cut)
    assert exc.value.reason == "truncated"


def test_pydicom_data_philips_and_siemens():
    """pydicom-data: a Philips MR (JPEG 2000) and a Siemens MR with overlays."""
    philips = read_header(get_testdata_file("MR2_J2KR.dcm"))
    assert philips.vendor == "philips" and philips.modality == "MR"
    siemens = read_header(get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm"))
    assert siemens.vendor == "siemens"
    assert "FS" in siemens.scan_options  # ScanOptions SAT2\FS
    label = classify_header([siemens], siemens.frames)
    assert label.label == "other"  # a 3D gradient-echo MPR is not a T2W series


def test_dicomdir_is_an_index_not_a_bad_file(tmp_path):
    src = get_testdata_file("DICOMDIR")
    shutil.copy(src, tmp_path / "DICOMDIR")
    with pytest.raises(HeaderError) as exc:
        read_header(tmp_path / "DICOMDIR")
    assert exc.value.reason == "dicomdir"


def test_acquired_resolution_from_a_real_siemens_header():
    """pydicom's Siemens file: AcquisitionMatrix [256, 0, 0, 134], phase along COL, 484 x 484 pixels of
    0.723 mm. The acquired resolution is the field of view over the encoding steps on each axis, far
    coarser than the interpolated pixels (which a pixel-spacing check would have passed)."""
    from scanside.agent.dicom.acquisition import acquired_resolution, field_of_view

    h = read_header(get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm"))
    assert h.encoding_steps == (256, 134) and h.phase_direction == "COL"
    rows_mm, cols_mm = field_of_view(h)
    phase, freq = acquired_resolution(h)
    assert phase == pytest.approx(rows_mm / 134, abs=1e-3) and freq == pytest.approx(cols_mm / 256, abs=1e-3)
    assert phase > 2.5 and max(h.pixel_spacing) < 0.75
    # no acquisition matrix: nothing is claimed
    assert acquired_resolution(read_header(get_testdata_file("MR_small.dcm"))) is None


@pytest.mark.parametrize("vendor", ["siemens", "siemens-xa", "ge", "philips"])
def test_acquired_resolution_of_simulated_t2w_per_vendor(vendor, tmp_path):
    """Classic (0018,1310)/(0018,1312) and enhanced MRFOVGeometrySequence give the same answer."""
    from scanside.agent.dicom.acquisition import acquired_resolution
    from scanside.simulator.scanner import simulate_exam

    truth = simulate_exam(vendor, tmp_path, 3, profile="prostate-bpmri")
    t2 = next(s for s in truth.series if s.kind == "t2w" and s.plane == "axial")
    h = read_header(next(p for p in sorted(tmp_path.rglob("*")) if p.is_file() and _series_of(p) == t2.series_uid))
    assert h.encoding_steps == (400, 256)
    assert acquired_resolution(h) == pytest.approx((160 / 256, 160 / 400), abs=1e-3)


def _series_of(path):
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID
    except Exception:
        return None
