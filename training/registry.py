"""Task registry: which evaluator and which trainer serve `scanside models evaluate|train`.

`scanside models evaluate NAME` reads NAME's manifest and dispatches on ``manifest.task`` through
EVALUATORS; `scanside models train KIND ...` dispatches on KIND through TRAINERS. Entries are
"module:function" strings, imported only when used (torch stays out of the runtime path).

Evaluator contract::

    def evaluate(store: scanside.engines.store.ModelStore, manifest: scanside.engines.manifest.ModelManifest,
                 options: scanside.training.registry.EvaluateOptions) -> dict

returns a JSON-able report with at least ``{"model": ref, "metrics": {...}, "floor": {...} | None,
"passed": bool}``; with ``options.write`` it also records the metrics in the manifest and writes
the markdown report beside it.

Trainer contract::

    def add_arguments(parser: argparse.ArgumentParser) -> None   # KIND's own options
    def train(args: argparse.Namespace) -> int                    # exit code

Other helpers add their task here (one line each).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from pydantic import BaseModel, Field

#: manifest task -> "module:function" of its evaluator
EVALUATORS: Dict[str, str] = {
    "sequence_classification": "scanside.training.sequence.evaluate:evaluate_model",
    "cspca_detection": "scanside.training.cspca.evaluate:evaluate_model",
    "gland_segmentation": "scanside.training.zones.evaluate:evaluate_model",
}

#: manifest task -> "module:function" of its real-data evaluator (`models evaluate NAME --real DIR`), same
#: contract as EVALUATORS; ``options.real`` holds the folders. It reads exams with scanside.agent.dicom.exam_reader.read_exams
#: (the daemon's read path) and reports per series / per exam, the header labels as reference where there is
#: no other label. A task without one says so.
REAL_EVALUATORS: Dict[str, str] = {
    "sequence_classification": "scanside.training.sequence.real:evaluate_real",
    "cspca_detection": "scanside.training.cspca.evaluate:evaluate_real",
    "gland_segmentation": "scanside.training.zones.evaluate:evaluate_real",
}

#: `models train KIND` -> "module" providing add_arguments(parser) and train(args)
TRAINERS: Dict[str, str] = {
    "sequence": "scanside.training.sequence.retrain",
}


class EvaluateOptions(BaseModel):
    """Options every evaluator accepts (an evaluator may ignore what does not apply)."""

    exams_per_vendor: Optional[int] = Field(None, description="fresh simulated exams per vendor (None: evaluator default)")
    seed: int = Field(900_000, description="first simulator seed of the held-out set (training never uses it)")
    workdir: Optional[Path] = Field(None, description="where simulated DICOM is written (default: a temp dir)")
    write: bool = Field(False, description="record metrics in the manifest and write the markdown report")
    variant: Optional[str] = None
    jobs: int = Field(1, ge=1, description="worker processes for simulation")
    real: List[Path] = Field(default_factory=list, description="real DICOM folders: evaluate on these (REAL_EVALUATORS) instead of simulated exams")
    labels: Optional[Path] = Field(None, description="with `real`: CSV series_uid[#part],label overriding header labels")


def _load(spec: str) -> Any:
    mod, _, attr = spec.partition(":")
    m = importlib.import_module(mod)
    return getattr(m, attr) if attr else m


def evaluator_for(task: str) -> Callable[..., dict]:
    if task not in EVALUATORS:
        raise KeyError(f"no evaluator registered for task {task!r}; known: {sorted(EVALUATORS)}")
    return _load(EVALUATORS[task])


def real_evaluator_for(task: str) -> Callable[..., dict]:
    if task not in REAL_EVALUATORS:
        raise KeyError(f"no real-data evaluator registered for task {task!r}; known: {sorted(REAL_EVALUATORS)}")
    return _load(REAL_EVALUATORS[task])


def trainer_for(kind: str) -> Any:
    if kind not in TRAINERS:
        raise KeyError(f"no trainer registered for {kind!r}; known: {sorted(TRAINERS)}")
    return _load(TRAINERS[kind])
