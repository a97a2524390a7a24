"""scanside.training.common.merge_stages: the record of a training continued with --init."""
from __future__ import annotations

import json

from scanside.training.common import merge_stages


def test_a_continued_training_records_both_stages_and_sums_them(tmp_path):
    first = {"steps": 400, "batch": 8, "lr": 0.003, "seconds": {"data": 200.0, "train": 600.0, "total": 800.0},
             "recipe": "train --cases 240"}
    (tmp_path / "train.json").write_text(json.dumps(first))
    second = {"steps": 210, "batch": 12, "lr": 0.001, "seconds": {"data": 56.0, "train": 542.0, "total": 612.0},
              "recipe": "train --init run/model.pt", "final_loss": 0.1}
    out = merge_stages(second, tmp_path / "model.pt", keep=("steps", "batch", "lr", "seconds", "recipe"),
                       seconds=("data", "train", "total"))
    assert [st["steps"] for st in out["stages"]] == [400, 210] and out["steps"] == 610
    assert out["seconds"] == {"data": 256.0, "train": 1142.0, "total": 1412.0}
    assert out["recipe"] == "train --cases 240 && train --init run/model.pt" and out["final_loss"] == 0.1
    # a third stage keeps the two before it; without "recipe" in keep none is joined
    (tmp_path / "train.json").write_text(json.dumps(out))
    third = merge_stages(dict(second, steps=5), tmp_path / "model.pt", keep=("steps", "seconds"), seconds=("total",))
    assert out["stages"][0]["steps"] == 400 and [st["steps"] for st in third["stages"]] == [400, 210, 5]
    assert third["seconds"] == {"total": 2024.0} and third["recipe"] == second["recipe"]
