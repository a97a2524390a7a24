"""The sequence classifier's model card reports every fresh set on record and their pooled figure, and
flags each set below the issue's target, so that one good set cannot stand for the model alone."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")

from scanside.engines.manifest import ModelManifest  # noqa: E402
from scanside.engines.store import ModelNotFound, ModelStore  # noqa: E402


def _set(seed: int, n: int, errors: int) -> dict:
    acc = (n - errors) / n
    return {"command": f"scanside models evaluate sequence-classifier --seed {seed} --write", "exams": 24,
            "subsets": {"all": {"n": n, "accuracy": acc, "kappa": acc - 0.001}}, "errors": errors}


def test_card_pools_every_set_and_flags_the_ones_below_target():
    from scanside.training.sequence.export import render_card

    try:
        shipped = ModelStore().resolve("sequence-classifier")
    except ModelNotFound:
        pytest.skip("sequence-classifier not in the model store")
    history = {"1": _set(1, 200, 0), "2": _set(2, 80, 1), "3": _set(3, 220, 2)}
    current = dict(history["3"], measured_at="now", backend="onnxruntime",
                   errors=[{"label": "DWI_Low", "pred": "T2WI_fs", "plane": "axial"}] * 2)
    m = ModelManifest.model_validate({**shipped.model_dump(), "metrics": {"evaluation": current, "evaluations": history}})
    card = render_card(m)
    assert "pooled, 3 sets: 497 of 500 series right (accuracy 0.9940)" in card
    # the current set is listed once (above), the two others below it
    assert card.count("--seed 1 --write") == 1 and card.count("--seed 2 --write") == 1
    assert "all of set 2" in card and "all of set 1" not in card
    assert "2 DWI_Low read as T2WI_fs" in card
    # every detail view of the shipped preprocessing is described, the reason for them once
    for i, v in enumerate(shipped.preprocessing.detail_views, 1):
        assert f"channel {i} its centre at {' x '.join(f'{s:g}' for s in v.spacing_mm)} mm" in card
    assert card.count("which the resize erases") == 1
