"""Where the real scanner DICOM lives (../shared/realdata from the repository root, read in place)."""
from __future__ import annotations

from pathlib import Path

import pytest

from scanside.agent.runtime.config import load_config
from scanside.agent.intake.pipeline import Pipeline
from scanside.agent.state.database import StateStore

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"
DCM_QA_NIH = REALDATA / "vendors" / "dcm_qa_nih"
PROSTATEX = REALDATA / "prostate" / "ProstateX-0218"
QIN_ADC = REALDATA / "prostate" / "QIN-PROSTATE-01-0001-ADC"


def need(path: Path) -> Path:
    """The folder, or skip the test saying which real data set is missing."""
    if not path.is_dir():
        pytest.skip(f"real DICOM not here: {path} (see ../shared/realdata/README.md)")
    return path


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files under a real data set (every one is named *.dcm; README/licence/Ref files left out)."""
    return sorted(p for p in folder.rglob("*.dcm") if p.is_file())


def stream(files: list[Path], state: Path, quiet_period_s: float = 30.0) -> list:
    """Feed files through the agent's ingest/series path as a scanner sends them (20 a second, the
    timers ticking after each), then let the quiet period pass; the events recorded."""
    clock = [1_000_000.0]
    config = load_config(**{"state.dir": str(state), "protocol.enabled": False, "series.quiet_period_s": quiet_period_s})
    store = StateStore(config.db_path)
    pipeline = Pipeline(config, store, clock=lambda: clock[0])
    for f in files:
        assert pipeline.process_file(str(f)).status == "ingested", f
        clock[0] += 0.05
        pipeline.tick()
    clock[0] += quiet_period_s + 1
    pipeline.tick()
    events = store.events_after(0, limit=100_000)
    store.close()
    return events
