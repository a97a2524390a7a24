"""Shared by the protocol tests: simulated exams (cached per session) and the one-shot scan path."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Optional

from scanside.agent.runtime.config import load_config
from scanside.agent.schema.events import ProtocolDeviation
from scanside.agent.intake.ingest import Ingestor
from scanside.agent.intake.pipeline import Pipeline
from scanside.agent.state.database import StateStore
from scanside.simulator.model import ExamSpec
from scanside.simulator.protocols import build_exam

VENDORS = ("siemens", "siemens-xa", "ge", "philips")


def reduced_exam(profile: str, vendor: str, faults: Iterable[str] = (), factor: int = 3,
                 edit=None) -> ExamSpec:  # type: ignore[no-untyped-def]
    """The simulator's exam with every series' slice count divided by `factor` (1 localizer slice
    per plane): the same protocol parameters, a third of the files to write and read."""
    spec = build_exam(profile, vendor, 3.0, list(faults))
    series = []
    for s in spec.series:
        n = 1 if s.kind == "localizer" else max(3, round(s.n_slices / factor))
        s = s.model_copy(update={"n_slices": n})
        if edit is not None:
            s = edit(s)
        series.append(s)
    return spec.model_copy(update={"series": series})


def scan(folder: Path, state_dir: Path, profile: str = "pirads-2.1-mpmri", site: Optional[Path] = None,
         **overrides) -> tuple[Pipeline, StateStore]:  # type: ignore[no-untyped-def]
    """What `scanside scan` does: ingest the folder once, close every series, end the exam."""
    config = load_config(**{"state.dir": str(state_dir), "protocol.profile": profile,
                            "protocol.site_profile": str(site) if site else None, **overrides})
    config.watch.settle_s = 0
    config.ingest.retry_delays_s = []
    config.ingest.quarantine_after_s = 0
    store = StateStore(config.db_path)
    pipeline = Pipeline(config, store)
    ingestor = Ingestor(config, pipeline)
    ingestor.catch_up(folder)
    assert ingestor.drain(timeout=600)
    pipeline.complete_all()
    pipeline.end_exams()
    return pipeline, store


def deviations(store: StateStore) -> list[ProtocolDeviation]:
    return [e for e in store.events_after(0, limit=1_000_000) if e.type == "protocol_deviation"]  # type: ignore[misc]


def codes(store: StateStore) -> set[str]:
    return {d.code for d in deviations(store)}


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
