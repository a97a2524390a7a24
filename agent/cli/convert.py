"""`scanside convert calibrate|trt|parity`.

    scanside convert calibrate MODEL --data DICOM_DIR [--method minmax|entropy|percentile] [--samples N]
    scanside convert parity MODEL --data HELDOUT_DICOM_DIR   (or --tensors held-out.npz)

A site makes the INT8 files it runs from its own exams (docs/int8-calibration.md): calibration and parity
records say whether their data were real or simulated, and the agent runs an INT8 variant on real exams only
on real-data parity.
    scanside convert trt MODEL [--precision int8_qdq|fp32|fp16|int8_implicit] [--dla-core N] ...

MODEL is NAME[@VERSION] in the model store (--store DIR, default $SCANSIDE_MODELS_DIR or engines/models).
Standalone: ``python -m scanside.agent.cli.convert convert ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, List, Optional


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="INT8 calibration, TensorRT plans, parity reports",
                              description="Model conversion on real DICOM data, prepared as the agent prepares it")
    p.add_argument("--store", action="append", metavar="DIR", help="model store root (repeatable)")
    sub = p.add_subparsers(dest="convert_cmd", metavar="{calibrate,trt,parity}")
    sub.required = True

    cal = sub.add_parser("calibrate", help="INT8 Q/DQ variants (symmetric for TensorRT, U8/S8 for CPU)")
    cal.add_argument("model", help="NAME[@VERSION]")
    cal.add_argument("--data", type=Path, action="append", required=True, metavar="DICOM_DIR",
                     help="DICOM folder(s) with the series the model takes (repeatable)")
    cal.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax")
    cal.add_argument("--variants", default="int8_sym,int8_u8s8", help="comma-separated: int8_sym, int8_u8s8")
    cal.add_argument("--samples", type=int, default=16, help="at most this many calibration samples")
    cal.add_argument("--windows-per-series", type=int, default=2, help="sliding-window models: windows per series")
    cal.add_argument("--max-rel-error", type=float, default=0.10,
                     help="an op type whose quantization alone changes the output more than this stays FP32")
    cal.add_argument("--no-select-ops", action="store_true", help="quantize every candidate op type unmeasured")
    cal.add_argument("--op-types", default=None,
                     help="comma-separated op types to try quantizing (default Conv,ConvTranspose,MatMul,Gemm)")
    cal.add_argument("--select-nodes", action="store_true",
                     help="measure keeping the first/last convolution and convolutions after a Resize in FP32; "
                          "keep those that help (recorded in the manifest)")
    cal.add_argument("--keep-fp32", default="", help="comma-separated node names kept FP32 as asked")
    cal.add_argument("--tool", choices=["onnxruntime", "modelopt"], default="onnxruntime")
    cal.add_argument("--threads", type=int, default=None)

    par = sub.add_parser("parity", help="FP32 vs INT8 (vs TensorRT) on held-out data; recorded in the manifest")
    par.add_argument("model")
    src = par.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, action="append", metavar="DICOM_DIR", help="held-out DICOM folder(s)")
    src.add_argument("--tensors", type=Path, help="a saved calibration-set .npz of held-out samples")
    par.add_argument("--samples", type=int, default=16)
    par.add_argument("--windows-per-series", type=int, default=1)
    par.add_argument("--variants", default=None, help="comma-separated (default: every non-FP32 file)")
    par.add_argument("--no-tensorrt", action="store_true")
    par.add_argument("--no-openvino", action="store_true",
                     help="do not measure the openvino:<variant> entries (the gate then refuses OpenVINO INT8)")
    par.add_argument("--threads", type=int, default=None)
    par.add_argument("--dry-run", action="store_true", help="print the report, do not write the manifest")

    trt = sub.add_parser("trt", help="build a TensorRT plan (needs tensorrt and a GPU)")
    trt.add_argument("model")
    trt.add_argument("--precision", choices=["int8_qdq", "fp32", "fp16", "int8_implicit"], default="int8_qdq")
    trt.add_argument("--opt", action="append", default=[], metavar="DIM=N", help="optimal size of a named dim")
    trt.add_argument("--max", action="append", default=[], metavar="DIM=N", help="largest size of a named dim")
    trt.add_argument("--timing-cache", type=Path, help="timing cache file (read and updated)")
    trt.add_argument("--dla-core", type=int, default=None, help="build for this DLA core, GPU fallback on")
    trt.add_argument("--hardware-compatibility", choices=["none", "ampere_plus", "same_compute_capability"],
                     default="none")
    trt.add_argument("--version-compatible", action="store_true")
    trt.add_argument("--workspace-mib", type=int, default=2048)
    trt.add_argument("--calibration-cache", type=Path, help="int8_implicit (TensorRT 10): calibration cache")
    trt.add_argument("--data", type=Path, action="append", help="int8_implicit: DICOM folder(s) to calibrate on")
    p.set_defaults(func=run)
    return p


def _dims(items: List[str]) -> dict:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not v.isdigit():
            raise ValueError(f"expected DIM=N, got {it!r}")
        out[k] = int(v)
    return out


def run(args: argparse.Namespace) -> int:
    from scanside.engines.store import ModelNotFound, ModelStore

    store = ModelStore(args.store or None)
    try:
        manifest = store.resolve(args.model)
    except (ModelNotFound, ValueError) as e:
        print(f"scanside convert: {e}", file=sys.stderr)
        return 2
    try:
        if args.convert_cmd == "calibrate":
            return _calibrate(args, manifest)
        if args.convert_cmd == "parity":
            return _parity(args, manifest)
        return _trt(args, manifest)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"scanside convert {args.convert_cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _calibrate(args: argparse.Namespace, manifest: Any) -> int:
    from scanside.converters.calibrate import calibrate
    from scanside.converters.calibration_data import build_set

    cset = build_set(manifest, args.data, max_samples=args.samples, windows_per_series=args.windows_per_series)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    r = calibrate(manifest, cset, method=args.method, variants=variants, select_ops=not args.no_select_ops,
                  max_rel_error=args.max_rel_error, tool=args.tool, threads=args.threads,
                  select_nodes_fp32=args.select_nodes,
                  keep_fp32=[n.strip() for n in args.keep_fp32.split(",") if n.strip()],
                  **({"candidates": [t.strip() for t in args.op_types.split(",") if t.strip()]} if args.op_types else {}),
                  data_description=f"{len(cset)} samples from {len(set(cset.sources))} series")
    print(json.dumps({"model": manifest.ref, "samples": len(cset), "series": len(set(cset.sources)),
                      "data_origin": cset.origin_summary(),
                      "tensors": str(r.tensors_path), "ranges": str(r.ranges_path), "seconds": r.seconds,
                      "variants": {k: {"path": str(p), "op_types_quantized": r.selections[k].kept,
                                       "op_type_rel_error": r.selections[k].measured,
                                       "kept_fp32": r.selections[k].dropped,
                                       "nodes_kept_fp32": (r.nodes[k].kept_fp32 if k in r.nodes else {}),
                                       "node_measurements": (r.nodes[k].measured if k in r.nodes else {})}
                                   for k, p in r.variants.items()},
                      "next": f"scanside convert parity {manifest.name}@{manifest.version} --data HELDOUT_DIR"},
                     indent=2))
    return 0


def _parity(args: argparse.Namespace, manifest: Any) -> int:
    from scanside.converters.calibration_data import CalibrationSet, build_set
    from scanside.converters.parity import parity_report, record

    if args.tensors:
        held = CalibrationSet.load(args.tensors)
    else:
        held = build_set(manifest, args.data, max_samples=args.samples, windows_per_series=args.windows_per_series)
    variants: Optional[List[str]] = [v.strip() for v in args.variants.split(",")] if args.variants else None
    rep = parity_report(manifest, held, variants=variants, tensorrt=not args.no_tensorrt, threads=args.threads,
                        openvino=not args.no_openvino)
    if not args.dry_run:
        record(manifest, rep)
    from scanside.engines.store import DEFAULT_INT8_TOLERANCE

    print(json.dumps(rep, indent=2))
    worst = max((v.get("loss", 0) for v in rep["variants"].values()), default=0.0)
    print(f"worst loss {worst:g} (default gate tolerance {DEFAULT_INT8_TOLERANCE:g}); measured on "
          f"{rep['data']['origin']} data", file=sys.stderr)
    if rep["data"]["origin"] not in ("real", "mixed"):
        print("note: parity on simulated data only: the agent ([engines] parity_data = real) will not run these INT8 "
              "variants on real exams; measure on held-out real exams (--data)", file=sys.stderr)
    return 0


def _trt(args: argparse.Namespace, manifest: Any) -> int:
    from scanside.converters.tensorrt_build import BuildOptions, build_plan, calibration_batches, profile_shapes, skip_reason

    why = skip_reason()
    if why:
        print(f"scanside convert trt: cannot build here: {why}", file=sys.stderr)
        return 3
    batches = None
    if args.precision == "int8_implicit" and args.data:
        from scanside.converters.calibration_data import build_set

        cset = build_set(manifest, args.data)  # batches at the calibration profile's opt shape
        shapes = profile_shapes(manifest, opt=_dims(args.opt), max_=_dims(args.max), static=args.dla_core is not None)
        batches = calibration_batches(cset.inputs, cset.input_name, shapes)
    opts = BuildOptions(precision=args.precision, workspace_bytes=args.workspace_mib << 20, opt=_dims(args.opt),
                        max=_dims(args.max), timing_cache=args.timing_cache, dla_core=args.dla_core,
                        hardware_compatibility=args.hardware_compatibility, version_compatible=args.version_compatible,
                        calibration_cache=args.calibration_cache, calibration_batches=batches)
    updated, report = build_plan(manifest, opts)
    print(json.dumps({"model": updated.ref, "plan": updated.plans[-1].model_dump(), "layers": report}, indent=2,
                     default=str))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="scanside")
    sub = ap.add_subparsers(dest="cmd")
    sub.required = True
    add_parser(sub)
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
