"""Tests of export_quantized (integer codes + scales) and ONNX QDQ export run by onnxruntime."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from bwrf_ext import (
    LSQQuantizer,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    export_onnx,
    export_quantized,
    onnx_export_mode,
    quantize_model,
)
from bwrf_ext.models import resnet20


def _calibrated_resnet20(bits: int, seed: int = 0, **kwargs) -> nn.Module:
    """A converted ResNet-20 whose BN statistics and activation step sizes saw random batches."""
    torch.manual_seed(seed)
    # LSQ's init, which the ONNX tolerances below were measured with: the finer 8-bit steps of
    # the default mse init put more values on rounding ties, where ORT's x/s may land one code
    # from the op's x*(1/s) (median logit difference 8e-4 instead of ~1e-7 on random weights).
    kwargs.setdefault("config", QuantConfig(init="lsq"))
    model = quantize_model(resnet20(), bits, bits, **kwargs)
    with torch.no_grad():
        for _ in range(3):  # BN running statistics, so that eval activations have sane ranges
            model(torch.randn(32, 3, 32, 32))
    return model.eval()


def _run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _op_counts(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_export_quantized_codes_reproduce_fake_quantized_weights():
    model = _calibrated_resnet20(4)
    layers = export_quantized(model)
    quant_layers = {
        n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))
    }
    assert list(layers) == list(quant_layers) and len(layers) == 20
    for name, exported in layers.items():
        layer = quant_layers[name]
        bits = layer.w_bits
        assert exported.weight_codes.dtype == torch.int8, name
        assert exported.weight_range == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        codes = exported.weight_codes.int()
        assert codes.min() >= exported.weight_range[0] and codes.max() <= exported.weight_range[1]
        assert exported.weight_scale.shape == (layer.out_channels if name != "linear" else 10,)
        assert exported.weight_axis == 0
        with torch.no_grad():
            assert torch.equal(exported.dequantized_weight(), layer.quantized_weight()), name
        assert torch.equal(exported.input_scale, layer.input_quantizer.effective_scale().detach())
        assert exported.input_range == layer.input_quantizer.qrange
    # After ReLU every input is unsigned; the image into the stem is signed.
    assert layers["conv1"].input_range == (-128, 127)
    assert layers["layer1.0.conv2"].input_range == (0, 15)


def test_export_quantized_code_dtypes_and_per_tensor_scales():
    torch.manual_seed(0)
    unsigned = QuantConv2d(3, 4, 3, w_bits=8, a_bits=None, config=QuantConfig(w_signed=False))
    per_tensor = QuantLinear(5, 2, w_bits=12, a_bits=4, config=QuantConfig(w_per_channel=False))
    model = nn.Sequential(unsigned, nn.Flatten(), nn.LazyLinear(5), per_tensor)
    model(torch.randn(1, 3, 4, 4))
    layers = export_quantized(model)
    assert layers["0"].weight_codes.dtype == torch.uint8 and layers["0"].input_scale is None
    assert layers["3"].weight_codes.dtype == torch.int16 and layers["3"].weight_scale.shape == ()
    with torch.no_grad():
        assert torch.equal(layers["0"].dequantized_weight(), unsigned.quantized_weight())
        assert torch.equal(layers["3"].dequantized_weight(), per_tensor.quantized_weight())


def test_export_needs_calibrated_quantizers():
    model = quantize_model(resnet20(), 4, 4)  # weights are initialised, activations not yet
    with pytest.raises(RuntimeError, match="calibration"):
        export_quantized(model)
    with pytest.raises(RuntimeError, match="calibration"), onnx_export_mode(model):
        pass


def test_onnx_export_mode_keeps_the_values_of_the_fused_op():
    model = _calibrated_resnet20(4)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        with onnx_export_mode(model):
            assert torch.equal(model(x), expected)
        assert all(q.export_scale is None for q in model.modules() if isinstance(q, LSQQuantizer))


@pytest.mark.parametrize(
    ("bits", "signed", "axis"), [(4, True, None), (8, False, None), (3, True, 1), (8, True, 1)]
)
def test_onnx_quantizer_is_qdq_and_matches_pytorch(tmp_path, bits, signed, axis):
    """A lone quantizer: the QDQ graph gives the same codes, up to rare rounding ties."""
    torch.manual_seed(0)
    x = torch.randn(8, 6, 10, 10) * 3
    if not signed:
        x = x.abs()
    quantizer = LSQQuantizer(bits, signed, axis, None if axis is None else 6)
    quantizer.initialize(x)
    path = tmp_path / "quantizer.onnx"
    export_onnx(quantizer, (x,), path)
    ops = _op_counts(path)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 1
    assert (ops["Min"] == ops["Max"] == 1) if bits < 8 else ("Min" not in ops)
    with torch.no_grad():
        expected = quantizer(x)
    got = _run_onnx(path, x)
    step = quantizer.effective_scale().detach()
    step = step if axis is None else step.view(1, -1, 1, 1)
    code_difference = ((got - expected) / step).round()
    # ONNX divides by s where the op multiplies by the fp32 1/s: ties may round one code apart.
    assert code_difference.abs().max() <= 1
    assert (code_difference != 0).float().mean() <= 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=float(step.max()) * 1.0001)


@pytest.mark.parametrize("bits", [4, 8])
def test_onnx_resnet20_runs_in_onnxruntime_and_matches_pytorch(tmp_path, bits):
    model = _calibrated_resnet20(bits)
    x = torch.randn(16, 3, 32, 32)
    path = tmp_path / "resnet20.onnx"
    export_onnx(model, (x,), path, input_names=["images"], dynamic_axes={"images": {0: "n"}})
    ops = _op_counts(path)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 40  # weight + input, 20 layers
    assert ops["Conv"] == 19 and ops["Gemm"] == 1
    assert all(node.domain in ("", "ai.onnx") for node in onnx.load(str(path)).graph.node)
    with torch.no_grad():
        expected = model(x)
    got = _run_onnx(path, x)
    difference = (got - expected).abs()
    # Most logits agree to float rounding. ORT sums convs in another order (and divides by s
    # where the op multiplies by 1/s), so a value on a rounding tie can land one code apart,
    # and that moves its image's logits by a few % of their range. Measured on 1,000 exact
    # CIFAR images with pretrained weights, W4A4: median 2e-7, max 0.64 of 18.9, 2.5 % of
    # images touched, 1 prediction changed.
    assert float(difference.median()) < 1e-4
    assert float(difference.max()) <= 0.1 * float(expected.abs().max())
    assert int((got.argmax(1) != expected.argmax(1)).sum()) <= 1
    np.testing.assert_array_equal(_run_onnx(path, x[:3]).numpy(), got[:3].numpy())
