"""Memory-lean execution of frozen networks: backward gives input gradients, saving ~1 bit/element.

Plain autograd saves every conv and BatchNorm input of a network even when its weights are
frozen, although the input gradient of a conv, a linear layer or an eval-mode BatchNorm needs
only the weights. :func:`make_lean` returns a copy of a frozen module whose layers save for
backward:

- Conv2d, Linear, BatchNorm (eval, running statistics): nothing (the weights are parameters);
- ReLU, ReLU6, Hardtanh: a bit-packed mask, 1 bit per element (``bwrf_ext.ops.pack_mask``);
- MaxPool2d: the indices of the maxima;
- AvgPool2d, AdaptiveAvgPool2d, Flatten, Dropout (eval), Identity: nothing.

Residual adds, slicing and padding save nothing under plain autograd already. ReLUs, ReLU6 and
adaptive average pooling called functionally inside a block's forward (``F.relu(out + x)``) are
rerouted to the lean functions while the lean copy runs. Other layers keep plain autograd
(correct, not lean); :func:`lean_report` names them. The copy shares the original's parameters
and buffers and gives them no gradient: it is for frozen networks only, in eval mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from bwrf_ext.ops import pack_mask, unpack_mask_mul

__all__ = ["LeanModule", "lean_report", "make_lean"]


class _FrozenConv2d(torch.autograd.Function):
    """conv2d whose backward gives the input gradient from the weight alone."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.weight = weight  # a parameter: holding it costs no memory
        ctx.params = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        shape, stride, padding, dilation, groups = ctx.params
        # convolution_backward reads only the shape of its input when just grad_input is asked.
        dummy = grad_y.new_empty(1).expand(shape)
        grad_x = torch.ops.aten.convolution_backward(
            grad_y, dummy, ctx.weight, None, stride, padding, dilation, False, [0, 0], groups,
            (True, False, False),
        )[0]
        return grad_x, None, None, None, None, None, None


class _FrozenLinear(torch.autograd.Function):
    """linear whose backward is ``grad_y @ W``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        return grad_y.matmul(ctx.weight.to(grad_y.dtype)), None, None


class _FrozenBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm: F.batch_norm forward, ``grad_y * gamma / sqrt(var + eps)`` backward."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):
        # The per-channel slope is C numbers, not an activation.
        scale = torch.rsqrt(var.float() + eps)
        if weight is not None:
            scale = scale * weight.float()
        ctx.scale = scale.reshape([1, -1] + [1] * (x.dim() - 2))
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        return (grad_y * ctx.scale).to(grad_y.dtype), None, None, None, None, None


class _MaskedIdentity(torch.autograd.Function):
    """ReLU (upper None) or hardtanh(lower, upper) = clamp: backward through a 1-bit mask."""

    @staticmethod
    def forward(ctx, x, lower, upper):
        # relu itself where it is one: the lean forward gives the plain forward's bits.
        relu = lower == 0.0 and upper is None
        y = torch.relu(x) if relu else torch.clamp(x, min=lower, max=upper)
        ctx.save_for_backward(pack_mask(x, lower, upper))
        ctx.shape = x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        return unpack_mask_mul(packed, grad_y).view(ctx.shape), None, None


class _MaxPool2d(torch.autograd.Function):
    """max_pool2d saving the argmax indices only; backward scatters (adds, windows may overlap)."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        y, indices = F.max_pool2d(
            x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True
        )
        ctx.save_for_backward(indices)
        ctx.shape = x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        (indices,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        grad_x = grad_y.new_zeros(n, c, h * w)
        grad_x.scatter_add_(2, indices.reshape(n, c, -1), grad_y.reshape(n, c, -1))
        return grad_x.view(n, c, h, w), None, None, None, None, None


class _LinearMap(torch.autograd.Function):
    """A linear, parameter-free map (average pooling) saving only the input's shape.

    Its backward is the map's own vector-Jacobian product at a zero input, which is exact for a
    linear map and keeps no activation alive between forward and backward. The product is
    ``torch.func.vjp`` rather than ``torch.autograd.grad`` on a leaf made with
    ``requires_grad=True``: Dynamo traces the former, so ``torch.compile(fullgraph=True)`` of a
    BWRF step keeps the lean partner in one graph.
    """

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        ctx.meta = (x.shape, x.dtype, x.device)
        return fn(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        shape, dtype, device = ctx.meta
        _, vjp = torch.func.vjp(ctx.fn, torch.zeros(shape, dtype=dtype, device=device))
        (grad_x,) = vjp(grad_y)
        return grad_x, None


class LeanConv2d(nn.Module):
    """A frozen nn.Conv2d (zero padding) that saves nothing for backward."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenConv2d.apply(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class LeanLinear(nn.Module):
    """A frozen nn.Linear that saves nothing for backward."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenLinear.apply(x, self.weight, self.bias)


class LeanBatchNorm(nn.Module):
    """An eval-mode BatchNorm (running statistics) that saves nothing for backward."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.eps = bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenBatchNorm.apply(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )


class LeanClamp(nn.Module):
    """ReLU (``upper=None``), ReLU6 or Hardtanh with a 1-bit mask for backward (never in place)."""

    def __init__(self, lower: float = 0.0, upper: float | None = None) -> None:
        super().__init__()
        self.lower, self.upper = lower, upper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaskedIdentity.apply(x, self.lower, self.upper)

    def extra_repr(self) -> str:
        return f"lower={self.lower}, upper={self.upper}"


class LeanMaxPool2d(nn.Module):
    """nn.MaxPool2d saving only the indices of the maxima."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.args = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaxPool2d.apply(x, *self.args)


class LeanAvgPool(nn.Module):
    """nn.AvgPool2d / nn.AdaptiveAvgPool2d saving only the input's shape."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool  # parameter-free, run outside autograd by _LinearMap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearMap.apply(x, self.pool)


def _lean_relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    del inplace  # the lean ReLU never writes its input: its mask is taken from x
    return _MaskedIdentity.apply(x, 0.0, None)


def _lean_hardtanh(
    x: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False
) -> torch.Tensor:
    del inplace
    return _MaskedIdentity.apply(x, float(min_val), float(max_val))


def _lean_relu6(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    del inplace
    return _MaskedIdentity.apply(x, 0.0, 6.0)


def _lean_adaptive_avg_pool2d(x: torch.Tensor, output_size: Any) -> torch.Tensor:
    return _LinearMap.apply(x, lambda t: F.adaptive_avg_pool2d(t, output_size))


# Functional calls inside a block's forward (CIFAR BasicBlock: F.relu(out + shortcut(x))).
_FUNCTIONAL: dict[Callable, Callable] = {
    F.relu: _lean_relu,
    torch.relu: _lean_relu,
    torch.Tensor.relu: _lean_relu,
    F.relu6: _lean_relu6,
    F.hardtanh: _lean_hardtanh,
    F.adaptive_avg_pool2d: _lean_adaptive_avg_pool2d,
}


class _LeanFunctions(TorchFunctionMode):
    """Reroutes the functional ops in _FUNCTIONAL to their lean versions; others pass through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        lean = _FUNCTIONAL.get(func)
        # Only where autograd would save something: no-grad runs keep the exact plain ops.
        if lean is not None and torch.is_grad_enabled():
            return lean(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


# Leaves that save nothing under plain autograd (in eval mode), kept as they are.
_PASSTHROUGH = (nn.Identity, nn.Flatten, nn.Dropout, nn.Unflatten)


def _lean_leaf(module: nn.Module) -> nn.Module | None:
    """The lean replacement of a leaf module, or None when there is none."""
    if type(module) is nn.Conv2d and module.padding_mode == "zeros":
        if not isinstance(module.padding, str):
            return LeanConv2d(module)
    if type(module) is nn.Linear:
        return LeanLinear(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) in (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d
    ):
        if module.track_running_stats and module.running_mean is not None:
            return LeanBatchNorm(module)
    if type(module) is nn.ReLU:
        return LeanClamp(0.0, None)
    if type(module) is nn.ReLU6:
        return LeanClamp(0.0, 6.0)
    if type(module) is nn.Hardtanh:
        return LeanClamp(float(module.min_val), float(module.max_val))
    if type(module) is nn.MaxPool2d and not module.return_indices:
        return LeanMaxPool2d(module)
    if type(module) in (nn.AvgPool2d, nn.AdaptiveAvgPool2d):
        return LeanAvgPool(module)
    return None


_LEAN_TYPES = (LeanConv2d, LeanLinear, LeanBatchNorm, LeanClamp, LeanMaxPool2d, LeanAvgPool)


class LeanModule(nn.Module):
    """A lean copy of a frozen module (build it with :func:`make_lean`).

    Runs ``module`` with the functional ReLU/ReLU6/adaptive pooling calls of its forwards
    rerouted to the lean versions. Same inputs and outputs as the original.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _LeanFunctions():
            return self.module(*args, **kwargs)


def make_lean(module: nn.Module) -> LeanModule:
    """A copy of a frozen module whose backward gives input gradients only, saving ~1 bit/element.

    Leaf layers are replaced as listed in this module's docstring; containers and blocks
    (BasicBlock, Bottleneck, InvertedResidual, ...) are copied with their forwards. The copy
    shares the original's parameters and buffers (no extra weight memory), is in eval mode and
    gives them no gradient. Use it where only gradients with respect to the input are wanted
    (the frozen partner of BWRF, a Block-KD teacher).

    Args:
        module: the frozen module (its eval-mode behaviour is what the copy computes).

    Returns:
        A LeanModule with the same forward (outputs equal up to floating-point rounding of the
        pooled layers; most layers give identical bits).
    """
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    clone = copy.deepcopy(module, memo=shared)

    def convert(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            lean = _lean_leaf(child)
            if lean is not None:
                setattr(parent, name, lean)
            else:
                convert(child)

    root = _lean_leaf(clone)
    if root is None:
        convert(clone)
    else:
        clone = root
    return LeanModule(clone).eval()


def lean_report(module: nn.Module) -> list[str]:
    """Names of the leaf modules of a lean copy that run on plain autograd (not lean).

    Args:
        module: a module from :func:`make_lean` (or any module: then every leaf that would not be
            converted is listed).

    Returns:
        Qualified module names, in module order; [] when every leaf is lean or saves nothing.
    """
    names: list[str] = []
    lean_prefixes: list[str] = []
    for name, child in module.named_modules():
        if any(name.startswith(prefix) for prefix in lean_prefixes):
            continue
        if isinstance(child, _LEAN_TYPES):
            lean_prefixes.append(name + ".")
            continue
        if any(True for _ in child.children()):
            continue
        if isinstance(child, _PASSTHROUGH) or _is_known_parameter_free(child):
            continue
        if _lean_leaf(child) is not None and not isinstance(module, LeanModule):
            continue
        names.append(name)
    return names


def _is_known_parameter_free(module: nn.Module) -> bool:
    """Leaves known to save nothing: the CIFAR ResNets' option-A shortcut (slicing and padding)."""
    from bwrf_ext.models.cifar_resnet import OptionAShortcut

    return isinstance(module, OptionAShortcut)
