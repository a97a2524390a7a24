"""Idle cost of the daemon with its models loaded: CPU (% of one core) and resident memory.

A child process runs the agent as `scanside run` would (folder watcher, ingest worker, sinks, HTTP
API + console + /metrics on 127.0.0.1, and the image models on the back ends the model store picks by
default), then the virtual scanner writes whole bpMRI exams into its folder: every series is labelled,
the gland segmented, the csPCa model run, so the runtimes hold what a real exam leaves them. The parent
waits for it to settle, then reads /proc/<pid>/stat (utime + stime) over the measuring window and
/proc/<pid>/status (VmRSS, VmHWM). Targets (issue 6): <= 1 % of one core idle; RSS <= 300 MB with the
reference models. Optionally a Prometheus-like scrape of /metrics every 15 s.

    python bench/bench_idle.py [--seconds 20] [--settle 5] [--scrape-every 0]

Three stages in one process, each measured: the agent with its models loaded (READY); after one exam;
after a second exam (does memory keep growing?).

Prints a summary and writes bench/results/idle.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "idle.json"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CPU_TARGET_PCT = 1.0
RSS_TARGET_MB = 300.0


def child(workdir: Path) -> int:
    """The daemon under test. Prints one JSON line when started, then one per command on stdin
    ('exam1', 'exam2': the scanner writes a bpMRI exam, answered once it is analysed), then idles."""
    sys.path.insert(0, str(ROOT))
    from scanside.agent.runtime.config import load_config
    from scanside.agent.service.daemon import Agent
    from scanside.agent.runtime.malloc import limit_malloc_arenas

    limit_malloc_arenas()  # as `scanside run` does
    # the virtual scanner is imported before the agent starts: importing it inside the READY window
    # charged this harness's own import (scipy and the renderer, about 0.3 s of CPU) to the idle agent
    from scanside.simulator.scanner import simulate_exam, stream_exam

    config = load_config(**{"watch.folder": str(workdir / "export"), "state.dir": str(workdir / "state"),
                            "output.stdout": False, "api.enabled": True, "api.port": 0})
    agent = Agent(config).start()
    print(json.dumps({"stage": "agent", "pid": os.getpid(), "api": agent.api_url}), flush=True)

    def models() -> list:
        return [dict(zip(("model", "backend", "precision", "device"), e)) for e in agent.metrics.engine_labels()]

    n_exams = 0
    for command in sys.stdin:
        command = command.strip()
        if command in ("exam1", "exam2"):
            n_exams += 1
            src = workdir / f"src{n_exams}"
            simulate_exam(("siemens", "ge")[n_exams % 2], src, seed=4200 + n_exams, profile="prostate-bpmri", cspca=True)
            t0 = time.perf_counter()
            stream_exam(src, workdir / "export" / src.name, rate=0)
            done = lambda: agent.store.event_counts().get("triage_result", 0) >= n_exams  # noqa: E731
            while not done() and time.perf_counter() - t0 < 600:
                time.sleep(0.5)
            seq = -1
            while seq != agent.store.last_event_seq():  # settled: nothing new for 3 s
                seq = agent.store.last_event_seq()
                time.sleep(3.0)
            print(json.dumps({"stage": command, "models": models(), "exam_s": round(time.perf_counter() - t0, 1),
                              "events": agent.store.event_counts()}), flush=True)
            continue
        if command == "quit":
            break
        print(json.dumps({"stage": command, "models": models()}), flush=True)
    agent.stop()
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="measuring window per stage")
    ap.add_argument("--settle", type=float, default=5.0, help="wait after the agent is ready before measuring")
    ap.add_argument("--scrape-every", type=float, default=0.0, help="also GET /metrics this often (0: pure idle)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)

    stages = []
    with tempfile.TemporaryDirectory(prefix="scanside-idle-") as tmp:
        proc = subprocess.Popen([sys.executable, __file__, "--child", tmp], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
        try:
            ready = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            models: list = []
            for stage in ("agent", "exam1", "exam2"):
                if stage != "agent":
                    proc.stdin.write(stage + "\n")  # type: ignore[union-attr]
                    proc.stdin.flush()  # type: ignore[union-attr]
                    models = json.loads(proc.stdout.readline())["models"]  # type: ignore[union-attr]
                stages.append({"stage": STAGES[stage], **measure(proc.pid, ready["api"], args)})
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    final = stages[-1]
    result = {
        "bench": "idle", "window_s": args.seconds, "settle_s": args.settle, "scrape_every_s": args.scrape_every,
        "cpu_target_pct": CPU_TARGET_PCT, "rss_target_mb": RSS_TARGET_MB, "stages": stages, "models": models,
        "cpu_ok": all(s["cpu_pct_one_core"] <= CPU_TARGET_PCT for s in stages),
        "rss_ok": final["rss_mb"] <= RSS_TARGET_MB,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "command": "python bench/bench_idle.py" + (f" --seconds {args.seconds:g}" if args.seconds != 20 else "")
                   + (f" --scrape-every {args.scrape_every:g}" if args.scrape_every else ""),
    }
    names = ", ".join(m["model"] + " [" + m.get("backend", "error") + "]" for m in models) or "none in the store"
    print(f"models: {names}")
    for s in stages:
        print(f"  {s['stage']:<34} CPU {s['cpu_pct_one_core']:6.3f} % of one core   RSS {s['rss_mb']:6.0f} MB"
              f"   threads {s['threads']}")
    print(f"targets: idle CPU <= {CPU_TARGET_PCT} % ({'met' if result['cpu_ok'] else 'MISSED'}), "
          f"RSS <= {RSS_TARGET_MB:.0f} MB with models ({'met' if result['rss_ok'] else 'MISSED'})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


STAGES = {"agent": "agent, models loaded (READY)", "exam1": "after one bpMRI exam", "exam2": "after a second exam"}


def measure(pid: int, api: str, args: argparse.Namespace) -> dict:
    import urllib.request

    time.sleep(args.settle)
    scrapes = 0
    c0, t0 = cpu_seconds(pid), time.monotonic()
    end = t0 + args.seconds
    next_scrape = t0 if args.scrape_every > 0 else float("inf")
    while time.monotonic() < end:
        if time.monotonic() >= next_scrape:
            urllib.request.urlopen(api + "/metrics", timeout=5).read()
            scrapes += 1
            next_scrape += args.scrape_every
        time.sleep(max(0.0, min(0.5, min(end, next_scrape) - time.monotonic())))
    c1, t1 = cpu_seconds(pid), time.monotonic()
    return {"cpu_pct_one_core": round(100.0 * (c1 - c0) / (t1 - t0), 3),
            "rss_mb": round(status_kb(pid, "VmRSS") / 1024, 1), "rss_peak_mb": round(status_kb(pid, "VmHWM") / 1024, 1),
            "threads": status_kb(pid, "Threads"), "scrapes": scrapes, "window_s": round(t1 - t0, 1)}


if __name__ == "__main__":
    sys.exit(main())
