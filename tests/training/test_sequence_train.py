"""Smoke training of the sequence classifier: a few steps on tiny render-path data give an ONNX
file that matches the torch model, a manifest that validates with matching sha256, and a model
that restores from its own ONNX for fine-tuning."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scanside.agent.schema.taxonomy import LABELS  # noqa: E402
from scanside.engines.manifest import ModelManifest  # noqa: E402
from scanside.engines.store import ModelStore  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from scanside.training.sequence.data import IN_CHANNELS, INPUT_SHAPE, exam_samples

    xs, ys = [], []
    for lab, arr, _ in exam_samples(700_001, "ge"):
        xs.append(arr)
        ys.append(LABELS.index(lab))
    x, y = np.stack(xs), np.asarray(ys)
    assert x.shape[1:] == (IN_CHANNELS,) + INPUT_SHAPE and IN_CHANNELS == 3 and set(y) == set(range(len(LABELS)))
    return x, y


def test_render_path_matches_preprocess_contract(tiny):
    x, _ = tiny
    assert np.isfinite(x).all()
    # z-scored per channel (whole field of view, then the fine detail view) by the spec's normalisation
    flat = x.reshape(len(x), x.shape[1], -1)
    assert np.allclose(flat.mean(2), 0, atol=1e-3)
    assert np.allclose(flat.std(2), 1, atol=1e-2)


def test_smoke_train_export_parity_manifest(tiny, tmp_path):
    from scanside.training.sequence.export import INPUT_NAME, OUTPUT_NAME, export_model
    from scanside.training.sequence.model import SeqResNet3d
    from scanside.training.sequence.train import fit, predict

    torch.set_num_threads(2)
    x, y = tiny
    model = SeqResNet3d(in_channels=x.shape[1])
    before = [p.detach().clone() for p in model.parameters()]
    res = fit(model, x, y, epochs=2, batch_size=4, lr=1e-3)
    assert res.steps >= 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "training changed nothing"
    m = export_model(model, "0.0.1-test", store_root=tmp_path, training={"params": 1})
    # manifest validates from disk, sha256 matches, store resolves it
    loaded = ModelManifest.load(tmp_path / "sequence-classifier" / "0.0.1-test")
    assert loaded.labels == list(LABELS) and loaded.preprocessing is not None
    store = ModelStore([tmp_path], user_dir=None)
    assert all(c.ok for c in store.verify(loaded))
    assert (loaded.root / "MODEL_CARD.md").read_text().count("simulated") >= 1
    # parity: ONNX Runtime (through the store's engine) == torch on real inputs, dynamic batch
    engine, sel = store.open(m.ref)
    assert sel.backend == "onnxruntime"
    for n in (1, 3):
        got = engine.run({INPUT_NAME: x[:n].astype(np.float32)})[OUTPUT_NAME]
        ref = predict(model, x[:n])
        np.testing.assert_allclose(got, ref, atol=1e-5)
    assert loaded.parity["max_abs_diff"] < 1e-4
    # the manifest's sha256 guards the file
    (loaded.root / "model.onnx").write_bytes((loaded.root / "model.onnx").read_bytes() + b"\0")
    assert not all(c.ok for c in store.verify(loaded))


def test_restore_from_onnx_matches(tiny, tmp_path):
    from scanside.training.sequence.export import export_onnx, load_from_onnx, onnx_parity
    from scanside.training.sequence.model import SeqResNet3d
    from scanside.training.sequence.train import fit

    x, y = tiny
    model = SeqResNet3d(in_channels=x.shape[1])
    fit(model, x, y, epochs=1, batch_size=4)  # non-trivial batch-norm statistics
    path = export_onnx(model, tmp_path / "m.onnx")
    restored = load_from_onnx(path)
    assert onnx_parity(restored, path)["max_abs_diff"] < 1e-5
    # a file of another architecture is refused, not loaded half-way
    export_onnx(SeqResNet3d(in_channels=x.shape[1], widths=(8, 16, 32, 64)), tmp_path / "o.onnx")
    with pytest.raises(ValueError):
        load_from_onnx(tmp_path / "o.onnx")
