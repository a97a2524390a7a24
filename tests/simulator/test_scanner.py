"""Exam orchestration: ground truth vs files, faults, determinism, real-time streaming, CLI."""
from __future__ import annotations

import threading

import pydicom
import pytest

from scanside.simulator.model import ExamSpec, SeriesSpec
from scanside.simulator.protocols import FAULTS, build_exam
from scanside.simulator.scanner import exam_files, load_ground_truth, simulate_exam, stream_exam


@pytest.fixture(scope="module", params=["siemens", "siemens-xa", "ge", "philips"])
def bp_exam(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"exam-{request.param}")
    gt = simulate_exam(request.param, out, seed=21, profile="prostate-bpmri")
    return request.param, out, gt


def _small_exam(vendor="siemens") -> ExamSpec:
    geom = dict(n_slices=6, matrix=(48, 48), fov_mm=(200.0, 200.0))
    return ExamSpec(name="tiny", series=[
        SeriesSpec(kind="t2w", description="t2_tse_tra", **geom),
        SeriesSpec(kind="dwi", description="ep2d_diff_TRACEW", b_values=[50.0, 800.0], fat_sat=True, **geom),
        SeriesSpec(kind="adc", description="ep2d_diff_ADC", b_values=[50.0, 800.0], **geom),
    ])


def test_ground_truth_matches_files(bp_exam):
    vendor, out, gt = bp_exam
    assert load_ground_truth(out) == gt
    labels = {p.label for s in gt.series for p in s.parts}
    assert {"T2WI_nan", "T2WI_fs", "DWI_Low", "DWI_High", "ADC", "other"} <= labels
    for s in gt.series:
        assert s.n_files == len(s.files)
        n_images = 0
        for rel in s.files:
            ds = pydicom.dcmread(out / rel, stop_before_pixels=True)
            assert ds.SeriesInstanceUID == s.series_uid and int(ds.SeriesNumber) == s.series_number
            assert ds.SeriesDescription == s.description and ds.StudyInstanceUID == gt.study_uid
            assert ds.PatientID == gt.patient_id and str(ds.PatientName) == gt.patient_name
            n_images += int(getattr(ds, "NumberOfFrames", 1) or 1)
        assert n_images == sum(p.n_images for p in s.parts)
    high = max(p.b_value for s in gt.series for p in s.parts if p.label == "DWI_High")
    assert high == 1400.0
    if vendor == "philips":
        dwi = next(s for s in gt.series if s.kind == "dwi")
        assert [p.label for p in dwi.parts][-1] == "ADC" and not any(s.kind == "adc" for s in gt.series)
    if vendor == "siemens":
        assert any(p.derived == "CALC_BVALUE" for s in gt.series for p in s.parts)


def test_mpmri_has_dce_and_t1_and_bpmri_not():
    for vendor in ("siemens", "ge", "philips"):
        mp = build_exam("prostate-mpmri", vendor)
        bp = build_exam("prostate-bpmri", vendor)
        assert {"dce", "t1"} <= {s.kind for s in mp.series}
        assert not {"dce", "t1"} & {s.kind for s in bp.series}
        dce = next(s for s in mp.series if s.kind == "dce")
        assert dce.temporal_resolution_s <= 15 and dce.n_phases * dce.temporal_resolution_s >= 120


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips"])
def test_protocol_faults(vendor):
    base = build_exam("prostate-bpmri", vendor)
    t2 = lambda e: next(s for s in e.series if s.kind == "t2w" and s.plane == "axial")  # noqa: E731
    dwi = lambda e: next(s for s in e.series if s.kind == "dwi")  # noqa: E731

    def max_b(e):
        return max(b for s in e.series if s.kind in ("dwi", "calc_bvalue") for b in s.b_values)

    assert max_b(base) == 1400.0
    assert max_b(build_exam("prostate-bpmri", vendor, faults=["b1000_high"])) == 1000.0
    assert max_b(build_exam("prostate-bpmri", vendor, faults=["missing_high_b"])) < 1400.0
    assert t2(build_exam("prostate-bpmri", vendor, faults=["thick_slices"])).slice_thickness_mm == 5.0
    assert t2(build_exam("prostate-bpmri", vendor, faults=["gap"])).slice_gap_mm > 0
    assert t2(build_exam("prostate-bpmri", vendor, faults=["wrong_fov"])).fov_mm[0] == 300.0
    assert not any(s.kind == "adc" for s in build_exam("prostate-bpmri", vendor, faults=["missing_adc"]).series)
    sw = build_exam("prostate-bpmri", vendor, faults=["swapped_descriptions"])
    assert (t2(sw).description, dwi(sw).description) == (dwi(base).description, t2(base).description)
    with pytest.raises(ValueError):
        build_exam("prostate-bpmri", vendor, faults=["no_such_fault"])
    assert len(FAULTS) >= 7


def test_truncated_file_fault_and_philips_missing_adc(tmp_path):
    gt = simulate_exam("philips", tmp_path, seed=4, profile="prostate-bpmri", faults=["truncated_file", "missing_adc"])
    assert len(gt.corrupt_files) == 1
    bad = tmp_path / gt.corrupt_files[0]
    with pytest.raises(Exception):
        pydicom.dcmread(bad).pixel_array
    dwi = next(s for s in gt.series if s.kind == "dwi")
    assert all(p.label != "ADC" for p in dwi.parts)


def test_deterministic_per_seed(tmp_path):
    a = simulate_exam("ge", tmp_path / "a", seed=9, exam=_small_exam())
    b = simulate_exam("ge", tmp_path / "b", seed=9, exam=_small_exam())
    c = simulate_exam("ge", tmp_path / "c", seed=10, exam=_small_exam())
    assert a == b and a.study_uid != c.study_uid
    for rel in exam_files(a):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


@pytest.mark.parametrize("mode", ["chunks", "rename"])
def test_stream_exam_reproduces_batch(mode, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "watch"
    gt = simulate_exam("siemens", src, seed=2, exam=_small_exam())
    seen = []
    done = stream_exam(src, dst, rate=0, write_mode=mode, chunk_size=4096, on_file=seen.append)
    files = exam_files(gt)
    assert [p.relative_to(dst).as_posix() for p in done] == files == [p.relative_to(dst).as_posix() for p in seen]
    for rel in files:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    assert not [p for p in dst.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_stream_exam_stops_mid_exam(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "watch"
    gt = simulate_exam("siemens", src, seed=2, exam=_small_exam())
    stop = threading.Event()
    count = []

    def on_file(p):
        count.append(p)
        if len(count) == 5:
            stop.set()

    done = stream_exam(src, dst, rate=200, write_mode="rename", stop_event=stop, on_file=on_file)
    assert len(done) == 5 < len(exam_files(gt))
    assert len([p for p in dst.rglob("*.dcm")]) == 5


def test_cli_simulate(tmp_path):
    import argparse

    from scanside.simulator.cli import add_parser

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["simulate", "--vendor", "ge", "--out", str(tmp_path / "rt"), "--seed", "5", "--profile",
                              "prostate-bpmri", "--fault", "missing_adc", "--realtime", "--rate", "0",
                              "--write-mode", "rename", "--ground-truth", str(tmp_path / "gt.json")])
    assert args.func(args) == 0
    from scanside.simulator.model import GroundTruth

    gt = GroundTruth.model_validate_json((tmp_path / "gt.json").read_text())
    assert gt.faults == ["missing_adc"] and all((tmp_path / "rt" / f).is_file() for f in exam_files(gt))
