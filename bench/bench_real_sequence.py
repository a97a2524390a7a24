"""The sequence classifier on real scans next to the simulator, from one command (issue 18): writes the
``sequence-classifier`` section of bench/results/real.json (bench/bench_real.py keeps it).

    python bench/bench_real_sequence.py [--real ../shared/realdata/prostate] [--models sequence-classifier@1.4.0,sequence-classifier@1.4.1,sequence-classifier]
                                        [--sim-exams-per-vendor 1] [--sim-seed 960000]

For each model: `scanside models evaluate NAME --real DIR` (the daemon's read path and labels, the diffusion
physics across each exam's series included; five-class and
all-class accuracy with `uncertain` counted wrong, accuracy of the most probable class, uncertain
rate, confident and wrong, would-be false LABEL_MISMATCH alerts per exam) and the same model on a
fresh simulated set (`scanside models evaluate NAME --exams-per-vendor N --seed S`, most probable
class, as every simulated figure in the model cards). Exams are opaque hashes; no patient data.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "real.json"
KEY = "sequence-classifier"


def measure(name: str, real: Path, sim_n: int, sim_seed: int) -> Dict[str, Any]:
    from scanside.engines.store import ModelStore
    from scanside.training.registry import EvaluateOptions
    from scanside.training.sequence.evaluate import evaluate_model
    from scanside.training.sequence.real import evaluate_real

    store = ModelStore()
    m = store.resolve(name)
    t0 = time.time()
    r = evaluate_real(store, m, EvaluateOptions(real=[real]))
    out: Dict[str, Any] = {"model": m.ref, "gate": bool((m.postprocessing or {}).get("uncertainty")),
                           "real": {"metrics": r["metrics"], "false_alerts": r["false_alerts"], "exams": r["exams"],
                                    "per_class": r["per_class"]["five_class"] if "five_class" in r["per_class"] else None,
                                    "seconds": round(time.time() - t0, 1),
                                    "command": f"scanside models evaluate {name} --real {real}"}}
    if sim_n:
        # one simulated set for every model compared (the evaluation reuses exams already in its workdir)
        work = ROOT / "var" / "bench-real-sequence" / f"sim-{sim_seed}-{sim_n}"
        s = evaluate_model(store, m, EvaluateOptions(exams_per_vendor=sim_n, seed=sim_seed, workdir=work))
        out["simulated"] = {k: {"n": v["n"], "accuracy": round(v["accuracy"], 4)} for k, v in s["metrics"].items()}
        out["simulated"]["gate"] = s.get("gate")  # uncertain rate of the uncertainty gate on the fresh simulated set
        out["simulated"]["network"] = s.get("network")  # the network alone, before the diffusion physics
        out["simulated"]["command"] = f"scanside models evaluate {name} --exams-per-vendor {sim_n} --seed {sim_seed}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "realdata" / "prostate")
    ap.add_argument("--models", default=f"{KEY}@1.4.0,{KEY}@1.4.1,{KEY}")
    ap.add_argument("--sim-exams-per-vendor", type=int, default=1)
    ap.add_argument("--sim-seed", type=int, default=960_000)
    a = ap.parse_args()
    if not a.real.is_dir():
        print(f"no real data at {a.real}", file=sys.stderr)
        return 2
    res = json.loads(OUT.read_text()) if OUT.is_file() else {}
    res[KEY] = {"command": "python bench/bench_real_sequence.py " + " ".join(sys.argv[1:]),
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
                "target": {"real_five_class_accuracy": 0.95, "simulated_accuracy": 0.99},
                "models": [measure(n.strip(), a.real, a.sim_exams_per_vendor, a.sim_seed) for n in a.models.split(",")]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    for m in res[KEY]["models"]:
        f = m["real"]["metrics"]["five_class"]
        print(f"{m['model']}: real five-class {f['accuracy']:.3f} (argmax {f['accuracy_argmax']:.3f}, uncertain "
              f"{f['uncertain_rate']:.2f}, confident wrong {f['confident_wrong']}), false alerts {m['real']['false_alerts']}; "
              f"simulated {m.get('simulated', {}).get('all')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
