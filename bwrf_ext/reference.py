"""Readable pure-PyTorch twin of every bwrf_ext op: the test oracle and the fallback backend.

The math is the kernels' math, step for step, in fp32: y = clamp(round(x * (1/s)), qmin, qmax) * s
with round half to even, the clip test after rounding (PyTorch's learnable fake-quant ops with
zero_point 0) or, with ``clip_before_round``, on x/s itself (the LSQ paper's variant).
"""

from __future__ import annotations

import torch

# The smallest step the kernels use: s <= 0 or NaN is replaced by it (csrc/lsq_fake_quant.h).
MIN_SCALE = torch.finfo(torch.float32).tiny


def broadcast_scale(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshapes a step size of shape () / (1,) (axis None) or (C,) to broadcast against x.

    The oracle's own copy (``bwrf_ext.nn.quantizer.broadcast_scale`` is the layers'): the layers
    do not depend on the oracle, and the oracle shares no code with what it checks."""
    if axis is None:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return scale.reshape(shape)


def _quantize(x: torch.Tensor, scale: torch.Tensor, axis: int | None):
    """Returns (s, v, q): the safe fp32 step, x/s as the kernels compute it, and round(v)."""
    s = broadcast_scale(scale, x, axis).float()
    s = torch.where(s > MIN_SCALE, s, torch.full_like(s, MIN_SCALE))
    v = x.float() * (1.0 / s)  # multiply by the fp32 reciprocal, as ATen's op does
    return s, v, torch.round(v)  # torch.round rounds half to even


def lsq_fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    clip_before_round: bool = False,
) -> torch.Tensor:
    """Forward of LSQ fake quantization (see ``bwrf_ext.lsq_fake_quant``).

    ``clip_before_round`` only changes the backward: with integer bounds,
    clamp(round(v)) == round(clamp(v)).
    """
    del clip_before_round
    s, _, q = _quantize(x, scale, axis)
    return (torch.clamp(q, qmin, qmax) * s).to(x.dtype)  # clamp keeps NaN, like the kernels


def lsq_fake_quant_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float,
    axis: int | None = None,
    clip_before_round: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of LSQ fake quantization: (grad_x, grad_scale).

    grad_x is the straight-through gradient, zero where x was clipped. grad_scale sums, over each
    scale's elements, grad_y times round(x/s) - x/s inside the range and qmin/qmax below/above it,
    in fp32, times grad_factor; it has scale's shape and dtype.
    """
    _, v, q = _quantize(x, scale, axis)
    test = v if clip_before_round else q
    below, above = test < qmin, test > qmax
    g = grad_y.float()
    grad_x = torch.where(below | above, torch.zeros_like(g), g).to(x.dtype)
    slope = torch.where(below, float(qmin), torch.where(above, float(qmax), q - v))
    per_element = g * slope
    if axis is None:
        grad_scale = per_element.sum()
    else:
        others = [d for d in range(x.dim()) if d != axis % x.dim()]
        # sum(dim=[]) would sum everything: a 1-D x has nothing to reduce.
        grad_scale = per_element.sum(dim=others) if others else per_element
    grad_scale = (grad_scale * grad_factor).reshape(scale.shape).to(scale.dtype)
    return grad_x, grad_scale


def pack_mask(x: torch.Tensor, lower: float = 0.0, upper: float | None = None) -> torch.Tensor:
    """Bit-packs ``not (x <= lower or x >= upper)`` (see ``bwrf_ext.ops.pack_mask``).

    The comparison is made in fp32 (fp64 for a float64 x), as the kernels make it.
    """
    v = x.reshape(-1)
    v = v if v.dtype == torch.float64 else v.float()
    outside = v <= lower
    if upper is not None:
        outside |= v >= upper
    bits = ~outside  # NaN is inside: autograd's ReLU/hardtanh backward lets its gradient pass
    pad = -bits.numel() % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).reshape(-1, 8).to(torch.uint8)
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=x.device)
    return (bits * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The bool mask of ``numel`` elements (flat) that :func:`pack_mask` packed."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].bool()


def unpack_mask_mul(packed: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad where the packed bit is set, else 0 (a select: inf/NaN under a 0 bit give 0)."""
    mask = unpack_mask(packed, grad.numel()).reshape(grad.shape)
    return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
