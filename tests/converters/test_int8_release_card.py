"""An INT8 release re-renders a reference model's card from the manifest it has just updated, so the card's
INT8 section can never describe the files the release replaced."""
from __future__ import annotations

import shutil

import pytest

from scanside.converters.int8_release import refresh_card
from scanside.engines.manifest import ModelManifest
from scanside.engines.store import ModelNotFound, ModelStore


def _copy(tmp_path, name: str) -> ModelManifest:
    try:
        shipped = ModelStore().resolve(name)
    except ModelNotFound:
        pytest.skip(f"{name} not in the model store")
    dest = tmp_path / name / shipped.version
    shutil.copytree(shipped.root, dest)
    return ModelManifest.load(dest)


def test_card_follows_the_new_parity_report(tmp_path):
    m = _copy(tmp_path, "cspca-reference")
    parity = m.parity.model_dump() if hasattr(m.parity, "model_dump") else dict(m.parity)
    parity["variants"]["int8_sym"] = dict(parity["variants"]["int8_sym"], value=0.912345)
    m = ModelManifest.model_validate({**m.model_dump(), "parity": parity}).set_root(m.root)
    m.save(m.root)
    card = m.root / "MODEL_CARD.md"
    assert "0.912345" not in card.read_text()

    assert refresh_card(ModelManifest.load(m.root)) == card
    assert "int8_sym: auroc 0.912345" in card.read_text()


def test_other_models_keep_their_card(tmp_path):
    m = _copy(tmp_path, "cspca-reference")
    other = ModelManifest.model_validate({**m.model_dump(), "name": "site-model"}).set_root(m.root)
    before = (m.root / "MODEL_CARD.md").read_text()
    assert refresh_card(other) is None
    assert (m.root / "MODEL_CARD.md").read_text() == before
