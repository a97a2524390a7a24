"""bench/roofline.py: the floor is a lower bound (compute at the peak, or the traffic no runtime can avoid),
counted from a real ONNX graph."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


@pytest.fixture
def roofline(bench_modules):
    return bench_modules[1]


def _two_convs(path: Path) -> None:
    """x (N, 2, 4, 8, 8) -> Conv 2->3 k3 pad 1 -> Relu -> Conv 3->1 k1 -> y: two intermediate activations."""
    w1 = numpy_helper.from_array(np.ones((3, 2, 3, 3, 3), np.float32), "w1")
    w2 = numpy_helper.from_array(np.ones((1, 3, 1, 1, 1), np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 6), helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"])], "two_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 4, 8, 8])], [w1, w2])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_work_counts_flops_and_the_compulsory_bytes_apart_from_the_unfused_traffic(roofline, tmp_path):
    _two_convs(tmp_path / "m.onnx")
    w = roofline.graph_work(tmp_path / "m.onnx")
    voxels = 4 * 8 * 8
    assert w["flops"] == 2 * voxels * 3 * 2 * 27 + 2 * voxels * 1 * 3
    weights, io = (3 * 2 * 27 + 3) * 4, (2 + 1) * voxels * 4
    assert (w["weight_bytes"], w["io_bytes"], w["compulsory_bytes"]) == (weights, io, weights + io)
    assert w["activation_bytes_written"] == 2 * 3 * voxels * 4  # a and r
    assert w["bytes_moved"] == weights + io + 2 * w["activation_bytes_written"]


def test_the_floor_is_the_longer_of_compute_and_compulsory_traffic(roofline):
    work = {"flops": 2_000_000_000, "compulsory_bytes": 1_000_000, "bytes_moved": 500_000_000}
    compute_bound = roofline.floor(work, 100.0, 10e9)  # 20 ms of compute, 0.1 ms of compulsory traffic
    assert compute_bound["bound"] == "compute" and compute_bound["floor_s"] == pytest.approx(0.02)
    # the unfused traffic (50 ms at 10 GB/s) is not a floor: a runtime that keeps activations in cache beats it
    assert compute_bound["floor_s"] < work["bytes_moved"] / 10e9
    memory_bound = roofline.floor(work, 100.0, 10e6)  # 0.1 s to stream the weights and I/O
    assert memory_bound["bound"] == "memory" and memory_bound["floor_s"] == pytest.approx(0.1)
