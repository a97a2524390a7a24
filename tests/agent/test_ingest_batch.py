"""The ingest worker records files in batches, one state transaction each ([ingest] batch_max_files):
a process killed mid-batch loses nothing (the files not committed are read again on restart, and no
event is recorded twice), and a batch the database refuses keeps every one of its files for retry."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from scanside.agent.runtime.config import load_config
from scanside.agent.intake.ingest import Ingestor
from scanside.agent.intake.pipeline import Pipeline
from scanside.agent.state.database import StateStore
from tests.agent.factory import series_files

ROOT = Path(__file__).resolve().parents[2]
N_FILES, BATCH, KILL_AT = 30, 8, 12  # one batch of 8 committed, the kill inside the second


def _agent(state: Path, export: Path):
    config = load_config(**{"state.dir": str(state), "watch.folder": str(export), "watch.settle_s": 0,
                            "ingest.batch_max_files": BATCH, "ingest.batch_max_ms": 60_000, "protocol.enabled": False})
    store = StateStore(config.db_path)
    pipeline = Pipeline(config, store)
    return store, pipeline, Ingestor(config, pipeline)


CRASHING_RUN = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from tests.agent.test_ingest_batch import KILL_AT, _agent
    store, pipeline, ingestor = _agent(Path({state!r}), Path({export!r}))
    real, calls = pipeline.process_file, []
    def process_file(path):
        calls.append(path)
        if len(calls) > KILL_AT:
            os._exit(9)  # killed mid-batch: no commit, no clean-up
        return real(path)
    pipeline.process_file = process_file
    ingestor.catch_up(Path({export!r}))
    ingestor.drain(timeout=60)
""")


def test_a_kill_mid_batch_loses_no_file_and_records_no_event_twice(tmp_path: Path) -> None:
    export, state = tmp_path / "export", tmp_path / "state"
    files = series_files(export / "s1", N_FILES, images_in_acquisition=N_FILES)
    script = CRASHING_RUN.format(root=str(ROOT), state=str(state), export=str(export))
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 9, run.stderr[-2000:]

    db = sqlite3.connect(str(state / "state.sqlite"))
    recorded = db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    instances = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    db.close()
    assert recorded == instances == BATCH  # the committed batch; the one killed left nothing behind

    store, _, ingestor = _agent(state, export)  # the restart: catch-up finds every file again
    ingestor.catch_up(export)
    assert ingestor.drain(timeout=60)
    assert store.file_counts() == {"ingested": N_FILES}
    assert sorted(h.path for h in store.series_headers(store.all_series()[0]["series_uid"])) == sorted(map(str, files))
    events = store.events_after(0, limit=1000)
    store.close()
    assert Counter(e.type for e in events)["series_completed"] == 1
    assert len({e.key for e in events}) == len(events)


def test_a_batch_the_database_refuses_keeps_every_file_for_retry(tmp_path: Path) -> None:
    export, state = tmp_path / "export", tmp_path / "state"
    series_files(export / "s1", 5, images_in_acquisition=5)
    store, pipeline, ingestor = _agent(state, export)
    real = pipeline.batch

    @contextmanager
    def refused() -> Iterator[None]:
        with real():
            yield
            raise sqlite3.OperationalError("database or disk is full")  # at the commit: all of it rolls back

    pipeline.batch = refused  # type: ignore[method-assign]
    ingestor.catch_up(export)
    ingestor.step()
    assert ingestor.backlog == 5 and store.file_counts() == {}  # nothing recorded, nothing forgotten
    pipeline.batch = real  # type: ignore[method-assign]
    assert ingestor.drain(timeout=30)
    assert store.file_counts() == {"ingested": 5}
    assert Counter(e.type for e in store.events_after(0))["series_completed"] == 1
    store.close()
