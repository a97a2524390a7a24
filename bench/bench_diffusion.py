"""What the diffusion physics costs (issue 18; scanside.engines.tasks.diffusion): writes bench/results/diffusion.json.

    python bench/bench_diffusion.py [--real ../shared/realdata/prostate] [--repeats 5]

* ``real``: every voxel grid two or more series of the real exams share (the daemon's volumes,
  scanside.agent.dicom.exam_reader), ``diffusion_roles`` timed (median of ``--repeats``), with what it placed;
* ``worst_case``: the bound, 16 series of 24 x 192 x 192 voxels on one grid (a DWI acquisition with every
  b-value, trace and map exported, and more): the pair search is cubic in the series count.
The daemon runs it once per completed series of a grid that holds three or more.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "diffusion.json"


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 4)


def real_grids(folder: Path, repeats: int) -> list:
    from scanside.agent.dicom.exam_reader import classifier_inputs, read_exams
    from scanside.engines.tasks.diffusion import diffusion_roles
    from scanside.engines.tasks.image_label import same_grid

    out = []
    for exam in read_exams([folder]):
        chosen = {s.series_id for s in classifier_inputs(exam.summaries())}
        named = {f"{es.summary.series_number}{es.summary.part}": es for es in exam.series if es.series_id in chosen}
        vols = {k: es.volume() for k, es in named.items()}
        for keys in same_grid(vols).values():
            arrays = {k: vols[k].array for k in keys}
            roles = diffusion_roles(arrays)
            out.append({"series": keys, "shape": list(vols[keys[0]].shape),
                        "seconds": _median_s(lambda: diffusion_roles(arrays), repeats),
                        "placed": {k: ("ADC" if r.kind == "ADC" else f"DWI step {r.b_step:.0f}" + (" weak" if r.weak else ""))
                                   for k, r in roles.items()}})
    return out


def worst_case(repeats: int) -> Dict[str, Any]:
    from scanside.engines.tasks.diffusion import MAX_SERIES, diffusion_roles

    rng = np.random.default_rng(0)
    shape = (24, 192, 192)
    s0 = rng.uniform(100, 400, shape)
    d = rng.uniform(0.5e-3, 3e-3, shape)
    arrays = {f"b{b}": np.abs(s0 * np.exp(-b * d) + rng.normal(0, 3, shape)).astype(np.float32)
              for b in np.linspace(0, 2000, MAX_SERIES - 1).astype(int)}
    arrays["adc"] = (d * 1e6).astype(np.float32)
    return {"series": len(arrays), "shape": list(shape), "seconds": _median_s(lambda: diffusion_roles(arrays), repeats)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "realdata" / "prostate")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    res: Dict[str, Any] = {
        "command": "python bench/bench_diffusion.py " + " ".join(sys.argv[1:]),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "real": real_grids(a.real, a.repeats) if a.real.is_dir() else f"no real data at {a.real}",
        "worst_case": worst_case(a.repeats),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=1)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
