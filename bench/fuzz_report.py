"""Fuzz the ingest path and record what happened: runs tests/agent/test_fuzz.py under a hypothesis
profile (ci: the deterministic `make test` form; soak: the long one) and writes the outcome counts per
stage (read_header, load_volume, pipeline) to bench/results/fuzz.json under the profile's name.

    .venv/bin/python bench/fuzz_report.py [ci|soak]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "fuzz.json"


def main(profile: str = "ci") -> int:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "counts.json"
        env = dict(os.environ, SCANSIDE_FUZZ_PROFILE=profile, SCANSIDE_FUZZ_OUT=str(out))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=0",
                               "tests/agent/test_fuzz.py"], cwd=ROOT, env=env)
        wall = time.perf_counter() - t0
        counts = json.loads(out.read_text()) if out.exists() else {}
    tried = {stage: sum(c.values()) for stage, c in counts.items()}
    record = {
        "profile": profile,
        "passed": proc.returncode == 0,
        "wall_s": round(wall, 1),
        "inputs_tried": tried,
        "outcomes": counts,
        "command": f"{Path(sys.executable).name} bench/fuzz_report.py {profile}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[profile] = record
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "ci"))
