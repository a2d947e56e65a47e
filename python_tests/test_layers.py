"""Tests of LSQQuantizer, QuantConv2d and QuantLinear against PyTorch's own ops and exact math."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext import LSQQuantizer, QuantConfig, QuantConv2d, QuantLinear
from bwrf_ext.nn import init_step_size, lsq_grad_factor, quant_range


def _torch_fake_quant(x, scale, qmin, qmax, grad_factor, axis=None):
    """PyTorch's learnable fake quantization with zero_point 0: the oracle of the fused op."""
    if axis is None:
        zero_point = torch.zeros(1)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale.reshape(1), zero_point, qmin, qmax, grad_factor
        )
    zero_point = torch.zeros(scale.shape[0])
    return torch._fake_quantize_learnable_per_channel_affine(
        x, scale, zero_point, axis % x.dim(), qmin, qmax, grad_factor
    )


def _initialized(quantizer: LSQQuantizer, v: torch.Tensor) -> LSQQuantizer:
    quantizer.initialize(v)
    return quantizer


@pytest.mark.parametrize(
    ("bits", "signed", "expected"),
    [(2, True, (-2, 1)), (4, True, (-8, 7)), (4, False, (0, 15)), (8, True, (-128, 127))],
)
def test_quant_range(bits, signed, expected):
    assert quant_range(bits, signed) == expected


@pytest.mark.parametrize("bits", [1, 17, 4.0, True])
def test_invalid_bits_are_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        LSQQuantizer(bits)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", [None, 1])
def test_quantizer_matches_torch_learnable_fake_quant(signed, axis):
    """With ATen's clip test, values, grad_x and grad_scale equal PyTorch's op with
    g = 1/sqrt(N*qmax)."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5) * 2
    channels = x.shape[1] if axis is not None else None
    quantizer = _initialized(LSQQuantizer(3, signed, axis, channels, clip_test="after_round"), x)
    qmin, qmax = quant_range(3, signed)
    elements_per_scale = x.numel() // (channels or 1)

    x_ours = x.clone().requires_grad_()
    y = quantizer(x_ours)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    x_torch = x.clone().requires_grad_()
    scale_torch = quantizer.scale.detach().clone().requires_grad_()
    y_torch = _torch_fake_quant(
        x_torch, scale_torch, qmin, qmax, 1 / math.sqrt(elements_per_scale * qmax), axis
    )
    y_torch.backward(grad_y)

    assert torch.equal(y, y_torch)
    assert torch.equal(x_ours.grad, x_torch.grad)
    torch.testing.assert_close(
        quantizer.scale.grad.reshape(-1), scale_torch.grad.reshape(-1), rtol=1e-5, atol=1e-7
    )


def test_grad_factor_is_one_over_sqrt_n_qmax():
    assert lsq_grad_factor(1000, 7) == pytest.approx(1 / math.sqrt(7000))


def test_lsq_init_per_tensor_from_first_batch_only():
    torch.manual_seed(0)
    first, second = torch.randn(8, 16), torch.randn(8, 16) * 10
    quantizer = LSQQuantizer(4, signed=True, init="lsq")
    quantizer(first)
    expected = 2 * first.abs().mean() / math.sqrt(7)
    torch.testing.assert_close(quantizer.scale.detach(), expected)
    quantizer(second)  # a later batch must not re-initialise
    torch.testing.assert_close(quantizer.scale.detach(), expected)
    assert quantizer.is_initialized and bool(quantizer.initialized)


def test_lsq_init_per_channel_from_weights():
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 3, 3) * torch.arange(1, 6).view(5, 1, 1, 1)
    quantizer = LSQQuantizer(4, signed=True, axis=0, num_channels=5, init="lsq")
    quantizer(weight)
    expected = torch.stack([2 * w.abs().mean() / math.sqrt(7) for w in weight])
    torch.testing.assert_close(quantizer.scale.detach(), expected)


def test_per_channel_init_checks_the_channel_count():
    quantizer = LSQQuantizer(4, signed=True, axis=0, num_channels=5)
    with pytest.raises(ValueError, match="5 channels"):
        quantizer(torch.randn(4, 3))


def test_absmax_init_and_zero_channel_fallback():
    weight = torch.tensor([[1.0, -3.0], [0.0, 0.0], [0.5, 0.25]])
    absmax = init_step_size(weight, 127, axis=0, method="absmax")
    # The all-zero channel takes the tensor-wide statistic.
    torch.testing.assert_close(absmax, torch.tensor([3.0, 3.0, 0.5]) / 127)
    lsq = init_step_size(weight, 7, axis=0)
    tensor_mean = weight.abs().mean()
    expected = torch.stack([torch.tensor(2.0), tensor_mean, torch.tensor(0.375)])
    torch.testing.assert_close(lsq, 2 * expected / math.sqrt(7))


def _quantization_error(v: torch.Tensor, step: float, qmin: int, qmax: int) -> float:
    v = v.double()
    return float(((torch.clamp(torch.round(v / step), qmin, qmax) * step - v) ** 2).sum())


@pytest.mark.parametrize(("qmin", "qmax"), [(-2, 1), (0, 3), (-8, 7)])
def test_mse_init_is_the_least_error_step_of_its_grid(qmin, qmax):
    torch.manual_seed(0)
    v = torch.randn(3, 500) * torch.tensor([[0.1], [1.0], [5.0]])
    v[1, 7] = 12.0  # an outlier: absmax would waste the range on it
    if qmin == 0:
        v = v.abs()
    steps = init_step_size(v, qmax, axis=0, method="mse", qmin=qmin)
    for row, step in zip(v, steps, strict=True):
        # Oracle: the same grid searched in float64, one candidate at a time.
        grid = [c / 100 * float(row.abs().max()) / qmax for c in range(1, 101)]
        errors = [_quantization_error(row, g, qmin, qmax) for g in grid]
        best = grid[min(range(100), key=errors.__getitem__)]
        assert float(step) == pytest.approx(best, rel=1e-5)
        for other in ("lsq", "absmax"):
            alternative = float(init_step_size(row, qmax, None, other, qmin))
            assert _quantization_error(row, float(step), qmin, qmax) <= _quantization_error(
                row, alternative, qmin, qmax
            )
    per_tensor = init_step_size(v, qmax, None, "mse", qmin)
    assert per_tensor.shape == ()


def test_mse_is_the_default_init():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    quantizer = LSQQuantizer(2)
    quantizer(x)
    expected = init_step_size(x, 1, None, "mse", qmin=-2)
    torch.testing.assert_close(quantizer.scale.detach(), expected)
    assert QuantConfig().init == "mse" and "init=" not in repr(quantizer)
    assert "init=lsq" in repr(LSQQuantizer(2, init="lsq"))


def test_mse_init_through_the_config():
    conv = nn.Conv2d(4, 6, 3)
    layer = QuantConv2d.from_float(conv, 2, 2, QuantConfig(init="mse"))
    expected = init_step_size(conv.weight, 1, axis=0, method="mse", qmin=-2)
    torch.testing.assert_close(layer.weight_quantizer.scale.detach(), expected)
    assert "init=" not in repr(layer.weight_quantizer)  # the default goes unsaid
    with pytest.raises(ValueError, match="init must be one of lsq, absmax, mse, got 'best'"):
        LSQQuantizer(2, init="best")


@pytest.mark.parametrize(("signed", "expected_range"), [(False, (0, 15)), (True, (-8, 7))])
def test_auto_signedness_is_decided_on_the_first_batch(signed, expected_range):
    torch.manual_seed(0)
    first_batch = torch.randn(4, 8) if signed else torch.rand(4, 8)
    quantizer = LSQQuantizer(4, signed="auto")
    quantizer(first_batch)
    assert quantizer.qrange == expected_range
    assert bool(quantizer.signed) is signed
    y = quantizer(-torch.rand(4, 8) - 1)  # a later negative batch does not flip it
    assert quantizer.qrange == expected_range
    assert (y < 0).all() if signed else (y == 0).all()


def test_state_dict_round_trip_restores_init_and_signedness():
    torch.manual_seed(0)
    trained = LSQQuantizer(4, signed="auto")
    trained(torch.rand(16, 8))  # non-negative: unsigned
    with torch.no_grad():
        trained.scale.mul_(1.7)  # a learned value, unlike any init

    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh = LSQQuantizer(4, signed="auto")
    fresh.load_state_dict(torch.load(buffer))

    x = torch.randn(16, 8) * 3  # would re-initialise to signed and another scale
    assert torch.equal(fresh(x), trained(x))
    assert fresh.qrange == (0, 15) and fresh.is_initialized


def test_loading_a_mismatched_fixed_signedness_is_an_error():
    unsigned = _initialized(LSQQuantizer(4, signed=False), torch.rand(4))
    with pytest.raises(ValueError, match="signed"):
        LSQQuantizer(4, signed=True).load_state_dict(unsigned.state_dict())


def test_disabled_quantizer_is_pass_through():
    quantizer = LSQQuantizer(2)
    x = torch.randn(3, 4, requires_grad=True)
    quantizer.set_enabled(False)
    y = quantizer(x)
    assert y is x
    assert not quantizer.is_initialized  # disabled layers do not consume the first batch
    quantizer.set_enabled(True)
    assert not torch.equal(quantizer(x), x)


def test_frozen_scale_gets_no_gradient_but_input_does():
    torch.manual_seed(0)
    x = torch.randn(32, requires_grad=True)
    quantizer = _initialized(LSQQuantizer(3), x)
    quantizer.freeze_scale()
    y = quantizer(x)
    y.sum().backward()
    assert quantizer.scale.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0
    s = quantizer.scale.detach()
    torch.testing.assert_close(y, torch.clamp(torch.round(x / s), -4, 3) * s)


@pytest.mark.parametrize("stored", [-0.25, 0.0, -1e-12])
def test_step_size_stays_positive(stored):
    x = torch.linspace(-1, 1, 41)
    quantizer = _initialized(LSQQuantizer(4, eps=1e-6), x)
    with torch.no_grad():
        quantizer.scale.fill_(stored)
    step = max(abs(stored), 1e-6)
    y = quantizer(x)
    assert float(quantizer.effective_scale().detach()) == pytest.approx(step)
    torch.testing.assert_close(y, torch.clamp(torch.round(x / step), -8, 7) * step)
    y.pow(2).sum().backward()
    if stored != 0.0:  # d|s|/ds is 0 at exactly 0; elsewhere the straight-through clamp passes it
        assert quantizer.scale.grad.abs() > 0


def test_extra_repr_says_what_the_quantizer_does():
    quantizer = LSQQuantizer(4, signed="auto", clip_test="after_round")
    assert "bits=4" in repr(quantizer) and "uninitialized" in repr(quantizer)
    quantizer(torch.rand(8))
    text = repr(quantizer)
    assert "range=[0, 15]" in text and "per_tensor" in text and "clip_test=after_round" in text
    assert "clip_test" not in repr(LSQQuantizer(4))  # the default, the paper's, goes unsaid
    per_channel = LSQQuantizer(8, True, axis=0, num_channels=3, init="absmax")
    assert "per_channel(axis=0, channels=3)" in repr(per_channel) and "absmax" in repr(per_channel)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_with_fp32_scale(dtype):
    torch.manual_seed(0)
    quantizer = LSQQuantizer(4).to(dtype)
    assert quantizer.scale.dtype == torch.float32  # the master step size stays fp32
    x = torch.randn(64).to(dtype)
    y = quantizer(x)
    s = quantizer.scale.detach()
    expected = (torch.clamp(torch.round(x.float() * (1 / s)), -8, 7) * s).to(dtype)
    assert y.dtype == dtype and torch.equal(y, expected)


def test_clip_test_is_named():
    with pytest.raises(ValueError, match="clip_test must be 'before_round'.*got True"):
        LSQQuantizer(4, clip_test=True)


CONV_CASES = {
    "plain": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    "stride_no_bias": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, bias=False),
    "groups_dilation": dict(in_channels=4, out_channels=8, kernel_size=3, groups=2, dilation=2),
    "depthwise_reflect": dict(
        in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1, padding_mode="reflect"
    ),
    "circular": dict(
        in_channels=4, out_channels=6, kernel_size=3, padding=2, padding_mode="circular"
    ),
    "same": dict(in_channels=4, out_channels=6, kernel_size=(3, 5), padding="same"),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_quant_conv2d_is_conv_of_fake_quantized_operands(case):
    """Exact oracle: F.conv via nn.Conv2d on operands fake-quantized by PyTorch's own op."""
    torch.manual_seed(0)
    float_conv = nn.Conv2d(**CONV_CASES[case])
    quant_conv = QuantConv2d.from_float(float_conv, w_bits=4, a_bits=4)
    x = torch.randn(2, 4, 9, 9)
    y = quant_conv(x)

    wq, iq = quant_conv.weight_quantizer, quant_conv.input_quantizer
    assert iq.qrange == (-8, 7)  # "auto" on a signed batch
    x_q = _torch_fake_quant(x, iq.scale.detach(), -8, 7, 1.0)
    w_q = _torch_fake_quant(float_conv.weight.detach(), wq.scale.detach(), -8, 7, 1.0, axis=0)
    with torch.no_grad():
        float_conv.weight.copy_(w_q)
    assert torch.equal(y, float_conv(x_q))


def test_quant_linear_is_linear_of_fake_quantized_operands():
    torch.manual_seed(0)
    float_linear = nn.Linear(12, 5)
    quant_linear = QuantLinear.from_float(float_linear, w_bits=3, a_bits=5)
    x = torch.rand(2, 7, 12)  # non-negative: the input quantizer becomes unsigned
    y = quant_linear(x)
    wq, iq = quant_linear.weight_quantizer, quant_linear.input_quantizer
    assert iq.qrange == (0, 31) and wq.qrange == (-4, 3)
    x_q = _torch_fake_quant(x, iq.scale.detach(), 0, 31, 1.0)
    w_q = _torch_fake_quant(float_linear.weight.detach(), wq.scale.detach(), -4, 3, 1.0, axis=0)
    assert y.shape == (2, 7, 5)
    assert torch.equal(y, F.linear(x_q, w_q, float_linear.bias))


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).norm().detach() / reference.norm().detach())


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_8bit_conv_closely_matches_float(case):
    torch.manual_seed(0)
    float_conv = nn.Conv2d(**CONV_CASES[case])
    x = torch.randn(2, 4, 9, 9)
    absmax = QuantConv2d.from_float(float_conv, 8, 8, QuantConfig(init="absmax"))
    lsq = QuantConv2d.from_float(float_conv, 8, 8)
    low_bit = QuantConv2d.from_float(float_conv, 4, 4)
    y = float_conv(x)
    # Quantization noise step/sqrt(12) relative to the data: ~0.5 % with the absmax step,
    # ~5 % with LSQ's init (a wide range made for low bits), ~25 % at 4 bits.
    assert _relative_error(absmax(x), y) < 0.015
    assert _relative_error(lsq(x), y) < 0.08
    assert _relative_error(lsq(x), y) < _relative_error(low_bit(x), y) / 3


def test_8bit_linear_closely_matches_float():
    torch.manual_seed(0)
    float_linear = nn.Linear(64, 10)
    quant_linear = QuantLinear.from_float(float_linear, 8, 8, QuantConfig(init="absmax"))
    x = torch.randn(16, 64)
    assert _relative_error(quant_linear(x), float_linear(x)) < 0.015


def test_constructor_is_drop_in_for_nn_conv2d_and_linear():
    kwargs = dict(stride=2, padding=1, dilation=1, groups=2, bias=False, padding_mode="replicate")
    quant = QuantConv2d(4, 8, 3, **kwargs, w_bits=2, a_bits=None)
    plain = nn.Conv2d(4, 8, 3, **kwargs)
    assert isinstance(quant, nn.Conv2d)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(quant, attr) == getattr(plain, attr)
    assert quant.bias is None and quant.weight.shape == plain.weight.shape
    assert quant.w_bits == 2 and quant.a_bits is None and quant.input_quantizer is None
    linear = QuantLinear(6, 3, bias=False, dtype=torch.float64, w_bits=None, a_bits=8)
    assert isinstance(linear, nn.Linear) and linear.weight.dtype == torch.float64
    assert linear.weight_quantizer is None and linear.a_bits == 8


def test_full_precision_sides_are_untouched():
    torch.manual_seed(0)
    float_conv = nn.Conv2d(3, 5, 3)
    x = torch.randn(1, 3, 6, 6)
    weights_only = QuantConv2d.from_float(float_conv, w_bits=4, a_bits=None)
    expected = F.conv2d(x, weights_only.quantized_weight(), float_conv.bias)
    assert torch.equal(weights_only(x), expected)
    neither = QuantConv2d.from_float(float_conv, w_bits=None, a_bits=None)
    assert torch.equal(neither(x), float_conv(x))


def test_from_float_copies_and_to_float_goes_back():
    torch.manual_seed(0)
    float_conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
    quant = QuantConv2d.from_float(float_conv, 4, 4)
    assert torch.equal(quant.weight, float_conv.weight)
    assert quant.weight.data_ptr() != float_conv.weight.data_ptr()
    back = quant.to_float()
    assert type(back) is nn.Conv2d and repr(back) == repr(float_conv)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(back(x), float_conv(x))
    with torch.no_grad():
        float_conv.weight.add_(1.0)  # the copies are independent
    assert not torch.equal(quant.weight, float_conv.weight)
    assert type(QuantLinear.from_float(nn.Linear(3, 2)).to_float()) is nn.Linear
    with pytest.raises(TypeError, match="Conv2d"):
        QuantConv2d.from_float(nn.Linear(3, 2))


def test_from_float_refuses_a_quantized_layer():
    """A quantized layer given again would come back with fresh step sizes: refused."""
    torch.manual_seed(0)
    quant = QuantConv2d(3, 4, 3, w_bits=3, a_bits=3)
    quant(torch.randn(2, 3, 6, 6))  # learned (here: initialised) step sizes
    state = {k: v.clone() for k, v in quant.state_dict().items()}
    with pytest.raises(TypeError, match=r"QuantConv2d\.from_float: expected a float Conv2d, "
                                        r"got a QuantConv2d \(already quantized"):  # fmt: skip
        QuantConv2d.from_float(quant, 4, 4)
    assert all(torch.equal(v, quant.state_dict()[k]) for k, v in state.items())
    with pytest.raises(TypeError, match="got a QuantLinear"):
        QuantLinear.from_float(QuantLinear(3, 2), 4, 4)
    # The way that works: back to float, then quantized again with other bits.
    assert QuantConv2d.from_float(quant.to_float(), 4, 4).w_bits == 4


def test_scales_receive_gradients_and_change_after_an_optimizer_step():
    torch.manual_seed(0)
    layer = QuantConv2d(3, 8, 3, padding=1, w_bits=3, a_bits=3)
    x = torch.randn(4, 3, 8, 8)
    layer(x)  # lazy init of both step sizes
    before = {n: p.detach().clone() for n, p in layer.named_parameters() if "scale" in n}
    assert set(before) == {"weight_quantizer.scale", "input_quantizer.scale"}
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    loss = (layer(x) - torch.randn(4, 8, 8, 8)).pow(2).mean()
    loss.backward()
    for name, p in layer.named_parameters():
        if "scale" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    optimizer.step()
    for name, p in layer.named_parameters():
        if "scale" in name:
            assert not torch.equal(p.detach(), before[name]), name


def test_channels_last_is_kept():
    torch.manual_seed(0)
    layer = QuantConv2d(8, 16, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 10, 10)
    y_contiguous = layer(x)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert layer.input_quantizer(x_cl).is_contiguous(memory_format=torch.channels_last)
    assert layer.quantized_weight().is_contiguous(memory_format=torch.channels_last)
    y = layer(x_cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_contiguous, rtol=1e-5, atol=1e-5)
    float_cl = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    converted = QuantConv2d.from_float(float_cl)
    assert converted.weight.is_contiguous(memory_format=torch.channels_last)
    assert converted.to_float().weight.is_contiguous(memory_format=torch.channels_last)


def test_deepcopy_keeps_state_and_is_independent():
    torch.manual_seed(0)
    layer = QuantLinear(8, 4, w_bits=4, a_bits=4)
    x = torch.rand(3, 8)
    layer(x)
    clone = copy.deepcopy(layer)
    assert clone.input_quantizer.is_initialized and clone.input_quantizer.qrange == (0, 15)
    assert torch.equal(clone(x), layer(x))
    with torch.no_grad():
        clone.input_quantizer.scale.mul_(2)
    assert not torch.equal(clone(x), layer(x))


def test_bfloat16_layer_keeps_fp32_scales():
    torch.manual_seed(0)
    layer = QuantConv2d(4, 6, 3, w_bits=8, a_bits=8)
    x = torch.randn(2, 4, 8, 8)
    y32 = layer(x)
    layer_bf16 = copy.deepcopy(layer).to(torch.bfloat16)
    assert layer_bf16.weight.dtype == torch.bfloat16
    assert layer_bf16.weight_quantizer.scale.dtype == torch.float32
    assert layer_bf16.input_quantizer.scale.dtype == torch.float32
    y = layer_bf16(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)
