"""Per-scale ONNX export of ActVAR / VAR and the deploy bundle."""
