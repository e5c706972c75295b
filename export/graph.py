"""The exported graph: uint8 NHWC pixels in, L2-normalised embedding and raw features out.

Normalisation lives in the graph so every client sends the same thing (uint8 pixels at the model's input
size) and no client can get the mean/std wrong.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from corinfomax.training.checkpoint import load_model

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("embedding", "features")
OPSET = 18


class EmbeddingGraph(nn.Module):
    """Wraps a backbone: cast, /255, (x - mean) / std, NHWC -> NCHW, backbone, L2 normalisation.

    ``compute_dtype`` is the backbone's dtype (float16 for the fp16 bundle); the normalisation and both
    outputs stay float32 so clients see the same types whatever the precision.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float],
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.backbone = backbone.to(compute_dtype)
        self.compute_dtype = compute_dtype
        self.scale: Tensor
        self.shift: Tensor
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)))
        self.register_buffer("shift", (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale - self.shift
        features = self.backbone(x.to(self.compute_dtype)).to(torch.float32)
        embedding = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return embedding, features


def load_backbone(state: dict[str, Any], path: str | Path) -> tuple[nn.Module, int]:
    """The checkpoint's backbone (eval mode) and its feature dimension."""
    model = load_model(state, path)
    return model.backbone.eval(), model.feature_dim


def export_onnx(graph: EmbeddingGraph, image_size: int, path: Path) -> None:
    """Export ``graph`` to ONNX with a dynamic batch axis."""
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    for noisy in ("onnxscript", "onnx_ir"):  # their INFO lines describe every optimisation pass
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with torch.no_grad():
        torch.onnx.export(
            graph.eval(), (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            opset_version=OPSET, dynamic_shapes={"pixels": {0: batch}}, dynamo=True, external_data=False,
            optimize=True, verbose=False,
        )
