"""Drop-in quantized layers: QuantConv2d and QuantLinear (LSQ weights and input activations)."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.common_types import _size_2_t

from bwrf_ext.nn.quantizer import LSQQuantizer, QuantConfig

_Layer = TypeVar("_Layer", bound="_QuantLayerMixin")


class _QuantLayerMixin:
    """What QuantConv2d and QuantLinear share: quantizer setup, conversion, repr."""

    _FLOAT_TYPE: type[nn.Module]
    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quantizer: LSQQuantizer | None
    input_quantizer: LSQQuantizer | None

    def _init_quantizers(self, w_bits: int | None, a_bits: int | None, config: QuantConfig):
        """Builds the weight quantizer (channel axis 0) and the per-tensor input quantizer.

        Args:
            w_bits: weight code width, or None to keep the weights in full precision.
            a_bits: input code width, or None to keep the input in full precision.
            config: the quantizer options.
        """
        common = dict(
            clip_test=config.clip_test,
            eps=config.eps,
            init=config.init,
        )
        self.weight_quantizer = None
        if w_bits is not None:
            per_channel = config.w_per_channel
            self.weight_quantizer = LSQQuantizer(
                w_bits,
                config.w_signed,
                axis=0 if per_channel else None,
                num_channels=self.weight.shape[0] if per_channel else None,
                **common,
            )
        self.input_quantizer = None
        if a_bits is not None:
            self.input_quantizer = LSQQuantizer(a_bits, config.a_signed, **common)

    @property
    def w_bits(self) -> int | None:
        """Weight code width (None: full-precision weights)."""
        return None if self.weight_quantizer is None else self.weight_quantizer.bits

    @property
    def a_bits(self) -> int | None:
        """Input-activation code width (None: full-precision input)."""
        return None if self.input_quantizer is None else self.input_quantizer.bits

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight forward uses (the weight itself when w_bits is None)."""
        if self.weight_quantizer is None:
            return self.weight
        return self.weight_quantizer(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized input forward uses (x itself when a_bits is None)."""
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @classmethod
    def _float_kwargs(cls, module: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_float(
        cls: type[_Layer],
        module: nn.Module,
        w_bits: int | None = 4,
        a_bits: int | None = 4,
        config: QuantConfig | None = None,
    ) -> _Layer:
        """A quantized copy of a float layer: same arguments, weights copied, on its device.

        The weight step size is initialised from the copied weights right away; the input step
        size on the first forward.

        Args:
            module: an instance of the float type (nn.Conv2d or nn.Linear).
            w_bits, a_bits: code widths, None for full precision.
            config: quantizer options (default QuantConfig()).

        Raises:
            TypeError: module is not of the float type, or is already a quantized layer (a
                new one would silently drop its learned step sizes).
        """
        if not isinstance(module, cls._FLOAT_TYPE):
            raise TypeError(
                f"{cls.__name__}.from_float: expected {cls._FLOAT_TYPE.__name__}, "
                f"got {type(module).__name__}"
            )
        if isinstance(module, _QuantLayerMixin):
            raise TypeError(
                f"{cls.__name__}.from_float: expected a float {cls._FLOAT_TYPE.__name__}, got a "
                f"{type(module).__name__} (already quantized: converting it again would drop its "
                "step sizes); use it as is, or call .to_float() first to requantize it"
            )
        weight = module.weight
        quant = cls(
            **cls._float_kwargs(module),
            device=weight.device,
            dtype=weight.dtype,
            w_bits=w_bits,
            a_bits=a_bits,
            config=config,
        )
        _copy_parameters(module, quant)
        quant.train(module.training)
        if quant.weight_quantizer is not None:
            quant.weight_quantizer.initialize(quant.weight)
        return quant

    def to_float(self) -> nn.Module:
        """A float layer of the original type with this layer's (latent, unquantized) weights."""
        weight = self.weight
        module = self._FLOAT_TYPE(
            **self._float_kwargs(self), device=weight.device, dtype=weight.dtype
        )
        _copy_parameters(self, module)
        module.train(self.training)
        return module

    def _quant_repr(self) -> str:
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}"


def _copy_parameters(source: nn.Module, target: nn.Module) -> None:
    """Copies weight and bias (values and requires_grad), keeping target's own storage."""
    with torch.no_grad():
        target.weight.copy_(source.weight)
        target.weight.requires_grad_(source.weight.requires_grad)
        if source.bias is not None:
            target.bias.copy_(source.bias)
            target.bias.requires_grad_(source.bias.requires_grad)
    if source.weight.dim() == 4 and source.weight.is_contiguous(memory_format=torch.channels_last):
        target.weight.data = target.weight.data.contiguous(memory_format=torch.channels_last)


class QuantConv2d(_QuantLayerMixin, nn.Conv2d):
    """nn.Conv2d whose weight and input go through LSQ fake quantizers.

    Takes nn.Conv2d's arguments (groups/depthwise, dilation, bias, every padding mode) plus the
    code widths. Weights: per-channel over output channels and signed by default; input:
    per-tensor, signedness from ``config.a_signed`` ("auto": unsigned after ReLU).

    Args:
        in_channels ... dtype: as nn.Conv2d.
        w_bits: weight code width, None for full-precision weights.
        a_bits: input code width, None for a full-precision input.
        config: quantizer options (default QuantConfig()).

    Shape:
        input (N, C_in, H, W) -> output (N, C_out, H_out, W_out), as nn.Conv2d; channels_last
        inputs stay channels_last.
    """

    _FLOAT_TYPE = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: _size_2_t | str = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        w_bits: int | None = 4,
        a_bits: int | None = 4,
        config: QuantConfig | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_quantizers(w_bits, a_bits, config or QuantConfig())

    @classmethod
    def _float_kwargs(cls, module: nn.Conv2d) -> dict[str, Any]:
        return dict(
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"


class QuantLinear(_QuantLayerMixin, nn.Linear):
    """nn.Linear whose weight and input go through LSQ fake quantizers.

    Args:
        in_features, out_features, bias, device, dtype: as nn.Linear.
        w_bits: weight code width (per output feature by default), None for full precision.
        a_bits: input code width (per tensor), None for full precision.
        config: quantizer options (default QuantConfig()).

    Shape:
        input (*, in_features) -> output (*, out_features).
    """

    _FLOAT_TYPE = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        w_bits: int | None = 4,
        a_bits: int | None = 4,
        config: QuantConfig | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quantizers(w_bits, a_bits, config or QuantConfig())

    @classmethod
    def _float_kwargs(cls, module: nn.Linear) -> dict[str, Any]:
        return dict(
            in_features=module.in_features,
            out_features=module.out_features,
            bias=module.bias is not None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"
