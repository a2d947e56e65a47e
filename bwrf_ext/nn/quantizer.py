"""LSQ quantizer module: learnable step size, lazy LSQ init, signedness and switches.

Over 400 lines because the step-size inits (mse, lsq, absmax) live beside the quantizer whose
first forward runs them and whose buffers record what they chose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bwrf_ext.ops import lsq_fake_quant

Signedness = bool | Literal["auto"]
InitMethod = Literal["lsq", "absmax", "mse"]
INIT_METHODS = ("lsq", "absmax", "mse")
# The default step-size init, chosen by measurement (issue 16: ResNet-20 on CIFAR-10, one QAT
# epoch, "mse" ahead of "lsq" and "absmax" at W2A2, W3A3 and W4A4; README, Results).
DEFAULT_INIT: InitMethod = "mse"
# Where the backward tests the clip range: on x/s before rounding (the LSQ paper's rule, the
# training default) or on round(x/s) (ATen's torch._fake_quantize_learnable_*, for parity).
ClipTest = Literal["before_round", "after_round"]
CLIP_TESTS = ("before_round", "after_round")
# The MSE init's candidate steps: fractions of absmax / qmax (a linear grid, as in the usual
# post-training-quantization searches), tried on at most this many elements per step size.
MSE_CANDIDATES = 100
MSE_MAX_ELEMENTS = 1 << 18


def broadcast_scale(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshapes a step size of shape () / (1,) (axis None) or (C,) to broadcast against x."""
    if axis is None:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return scale.reshape(shape)


def check_bits(bits: object, what: str = "bits") -> None:
    """Raises ValueError unless bits is an int code width in [2, 16]."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"{what} must be an int in [2, 16], got {bits!r}")


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer code range of a b-bit quantizer.

    Args:
        bits: code width, 2..16 (8 is the widest that ONNX QDQ export supports).
        signed: two's complement range if True, else unsigned.

    Returns:
        (qmin, qmax): signed -2**(b-1)..2**(b-1)-1, unsigned 0..2**b-1.
    """
    check_bits(bits, "quant_range: bits")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_grad_factor(elements_per_scale: int, qmax: int) -> float:
    """LSQ's step-size gradient scale g = 1/sqrt(N * qmax), N the elements one step size covers."""
    return 1.0 / math.sqrt(elements_per_scale * qmax)


def init_step_size(
    v: torch.Tensor,
    qmax: int,
    axis: int | None,
    method: InitMethod = "lsq",
    qmin: int | None = None,
) -> torch.Tensor:
    """Initial step size from the weights or a first batch, in fp32.

    "lsq" is LSQ's 2 * mean(|v|) / sqrt(qmax), made for low bit widths: at 8 bits its range
    (about 22 * mean|v|) is far wider than the data, so the step is coarse (measured: ~6 %
    relative output error of a conv layer, and ResNet-20 W8A8 loses 0.7 points before any
    training). "absmax" is max(|v|) / qmax: no clipping and a fine step at 8 bits (~0.5 %), but
    outlier-driven at low bit widths. "mse" tries the steps c * max(|v|) / qmax for c = 1/100,
    2/100, .., 1 and keeps the one of least squared quantization error, per step size (on an
    evenly strided sample of at most ``MSE_MAX_ELEMENTS`` elements of each channel or tensor).

    Args:
        v: (any shape) the weights or the first batch of activations.
        qmax: the positive end of the code range.
        axis: None for one step size, else the channel dimension of v.
        method: "lsq", "absmax" or "mse".
        qmin: the negative end of the code range ("mse" only; default -qmax - 1, signed).

    Returns:
        fp32 tensor of shape () (axis None) or (v.shape[axis],).
    """
    if method not in INIT_METHODS:
        raise ValueError(
            f"init_step_size: method must be one of {', '.join(INIT_METHODS)}, got {method!r}"
        )
    rows = _rows(v.detach().float(), axis)  # one row per step size
    if method == "mse":
        statistic = _mse_step(rows, qmin if qmin is not None else -qmax - 1, qmax)
    elif method == "absmax":
        statistic = rows.abs().amax(dim=1) / qmax
    else:
        statistic = 2.0 * rows.abs().mean(dim=1) / math.sqrt(qmax)
    if axis is None:
        return statistic.reshape(())
    # An all-zero channel (pruned or dead filter) would start at the eps floor and then need
    # thousands of tiny steps to grow once its weights move; the tensor-wide value is a sane
    # start.
    if bool((statistic > 0).all()):  # the usual case: no second pass over the tensor
        return statistic
    tensor_wide = init_step_size(v, qmax, None, method, qmin)
    return torch.where(statistic > 0, statistic, tensor_wide)


def _rows(v: torch.Tensor, axis: int | None) -> torch.Tensor:
    """v as (step sizes, elements each): one row, or one row per channel along axis."""
    rows = v.reshape(1, -1) if axis is None else v.movedim(axis % v.dim(), 0)
    return rows.reshape(rows.shape[0], -1)


def _mse_step(rows: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The step of least squared quantization error among c * absmax / qmax, per row."""
    stride = max(1, rows.shape[1] // MSE_MAX_ELEMENTS)
    rows = rows[:, ::stride]
    absmax = rows.abs().amax(dim=1)
    best_error = torch.full_like(absmax, math.inf)
    best = absmax / qmax
    for c in torch.arange(1, MSE_CANDIDATES + 1, dtype=torch.float32) / MSE_CANDIDATES:
        step = (c * absmax / qmax).clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        quantized = torch.clamp(torch.round(rows * (1.0 / step)), qmin, qmax) * step
        error = (quantized - rows).square().sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, step[:, 0], best)
    return best


@dataclass(frozen=True)
class QuantConfig:
    """Quantizer options shared by every quantized layer (bits are set per layer).

    Attributes:
        w_per_channel: one weight step size per output channel (else one per tensor).
        w_signed: weight code range signed (True), unsigned (False) or "auto".
        a_signed: input-activation code range; "auto" picks unsigned when the first batch is
            non-negative (after ReLU), else signed.
        clip_test: where the backward tests the clip range (forward values are the same):
            "before_round" tests x/s, the LSQ paper's rule and the default: a value past the
            range gets no input gradient and the step-size gradient qmin/qmax. "after_round"
            tests round(x/s), ATen's ``torch._fake_quantize_learnable_*`` (bit-exact parity):
            x/s in [qmax, qmax + 0.5) then counts as inside (input gradient 1, step-size
            gradient <= 0), which at 2 bits pushes the weights' step sizes down (measured: ~20
            points lower ResNet-20 W2A2 accuracy after one CIFAR-10 epoch).
        eps: floor of the step size used in forward.
        init: step-size initialisation, "mse" (least quantization error, the default: it
            trained best at 2-4 bits), "lsq" (the LSQ paper's) or "absmax", see
            :func:`init_step_size`.
    """

    w_per_channel: bool = True
    w_signed: Signedness = True
    a_signed: Signedness = "auto"
    clip_test: ClipTest = "before_round"
    eps: float = 1e-8
    init: InitMethod = DEFAULT_INIT


class LSQQuantizer(nn.Module):
    """LSQ fake quantizer (Esser et al. 2020) with a learnable fp32 step size.

    The step size is initialised on the first forward from the tensor it sees (the weights, or
    the first batch of activations), by default LSQ's 2*mean(|v|)/sqrt(qmax) (see
    :func:`init_step_size`); "auto" signedness is decided on that batch too. Both decisions
    live in buffers (``initialized``, ``signed``), so they survive ``state_dict`` round trips
    and deepcopy; a quantizer loaded from a state_dict does not initialise again. Python
    mirrors of the buffers drive the control flow, so ``torch.compile(fullgraph=True)`` guards
    on them instead of breaking the graph on a tensor-valued ``if``: compile after one eager
    forward, so the compiled graph holds no initialisation. Likewise run that first forward
    before wrapping the model in DistributedDataParallel, which then broadcasts rank 0's step
    sizes; initialised inside DDP, every rank would start from its own batch.

    LSQ's gradient factor g = 1/sqrt(N * qmax) counts the N elements one step size covers in a
    step. Under data parallelism each process sees 1/P of the batch and the gradients are
    averaged, which would make an activation step size's gradient sqrt(P) times the
    one-process one; ``data_parallel_size = P`` (set by :func:`set_data_parallel_size`) makes
    N count the global batch instead, so P processes give the one-process gradient.

    The forward step size is ``max(|scale|, eps)`` in value with the gradient of ``|scale|``
    (straight-through clamp): it is always > 0, and a parameter pushed below eps or through
    zero still gets a gradient that can bring it back.

    Args:
        bits: code width (2..16).
        signed: True, False or "auto".
        axis: None for one step size, else the channel dimension of the input.
        num_channels: number of step sizes when axis is not None (the input's size along axis).
        clip_test: "before_round" (the LSQ paper's, default) or "after_round" (ATen's), see
            :class:`QuantConfig`.
        eps: floor of the forward step size.
        init: "mse" (default), "lsq" or "absmax", see :func:`init_step_size`.

    Shape:
        input: (any shape), float32/float16/bfloat16; output: same shape, dtype and layout.
    """

    def __init__(
        self,
        bits: int,
        signed: Signedness = True,
        axis: int | None = None,
        num_channels: int | None = None,
        *,
        clip_test: ClipTest = "before_round",
        eps: float = 1e-8,
        init: InitMethod = DEFAULT_INIT,
    ) -> None:
        super().__init__()
        check_bits(bits, "LSQQuantizer: bits")
        if signed not in (True, False, "auto"):
            raise ValueError(f"LSQQuantizer: signed must be True, False or 'auto', got {signed!r}")
        if (axis is None) != (num_channels is None):
            raise ValueError(
                "LSQQuantizer: per-channel quantization needs both axis and num_channels, got "
                f"axis={axis}, num_channels={num_channels}"
            )
        if clip_test not in CLIP_TESTS:
            raise ValueError(
                f"LSQQuantizer: clip_test must be 'before_round' (the LSQ paper's) or "
                f"'after_round' (ATen's), got {clip_test!r}"
            )
        if init not in INIT_METHODS:
            raise ValueError(
                f"LSQQuantizer: init must be one of {', '.join(INIT_METHODS)}, got {init!r}"
            )
        if not eps > 0:
            raise ValueError(f"LSQQuantizer: eps must be > 0, got {eps}")
        self.bits = bits
        self.signed_mode = signed
        self.axis = axis
        self.clip_test = clip_test
        self.eps = eps
        self.init_method = init
        self.enabled = True
        self.scale_frozen = False
        self.data_parallel_size = 1  # processes sharing the batch (activation quantizers only)
        # A frozen copy of the step size while bwrf_ext.export.onnx_export_mode is active (see
        # set_export_mode); None otherwise.
        self.export_scale: torch.Tensor | None = None
        shape = () if num_channels is None else (num_channels,)
        self.scale = nn.Parameter(torch.ones(shape, dtype=torch.float32))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(signed is not False))
        self._initialized = False
        self._signed = signed is not False
        self.register_load_state_dict_post_hook(_sync_mirrors_after_load)

    @property
    def qrange(self) -> tuple[int, int]:
        """(qmin, qmax) of the current signedness ("auto" resolves on the first batch)."""
        return quant_range(self.bits, self._signed)

    @property
    def is_initialized(self) -> bool:
        """Whether the step size (and "auto" signedness) have been set."""
        return self._initialized

    def effective_scale(self) -> torch.Tensor:
        """The step size forward uses: max(|scale|, eps), fp32, gradient of |scale|.

        Returns:
            fp32 tensor of the parameter's shape, () or (num_channels,).
        """
        magnitude = self.scale.abs()
        s = magnitude + (magnitude.clamp_min(self.eps) - magnitude).detach()
        return s.detach() if self.scale_frozen else s

    @torch.no_grad()
    def initialize(self, v: torch.Tensor) -> None:
        """Sets "auto" signedness and the initial step size from v (weights or a first batch).

        Args:
            v: (any shape) float tensor; for per-channel quantizers v.shape[axis] == num_channels.
        """
        if self.axis is not None and v.shape[self.axis] != self.scale.numel():
            raise ValueError(
                f"LSQQuantizer.initialize: expected {self.scale.numel()} channels along axis "
                f"{self.axis}, got shape {tuple(v.shape)}"
            )
        if not bool(torch.isfinite(v).all()):
            raise ValueError(
                f"LSQQuantizer.initialize: the tensor holds {int((~torch.isfinite(v)).sum())} "
                f"non-finite value(s) of {v.numel()}; a step size initialised from it would be "
                "NaN and disable the layer. Calibrate on finite data"
            )
        if self.signed_mode == "auto":
            self._signed = bool((v < 0).any())
            self.signed.fill_(self._signed)
        qmin, qmax = self.qrange
        step = init_step_size(v, qmax, self.axis, self.init_method, qmin)
        self.scale.copy_(step.clamp_min(self.eps))
        self.initialized.fill_(True)
        self._initialized = True

    def reset_initialization(self) -> None:
        """Marks the step size (and "auto" signedness) unset: the next forward initialises."""
        self.initialized.fill_(False)
        self._initialized = False

    def set_enabled(self, enabled: bool = True) -> None:
        """Turns quantization on, or off (forward returns its input unchanged)."""
        self.enabled = enabled

    def freeze_scale(self, frozen: bool = True) -> None:
        """Stops (or resumes) step-size learning: the scale gets no gradient while frozen."""
        self.scale_frozen = frozen

    def set_export_mode(self, enabled: bool) -> None:
        """Switches forward to ATen's fake_quantize_per_{tensor,channel}_affine, or back.

        The ONNX (TorchScript) exporter lowers those ops to QuantizeLinear/DequantizeLinear.
        The step size is snapshotted as a plain tensor so the exporter embeds it as a constant
        instead of tracing the abs/clamp chain on the parameter. Inference only: no gradients.
        """
        if enabled and not self._initialized:
            raise RuntimeError("LSQQuantizer.set_export_mode: run one forward (calibration) first")
        self.export_scale = self.effective_scale().detach().clone() if enabled else None

    @torch.no_grad()
    def integer_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes clamp(round(x * (1/s)), qmin, qmax) that forward multiplies by s.

        The arithmetic is the op's (fp32, product with the fp32 reciprocal, round half to even),
        so ``codes * effective_scale()`` equals forward's output bit for bit.

        Args:
            x: (any shape) float tensor.

        Returns:
            int32 tensor of x's shape.
        """
        if not self._initialized:
            raise RuntimeError("LSQQuantizer.integer_codes: run one forward (or initialize) first")
        qmin, qmax = self.qrange
        s = broadcast_scale(self.effective_scale(), x, self.axis)
        return torch.clamp(torch.round(x.float() * (1.0 / s)), qmin, qmax).to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantizes x: clamp(round(x/s), qmin, qmax) * s with LSQ gradients."""
        if not self.enabled:
            return x
        if not self._initialized:
            self.initialize(x)
        qmin, qmax = self.qrange
        if self.export_scale is not None:
            return self._aten_fake_quant(x, self.export_scale, qmin, qmax)
        s = self.effective_scale()
        channels = 1 if self.axis is None else x.shape[self.axis]
        g = lsq_grad_factor(x.numel() // channels * self.data_parallel_size, qmax)
        return self._fake_quant(x, s, qmin, qmax, g)

    def _fake_quant(self, x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, g: float):
        """The fake-quant op itself (the benchmarks' eager composite baseline overrides it)."""
        return lsq_fake_quant(
            x, s, qmin, qmax, g, self.axis, clip_before_round=self.clip_test == "before_round"
        )

    def _aten_fake_quant(self, x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int):
        """Forward through ATen's fake_quantize_per_{tensor,channel}_affine, for ONNX export.

        ONNX QDQ only has 8-bit codes (ranges -128..127 and 0..255), so a narrower range is
        clamped to [qmin*s, qmax*s] first; with integer bounds round(clamp(v)) == clamp(round(v)),
        so the values equal the fused op's.
        """
        wide_min, wide_max = quant_range(8, self._signed)
        if not (wide_min <= qmin and qmax <= wide_max):
            raise ValueError(
                f"LSQQuantizer: ONNX QDQ export needs codes of at most 8 bits, got bits={self.bits}"
            )
        if (qmin, qmax) != (wide_min, wide_max):
            sb = broadcast_scale(s, x, self.axis).to(x.dtype)
            x = torch.maximum(torch.minimum(x, sb * qmax), sb * qmin)
        if self.axis is None:
            zero_point = torch.zeros((), dtype=torch.int32, device=x.device)
            return torch.fake_quantize_per_tensor_affine(x, s, zero_point, wide_min, wide_max)
        zero_point = torch.zeros(s.shape, dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_channel_affine(
            x, s, zero_point, self.axis % x.dim(), wide_min, wide_max
        )

    def _apply(self, fn, recurse=True):
        # model.half()/.bfloat16() would cast the step size too; updates of lr*grad (~1e-5 of s)
        # vanish in bf16's 8-bit significand, so the step size stays fp32 (the op takes mixed
        # dtypes).
        super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:
            self.scale.data = self.scale.data.float()
        return self

    def extra_repr(self) -> str:
        qmin, qmax = self.qrange
        signed = "auto" if self.signed_mode == "auto" else self.signed_mode
        parts = [
            f"bits={self.bits}",
            f"signed={signed}",
            f"range=[{qmin}, {qmax}]" if self._initialized or self.signed_mode != "auto" else None,
            "per_tensor"
            if self.axis is None
            else f"per_channel(axis={self.axis}, channels={self.scale.numel()})",
            None if self.init_method == DEFAULT_INIT else f"init={self.init_method}",
            None if self.clip_test == "before_round" else f"clip_test={self.clip_test}",
            None if self._initialized else "uninitialized",
            None if self.enabled else "disabled",
            "scale_frozen" if self.scale_frozen else None,
        ]
        return ", ".join(p for p in parts if p is not None)


def _sync_mirrors_after_load(module: LSQQuantizer, incompatible_keys) -> None:
    """Copies the loaded ``initialized``/``signed`` buffers into their Python mirrors."""
    del incompatible_keys
    loaded_signed = bool(module.signed)
    if module.signed_mode != "auto" and loaded_signed != module.signed_mode:
        raise ValueError(
            f"LSQQuantizer: the state_dict was saved with signed={loaded_signed}, but this "
            f"quantizer is signed={module.signed_mode}; build it with the same signedness "
            "(or 'auto')"
        )
    module._signed = loaded_signed
    module._initialized = bool(module.initialized)
