"""One command: INT8 variants of a store model with their parity reports, from simulated DICOM.

    python -m scanside.converters.int8_release MODEL[@VERSION] [--calib-exams 6] [--heldout-exams 16] [--seed 810000]
                                      [--profile prostate-bpmri|prostate-mpmri] [--store DIR] [--work DIR]
                                      [--method minmax|entropy|percentile]

1. simulates calibration and held-out exams (different seeds, csPCa alternating, the four vendor styles) into
   --work (default var/int8/<name>-<version>; DICOM is never written into the repository);
2. ``scanside convert calibrate`` on the calibration exams: one calibration, the symmetric (TensorRT) and
   the U8/S8 (CPU) variants, nodes kept FP32 chosen by measurement (--select-nodes), written beside the
   model with the calibration tensors and recorded in its manifest;
3. ``scanside convert parity`` on the held-out exams: ONNX Runtime and OpenVINO entries per variant (task
   metric, output differences), recorded in the manifest -- the store's parity gate reads them;
4. the model card of a reference model re-rendered from the manifest, so its INT8 section is never stale.

The model's inputs are prepared exactly as the agent prepares them (scanside.converters.calibration_data.build_set);
a series classifier (channel "series") gets one sample per series of every exam, labelled by the header
rules.  Prints a summary and the gate's verdict per variant and back end.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

VENDORS = ("siemens", "ge", "philips", "siemens-xa")
#: where each reference model's card is rendered (its INT8 section is read from the manifest)
CARD_WRITERS = {"sequence-classifier": "scanside.training.sequence.export", "cspca-reference": "scanside.training.cspca.export",
                "prostate-zones-reference": "scanside.training.zones.export"}


def refresh_card(m: Any) -> Optional[Path]:
    """Rewrites the model card of a reference model from its updated manifest; None for other models (their
    cards are not ours to write).  The sequence family needs the ``train`` extra (torch)."""
    import importlib

    module = CARD_WRITERS.get(m.name)
    if module is None or m.root is None:
        return None
    return importlib.import_module(module).write_card(m, Path(m.root))


def simulate(dest: Path, n: int, seed0: int, profile: str) -> List[Path]:
    from scanside.simulator.scanner import simulate_exam

    out = []
    for i in range(n):
        d = dest / f"exam{i:02d}"
        if not (d / "ground_truth.json").is_file():
            simulate_exam(VENDORS[i % len(VENDORS)], d, seed0 + i, profile=profile, cspca=(i % 2 == 0))
        out.append(d)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="NAME[@VERSION] in the model store")
    ap.add_argument("--store", action="append", metavar="DIR", help="model store root (default engines/models)")
    ap.add_argument("--work", type=Path, default=None, help="where the simulated DICOM goes (default var/int8/...)")
    ap.add_argument("--calib-exams", type=int, default=6)
    ap.add_argument("--heldout-exams", type=int, default=16)
    ap.add_argument("--seed", type=int, default=810000, help="calibration seeds from here, held-out from +10000")
    ap.add_argument("--profile", default="prostate-bpmri", choices=["prostate-bpmri", "prostate-mpmri"])
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (default: all)")
    ap.add_argument("--heldout-samples", type=int, default=None, help="held-out samples (default: all)")
    ap.add_argument("--op-types", default="Conv,Resize,MatMul,Gemm")
    ap.add_argument("--max-rel-error", type=float, default=0.05)
    ap.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"],
                    help="activation range calibration (percentile: 99.999th of |x|, ignores rare outliers)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reduce-range", default="on", choices=["on", "off", "auto"],
                    help="7-bit weights in the U8/S8 CPU variant. on (default): a released file runs on CPUs it was "
                         "not made on, and U8/S8 without VNNI saturates 8-bit weights; auto: decided by this CPU")
    args = ap.parse_args(argv)

    from scanside.converters.calibrate import calibrate
    from scanside.converters.calibration_data import build_set
    from scanside.converters.parity import parity_report, record
    from scanside.engines.manifest import ModelManifest
    from scanside.engines.store import ModelStore, parity_refusal

    store = ModelStore(args.store or None, user_dir=None)
    m = store.resolve(args.model)
    work = args.work or Path("var") / "int8" / f"{m.name}-{m.version}"
    t0 = time.perf_counter()
    calib = simulate(work / "calib", args.calib_exams, args.seed, args.profile)
    held = simulate(work / "heldout", args.heldout_exams, args.seed + 10000, args.profile)
    sim_s = time.perf_counter() - t0
    print(f"{m.ref}: {len(calib)} calibration + {len(held)} held-out exams in {work} ({sim_s:.0f} s)", flush=True)

    cset = build_set(m, calib, max_samples=args.samples)
    ops = [o.strip() for o in args.op_types.split(",") if o.strip()]
    rr = {"on": True, "off": False, "auto": None}[args.reduce_range]
    r = calibrate(m, cset, method=args.method, variants=("int8_sym", "int8_u8s8"), candidates=ops, reduce_range=rr,
                  select_nodes_fp32=True, max_rel_error=args.max_rel_error, threads=args.threads,
                  data_description=f"{len(cset)} samples from {len(set(cset.sources))} series of {len(calib)} "
                                   f"simulated {args.profile} exams (seeds {args.seed}..), agent preprocessing")
    m = ModelManifest.load(r.manifest.root)
    hset = build_set(m, held, max_samples=args.heldout_samples)
    rep = parity_report(m, hset, threads=args.threads, data_description=(
        f"{len(hset)} samples from {len(held)} held-out simulated {args.profile} exams "
        f"(seeds {args.seed + 10000}..), agent preprocessing"))
    m = record(m, rep)
    summary: Dict[str, Any] = {"model": m.ref, "calibration_samples": len(cset), "heldout_samples": len(hset),
                               "seconds": {"simulate": round(sim_s, 1), **r.seconds}, "variants": {}}
    for key, e in rep["variants"].items():
        v = key.split(":")[-1]
        mf = m.files.get(v)
        verdict = parity_refusal(m, key, "int8", mf.sha256, store.int8_tolerance) if mf else "no file"
        summary["variants"][key] = {"metric": e.get("metric"), "value": e.get("value"), "loss": e.get("loss"),
                                    "max_abs_diff": e.get("max_abs_diff"), "median_latency_s": e.get("median_latency_s"),
                                    "gate": verdict or "passes"}
    summary["nodes_kept_fp32"] = {k: sorted(n.kept_fp32) for k, n in r.nodes.items()}
    summary["store_default"] = ModelStore(args.store or None, user_dir=None).explain(m).summary()
    try:
        card = refresh_card(m)
        summary["model_card"] = str(card) if card else "not a reference model: card left as it is"
    except ImportError as exc:  # the sequence family's renderer needs torch
        summary["model_card"] = f"not refreshed ({exc}); install the train extra and run again"
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
