"""Load: 10 simulated mpMRI exams (Siemens, GE, Philips classic DICOM; long DCE series bring each to ~1,500 files,
~15,000 in all) copied into the watched folder at full disk speed (parallel copy threads) while a
`scanside run` subprocess (defaults: image models on, API on) ingests them.

Measured: seconds from the first file copied until every series of every exam has completed and the
ingest queue has drained (every file recorded), files/s over that span, the copy's own files/s, and
the agent's peak RSS (VmHWM from /proc, sampled VmRSS as a cross-check). Writes bench/results/load.json.

    .venv/bin/python bench/bench_load.py [--exams 10] [--dce-phases 65] [--copy-threads 8]

Simulated exams are cached under var/bench-load/ (gitignored) so a rerun only measures the agent."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VENDORS = ["siemens", "ge", "philips"]  # classic one-file-per-image styles (XA and Philips enhanced write one file per series)
MEMORY_BOUND_MB = 384  # documented bound: agent peak RSS under this load (observed 205 MB on 2 cores, image models on)


def _simulate(args: tuple[str, int, int, str]) -> tuple[str, int, int]:
    from scanside.simulator.protocols import build_exam
    from scanside.simulator.scanner import load_ground_truth, simulate_exam

    vendor, seed, phases, out = args
    out_dir = Path(out)
    if (out_dir / "ground_truth.json").exists():
        gt = load_ground_truth(out_dir)
    else:
        spec = build_exam("prostate-mpmri", vendor, 3.0, [])
        spec = spec.model_copy(update={"series": [s.model_copy(update={"n_phases": phases}) if s.kind == "dce" else s
                                                  for s in spec.series]})
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        gt = simulate_exam(vendor, tmp, seed, exam=spec)
        os.replace(tmp, out_dir)
    return gt.study_uid, sum(s.n_files for s in gt.series), sum(len(s.parts) for s in gt.series)


def _rss_kb(pid: int, field: str) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exams", type=int, default=10)
    ap.add_argument("--dce-phases", type=int, default=65)
    ap.add_argument("--copy-threads", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "bench-load")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    jobs = [(VENDORS[i % len(VENDORS)], 100 + i, args.dce_phases, str(args.cache / f"exam{i:02d}-{VENDORS[i % len(VENDORS)]}-p{args.dce_phases}"))
            for i in range(args.exams)]
    t = time.monotonic()
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        exams = list(pool.map(_simulate, jobs))
    print(f"simulated/cached {len(exams)} exams in {time.monotonic() - t:.0f} s", flush=True)
    n_files = sum(n for _, n, _ in exams)
    n_parts = sum(p for _, _, p in exams)

    work = Path(tempfile.mkdtemp(prefix="scanside-load-"))
    export, state = work / "export", work / "state"
    export.mkdir()
    cfg = work / "scanside.toml"
    # quiet periods as a site would set them; only the logging and the free port are bench choices
    cfg.write_text("[output]\nstdout = false\n[readiness]\nmin_free_disk_bytes = 0\n")
    log = open(work / "agent.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "scanside.agent.cli", "run", "--config", str(cfg), "--watch", str(export),
                             "--state-dir", str(state), "--api-port", "0"], stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            samples.append(_rss_kb(proc.pid, "VmRSS"))
    threading.Thread(target=sample, daemon=True).start()
    try:
        # wait until the agent is up (console line on stderr: models loaded, watching)
        end = time.monotonic() + 180
        while "console http" not in (work / "agent.log").read_text():
            if proc.poll() is not None or time.monotonic() > end:
                raise SystemExit("agent did not start:\n" + (work / "agent.log").read_text()[-3000:])
            time.sleep(0.2)
        idle_rss_mb = _rss_kb(proc.pid, "VmRSS") / 1024

        pairs = []
        for (_, _, _), (_, _, _, out) in zip(exams, jobs):
            src = Path(out)
            gt = json.loads((src / "ground_truth.json").read_text())
            for s in gt["series"]:
                pairs += [(src / f, export / src.name / f) for f in s["files"]]

        def copy(pair) -> None:
            s, d = pair
            d.parent.mkdir(parents=True, exist_ok=True)
            tmp = d.with_name("." + d.name + ".tmp")
            shutil.copyfile(s, tmp)
            os.replace(tmp, d)  # a finished file appears at once, as from a scanner writing via rename

        t0 = time.monotonic()
        with ThreadPoolExecutor(args.copy_threads) as pool:
            list(pool.map(copy, pairs, chunksize=64))
        copy_s = time.monotonic() - t0
        print(f"copied {len(pairs)} files in {copy_s:.1f} s ({len(pairs) / copy_s:.0f} files/s)", flush=True)

        db = sqlite3.connect(f"file:{state / 'state.sqlite'}?mode=ro", uri=True, timeout=30)
        progress = []
        while True:
            ingested = db.execute("SELECT COUNT(*) FROM files WHERE status IN ('ingested','duplicate','quarantined','ignored')").fetchone()[0]
            completed = db.execute("SELECT COUNT(DISTINCT key) FROM events WHERE type='series_completed'").fetchone()[0]
            now = time.monotonic() - t0
            if not progress or now - progress[-1][0] >= 10:
                progress.append((round(now, 1), ingested, completed))
                print(f"  t={now:6.1f}s files {ingested}/{n_files} series {completed}/{n_parts}", flush=True)
            if ingested >= n_files and completed >= n_parts:
                break
            if proc.poll() is not None or now > args.timeout:
                raise SystemExit("agent died or timed out:\n" + (work / "agent.log").read_text()[-3000:])
            time.sleep(0.5)
        drain_s = time.monotonic() - t0
        ingest_done = next((p[0] for p in progress if p[1] >= n_files), drain_s)
        peak_kb = _rss_kb(proc.pid, "VmHWM")
        classified = db.execute("SELECT COUNT(*) FROM events WHERE type='series_classified'").fetchone()[0]
        db.close()
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    peak_mb = peak_kb / 1024
    result = {
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},
        "load": {"exams": len(exams), "vendors": sorted({j[0] for j in jobs}), "files": n_files, "series_parts": n_parts,
                 "dce_phases": args.dce_phases, "copy_threads": args.copy_threads},
        "copy_s": round(copy_s, 2), "copy_files_per_s": round(n_files / copy_s, 1),
        "all_series_complete_and_queue_drained_s": round(drain_s, 1),
        "agent_files_per_s": round(n_files / drain_s, 1),
        "series_classified_by_image_model_at_drain": classified,
        "rss_mb": {"idle_after_start": round(idle_rss_mb, 1), "peak_vmhwm": round(peak_mb, 1),
                   "peak_sampled": round(max(samples or [0]) / 1024, 1)},
        "memory_bound_mb": MEMORY_BOUND_MB, "within_bound": peak_mb < MEMORY_BOUND_MB,
        "progress_s_files_series": progress,
        "command": "python bench/bench_load.py",
    }
    print(json.dumps({k: v for k, v in result.items() if k != "progress_s_files_series"}, indent=2))
    out = ROOT / "bench" / "results" / "load.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if result["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
