"""Simulated axial T2W DICOM series (one per exam folder) for INT8 calibration and parity runs.

    python bench/make_t2w_data.py OUT_DIR [--n 6] [--seed0 100]

Each exam holds only the axial T2W series of the bpMRI protocol (vendor rotates), so that
generating a calibration set stays cheap; ground_truth.json is written beside it."""
from __future__ import annotations

import argparse
from pathlib import Path

from scanside.simulator.protocols import build_exam
from scanside.simulator.scanner import simulate_exam

VENDORS = ("siemens", "ge", "philips", "siemens-xa")


def make(out: Path, n: int = 6, seed0: int = 100) -> list[Path]:
    dirs = []
    for i in range(n):
        vendor = VENDORS[i % len(VENDORS)]
        d = out / f"exam{i:02d}-{vendor}"
        if not (d / "ground_truth.json").is_file():
            exam = build_exam("prostate-bpmri", vendor)
            exam = exam.model_copy(update={"series": [s for s in exam.series if s.kind == "t2w" and s.plane == "axial"]})
            simulate_exam(vendor, d, seed0 + i, exam=exam)
        dirs.append(d)
    return dirs


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--seed0", type=int, default=100)
    a = ap.parse_args()
    for d in make(a.out, a.n, a.seed0):
        print(d)
