"""Inference back ends: ONNX Runtime, OpenVINO, TensorRT, Triton (KServe v2)."""
