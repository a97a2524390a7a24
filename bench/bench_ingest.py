"""Ingestion benchmarks (issue 2).

1. Header ingestion rate on one core: scanside.agent.dicom.header.read_header (header only, completeness checked)
   and the whole Pipeline (header + SQLite + series bookkeeping), against a plain loop of full
   pydicom.dcmread on the same files. pydicom converts element values lazily, so the plain loop
   parses none; the like-for-like baseline is full dcmread plus the same vendor decoding.
2. Latency from the last file of a series landing in the watched folder to its completion event,
   with an expected count ((0020,1002), target p95 <= 0.3 s) and without one (quiet period, target
   quiet period + 0.3 s).

Run: .venv/bin/python bench/bench_ingest.py [--vendor siemens] [--quiet 2.0]
Writes bench/results/ingest.json.
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

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scanside.agent.runtime.config import load_config  # noqa: E402
from scanside.agent.service.daemon import Agent  # noqa: E402
from scanside.agent.dicom.header import header_from_dataset, read_header  # noqa: E402
from scanside.agent.intake.pipeline import Pipeline  # noqa: E402
from scanside.agent.state.database import StateStore  # noqa: E402
from scanside.simulator.scanner import simulate_exam, stream_exam  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def rate(fn, files: list[str], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in files:
            fn(f)
        best = min(best, time.perf_counter() - t0)
    return len(files) / best


def pipeline_rate(files: list[str], work: Path) -> float:
    best = float("inf")
    for i in range(2):
        config = load_config(**{"state.dir": str(work / f"state{i}")})
        store = StateStore(config.db_path)
        pipeline = Pipeline(config, store)
        t0 = time.perf_counter()
        for f in files:
            pipeline.process_file(f)
        best = min(best, time.perf_counter() - t0)
        store.close()
    return len(files) / best


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def strip_counts(src: Path, dst: Path) -> None:
    """A copy of the exam with no (0020,1002) or GE (0025,1007): completion must come from the quiet period."""
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        out = dst / rel
        if path.is_dir():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.name == "ground_truth.json":
            shutil.copy(path, out)
            continue
        ds = pydicom.dcmread(path)
        for tag in (0x00201002, 0x00251007):
            if tag in ds:
                del ds[tag]
        ds.save_as(out)


def completion_latency(exam: Path, truth, quiet: float, work: Path) -> list[float]:
    """Stream the exam (temp file + rename, 100 files/s); per series: last file landed -> completion event."""
    config = load_config(**{"watch.folder": str(work / "export"), "state.dir": str(work / "state"), "output.stdout": False,
                            "series.quiet_period_s": quiet, "watch.settle_s": 0.3})
    last_landed: dict[str, float] = {}
    completed: dict[str, float] = {}
    uid_of = {str(work / "export" / f): s.series_uid for s in truth.series for f in s.files}

    def on_file(path: Path) -> None:
        last_landed[uid_of[str(path)]] = time.monotonic()

    def on_event(event) -> None:  # type: ignore[no-untyped-def]
        if event.type == "series_completed":
            completed.setdefault(event.series.series_uid, time.monotonic())

    agent = Agent(config)
    agent.subscribe(on_event)
    agent.start()
    try:
        stream_exam(exam, work / "export", rate=100, write_mode="rename", ground_truth=truth, on_file=on_file,
                    series_pause_s=quiet + 1.0)  # series apart, as on a scanner: each completes on its own
        end = time.monotonic() + quiet + 30
        while len(completed) < len(truth.series) and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        agent.stop()
    return [completed[uid] - last_landed[uid] for uid in last_landed if uid in completed]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vendor", default="siemens")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=2.0, help="quiet period for the no-count case (s)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scanside-bench-"))
    try:
        exam = work / "exam"
        truth = simulate_exam(args.vendor, exam, args.seed, profile="prostate-bpmri")
        files = [str(exam / f) for s in truth.series for f in s.files]
        pin_one_core()
        full = rate(lambda f: pydicom.dcmread(f), files)
        # the like-for-like baseline: the whole file read, then the same vendor decoding
        full_decoded = rate(lambda f: header_from_dataset(pydicom.dcmread(f), f), files)
        header = rate(read_header, files)
        pipe = pipeline_rate(files, work)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1))) if hasattr(os, "sched_setaffinity") else None

        with_count = completion_latency(exam, truth, args.quiet, work / "lat1")
        nocount_exam = work / "exam-nocount"
        strip_counts(exam, nocount_exam)
        without_count = completion_latency(nocount_exam, truth, args.quiet, work / "lat2")
        result = {
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "pydicom": pydicom.__version__,
                        "loadavg": os.getloadavg()},
            "exam": {"vendor": args.vendor, "files": len(files), "series": len(truth.series)},
            "files_per_s_one_core": {"pydicom_full_dcmread_lazy": round(full, 1),
                                     "pydicom_full_dcmread_plus_same_decoding": round(full_decoded, 1),
                                     "read_header": round(header, 1),
                                     "pipeline_header_sqlite_series": round(pipe, 1)},
            "completion_latency_s": {
                "with_expected_count": {"p50": round(statistics.median(with_count), 3), "p95": round(percentile(with_count, 0.95), 3),
                                        "n": len(with_count), "target_p95": 0.3},
                "quiet_period": {"quiet_period_s": args.quiet, "p50": round(statistics.median(without_count), 3),
                                 "p95": round(percentile(without_count, 0.95), 3), "n": len(without_count),
                                 "target_p95": args.quiet + 0.3},
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result["files_per_s_one_core"]
    lat = result["completion_latency_s"]
    print(f"files/s on one core: full dcmread (values left unparsed) {r['pydicom_full_dcmread_lazy']}, full dcmread + "
          f"same decoding {r['pydicom_full_dcmread_plus_same_decoding']}, read_header {r['read_header']}, "
          f"pipeline {r['pipeline_header_sqlite_series']}  ({len(files)} {args.vendor} files)")
    print(f"completion latency with count: p50 {lat['with_expected_count']['p50']} s, p95 {lat['with_expected_count']['p95']} s "
          f"(target 0.3); quiet period {args.quiet} s: p50 {lat['quiet_period']['p50']} s, p95 {lat['quiet_period']['p95']} s "
          f"(target {args.quiet + 0.3})")
    print(f"load average during run: {result['machine']['loadavg']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
