"""BentoML services over ONNX Runtime for the registered models (no torch needed)."""
