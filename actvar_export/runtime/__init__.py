"""Runtimes for deploy bundles (ONNX Runtime now; TensorRT engines later)."""
