"""actvar-export: compile ActVAR / VAR image generators to ONNX and TensorRT, and prove they match."""
__version__ = "0.1.0"
