"""One read path: scanside.agent.dicom.exam_reader.read_exam groups and labels an exam's series exactly as the daemon
does, and the pure selection functions pick the same series and frames whether the daemon
(scanside.agent.analysis.analysis, on its event log) or an evaluation (on read_exam) asks. Checked on simulated exams of
every vendor style and on the real ProstateX exam (skipped where ../shared/realdata is absent)."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from scanside.agent.analysis.analysis import Analyzer
from scanside.agent.dicom.exam_reader import (classifier_inputs, gland_input, model_frames, read_exam, read_exams,
                               triage_inputs)
from scanside.simulator.scanner import simulate_exam
from tests.agent.protocol_helpers import scan

REAL_EXAM = Path(__file__).resolve().parents[2].parent / "shared" / "realdata" / "prostate" / "ProstateX-0218"


def daemon_view(folder: Path, tmp: Path):
    """The daemon's own path over a folder (as `scanside scan`), then the Analyzer the daemon runs, on the
    resulting event log."""
    pipeline, store = scan(folder, tmp / "state")
    return Analyzer(pipeline.config, store, threading.Condition()), store


def _same_selection(folder: Path, tmp: Path) -> dict:
    exam = read_exam(folder)
    analyzer, store = daemon_view(folder, tmp)
    try:
        runtime = analyzer._latest_series(exam.study_uid)
        mine = {s.series_id: s for s in exam.summaries()}
        # the same series, labelled the same way, with the same geometry and counts
        assert sorted(runtime) == sorted(mine)
        for sid, s in mine.items():
            assert runtime[sid].model_dump(exclude={"revision"}) == s.model_dump(exclude={"revision"}), sid
        # the same inputs for each model ...
        chosen = analyzer.triage_inputs(exam.study_uid, exam_over=True)
        assert chosen is not None
        mine_chosen = triage_inputs(exam.summaries(), exam_over=True)
        assert {k: v.series_id for k, v in chosen.items()} == {k: v.series_id for k, v in mine_chosen.items()}
        assert analyzer._reference_t2(exam.study_uid).series_id == gland_input(exam.summaries()).series_id
        assert ({s.series_id for s in classifier_inputs(runtime.values())}
                == {s.series_id for s in classifier_inputs(exam.summaries())})
        # ... and the same frames of each
        for summary in chosen.values():
            assert model_frames(analyzer._part(summary)) == exam.get(summary.series_id).frames()
        return {k: v.series_id for k, v in chosen.items()}
    finally:
        store.close()


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips", "siemens-xa"])
def test_evaluation_and_runtime_select_the_same_series_and_frames(tmp_path: Path, vendor: str) -> None:
    folder = tmp_path / "exam"
    simulate_exam(vendor, folder, seed=31, profile="prostate-bpmri")
    chosen = _same_selection(folder, tmp_path)
    exam = read_exam(folder)
    labels = {ch: exam.get(sid).summary.label for ch, sid in chosen.items()}
    assert labels == {"T2W": "T2WI_nan", "ADC": "ADC", "HBV": "DWI_High"}
    # the volume every model gets is the selected frames, decoded
    t2 = exam.get(chosen["T2W"])
    assert t2.volume().shape[0] == len(t2.frames())


@pytest.mark.skipif(not REAL_EXAM.is_dir(), reason=f"real ProstateX exam not present at {REAL_EXAM}")
def test_same_selection_on_the_real_exam(tmp_path: Path) -> None:
    chosen = _same_selection(REAL_EXAM, tmp_path)
    exam = read_exam(REAL_EXAM)
    hbv = exam.get(chosen["HBV"]).summary
    assert max(hbv.b_values) >= 1400  # the calculated b1600 or the acquired b1400, never the b800
    assert exam.get(chosen["T2W"]).summary.plane == "axial"


def test_selection_rules() -> None:
    from scanside.agent.schema.events import SeriesSummary

    def s(sid, label, number, b=(), plane="axial", complete=True):
        return SeriesSummary(series_id=sid, study_uid="1", series_uid=sid, series_number=number, label=label,
                             label_confidence=1.0, reason="", b_values=list(b), plane=plane, n_instances=1, n_images=1,
                             complete=complete)

    ss = [s("t2fs", "T2WI_fs", 9), s("t2", "T2WI_nan", 3), s("t2sag", "T2WI_nan", 10, plane="sagittal"),
          s("adc1", "ADC", 5), s("adc2", "ADC", 7), s("b800", "DWI_High", 8, b=(800,)),
          s("b1400", "DWI_High", 4, b=(1400,)), s("b2000", "DWI_High", 11, b=(2000,), complete=False)]
    got = triage_inputs(ss, exam_over=False)
    assert {k: v.series_id for k, v in got.items()} == {"T2W": "t2", "ADC": "adc2", "HBV": "b1400"}
    assert gland_input(ss).series_id == "t2"
    assert gland_input([x for x in ss if x.series_id != "t2"]).series_id == "t2fs"
    # while the exam goes on a b800 alone does not start triage; at its end it will do
    only800 = [x for x in ss if x.series_id not in ("b1400",)]
    assert triage_inputs(only800, exam_over=False) is None
    assert triage_inputs(only800, exam_over=True)["HBV"].series_id == "b800"


def test_bad_files_are_counted_not_raised(tmp_path: Path) -> None:
    folder = tmp_path / "exam"
    simulate_exam("ge", folder, seed=5, profile="prostate-bpmri")
    (folder / "garbage.dcm").write_bytes(b"not dicom at all" * 10)
    first = next(p for p in sorted(folder.rglob("*.dcm")) if p.name != "garbage.dcm")
    (folder / "copy.dcm").write_bytes(first.read_bytes())
    (exam,) = read_exams(folder)
    assert exam.skipped.get("duplicate") == 1
    assert sum(exam.skipped.values()) >= 2
