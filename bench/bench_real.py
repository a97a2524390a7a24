"""Image models on real scans, from one command (issue 18): writes bench/results/real.json.

    python bench/bench_real.py [--real ../shared/realdata/prostate] [--taps-store DIR] [--sim-exams-per-vendor 2]

Sections (each model family adds its own; the sequence classifier's rows come from its own evaluator):

* ``cspca-reference``: `scanside models evaluate cspca-reference --real DIR` (per exam: the inputs the
  daemon picks, NOT_ASSESSED and why, DCE_ADVISED, findings of the model and those dropped outside the
  gland, technologist alerts in shadow mode and if the model were validated), next to the same model on
  fresh simulated exams (AUROC, NOT_ASSESSED rate) from the simulated evaluation;
* ``gland``: the zonal reference model and TAPS on the real axial T2W, each against the other (volume, Dice);
* ``daemon_shadow``: the whole agent (ingest, classifier, gland, triage, alerts) run on each real exam
  folder with its defaults (shadow mode on): technologist alerts by code, and how many came from an
  image model (target 0), the console's "image checks" line.

TAPS is used where it has been imported (``--taps-store``, default: the user model dir or engines/models).
No patient identifiers are written: exams are opaque hashes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "real.json"
IMAGE_ALERTS = ("LABEL_MISMATCH", "TRIAGE_DCE_ADVISED", "TRIAGE_BPMRI_SUFFICIENT")


def _stores(taps_store: Any) -> List[str]:
    from scanside.engines.store import PACKAGE_MODELS_DIR

    return [str(PACKAGE_MODELS_DIR)] + ([str(taps_store)] if taps_store else [])


def _evaluate(stores: List[str], name: str, real: List[Path], **kw: Any) -> Dict[str, Any]:
    from scanside.engines.store import ModelStore
    from scanside.training.registry import EvaluateOptions, evaluator_for, real_evaluator_for

    store = ModelStore(stores)
    m = store.resolve(name)
    opts = EvaluateOptions(real=real, **kw)
    t0 = time.time()
    rep = (real_evaluator_for if real else evaluator_for)(m.task)(store, m, opts)
    rep["seconds"] = round(time.time() - t0, 1)
    return rep


def daemon_shadow(folder: Path, stores: List[str], timeout: float = 900.0) -> Dict[str, Any]:
    """The whole agent on one real exam folder, defaults (shadow mode on): the alerts the technologist sees."""
    from scanside.agent.state.alerts import alert_from_event
    from scanside.agent.runtime.config import load_config
    from scanside.agent.service.daemon import Agent

    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        os.environ["SCANSIDE_MODELS_DIR"] = os.pathsep.join(stores)
        config = load_config(**{"watch.folder": str(folder), "state.dir": tmp, "output.stdout": False,
                                "watch.settle_s": 0.1, "series.quiet_period_s": 1.0, "protocol.exam_quiet_period_s": 3.0})
        t0 = time.time()
        agent = Agent(config).start()
        try:
            while time.time() - t0 < timeout:
                s = agent.store
                if s.event_counts().get("exam_completed") and s.cursor("analysis") >= s.last_event_seq():
                    time.sleep(1.0)
                    if s.cursor("analysis") >= s.last_event_seq():
                        break
                time.sleep(0.5)
            events = agent.store.events_after(0, limit=1_000_000)
            line = agent.analyzer.image_checks()
        finally:
            agent.stop()
    alerts: Dict[str, int] = {}
    for ev in events:
        a = alert_from_event(ev)
        if a is not None:
            alerts[a.code] = alerts.get(a.code, 0) + 1
    triage = [e for e in events if e.type == "triage_result"]
    classified = [e for e in events if e.type == "series_classified"]
    return {"seconds": round(time.time() - t0, 1), "alerts_by_code": alerts,
            "image_model_alerts": sum(n for c, n in alerts.items() if c in IMAGE_ALERTS),
            "label_mismatch_events_recorded": sum(e.type == "label_mismatch" for e in events),
            "series_classified": len(classified), "classifier_agreement": round(sum(e.agree for e in classified) / len(classified), 3)
            if classified else None,
            "triage": [{"recommendation": t.recommendation, "shadow": t.shadow, "reason": t.not_assessed_reason,
                        "gland_check": t.gland_check, "findings": len(t.findings),
                        "findings_outside_gland": t.findings_outside_gland} for t in triage],
            "image_checks": line}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "realdata" / "prostate")
    ap.add_argument("--taps-store", type=Path, default=None, help="a store root holding prostate-gland-taps")
    ap.add_argument("--sim-exams-per-vendor", type=int, default=2)
    ap.add_argument("--skip-daemon", action="store_true")
    a = ap.parse_args()
    if not a.real.is_dir():
        print(f"no real data at {a.real}", file=sys.stderr)
        return 2
    stores = _stores(a.taps_store)
    prev = json.loads(OUT.read_text()) if OUT.is_file() else {}
    res: Dict[str, Any] = {k: v for k, v in prev.items() if k not in ("cspca-reference", "gland", "daemon_shadow")}
    res.update({"command": "python bench/bench_real.py " + " ".join(sys.argv[1:]),
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
                "data": {"real": str(a.real), "note": "real scanner DICOM nobody on this project wrote (see its README)"}})
    cs = _evaluate(stores, "cspca-reference", [a.real])
    sim = _evaluate(stores, "cspca-reference", [], exams_per_vendor=a.sim_exams_per_vendor)
    res["cspca-reference"] = {
        "real": {"gland_model": cs["gland_model"], "metrics": cs["metrics"], "rows": cs["rows"]},
        "simulated": {"exams": sim["metrics"]["n"], "auroc": sim["metrics"].get("auroc"),
                      "not_assessed_rate": sim["metrics"].get("not_assessed_rate"),
                      "command": f"scanside models evaluate cspca-reference --exams-per-vendor {a.sim_exams_per_vendor}"}}
    res["gland"] = {}
    for name in ("prostate-zones-reference", "prostate-gland-taps"):
        try:
            g = _evaluate(stores, name, [a.real])
        except Exception as e:  # TAPS not imported
            res["gland"][name] = {"not_measured": f"{type(e).__name__}: {e}"}
            continue
        res["gland"][name] = {"metrics": g["metrics"], "usable_on_real": g["usable_on_real"], "rows": g["rows"]}
    if not a.skip_daemon:
        res["daemon_shadow"] = {p.name: daemon_shadow(p, stores) for p in sorted(a.real.iterdir()) if p.is_dir()}
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("cspca-reference", "daemon_shadow") if k in res}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
