"""Stage 3: embed, search and classify images with onnxruntime (never PyTorch)."""
