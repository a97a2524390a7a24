"""Series completion: by expected count, by quiet period, incomplete grace, late instances, duplicates."""
from __future__ import annotations

from pydicom.uid import generate_uid

from scanside.agent.runtime.config import load_config
from scanside.agent.intake.pipeline import Pipeline
from scanside.agent.state.database import StateStore

from .factory import mr_dataset, series_files, write


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _pipeline(tmp_path, clock, **overrides):
    # series assembly alone: the factory's minimal series are not PI-RADS series (see test_protocol*.py)
    config = load_config(**{"state.dir": str(tmp_path / "state"), "protocol.enabled": False, **overrides})
    store = StateStore(config.db_path)
    return Pipeline(config, store, clock=clock), store


def _completed(store):
    return [e for e in store.events_after(0) if e.type == "series_completed"]


def test_completes_when_expected_count_reached(tmp_path):
    clock = Clock()
    pipeline, store = _pipeline(tmp_path, clock)
    files = series_files(tmp_path / "in", 4, images_in_acquisition=4)
    for f in files[:3]:
        pipeline.process_file(str(f))
    assert _completed(store) == []
    pipeline.process_file(str(files[3]))
    (ev,) = _completed(store)
    assert ev.series.complete and ev.series.n_images == 4 and ev.series.expected_images == 4
    assert ev.series.slice_spacing_mm == 3.0


def test_quiet_period_without_count(tmp_path):
    clock = Clock()
    pipeline, store = _pipeline(tmp_path, clock, **{"series.quiet_period_s": 5})
    for f in series_files(tmp_path / "in", 3):
        pipeline.process_file(str(f))
    clock.t += 4.9
    pipeline.tick()
    assert _completed(store) == []
    clock.t += 0.2
    pipeline.tick()
    (ev,) = _completed(store)
    assert ev.series.complete and ev.series.expected_images is None


def test_short_series_closes_incomplete_after_grace(tmp_path):
    clock = Clock()
    pipeline, store = _pipeline(tmp_path, clock, **{"series.incomplete_grace_s": 30})
    for f in series_files(tmp_path / "in", 3, images_in_acquisition=5):
        pipeline.process_file(str(f))
    clock.t += 29
    pipeline.tick()
    assert _completed(store) == []
    clock.t += 2
    pipeline.tick()
    (ev,) = _completed(store)
    assert not ev.series.complete and ev.series.n_images == 3 and ev.series.expected_images == 5
    assert ev.series.reason.endswith("closed with 3 of the 5 images its header counts")


def test_late_instance_reopens_and_is_never_lost(tmp_path):
    clock = Clock()
    pipeline, store = _pipeline(tmp_path, clock)
    series_uid, study_uid = generate_uid(), generate_uid()
    files = series_files(tmp_path / "in", 2, series_uid=series_uid, study_uid=study_uid, images_in_acquisition=2)
    for f in files:
        pipeline.process_file(str(f))
    late = write(mr_dataset(series_uid, study_uid, instance=3, position=(0, 0, 6.0), images_in_acquisition=3),
                 tmp_path / "in" / "late.dcm")
    pipeline.process_file(str(late))
    types = [e.type for e in store.events_after(0)]
    assert types == ["series_completed", "series_reopened", "series_completed"]
    first, _, second = store.events_after(0)
    assert (first.series.revision, second.series.revision) == (1, 2)
    assert second.series.n_images == 3 and first.key != second.key


def test_duplicate_instance_is_recorded_not_counted(tmp_path):
    clock = Clock()
    pipeline, store = _pipeline(tmp_path, clock)
    (f,) = series_files(tmp_path / "in", 1, images_in_acquisition=2)
    copy = tmp_path / "in" / "copy.dcm"
    copy.write_bytes(f.read_bytes())
    assert pipeline.process_file(str(f)).status == "ingested"
    assert pipeline.process_file(str(copy)).status == "duplicate"
    assert pipeline.process_file(str(f)).status == "skipped"  # same path, same size and mtime: already done
    assert store.get_series(store.all_series()[0]["series_uid"])["n_images"] == 1


def test_event_keys_make_recording_idempotent(tmp_path):
    clock = Clock()
    pipeline, store = _pipeline(tmp_path, clock)
    for f in series_files(tmp_path / "in", 2, images_in_acquisition=2):
        pipeline.process_file(str(f))
    (ev,) = store.events_after(0)
    ev.seq = None
    assert store.append_event(ev) is None  # the same fact again is refused by its key
