"""The eager research-code LSQ (a chain of ATen ops): the baseline our fused op is measured
against, as a function and as a quantizer for whole models. Benchmarks only: the library's
layers always run the fused op."""

from __future__ import annotations

import torch
from torch import nn

from bwrf_ext.nn.quantizer import LSQQuantizer, broadcast_scale


def composite_lsq_fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float,
    axis: int | None = None,
) -> torch.Tensor:
    """The eager research-code LSQ: grad_scale + clamp + round_pass, as most LSQ code writes it.

    Same values as :func:`bwrf_ext.lsq_fake_quant` up to x/s being a division here (a product
    with 1/s in the fused op), and the gradients of ``clip_test="before_round"``, since the
    clamp comes before the round.

    Args:
        x: (any shape) float tensor.
        scale: () or (1,) when axis is None, else (x.shape[axis],).
        qmin, qmax: integer code range.
        grad_factor: the step-size gradient scale g.
        axis: None for one step size, else the channel dimension of x.

    Returns:
        Tensor of x's shape.
    """
    s = broadcast_scale(scale, x, axis)
    s = (s - s * grad_factor).detach() + s * grad_factor  # value s, gradient scaled by g
    v = (x / s).clamp(qmin, qmax)
    return ((v.round() - v).detach() + v) * s  # straight-through round


class CompositeLSQQuantizer(LSQQuantizer):
    """An LSQQuantizer whose op is :func:`composite_lsq_fake_quant` (same init, state, switches).

    The composite clamps x/s before rounding: it has the gradients of the paper's clip test
    (``clip_test="before_round"``) only.
    """

    def _fake_quant(self, x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, g: float):
        return composite_lsq_fake_quant(x, s, qmin, qmax, g, self.axis)


def use_composite(model: nn.Module) -> nn.Module:
    """Switches every LSQQuantizer of ``model`` to the eager composite op, in place.

    Raises:
        ValueError: a quantizer with ATen's clip test (the composite has the paper's only).
    """
    for name, module in model.named_modules():
        if isinstance(module, LSQQuantizer):
            if module.clip_test != "before_round":
                raise ValueError(
                    f"use_composite: {name} has clip_test={module.clip_test!r}; the composite "
                    "clamps before rounding, so it needs clip_test='before_round'"
                )
            module.__class__ = CompositeLSQQuantizer
    return model
