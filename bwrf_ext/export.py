"""Deployment export of quantized models: integer weight codes with scales, and ONNX QDQ graphs."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bwrf_ext.nn.layers import QuantConv2d, QuantLinear
from bwrf_ext.nn.quantizer import LSQQuantizer, broadcast_scale

# ONNX opset 13 is the first with per-channel QuantizeLinear/DequantizeLinear (axis attribute).
MIN_QDQ_OPSET = 13


@dataclass(frozen=True)
class QuantizedLayer:
    """Integer form of one QuantConv2d/QuantLinear.

    Attributes:
        weight_codes: integer codes of the weight's shape, int8 when the range fits (signed
            <= 8 bits), uint8 (unsigned <= 8 bits), else int16/int32; None for full-precision
            weights.
        weight_scale: fp32 step sizes, shape () or (C_out,); None for full-precision weights.
        weight_axis: channel dimension of weight_scale (0) or None for one step size.
        weight_range: (qmin, qmax) of the codes, or None.
        input_scale: fp32 step size of the input, shape (); None for a full-precision input.
        input_range: (qmin, qmax) of the input codes, or None.
        bias: the float bias or None.
    """

    weight_codes: torch.Tensor | None
    weight_scale: torch.Tensor | None
    weight_axis: int | None
    weight_range: tuple[int, int] | None
    input_scale: torch.Tensor | None
    input_range: tuple[int, int] | None
    bias: torch.Tensor | None

    def dequantized_weight(self) -> torch.Tensor:
        """codes * scale in fp32: equal, bit for bit, to the layer's fake-quantized weight."""
        if self.weight_codes is None:
            raise ValueError("QuantizedLayer.dequantized_weight: the weights are not quantized")
        scale = broadcast_scale(self.weight_scale, self.weight_codes, self.weight_axis)
        return self.weight_codes.float() * scale


def _smallest_code_dtype(qmin: int, qmax: int) -> torch.dtype:
    for dtype in (torch.int8, torch.uint8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return torch.int32


def _initialized_quantizers(model: nn.Module, caller: str) -> list[tuple[str, LSQQuantizer]]:
    """All LSQQuantizers of a model; raises if one has not seen its first batch yet."""
    quantizers = [(n, m) for n, m in model.named_modules() if isinstance(m, LSQQuantizer)]
    missing = [name for name, q in quantizers if not q.is_initialized]
    if missing:
        raise RuntimeError(
            f"{caller}: quantizers {missing[:3]}{'...' if len(missing) > 3 else ''} have no step "
            "size yet; run one forward pass on representative data (calibration) first"
        )
    return quantizers


@torch.no_grad()
def export_quantized(model: nn.Module) -> dict[str, QuantizedLayer]:
    """Integer weight codes and scales of every quantized layer of a model.

    Args:
        model: a model converted by ``bwrf_ext.quantize_model`` (or holding QuantConv2d /
            QuantLinear), after at least one forward pass so every input step size is set.

    Returns:
        Qualified layer name -> QuantizedLayer, in registration order; tensors are detached
        copies on the model's device.
    """
    _initialized_quantizers(model, "export_quantized")
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, (QuantConv2d, QuantLinear)):
            continue
        wq, iq = module.weight_quantizer, module.input_quantizer
        codes = None
        if wq is not None:
            codes = wq.integer_codes(module.weight).to(_smallest_code_dtype(*wq.qrange))
        layers[name] = QuantizedLayer(
            weight_codes=codes,
            weight_scale=None if wq is None else wq.effective_scale().detach().clone(),
            weight_axis=None if wq is None else wq.axis,
            weight_range=None if wq is None else wq.qrange,
            input_scale=None if iq is None else iq.effective_scale().detach().clone(),
            input_range=None if iq is None else iq.qrange,
            bias=None if module.bias is None else module.bias.detach().clone(),
        )
    return layers


@contextlib.contextmanager
def onnx_export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, quantizers run ATen's fake_quantize_per_{tensor,channel}_affine.

    The TorchScript ONNX exporter lowers those to QuantizeLinear/DequantizeLinear pairs (codes
    narrower than 8 bits get a Min/Max clamp first); the values are the fused op's.

    Args:
        model: a converted model whose quantizers are all initialised.

    Yields:
        The same model.
    """
    quantizers = [q for _, q in _initialized_quantizers(model, "onnx_export_mode")]
    for q in quantizers:
        q.set_export_mode(True)
    try:
        yield model
    finally:
        for q in quantizers:
            q.set_export_mode(False)


def export_onnx(
    model: nn.Module,
    args: tuple[Any, ...],
    f: str | os.PathLike,
    opset_version: int = 17,
    **export_kwargs: Any,
) -> None:
    """Exports a converted model to ONNX with QuantizeLinear/DequantizeLinear nodes.

    Uses the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), which has
    symbolics for ATen's fake-quant ops; the model is exported in eval mode (BatchNorm running
    statistics), as the exporter does by default.

    Args:
        model: a converted model, calibrated (one forward pass run).
        args: example inputs, e.g. ``(torch.randn(1, 3, 32, 32),)``.
        f: output path.
        opset_version: >= 13 (per-channel QDQ).
        **export_kwargs: passed to torch.onnx.export (input_names, dynamic_axes, ...).
    """
    if opset_version < MIN_QDQ_OPSET:
        raise ValueError(
            f"export_onnx: per-channel QDQ needs opset_version >= {MIN_QDQ_OPSET}, "
            f"got {opset_version}"
        )
    with onnx_export_mode(model), warnings.catch_warnings():
        # The TorchScript exporter is deprecated since torch 2.9, but it is the one that lowers
        # ATen's fake-quant ops to QDQ; the warning would only tell users what this says.
        warnings.filterwarnings(
            "ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        torch.onnx.export(
            model, args, f, opset_version=opset_version, dynamo=False, **export_kwargs
        )
