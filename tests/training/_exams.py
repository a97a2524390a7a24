"""Small simulated DICOM exams for the sequence-classifier tests (one per vendor style, cached per
test process)."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(tempfile.mkdtemp(prefix="scanside-seqtest-"))


@functools.lru_cache(maxsize=None)
def exam(vendor: str, seed: int, variant: str = "train") -> Path:
    from scanside.simulator.scanner import simulate_exam
    from scanside.training.sequence.protocols import random_exam

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE7A1]))
    out = ROOT / f"{vendor}-{seed}-{variant}"
    simulate_exam(vendor, out, seed, exam=random_exam(rng, vendor, variant, dce_phases=3))  # type: ignore[arg-type]
    return out
