"""Calibration data from real (simulated-scanner) DICOM folders through the agent's own reading and
preprocessing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scanside.converters.calibration_data import CalibrationDataError, CalibrationSet, build_set, extract_windows, read_series, \
    window_starts
from scanside.engines.preprocess import prepare, sliding_window
from scanside.engines.spec import PreprocessSpec, WindowSpec


def test_series_are_read_and_labelled_by_the_agent(t2w_exams: list) -> None:
    series = read_series(t2w_exams)
    assert len(series) == 4
    assert {s.label for s in series} == {"T2WI_nan"} and {s.plane for s in series} == {"axial"}
    assert all(s.volume.shape == (24, 256, 256) for s in series)
    # opaque keys: no UID, no patient data
    gts = [json.loads((d / "ground_truth.json").read_text()) for d in t2w_exams]
    for s in series:
        for gt in gts:
            assert s.study_key not in gt["study_uid"] and s.series_key not in json.dumps(gt)
    assert read_series(t2w_exams, labels=["ADC"]) == []


def test_samples_equal_what_the_agent_prepares(tiny_model, t2w_exams: list) -> None:
    cset = build_set(tiny_model, t2w_exams[:2])
    assert cset.inputs.shape == (2, 1, 8, 8, 4) and cset.inputs.dtype == np.float32
    assert cset.input_name == "x" and cset.labels == ["T2WI_nan", "T2WI_nan"]
    assert len(set(cset.sources)) == 2
    assert all(t in (0.0, 1.0) for t in cset.targets)  # exam truth read from ground_truth.json
    # the same numbers scanside.engines.preprocess.prepare gives the agent
    s = [x for x in read_series(t2w_exams[:2]) if x.series_key == cset.sources[0]][0]
    arr, _grid = prepare({"T2W": s.volume}, tiny_model.preprocessing)
    np.testing.assert_array_equal(cset.inputs[0], arr)


def test_bad_files_are_skipped_not_fatal(tiny_model, t2w_exams: list, tmp_path: Path) -> None:
    d = tmp_path / "exam"
    shutil.copytree(t2w_exams[0], d)
    (d / "junk.dcm").write_bytes(b"not dicom at all")
    first = sorted(p for p in d.rglob("*.dcm"))[0]
    (d / "truncated.dcm").write_bytes(first.read_bytes()[:600])
    cset = build_set(tiny_model, [d])
    assert len(cset) == 1


def test_missing_channel_and_shape_mismatch_are_explained(tiny_model, t2w_exams: list) -> None:
    wrong = tiny_model.model_copy(update={"preprocessing": tiny_model.preprocessing.model_copy(
        update={"channels": ["ADC"]})})
    with pytest.raises(CalibrationDataError, match="no exam with all channels"):
        build_set(wrong, t2w_exams[:1])
    wrong = tiny_model.model_copy(update={"preprocessing": tiny_model.preprocessing.model_copy(
        update={"shape": (8, 8, 5)})})
    with pytest.raises(CalibrationDataError, match="takes 4"):
        build_set(wrong, t2w_exams[:1])


def test_windows_are_the_sliding_window_positions() -> None:
    spec = PreprocessSpec(channels=["T2W"], spacing_mm=(1, 1, 1), shape=None, crop="none",
                          window=WindowSpec(roi=(16, 16, 8), overlap=0.5))
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((1, 40, 30, 6)).astype(np.float32)  # axis 2 smaller than the roi: padded
    seen = []

    def run(batch: np.ndarray) -> np.ndarray:
        seen.extend(batch.copy())
        return batch

    sliding_window(run, arr, spec.window, batch_size=1)
    wins = extract_windows(arr, spec)
    assert len(wins) == len(window_starts(arr.shape[1:], spec)) == len(seen)
    for _start, w in wins:  # every extracted window is one the agent's sliding window runs
        assert any(np.array_equal(w, s) for s in seen)
    assert len(extract_windows(arr, spec, max_windows=2)) == 2


def test_save_load_and_split_by_series(tiny_model, t2w_exams: list, tmp_path: Path) -> None:
    cset = build_set(tiny_model, t2w_exams)
    p = cset.save(tmp_path / "c.npz")
    back = CalibrationSet.load(p)
    np.testing.assert_array_equal(back.inputs, cset.inputs)
    assert back.labels == cset.labels and back.sources == cset.sources and back.input_name == "x"
    assert back.targets == cset.targets
    a, b = cset.split(3)
    assert len(a) == 3 and len(b) == 1 and not set(a.sources) & set(b.sources)
