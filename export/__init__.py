"""Stage 2: turn a training checkpoint into a verified, self-describing ONNX model bundle."""
