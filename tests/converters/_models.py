"""Test models for the converters: the tiny real 3-D ONNX of tests/engines/_tiny.py, installed with a
preprocessing spec that turns a simulated axial T2W series into its (1, 8, 8, 4) input."""
from __future__ import annotations

from pathlib import Path

from tests.engines._tiny import build_tiny_onnx, tiny_manifest_dict

T2W_DATA_SEEDS = (300, 301, 302, 303)


def install_tiny_t2w(root: Path, *, name: str = "tiny3d", version: str = "1.0.0", seed: int = 0):
    from scanside.engines.manifest import ModelManifest, sha256_file
    from scanside.engines.store import ModelStore

    src = build_tiny_onnx(Path(root).parent / f"_src_{name}_{version}.onnx", seed=seed)
    d = tiny_manifest_dict(sha256_file(src), name=name, version=version)
    d["labels"] = ["T2WI_nan", "T2WI_fs"]
    # SPL axes: 8 x 9 mm (S, 72 mm = a 24 x 3 mm slab), 8 x 20 mm (P), 4 x 40 mm (L)
    d["preprocessing"] = {"channels": ["T2W"], "axcodes": "SPL", "spacing_mm": [9.0, 20.0, 40.0], "shape": [8, 8, 4],
                          "crop": "center", "normalize": "zscore_percentile"}
    m = ModelManifest.model_validate(d)
    return ModelStore(root).install(m, {"model.onnx": src})


def make_t2w_exams(out: Path, n: int = 4) -> list:
    """n simulated exams holding only the axial T2W series (cached by the caller's tmp dir)."""
    from bench.make_t2w_data import make

    return make(out, n=n, seed0=T2W_DATA_SEEDS[0])
