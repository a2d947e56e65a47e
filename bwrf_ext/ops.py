"""Typed wrappers of the bwrf_ext ops, with their fake (meta) and fallback registrations.

Three layers, as in flash-attention: the kernels (csrc/, registered as torch.ops.bwrf_ext.*, their
autograd in C++ too), the registrations here (fake kernels for torch.compile, the pure-PyTorch
reference as every op's default kernel), and the user-facing functions below, which check the
arguments and call the op. Without the compiled library the same ops are defined here, with the
reference as their kernel and a Python autograd: one dispatch path either way.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from bwrf_ext import reference
from bwrf_ext._backend import compiled  # noqa: F401  (imported first: it registers the ops)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32 = (-(2**31), 2**31 - 1)


def _describe(value: object) -> str:
    """How an error message shows a received value: a tensor's dtype, else type and value."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_int(value: object) -> bool:
    """A Python or NumPy integer, not a bool (True would silently mean 1)."""
    if isinstance(value, int):  # the common case first: cheap, and traceable by torch.compile
        return not isinstance(value, bool)
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    """A Python or NumPy real number (or a symbolic one under torch.compile), not a bool."""
    if isinstance(value, (float, int)):
        return not isinstance(value, bool)
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_float_tensor(op: str, name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype not in _FLOAT_DTYPES:
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {got}")


def check_lsq_args(
    op: str,
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float,
    axis: int | None,
    clip_before_round: bool = False,
) -> None:
    """Raises a clear error for arguments the LSQ ops reject, before either backend runs.

    The same rules and messages as the C++ checks, plus the types the C++ schema would reject
    with a bare RuntimeError (or accept by conversion): so the compiled ops and the
    pure-PyTorch fallback refuse exactly the same calls with exactly the same errors.

    Raises:
        TypeError: x or scale not a float32/float16/bfloat16 tensor; qmin/qmax not an int
            (a bool or a float is refused); grad_factor not a real number; axis neither an int
            nor None; clip_before_round not a bool.
        ValueError: scale on another device or of the wrong shape; qmin >= qmax or outside
            int32; grad_factor negative or not finite.
        IndexError: axis outside x's dimensions.
    """
    _check_float_tensor(op, "x", x)
    _check_float_tensor(op, "scale", scale)
    for name, value in (("qmin", qmin), ("qmax", qmax)):
        if not _is_int(value):
            raise TypeError(f"{op}: {name} must be an int, got {_describe(value)}")
    if not _is_real(grad_factor):
        raise TypeError(f"{op}: grad_factor must be a real number, got {_describe(grad_factor)}")
    if axis is not None and not _is_int(axis):
        raise TypeError(f"{op}: axis must be an int or None, got {_describe(axis)}")
    if not isinstance(clip_before_round, bool):
        raise TypeError(
            f"{op}: clip_before_round must be a bool, got {_describe(clip_before_round)}"
        )
    if scale.device != x.device:
        raise ValueError(f"{op}: scale must be on x's device {x.device}, got {scale.device}")
    if not (_INT32[0] <= qmin and qmax <= _INT32[1]):
        raise ValueError(f"{op}: qmin and qmax must fit in int32, got qmin={qmin}, qmax={qmax}")
    if not qmin < qmax:
        raise ValueError(f"{op}: qmin must be < qmax, got qmin={qmin}, qmax={qmax}")
    # A symbolic grad_factor (torch.compile with dynamic shapes) is checked by the kernel.
    if not isinstance(grad_factor, (torch.SymFloat, torch.SymInt)) and not (
        math.isfinite(grad_factor) and grad_factor >= 0
    ):
        raise ValueError(f"{op}: grad_factor must be a finite number >= 0, got {grad_factor}")
    if axis is None:
        if scale.numel() != 1 or scale.dim() > 1:
            raise ValueError(
                f"{op}: per-tensor scale (axis=None) must have shape () or (1,), "
                f"got {tuple(scale.shape)}"
            )
        return
    ndim = x.dim()
    if ndim == 0 or not -ndim <= axis < ndim:
        raise IndexError(
            f"{op}: axis must be in [{-ndim}, {ndim - 1}] for x of shape {tuple(x.shape)}, "
            f"got {axis}"
        )
    channels = x.shape[axis]
    if scale.dim() != 1 or scale.shape[0] != channels:
        raise ValueError(
            f"{op}: per-channel scale must have shape ({channels},) = (x.shape[{axis % ndim}],), "
            f"got {tuple(scale.shape)}"
        )


def check_grad_y(grad_y: torch.Tensor, x: torch.Tensor) -> None:
    """The backward's own checks on grad_y (after :func:`check_lsq_args`, as in C++)."""
    op = "lsq_fake_quant_backward"
    if not isinstance(grad_y, torch.Tensor):
        raise TypeError(f"{op}: grad_y must be a tensor of x's dtype {x.dtype}, got "
                        f"{type(grad_y).__name__}")  # fmt: skip
    if grad_y.shape != x.shape:
        raise ValueError(
            f"{op}: grad_y must have x's shape {tuple(x.shape)}, got {tuple(grad_y.shape)}"
        )
    if grad_y.dtype != x.dtype:
        raise TypeError(f"{op}: grad_y must have x's dtype {x.dtype}, got {grad_y.dtype}")
    if grad_y.device != x.device:
        raise ValueError(f"{op}: grad_y must be on x's device {x.device}, got {grad_y.device}")


def _canonical(qmin, qmax, grad_factor, axis) -> tuple:
    """NumPy scalars as Python numbers (what the C++ schema and torch.compile take)."""
    if type(qmin) is not int:
        qmin = int(qmin)
    if type(qmax) is not int:
        qmax = int(qmax)
    if type(grad_factor) is not float and isinstance(grad_factor, numbers.Real):
        grad_factor = float(grad_factor)
    if axis is not None and type(axis) is not int:
        axis = int(axis)
    return qmin, qmax, grad_factor, axis


# The ops' schemas, as csrc/bwrf_ext.cpp defines them (a test checks that they match). Without a
# compiled library (bwrf_ext._C, or the CMake build loaded by a C++ user's torch.ops.load_library)
# Python defines the same ops, so that both backends run one dispatch path: the compiled CPU/CUDA
# kernels where they are registered, else the pure-PyTorch reference, which is registered below as
# every op's default kernel (the fallback, and the kernel of other devices).
OP_SCHEMAS = {
    "lsq_fake_quant": "(Tensor x, Tensor scale, int qmin, int qmax, float grad_factor, "
    "int? axis=None, bool clip_before_round=False) -> Tensor",
    "lsq_fake_quant_backward": "(Tensor grad_y, Tensor x, Tensor scale, int qmin, int qmax, "
    "float grad_factor, int? axis=None, bool clip_before_round=False) -> (Tensor, Tensor)",
    "pack_mask": "(Tensor x, float lower=0., float? upper=None) -> Tensor",
    "unpack_mask_mul": "(Tensor packed, Tensor grad) -> Tensor",
}


def _is_defined(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"bwrf_ext::{name}", "")
    except RuntimeError:
        return False
    return True


for _name, _schema in OP_SCHEMAS.items():
    if not _is_defined(_name):
        torch.library.define(f"bwrf_ext::{_name}", _schema)


@torch.library.impl("bwrf_ext::lsq_fake_quant", "default")
def _lsq_fake_quant_reference(
    x, scale, qmin, qmax, grad_factor, axis=None, clip_before_round=False
):
    return reference.lsq_fake_quant(x, scale, qmin, qmax, axis, clip_before_round)


@torch.library.impl("bwrf_ext::lsq_fake_quant_backward", "default")
def _lsq_fake_quant_backward_reference(
    grad_y, x, scale, qmin, qmax, grad_factor, axis=None, clip_before_round=False
):
    return reference.lsq_fake_quant_backward(
        grad_y, x, scale, qmin, qmax, grad_factor, axis, clip_before_round
    )


@torch.library.impl("bwrf_ext::pack_mask", "default")
def _pack_mask_reference(x, lower=0.0, upper=None):
    return reference.pack_mask(x, lower, upper)


@torch.library.impl("bwrf_ext::unpack_mask_mul", "default")
def _unpack_mask_mul_reference(packed, grad):
    return reference.unpack_mask_mul(packed, grad).contiguous()


@torch.library.register_fake("bwrf_ext::lsq_fake_quant")
def _lsq_fake_quant_fake(x, scale, qmin, qmax, grad_factor, axis=None, clip_before_round=False):
    check_lsq_args("lsq_fake_quant", x, scale, qmin, qmax, grad_factor, axis)
    return torch.empty_like(x)


@torch.library.register_fake("bwrf_ext::lsq_fake_quant_backward")
def _lsq_fake_quant_backward_fake(
    grad_y, x, scale, qmin, qmax, grad_factor, axis=None, clip_before_round=False
):
    check_lsq_args("lsq_fake_quant_backward", x, scale, qmin, qmax, grad_factor, axis)
    check_grad_y(grad_y, x)
    return torch.empty_like(x), torch.empty(scale.shape, dtype=scale.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    x, scale, qmin, qmax, grad_factor, axis, clip_before_round = inputs
    ctx.save_for_backward(x, scale)
    ctx.params = (qmin, qmax, grad_factor, axis, clip_before_round)


def _backward(ctx, grad_y):
    x, scale = ctx.saved_tensors
    grad_x, grad_scale = torch.ops.bwrf_ext.lsq_fake_quant_backward(grad_y, x, scale, *ctx.params)
    return grad_x, grad_scale, None, None, None, None, None


# A compiled library registers this autograd in C++ (csrc/autograd.cpp), which runs no Python
# per call; the pure-PyTorch fallback gets it here.
if not torch._C._dispatch_has_kernel_for_dispatch_key("bwrf_ext::lsq_fake_quant", "Autograd"):
    torch.library.register_autograd(
        "bwrf_ext::lsq_fake_quant", _backward, setup_context=_setup_context
    )


def lsq_fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float,
    axis: int | None = None,
    *,
    clip_before_round: bool = False,
) -> torch.Tensor:
    """LSQ fake quantization with a learnable step size, fused forward and backward.

    ``y = clamp(round(x * (1/s)), qmin, qmax) * s``, rounding half to even, computed in fp32 and
    returned in x's dtype and layout (contiguous and channels_last are kept; other strided inputs
    give a dense output). Forward values equal ``torch._fake_quantize_learnable_per_tensor_affine``
    / ``_per_channel_affine`` with zero_point 0, bit for bit, for |qmin|, |qmax| <= 2**24.

    Backward: grad_x is grad_y where round(x/s) lies in [qmin, qmax] (straight-through), else 0;
    grad_scale sums ``grad_y * (round(x/s) - x/s)`` inside the range and ``grad_y * qmin`` /
    ``grad_y * qmax`` below / above it over each scale's elements, in fp32, deterministically,
    then multiplies by grad_factor.

    Step sizes <= 0 (and NaN) are replaced by the smallest normal fp32 number (about 1.2e-38):
    x becomes 0 or is clipped to qmin*s / qmax*s. So a finite x with a finite s never yields NaN
    (y overflows to +-inf only where |x| + s/2 passes the fp32 range). s = +inf is not repaired:
    x/s is 0 and 0 * inf gives NaN for every x (grad_scale 0). Keeping s positive and finite is
    the caller's job (``bwrf_ext.LSQQuantizer`` does it). A NaN in x gives NaN in y and in
    grad_scale, so bad inputs stay visible.

    Both backends (the compiled kernels and the pure-PyTorch fallback) check the arguments with
    :func:`check_lsq_args` before running, so they refuse the same calls with the same errors.

    Args:
        x: (any shape) float32, float16 or bfloat16.
        scale: step size, float32/float16/bfloat16 on x's device: shape () or (1,) when axis is
            None, else (x.shape[axis],).
        qmin, qmax: integer clipping bounds, qmin < qmax, both within int32 (for b bits:
            signed -2**(b-1), 2**(b-1)-1; unsigned 0, 2**b-1).
        grad_factor: >= 0; LSQ uses 1/sqrt(N * qmax), N the number of elements per scale.
        axis: None for one scale, else the channel dimension (negative values count from the end).
        clip_before_round: the LSQ paper's clip test on x/s before rounding (affects the backward
            only); default False is PyTorch's test after rounding.

    Returns:
        Tensor of x's shape and dtype.

    Raises:
        TypeError, ValueError, IndexError: see :func:`check_lsq_args`.
    """
    check_lsq_args("lsq_fake_quant", x, scale, qmin, qmax, grad_factor, axis, clip_before_round)
    qmin, qmax, grad_factor, axis = _canonical(qmin, qmax, grad_factor, axis)
    return torch.ops.bwrf_ext.lsq_fake_quant(
        x, scale, qmin, qmax, grad_factor, axis, clip_before_round
    )


def lsq_fake_quant_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float,
    axis: int | None = None,
    *,
    clip_before_round: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused backward of :func:`lsq_fake_quant` on its own.

    Returns:
        (grad_x, grad_scale): grad_x like x; grad_scale with scale's shape and dtype.

    Raises:
        TypeError, ValueError, IndexError: see :func:`check_lsq_args`; also grad_y not a tensor
            of x's shape, dtype and device.
    """
    check_lsq_args(
        "lsq_fake_quant_backward", x, scale, qmin, qmax, grad_factor, axis, clip_before_round
    )
    check_grad_y(grad_y, x)
    qmin, qmax, grad_factor, axis = _canonical(qmin, qmax, grad_factor, axis)
    return torch.ops.bwrf_ext.lsq_fake_quant_backward(
        grad_y, x, scale, qmin, qmax, grad_factor, axis, clip_before_round
    )


def _check_mask_args(op: str, packed: torch.Tensor, grad: torch.Tensor) -> None:
    """Raises a clear error for arguments unpack_mask_mul rejects (the C++ checks' rules)."""
    if not isinstance(grad, torch.Tensor) or not grad.dtype.is_floating_point:
        got = grad.dtype if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise TypeError(f"{op}: grad must be a floating-point tensor, got {got}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"{op}: packed must be uint8, got {got}")
    if packed.device != grad.device:
        raise ValueError(
            f"{op}: packed must be on grad's device {grad.device}, got {packed.device}"
        )
    expected = (grad.numel() + 7) // 8
    if packed.dim() != 1 or packed.shape[0] != expected:
        raise ValueError(
            f"{op}: packed must have shape ({expected},) = (ceil(grad.numel() / 8),), "
            f"got {tuple(packed.shape)}"
        )


@torch.library.register_fake("bwrf_ext::pack_mask")
def _pack_mask_fake(x, lower=0.0, upper=None):
    torch._check(x.dtype.is_floating_point, lambda: "pack_mask: x must be floating point")
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.register_fake("bwrf_ext::unpack_mask_mul")
def _unpack_mask_mul_fake(packed, grad):
    _check_mask_args("unpack_mask_mul", packed, grad)
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def pack_mask(x: torch.Tensor, lower: float = 0.0, upper: float | None = None) -> torch.Tensor:
    """Bit-packs the mask ``lower < x < upper``: 1 bit per element, 32x smaller than fp32.

    Bit i (byte ``i // 8``, bit ``i % 8``, least significant first) is element i of x in logical
    (row-major) order, whatever x's memory layout; the unused high bits of the last byte are 0.
    The bit is ``not (x <= lower or x >= upper)``, compared in fp32 (fp64 for float64): NaN gives
    1, as autograd's ReLU and hardtanh backward let a NaN input's gradient pass. ReLU's backward
    needs ``x > 0`` (the defaults), ReLU6's ``0 < x < 6``.

    Args:
        x: (any shape) float32, float64, float16 or bfloat16.
        lower: exclusive lower bound.
        upper: exclusive upper bound; None for none.

    Returns:
        (ceil(x.numel() / 8),) uint8 on x's device.
    """
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"pack_mask: x must be a floating-point tensor, got {got}")
    if not _is_real(lower):
        raise TypeError(f"pack_mask: lower must be a real number, got {_describe(lower)}")
    if upper is not None and not _is_real(upper):
        raise TypeError(f"pack_mask: upper must be a real number or None, got {_describe(upper)}")
    return torch.ops.bwrf_ext.pack_mask(x, lower, upper)


def unpack_mask_mul(packed: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The backward of a masked identity in one pass: grad where the bit is set, else 0.

    A select, not a product: inf or NaN in grad under a cleared bit gives 0, as autograd's own
    ReLU backward does.

    Args:
        packed: (ceil(grad.numel() / 8),) uint8 from :func:`pack_mask` of a tensor of grad's shape.
        grad: (any shape) floating point.

    Returns:
        Tensor of grad's shape and dtype, contiguous.
    """
    _check_mask_args("unpack_mask_mul", packed, grad)
    return torch.ops.bwrf_ext.unpack_mask_mul(packed, grad)
