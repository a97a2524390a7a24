"""`simulate` command: write a virtual scanner exam (batch or real time)."""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from scanside.simulator.protocols import FAULTS, PROFILES
from scanside.simulator.vendors import VENDORS


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("simulate", help="write a simulated prostate MRI exam as vendor DICOM",
                              description="Virtual scanner: phantom exam written as Siemens/GE/Philips DICOM.")
    configure(p)
    p.set_defaults(func=run)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vendor", choices=VENDORS, default="siemens")
    p.add_argument("--out", required=True, type=Path, help="exam folder (batch) or watched folder (--realtime)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fault", action="append", default=[], choices=sorted(FAULTS), help="inject a protocol fault (repeatable)")
    p.add_argument("--profile", choices=PROFILES, default="prostate-mpmri")
    p.add_argument("--field-strength", type=float, choices=(1.5, 3.0), default=3.0)
    p.add_argument("--enhanced", action="store_true", default=None, help="enhanced multi-frame (Philips; XA always)")
    p.add_argument("--mosaic", action="store_true", help="Siemens VE: DWI/ADC as mosaics")
    p.add_argument("--realtime", action="store_true", help="render to a staging folder, then stream into --out")
    p.add_argument("--rate", type=float, default=20.0, help="files per second in --realtime")
    p.add_argument("--write-mode", choices=("chunks", "rename"), default="chunks")
    p.add_argument("--ground-truth", type=Path, default=None,
                   help="where --realtime writes ground truth (default: <out>/../<out name>.ground_truth.json)")


def run(args: argparse.Namespace) -> int:
    from scanside.simulator.scanner import simulate_exam, stream_exam

    kw = dict(faults=args.fault, profile=args.profile, field_strength=args.field_strength,
              enhanced=args.enhanced, mosaic=args.mosaic)
    t0 = time.perf_counter()
    if not args.realtime:
        gt = simulate_exam(args.vendor, args.out, args.seed, **kw)
        n = sum(s.n_files for s in gt.series)
        print(f"wrote {n} files in {len(gt.series)} series to {args.out} ({time.perf_counter() - t0:.1f} s); "
              f"ground truth {args.out / 'ground_truth.json'}")
        return 0
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix="scanside-sim-"))
    stop = threading.Event()
    try:
        gt = simulate_exam(args.vendor, staging, args.seed, **kw)
        gt_path = args.ground_truth or args.out.parent / f"{args.out.name}.ground_truth.json"
        gt_path.parent.mkdir(parents=True, exist_ok=True)
        gt_path.write_text(gt.model_dump_json(indent=2))
        print(f"rendered in {time.perf_counter() - t0:.1f} s; streaming to {args.out} at {args.rate} files/s "
              f"({args.write_mode}); ground truth {gt_path}", flush=True)
        done = stream_exam(staging, args.out, rate=args.rate, write_mode=args.write_mode, stop_event=stop,
                           ground_truth=gt, on_file=lambda p: None)
        print(f"streamed {len(done)} files", flush=True)
        return 0
    except KeyboardInterrupt:
        stop.set()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scanside.simulator")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)
