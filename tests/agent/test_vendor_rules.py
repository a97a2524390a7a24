"""Each vendor rule of design.md section 3, on exact synthetic headers."""
from __future__ import annotations

import pytest
from pydicom.uid import generate_uid

from scanside.agent.dicom.classify import classify_header
from scanside.agent.dicom.header import header_from_dataset
from scanside.agent.dicom.vendor import clean_b, plane_of

from .factory import mr_dataset


def _header(**kw):
    ds = mr_dataset(generate_uid(), generate_uid(), **kw)
    return header_from_dataset(ds, "mem")


def _ge_dwi(slop: str, *, with_standard_b=None, scanning="EP", te=80.0, tr=4500.0):
    ds = mr_dataset(generate_uid(), generate_uid(), manufacturer="GE MEDICAL SYSTEMS", scanning=scanning, te=te, tr=tr,
                    description="Ax DWI", image_type=("ORIGINAL", "PRIMARY", "OTHER"))
    block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    block.add_new(0x39, "IS", slop)
    if with_standard_b is not None:
        ds.DiffusionBValue = with_standard_b
    return header_from_dataset(ds, "mem")


def test_ge_bias_modulo_1e9_not_1e4():
    h = _ge_dwi("1000001400\\8\\0\\0")
    assert h.frames[0].b_value == 1400 and "modulo" in h.frames[0].b_source
    # b >= 10000 is implausible here, but the modulo must not wrap it: % 10000 would give 1400 for 11400
    assert _ge_dwi("1000011400\\8\\0\\0").frames[0].b_value is None  # rejected as > 5000, not silently 1400


def test_ge_software_27_b0_without_standard_tag():
    h = _ge_dwi("1000000000\\8\\0\\0")
    assert h.frames[0].b_value == 0


def test_standard_tag_wins_over_ge_private():
    assert _ge_dwi("1000000050\\8\\0\\0", with_standard_b=1400).frames[0].b_value == 1400


def test_ge_private_b_on_non_epi_series_is_not_diffusion():
    """GE writes (0043,1039) on FSE series too: require EPI before calling a series diffusion."""
    h = _ge_dwi("1000000000\\0\\0\\0", scanning="SE", te=102.0, tr=5000.0)
    assert h.frames[0].b_value is None
    label = classify_header([h], h.frames)
    assert label.label == "T2WI_nan"


def test_philips_b_factor_and_isotropic():
    ds = mr_dataset(generate_uid(), generate_uid(), manufacturer="Philips Medical Systems", scanning="SE",
                    description="DWI_SPAIR", image_type=("ORIGINAL", "PRIMARY", "DIFFUSION"))
    ds.ScanningSequence = ["SE", "EP"]
    block = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
    block.add_new(0x03, "FL", 1400.0)
    block.add_new(0x04, "CS", "I")
    h = header_from_dataset(ds, "mem")
    assert h.frames[0].b_value == 1400 and h.frames[0].isotropic
    assert classify_header([h], h.frames).label == "DWI_High"


def test_uih_b_value():
    ds = mr_dataset(generate_uid(), generate_uid(), manufacturer="UIH", scanning="EP", te=70, tr=4000)
    block = ds.private_block(0x0065, "Image Private Header", create=True)
    block.add_new(0x09, "FD", 800.0)
    h = header_from_dataset(ds, "mem")
    assert h.vendor == "uih" and h.frames[0].b_value == 800


def test_siemens_trace_from_sequence_name_and_calc_bvalue():
    ds = mr_dataset(generate_uid(), generate_uid(), scanning="EP", te=70, tr=4500,
                    image_type=("DERIVED", "PRIMARY", "DIFFUSION", "CALC_BVALUE", "TRACEW", "ND"))
    ds.SequenceName = "*ep_b1400t"
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "IS", "1400")
    h = header_from_dataset(ds, "mem")
    f = h.frames[0]
    assert f.isotropic and f.derived == "CALC_BVALUE"
    label = classify_header([h], h.frames)
    assert label.label == "DWI_High" and "calculated" in label.reason


def test_adc_from_image_type_including_xa_form():
    h = _header(image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), scanning="EP", te=70)
    assert classify_header([h], h.frames).label == "ADC"


def test_b_value_cleaning():
    assert clean_b(1403.0) == 1400 and clean_b(48.0) == 50 and clean_b(6000.0) is None and clean_b(-1) is None


@pytest.mark.parametrize("options,expected", [("PFP\\FS", "T2WI_fs"), ("SFS", "T2WI_fs"), ("FAT_SAT", "T2WI_fs"), ("PFP", "T2WI_nan")])
def test_fat_suppression_from_scan_options(options, expected):
    h = _header(ScanOptions=options)
    assert classify_header([h], h.frames).label == expected


def test_enhanced_spectral_suppression_and_philips_unknown():
    h = _header(SpectrallySelectedSuppression="FAT")
    assert classify_header([h], h.frames).label == "T2WI_fs"
    p = _header(manufacturer="Philips Medical Systems")
    label = classify_header([p], p.frames)
    assert label.label == "T2WI_nan" and label.confidence < 0.7 and "private" in label.reason


def test_dce_t1_and_localizer():
    dce = _header(scanning="GR", te=1.5, tr=4.0, NumberOfTemporalPositions=20, description="t1_vibe_dyn")
    assert classify_header([dce], dce.frames).other_kind == "DCE"
    t1 = _header(scanning="SE", te=10.0, tr=600.0, description="t1_tse_tra")
    assert classify_header([t1], t1.frames).other_kind == "T1"
    loc_a = _header(scanning="GR", te=3, tr=8, orientation=(1, 0, 0, 0, 1, 0))
    loc_s = _header(scanning="GR", te=3, tr=8, orientation=(0, 1, 0, 0, 0, -1))
    assert classify_header([loc_a, loc_s], loc_a.frames + loc_s.frames).other_kind == "localizer"


@pytest.mark.parametrize("iop,plane", [
    ((1, 0, 0, 0, 1, 0), "axial"), ((0, 1, 0, 0, 0, -1), "sagittal"), ((1, 0, 0, 0, 0, -1), "coronal"),
    ((1, 0, 0, 0, 0.9659, -0.2588), "axial"),  # 15 degree axial-oblique stays axial (PI-RADS: straight or oblique)
    ((1, 0, 0, 0, 0.6, -0.8), "coronal"),
])
def test_plane(iop, plane):
    assert plane_of(iop) == plane
