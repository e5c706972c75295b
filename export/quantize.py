"""int8: onnxruntime static quantisation (QDQ), calibrated on real training images.

QDQ keeps the graph portable (any provider can run it; CPU fuses it into integer kernels). Weights are
per-channel int8, activations uint8 from min/max calibration.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from corinfomax.export.graph import INPUT_NAME

log = logging.getLogger(__name__)
# Only the backbone's heavy ops: the uint8 -> float normalisation and the L2 normalisation stay float.
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm", "Add", "Relu", "MaxPool", "GlobalAveragePool", "AveragePool"]


class _Batches(CalibrationDataReader):
    def __init__(self, pixels: np.ndarray, batch_size: int) -> None:
        self._batches = iter([pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32_model: Path, out: Path, calibration: np.ndarray, batch_size: int = 64) -> None:
    """Write the int8 QDQ version of ``fp32_model`` to ``out``, calibrated on uint8 ``[N, H, W, 3]`` pixels."""
    prepared = out.with_name(out.stem + ".prep.onnx")
    quant_pre_process(str(fp32_model), str(prepared), skip_symbolic_shape=True)
    log.info("calibrating int8 on %d images", len(calibration))
    quantize_static(
        str(prepared), str(out), _Batches(calibration, batch_size), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANTIZED_OPS, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
    )
    prepared.unlink()
