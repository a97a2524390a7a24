"""A tiny, real 3-D ONNX model for engine and store tests (built with onnx.helper, no mocks).

x float32 [N, 1, 8, 8, 4] -> Conv3d(1->4, k3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(4->2)
-> logits float32 [N, 2]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

INPUT_SHAPE = (1, 8, 8, 4)


def build_tiny_onnx(path: Path, *, seed: int = 0, input_name: str = "x", opset: int = 17) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 1, 3, 3, 3)).astype(np.float32) * 0.3
    b = rng.standard_normal(4).astype(np.float32) * 0.1
    gw = rng.standard_normal((2, 4)).astype(np.float32)
    gb = np.array([0.1, -0.2], dtype=np.float32)
    nodes = [
        helper.make_node("Conv", [input_name, "w", "b"], ["c"], kernel_shape=[3, 3, 3], pads=[1] * 6),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny3d",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (gw, "gw"), (gb, "gb"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="scanside-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_manifest_dict(sha256: str, *, name: str = "tiny3d", version: str = "1.0.0", input_name: str = "x",
                       extra_files: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    files = {"fp32": {"path": "model.onnx", "sha256": sha256, "precision": "fp32", "opset": 17}}
    files.update(extra_files or {})
    return {
        "name": name, "version": version, "task": "sequence_classification",
        "inputs": [{"name": input_name, "dtype": "float32", "shape": ["N", *INPUT_SHAPE]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["N", 2]}],
        "labels": ["T2W", "ADC"],
        "files": files,
        "postprocessing": {"activation": "softmax"},
        "license": "Apache-2.0", "source": "tests/engines/_tiny.py",
        "preprocessing": {"channels": ["T2WI_nan"], "spacing_mm": [3.0, 0.5, 0.5], "shape": [4, 8, 8]},
    }


def install_tiny(root: Path, version: str = "1.0.0", *, name: str = "tiny3d", seed: int = 0):
    """Build the tiny model and install it as <root>/<name>/<version>; returns the loaded manifest."""
    from scanside.engines.manifest import ModelManifest, sha256_file
    from scanside.engines.store import ModelStore

    src = build_tiny_onnx(Path(root).parent / f"_src_{name}_{version}.onnx", seed=seed)
    m = ModelManifest.model_validate(tiny_manifest_dict(sha256_file(src), name=name, version=version))
    return ModelStore(root).install(m, {"model.onnx": src})


def sample_input(batch: int = 1, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *INPUT_SHAPE)).astype(np.float32)
