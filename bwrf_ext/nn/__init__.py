"""Quantizers and quantized layers."""

from bwrf_ext.nn.layers import QuantConv2d, QuantLinear
from bwrf_ext.nn.quantizer import (
    LSQQuantizer,
    QuantConfig,
    init_step_size,
    lsq_grad_factor,
    quant_range,
)

__all__ = [
    "LSQQuantizer",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "lsq_grad_factor",
    "init_step_size",
    "quant_range",
]
