"""Issue 22 item 5: the ingest fast path keeps every check, and the exam clock looks only at open exams.
(Speed figures live in bench/bench_scale.py, not here.)"""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from scanside.agent.dicom import header as hdr
from scanside.agent.runtime.config import load_config
from scanside.agent.dicom.header import HeaderError, read_header
from scanside.agent.intake.pipeline import Pipeline
from scanside.agent.state.database import StateStore
from tests.agent.factory import mr_dataset, series_files, write


def _both_paths(path: Path, monkeypatch: pytest.MonkeyPatch):
    """read_header through the in-memory prefix and through the bounded-file path only."""
    fast = read_header(path)
    with monkeypatch.context() as m:
        m.setattr(hdr, "_parse_prefix", lambda *a: None)
        slow = read_header(path)
    return fast, slow


def test_header_longer_than_the_prefix_reads_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = mr_dataset(generate_uid(), generate_uid(), SeriesDescription="dwi")
    ds.private_block(0x0009, "SCANSIDE TEST", create=True).add_new(0x10, "OB", b"\x01" * (hdr.LONG_PREFIX_BYTES + 5000))
    path = write(ds, tmp_path / "long.dcm")
    calls = []
    real = hdr._parse_prefix
    monkeypatch.setattr(hdr, "_parse_prefix", lambda *a: calls.append(real(*a)) or calls[-1])
    fast = read_header(path)
    assert calls == [None]  # the longer read ended inside the header as well: the file path read it
    monkeypatch.undo()
    fast2, slow = _both_paths(path, monkeypatch)
    assert fast == slow == fast2
    assert fast.series_description == "dwi"


def test_fast_path_result_equals_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = mr_dataset(generate_uid(), generate_uid(), manufacturer="GE MEDICAL SYSTEMS", rows=64, cols=64)
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", "1000001400\\8\\0\\0")
    path = write(ds, tmp_path / "ge.dcm")
    fast, slow = _both_paths(path, monkeypatch)
    assert fast == slow


@pytest.mark.parametrize("cut", [200, 12])  # cut inside the pixel data / inside the pixel element header
def test_truncated_pixels_within_the_prefix_are_still_truncated(tmp_path: Path, cut: int) -> None:
    ds = mr_dataset(generate_uid(), generate_uid(), rows=64, cols=64)
    path = write(ds, tmp_path / "t.dcm")
    data = path.read_bytes()
    pixel_tag = data.rindex(hdr.PIXEL_DATA_TAG)
    path.write_bytes(data[: pixel_tag + cut])
    with pytest.raises(HeaderError) as exc:
        read_header(path)
    assert exc.value.reason == "truncated"


def test_exam_clock_ticks_over_open_exams_only(tmp_path: Path) -> None:
    config = load_config(**{"state.dir": str(tmp_path / "state"), "protocol.exam_quiet_period_s": 0.01,
                            "series.quiet_period_s": 0.01})
    store = StateStore(config.db_path)
    pipeline = Pipeline(config, store)
    study = generate_uid()
    for f in series_files(tmp_path / "a", 2, study_uid=study, images_in_acquisition=2):
        assert pipeline.process_file(str(f)).status == "ingested"
    assert [r["study_uid"] for r in store.open_exams()] == [study]
    import time

    time.sleep(0.05)
    pipeline.tick()  # ends the exam (ExamCompleted)
    pipeline.tick()  # and takes it off the open list
    assert store.open_exams() == []
    assert sum(1 for e in store.events_after(0) if e.type == "exam_completed") == 1
    # a late image reopens it; it ends again as round 2
    late = series_files(tmp_path / "b", 1, study_uid=study)
    assert pipeline.process_file(str(late[0])).status == "ingested"
    assert [r["study_uid"] for r in store.open_exams()] == [study]
    time.sleep(0.05)
    pipeline.tick()
    pipeline.tick()
    assert store.open_exams() == []
    assert [e.key for e in store.events_after(0) if e.type == "exam_completed"] == \
        [f"exam_completed:{study}:1", f"exam_completed:{study}:2"]
    store.close()
