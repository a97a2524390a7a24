"""Where the real scanner DICOM lives (../shared/realdata from the repository root, read in place)."""
from __future__ import annotations

from pathlib import Path

import pytest

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
