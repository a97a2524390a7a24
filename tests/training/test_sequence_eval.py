"""CI gate: `scanside models evaluate sequence-classifier --json` on a small freshly simulated
held-out set (1 exam per vendor style for the training protocols and 1 for the held-out protocol
variant: 8 exams, about 80 series) through the runtime path must meet the stated floor (below the issue
target of 0.995 / 0.99, which this model reaches on four 24-exam sets; on these 79 series one error is
already below it: see EVALUATION.md): accuracy >= 0.95 and Cohen's kappa >= 0.94 (this exact set measured
0.987 / 0.984 with 1.4.0 and 0.975 / 0.969 with 1.3.0 on the simulator with EPI effects in DWI; on the earlier
simulator 0.975 / 0.969 with 1.2.0, 0.937 / 0.921 with 1.1.0, 0.899 / 0.874 with 1.0.0)
(scanside.training.sequence.evaluate.FLOOR)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scanside.engines.store import ModelNotFound, ModelStore
from scanside.training.sequence.evaluate import FLOOR


def test_shipped_model_meets_floor_on_fresh_heldout(tmp_path):
    try:
        ModelStore().resolve("sequence-classifier")
    except ModelNotFound:
        pytest.skip("sequence-classifier not in the model store")
    assert FLOOR == {"accuracy": 0.95, "kappa": 0.94}
    proc = subprocess.run([sys.executable, "-m", "scanside.agent.cli", "models", "evaluate", "sequence-classifier", "--json",
                           "--exams-per-vendor", "1", "--seed", "960000", "--jobs", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    m = rep["metrics"]["all"]
    assert rep["exams"] == 8 and m["n"] >= 70, rep
    assert set(rep["metrics"]) == {"all", "train_protocols", "heldout_variant"}
    assert all(m["per_class"][c]["support"] > 0 for c in m["labels"]), m["per_class"]
    for k in ("sensitivity", "specificity", "ppv", "npv", "f1"):
        assert k in m["per_class"]["ADC"]
    assert m["accuracy"] >= FLOOR["accuracy"] and m["kappa"] >= FLOOR["kappa"], (m["accuracy"], m["kappa"], rep["errors"])
    assert rep["passed"] is True and proc.returncode == 0
