"""Issue 19: header decoding held to dcm2niix's validation data, one test per finding.

Real files (../shared/realdata, read in place; skipped where absent) where we have them; pydicom-built
files reproducing the tag patterns of the validation sets we do not have (dcm_qa_ge, dcm_qa_philips,
dcm_qa_toshiba, dcm_qa_xa30, dcm_qa_sag).
"""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from scanside.agent.dicom.classify import classify_header, diffusion_evidence
from scanside.agent.cli import main as cli_main
from scanside.agent.dicom.header import HeaderError, header_from_dataset, read_header
from scanside.agent.dicom.series import expected_count, split_parts, summarise

from .factory import mr_dataset, write
from .realdata import DCM_QA_NIH, QIN_ADC, dicom_files, need, stream

GE = "GE MEDICAL SYSTEMS"
PHILIPS = "Philips Medical Systems"


def _summaries(headers):
    return [summarise(p, 1, True, None) for p in split_parts(headers)]


def _ge(slop: str, *, b_series=None, **kw):
    ds = mr_dataset(kw.pop("series_uid", generate_uid()), kw.pop("study_uid", generate_uid()), manufacturer=GE, **kw)
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", slop)
    if b_series is not None:
        ds.private_block(0x0025, "GEMS_SERS_01", create=True).add_new(0x07, "SL", b_series)
    return ds


def _philips(b: float, **kw):
    ds = mr_dataset(generate_uid(), generate_uid(), manufacturer=PHILIPS, **kw)
    ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "FL", b)
    return ds


# ------------------------------------------------------------------ 1. non-diffusion EPI is not DWI b=0
def test_real_ge_fmri_with_zero_b_tag_is_not_diffusion():
    folder = need(DCM_QA_NIH) / "In" / "20180918GE" / "mr_0004"
    headers = [read_header(p) for p in dicom_files(folder)[:15]]
    assert headers[0].vendor == "ge" and headers[0].epi
    assert {h.frames[0].b_value for h in headers} == {0.0}  # (0043,1039) = 0 on every fMRI image
    assert diffusion_evidence(headers) is None
    (s,) = _summaries(headers)
    assert s.label == "other" and s.b_values == [] and "echo-planar without diffusion" in s.reason


@pytest.mark.parametrize("make", [
    lambda: _ge("0\\268435456\\0\\0", scanning=["EP", "GR"], te=30.0, tr=2000.0, description="fMRI",
                image_type=("ORIGINAL", "PRIMARY", "EPI", "NONE"), NumberOfTemporalPositions=10),
    lambda: _ge("0\\0\\0\\0", scanning=["EP", "GR"], te=4.0, tr=700.0, description="B0 field map"),
    lambda: _ge("1000000000\\0\\0\\0", scanning=["EP", "GR"], te=25.0, tr=2500.0, description="multiphase EPI",
                NumberOfTemporalPositions=40),
    lambda: _philips(0.0, scanning=["GR"], te=30.0, tr=2000.0, description="fMRI_EPI", SequenceName="FEEPI"),
    lambda: _philips(0.0, scanning=["GR"], te=14.0, tr=4200.0, description="pCASL", SequenceName="FEEPI",
                     image_type=("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE")),
])
def test_zero_b_tag_on_non_diffusion_epi_is_not_dwi(make):
    h = header_from_dataset(make(), "mem")
    assert h.epi
    (s,) = _summaries([h])
    assert s.label == "other" and s.b_values == [], s.reason


def test_ge_dwi_b0_part_keeps_its_label_from_the_series():
    """The b0 images of a DWI series carry no evidence of their own: the series' b=1000 files decide."""
    series, study = generate_uid(), generate_uid()
    kw = dict(series_uid=series, study_uid=study, scanning=["EP", "SE"], te=80.0, tr=4500.0, description="Ax DWI")
    headers = [header_from_dataset(_ge("1000000000\\8\\0\\0", **kw), "b0"),
               header_from_dataset(_ge("1000001000\\8\\0\\0", **kw), "b1000")]
    labels = {s.part: (s.label, s.b_values) for s in _summaries(headers)}
    assert labels == {"b0": ("DWI_Low", [0.0]), "b1000": ("DWI_High", [1000.0])}


# ------------------------------------------------------------------ 2. a GE ADC map is ADC
def test_real_ge_adc_map_is_adc_not_dwi_high():
    headers = [read_header(p) for p in dicom_files(need(QIN_ADC))]
    assert {h.frames[0].b_value for h in headers} == {500.0}  # the source b, kept on the map
    (s,) = _summaries(headers)
    assert s.label == "ADC" and s.b_values == [] and "names an ADC map" in s.reason


def test_synthetic_ge_derived_adc_and_exponential_adc():
    adc = header_from_dataset(_ge("1000", scanning=["EP", "SE"], te=65.0, tr=2500.0,
                                  image_type=("DERIVED", "SECONDARY", "PROCESSED"),
                                  description="Apparent Diffusion Coefficient (mm2/s)"), "mem")
    assert _summaries([adc])[0].label == "ADC"
    # an exponential ADC is not an ADC map; a DERIVED image without ADC in its description is not either
    eadc = header_from_dataset(_ge("1000", scanning=["EP", "SE"], te=65.0, tr=2500.0,
                                   image_type=("DERIVED", "SECONDARY", "PROCESSED"),
                                   description="Exponential Apparent Diffusion Coefficient"), "mem")
    assert eadc.frames[0].derived is None and _summaries([eadc])[0].label == "DWI_High"


# ------------------------------------------------------------------ 3. completion exactly once, linear
@pytest.mark.parametrize("order", ["scanner", "shuffled"])
def test_real_ge_multiphase_epi_completes_once_when_all_150_are_in(tmp_path, order):
    files = dicom_files(need(DCM_QA_NIH) / "In" / "20180918GE")
    assert len(files) == 600
    if order == "shuffled":
        random.Random(19).shuffle(files)
    events = stream(files, tmp_path / "state")
    done = [e for e in events if e.type == "series_completed"]
    assert [e.type for e in events if e.type == "series_reopened"] == []
    assert sorted(e.series.series_number for e in done) == [4, 5, 6, 7]  # once each
    for e in done:
        s = e.series
        assert s.complete and s.n_images == 150 and s.expected_images == 150 and s.revision == 1
        assert "(0025,1007) images in series = 15 counts one volume" in s.reason


def _xa_enhanced_dwi(series: str, study: str, volume: int, b: float, n_slices: int = 4, ntp: int = 21) -> Dataset:
    """Siemens XA enhanced DWI, one file per volume, NumberOfTemporalPositions = volumes (dcm_qa_xa30)."""
    ds = mr_dataset(series, study, instance=volume + 1, manufacturer="Siemens Healthineers", scanning="EP",
                    description="ep2d_diff", image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "EchoTime",
              "RepetitionTime", "ScanningSequence"):
        delattr(ds, k)
    ds.EchoPlanarPulseSequence = "YES"
    ds.NumberOfTemporalPositions = ntp
    ds.NumberOfFrames = n_slices
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [2.0, 2.0]
    shared.PixelMeasuresSequence[0].SliceThickness = 4.0
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.MREchoSequence = Sequence([Dataset()])
    shared.MREchoSequence[0].EffectiveEchoTime = 70.0
    shared.MRTimingAndRelatedParametersSequence = Sequence([Dataset()])
    shared.MRTimingAndRelatedParametersSequence[0].RepetitionTime = 4000.0
    diff = Dataset()
    diff.DiffusionBValue = b
    diff.DiffusionDirectionality = "DIRECTIONAL" if b else "NONE"
    shared.MRDiffusionSequence = Sequence([diff])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for z in range(n_slices):
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, 4.0 * z]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.zeros(ds.Rows * ds.Columns * n_slices, dtype=np.uint16).tobytes()
    return ds


def test_xa_enhanced_dwi_one_file_per_volume_completes_once_at_21(tmp_path):
    series, study = generate_uid(), generate_uid()
    files = [write(_xa_enhanced_dwi(series, study, v, 0.0 if v == 0 else 1000.0), tmp_path / "in" / f"v{v:02d}.dcm")
             for v in range(21)]
    events = stream(files, tmp_path / "state")
    done = [e for e in events if e.type == "series_completed"]
    assert [e.type for e in events if e.type == "series_reopened"] == []
    assert {e.series.part: e.series.n_images for e in done} == {"b0": 4, "b1000": 80}
    assert all(e.series.expected_images == 84 and e.series.revision == 1 for e in done)
    assert "4 images (4 slice positions), the series 21 temporal positions: 84 expected" in done[0].series.reason


def test_expected_counts_ge_dwi_ge_dce_and_one_file_enhanced():
    # GE DWI: (0020,1002) counts slice locations, (0025,1007) the whole series (no temporal positions)
    dwi = header_from_dataset(_ge("1000001000\\8\\0\\0", b_series=20 * 31, images_in_acquisition=20,
                                  scanning=["EP", "SE"]), "m")
    assert expected_count(dwi) == (620, "")
    # GE multiphase DCE: (0025,1007) counts one phase, like (0020,1002); the phases multiply it
    dce = header_from_dataset(_ge("0\\0\\0\\0", b_series=40, images_in_acquisition=40, scanning="GR", te=1.5,
                                  tr=4.0, NumberOfTemporalPositions=30), "m")
    n, note = expected_count(dce)
    assert n == 1200 and "(0025,1007) images in series = 40 counts one volume" in note
    # an enhanced file holding every phase (positions repeat once per phase) is the whole series
    ds = _xa_enhanced_dwi(generate_uid(), generate_uid(), 0, 0.0, n_slices=4, ntp=3)
    per = list(ds.PerFrameFunctionalGroupsSequence)
    ds.PerFrameFunctionalGroupsSequence = Sequence([copy.deepcopy(x) for _ in range(3) for x in per])
    ds.NumberOfFrames = 12
    ds.PixelData = np.zeros(ds.Rows * ds.Columns * 12, dtype=np.uint16).tobytes()
    assert expected_count(header_from_dataset(ds, "m")) == (12, "")


def test_count_proved_too_small_reopens_once_then_waits_for_the_quiet_period(tmp_path):
    """A count that is wrong in a way no rule knows: the first late image reopens the series; the
    rest of the run does not reopen and re-complete (and rescan) it once per image."""
    series, study = generate_uid(), generate_uid()
    files = [write(mr_dataset(series, study, instance=i + 1, position=(0, 0, 3.0 * (i % 10)), images_in_acquisition=10,
                              TemporalPositionIdentifier=i // 10 + 1, scanning="GR", te=2.0, tr=5.0),
                   tmp_path / "in" / f"{i:03d}.dcm") for i in range(60)]
    events = stream(files, tmp_path / "state", quiet_period_s=20.0)
    done = [e for e in events if e.type == "series_completed"]
    assert [e.series.revision for e in done] == [1, 2]
    assert len([e for e in events if e.type == "series_reopened"]) == 1
    last = done[-1].series
    assert last.n_images == 60 and last.complete and "expected count 10 exceeded (60 images)" in last.reason


# ------------------------------------------------------------------ 4. Canon/Toshiba b0 without a b-value tag
def test_canon_dti_b0_without_b_value_tag_is_the_b0_of_the_series():
    series, study = generate_uid(), generate_uid()
    common = dict(manufacturer="TOSHIBA_MEC", scanning=["SE", "EP"], te=90.0, tr=5000.0, description="DTI_15dir")
    b0 = mr_dataset(series, study, instance=1, **common)  # no (0018,9087) on the b0 images
    dirs = []
    for i, vec in enumerate([(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]):
        ds = mr_dataset(series, study, instance=i + 2, **common)
        ds.DiffusionBValue = 1000.0
        seq = Dataset()
        seq.DiffusionGradientOrientation = list(vec)
        ds.DiffusionGradientDirectionSequence = Sequence([seq])
        dirs.append(ds)
    headers = [header_from_dataset(ds, f"f{i}") for i, ds in enumerate([b0, *dirs])]
    assert {h.vendor for h in headers} == {"canon"}
    assert headers[0].frames[0].b_value is None
    labels = {s.part: (s.label, s.b_values) for s in _summaries(headers)}
    assert labels == {"b0": ("DWI_Low", [0.0]), "b1000": ("DWI_High", [1000.0])}  # no T2WI_nan part


def test_canon_is_its_own_vendor():
    for name in ("Canon Medical Systems", "TOSHIBA_MEC", "Toshiba"):
        assert header_from_dataset(mr_dataset(generate_uid(), generate_uid(), manufacturer=name), "m").vendor == "canon"


# ------------------------------------------------------------------ 5. spin-echo EPI is not T2W
def test_real_siemens_epi_with_fs_is_not_t2w():
    folder = need(DCM_QA_NIH) / "In" / "20180918Si" / "mr_0003"
    headers = [read_header(p) for p in dicom_files(folder)]
    assert headers[0].scan_options == ("FS",) and headers[0].epi
    (s,) = _summaries(headers)
    assert s.label == "other" and s.b_values == []


def test_siemens_spin_echo_epi_with_fs_te60_is_not_t2wi_fs():
    ds = mr_dataset(generate_uid(), generate_uid(), scanning="EP", te=60.0, tr=3000.0, description="SE_EPI_PA",
                    ScanOptions="FS", SequenceName="epse2d1_86", SequenceVariant="SK")
    h = header_from_dataset(ds, "mem")
    label = classify_header([h], h.frames)
    assert label.label == "other" and "echo-planar" in label.reason
    # the same timing on a turbo spin echo is still a fat-suppressed T2W
    tse = header_from_dataset(mr_dataset(generate_uid(), generate_uid(), scanning="SE", te=60.0, tr=3000.0,
                                         ScanOptions="FS"), "mem")
    assert classify_header([tse], tse.frames).label == "T2WI_fs"


# ------------------------------------------------------------------ 6. dynamic EPI is not DCE
@pytest.mark.parametrize("ntp", [5, 60])
def test_dynamic_epi_is_not_dce(ntp):
    ds = mr_dataset(generate_uid(), generate_uid(), manufacturer="Siemens Healthineers", scanning="EP", te=30.0,
                    tr=1000.0, description="Product EPI Sag Ascending", orientation=(0, 1, 0, 0, 0, -1),
                    NumberOfTemporalPositions=ntp, TemporalPositionIdentifier=2, SequenceName="epfid2d1_64")
    h = header_from_dataset(ds, "mem")
    label = classify_header([h], h.frames)
    assert label.label == "other" and label.other_kind != "DCE" and f"{ntp} temporal positions" in label.reason
    gre = header_from_dataset(mr_dataset(generate_uid(), generate_uid(), scanning="GR", te=1.4, tr=3.9,
                                         NumberOfTemporalPositions=ntp, description="t1_twist_dyn"), "mem")
    assert classify_header([gre], gre.frames).other_kind == "DCE"


# ------------------------------------------------------------------ 7. smaller findings
def test_philips_zero_b_factor_on_mprage_and_ffe_lists_no_b_values():
    for kw in (dict(scanning="GR", te=3.2, tr=7.0, description="3D_MPRAGE"),
               dict(scanning="GR", te=4.6, tr=300.0, description="FFE")):
        (s,) = _summaries([header_from_dataset(_philips(0.0, **kw), "mem")])
        assert s.label == "other" and s.b_values == [], s


@pytest.mark.parametrize("sop_class", ["1.3.46.670589.11.0.0.12.1", "1.3.46.670589.11.0.0.12.2",
                                       "1.2.840.10008.5.1.4.1.1.66"])
def test_philips_xx_and_raw_data_files_are_not_images_not_truncated(tmp_path, sop_class):
    ds = mr_dataset(generate_uid(), generate_uid(), manufacturer=PHILIPS)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    del ds.PixelData  # Rows/Columns kept, as on Philips XX_ files
    path = write(ds, tmp_path / "XX_0001")
    with pytest.raises(HeaderError) as exc:
        read_header(path)
    assert exc.value.reason == "no_pixel_data" and not exc.value.retryable
    # an MR image cut before its pixels is still truncated (and retried)
    img = mr_dataset(generate_uid(), generate_uid())
    del img.PixelData
    with pytest.raises(HeaderError) as exc:
        read_header(write(img, tmp_path / "IM_0001"))
    assert exc.value.reason == "truncated"


def test_scan_text_shows_no_b_value_on_an_adc_map(capsys):
    assert cli_main(["scan", str(need(QIN_ADC))]) == 5  # an ADC map alone: critical deviations (no T2W, no DWI)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "Apparent Diffusion" in x]
    assert line.split()[1] == "ADC" and "b=" not in line.split("'")[0]
