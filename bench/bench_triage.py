"""Triage latency (issue 5): from the last file of an exam's last needed series (axial T2W, ADC,
high-b DWI >= 1400) landing in the watched folder to the TriageResult event, on CPU with the shipped
reference models, without the gland model. Target p95 <= 5 s.

Run: .venv/bin/python bench/bench_triage.py [--exams 4]   -> bench/results/triage.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scanside.agent.runtime.config import load_config  # noqa: E402
from scanside.agent.service.daemon import Agent  # noqa: E402
from scanside.simulator.scanner import simulate_exam, stream_exam  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VENDORS = ["siemens", "ge", "philips", "siemens-xa"]


def needed(part) -> bool:  # type: ignore[no-untyped-def]
    return part.label in ("T2WI_nan", "ADC") or (part.label == "DWI_High" and (part.b_value or 0) >= 1400)


def one_exam(vendor: str, seed: int, work: Path) -> float:
    exam = work / f"exam-{vendor}-{seed}"
    truth = simulate_exam(vendor, exam, seed, profile="prostate-bpmri", cspca=seed % 2 == 0)
    needed_files = {str(work / "export" / f) for s in truth.series
                    if any(needed(p) for p in s.parts) and s.plane == "axial" for f in s.files}
    config = load_config(**{"watch.folder": str(work / "export"), "state.dir": str(work / f"state-{vendor}-{seed}"),
                            "output.stdout": False, "series.quiet_period_s": 2.0, "gland.enabled": False})
    landed: list[float] = []
    result: list[float] = []
    agent = Agent(config)
    agent.subscribe(lambda e: result.append(time.monotonic()) if e.type == "triage_result" else None)
    agent.start()
    try:
        stream_exam(exam, work / "export", rate=100, write_mode="rename", ground_truth=truth,
                    on_file=lambda p: landed.append(time.monotonic()) if str(p) in needed_files else None)
        end = time.monotonic() + 120
        while not result and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        agent.stop()
        shutil.rmtree(work / "export", ignore_errors=True)
    if not result:
        raise RuntimeError(f"no triage result for {vendor} seed {seed}")
    return result[0] - max(landed)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exams", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scanside-bench-triage-"))
    try:
        latencies = [one_exam(VENDORS[i % len(VENDORS)], 100 + i, work) for i in range(args.exams)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    out = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()},
           "exams": args.exams, "latencies_s": [round(x, 3) for x in latencies],
           "p50_s": round(statistics.median(lat), 3), "p95_s": round(p95, 3), "target_p95_s": 5.0,
           "gland_model": False}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "triage.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"last needed file -> triage result: p50 {out['p50_s']} s, p95 {out['p95_s']} s over {args.exams} exams "
          f"(target p95 <= 5 s); load average {out['machine']['loadavg']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
