"""TAPS import: real wheel from PyPI (downloaded once into ~/.cache/scanside/wheels, or
$SCANSIDE_CACHE_DIR/wheels), pinned hash, one real ONNX Runtime window, tampering refused.
Set SCANSIDE_OFFLINE=1 to skip when PyPI cannot be reached."""
from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from scanside.engines.manifest import IntegrityError, ModelManifest, sha256_file
from scanside.engines.store import ModelStore
from scanside.agent.cli.taps import MODEL_NAME, TAPS_MEMBER, TAPS_ONNX_SHA256, TAPS_VERSION, extract_onnx, fetch_wheel, import_taps

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel() -> Path:
    try:
        return fetch_wheel()
    except RuntimeError as e:
        if os.environ.get("SCANSIDE_OFFLINE") == "1":
            pytest.skip(f"SCANSIDE_OFFLINE=1 and the lavlab-taps wheel is not cached: {e}")
        raise


@pytest.fixture(scope="module")
def store_root(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    import_taps(root, wheel)
    return root


def test_import_registers_manifest_and_verified_file(store_root: Path) -> None:
    d = store_root / MODEL_NAME / TAPS_VERSION
    m = ModelManifest.load(d)
    assert m.ref == "prostate-gland-taps/1.1.2" and m.task == "gland_segmentation"
    assert sha256_file(d / "model_v1.onnx") == TAPS_ONNX_SHA256 == m.files["fp32"].sha256
    assert m.license.startswith("MIT") and "laviolette-lab/taps" in m.source
    pre = m.preprocessing
    assert pre.channels == ["T2W"] and pre.axcodes == "RAS" and pre.spacing_mm == (0.8, 0.8, 3.0)
    assert pre.shape is None and pre.normalize == "zscore_nonzero"
    assert pre.window.roi == (128, 128, 32) and pre.window.overlap == 0.5
    assert m.postprocessing["activation"] == "sigmoid" and m.postprocessing["gaussian_sigma"] == 2.5
    assert m.postprocessing["threshold"] == 0.55
    # the ONNX says the same as the manifest (names, shapes, opset)
    from scanside.engines.manifest import tensor_specs_from_onnx
    ins, outs, opset = tensor_specs_from_onnx(d / "model_v1.onnx")
    assert [(s.name, s.shape) for s in ins] == [("input", ["batch_size", 1, 128, 128, 32])]
    assert [(s.name, s.shape) for s in outs] == [("output", ["batch_size", 1, 128, 128, 32])]
    assert opset == 17
    # importing again is a no-op that re-verifies
    assert import_taps(store_root).ref == m.ref


def test_onnxruntime_runs_one_window(store_root: Path) -> None:
    store = ModelStore(store_root, engine_options={"onnxruntime": {"intra_op_threads": 2}})
    engine, sel = store.open(MODEL_NAME)
    with engine:
        assert sel.backend == "onnxruntime" and sel.variant == "fp32"
        # a bright ellipsoid in noise, z-scored like the real preprocessing would
        z, y, x = np.meshgrid(np.arange(128), np.arange(128), np.arange(32), indexing="ij")
        vol = ((z - 64) ** 2 / 30 ** 2 + (y - 64) ** 2 / 25 ** 2 + (x - 16) ** 2 / 8 ** 2 < 1).astype(np.float32)
        vol += np.random.default_rng(0).normal(0, 0.3, vol.shape).astype(np.float32)
        vol = (vol - vol.mean()) / vol.std()
        out = engine.run({"input": vol[None, None]})
    logits = out["output"]
    assert logits.shape == (1, 1, 128, 128, 32) and logits.dtype == np.float32
    assert np.isfinite(logits).all() and logits.std() > 0


def test_tampered_copy_is_refused(store_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(store_root / MODEL_NAME, root / MODEL_NAME)
    onnx = root / MODEL_NAME / TAPS_VERSION / "model_v1.onnx"
    with open(onnx, "r+b") as f:
        f.seek(40_000_000)
        b = f.read(1)
        f.seek(40_000_000)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(IntegrityError) as ei:
        ModelStore(root).open(MODEL_NAME)
    assert str(onnx) in str(ei.value) and TAPS_ONNX_SHA256 in str(ei.value)
    with pytest.raises(IntegrityError):  # re-import notices too
        import_taps(root)


def test_wheel_with_other_model_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "lavlab_taps-1.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(TAPS_MEMBER, b"not the TAPS model")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        extract_onnx(fake, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("other.txt", b"")
    with pytest.raises(ValueError, match="has no taps/resources/model_v1.onnx"):
        import_taps(tmp_path / "models", fake)
