"""Tests of quantize_model on torchvision and CIFAR ResNets: swaps, bits, state, compile."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torchvision
from torch import nn

from bwrf_ext import (
    LSQQuantizer,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    freeze_scales,
    quantization_report,
    quantize_model,
    set_data_parallel_size,
    set_quantization_enabled,
)
from bwrf_ext.models import resnet20

# (builder, input size, convs, linears, first layer, last layer), counted from the architectures:
# resnet18 = stem + 8 blocks x 2 + 3 downsample convs; resnet50 = stem + 16 blocks x 3 + 4
# downsample convs; mobilenet_v2 = stem + 17 blocks (2 or 3 convs) + final 1x1 conv.
MODELS = {
    "resnet18": (torchvision.models.resnet18, 32, 20, 1, "conv1", "fc"),
    "resnet50": (torchvision.models.resnet50, 32, 53, 1, "conv1", "fc"),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, 32, 52, 1, "features.0.0", "classifier.1"),
    "cifar_resnet20": (resnet20, 32, 19, 1, "conv1", "linear"),
}


def _tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_every_conv_and_linear_is_swapped_with_8bit_ends(name):
    builder, size, convs, linears, first, last = MODELS[name]
    torch.manual_seed(0)
    model = builder().eval()
    converted = quantize_model(model, w_bits=4, a_bits=4)
    modules = dict(converted.named_modules())
    assert sum(type(m) is QuantConv2d for m in modules.values()) == convs
    assert sum(type(m) is QuantLinear for m in modules.values()) == linears
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in modules.values())
    report = quantization_report(converted)
    assert len(report) == convs + linears and all(r.quantized for r in report)
    eight_bit = {r.name for r in report if (r.w_bits, r.a_bits) == (8, 8)}
    assert eight_bit == {first, last}
    assert all((r.w_bits, r.a_bits) == (4, 4) for r in report if r.name not in eight_bit)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y, y_float = converted(x), model(x)
    assert y.shape == y_float.shape and torch.isfinite(y).all()
    assert not any(type(m) is QuantConv2d for m in model.modules())  # not inplace: untouched


def test_first_last_bits_options():
    model = torchvision.models.resnet18()
    full = quantize_model(model, 4, 4, first_last_bits=None)
    assert type(full.conv1) is nn.Conv2d and type(full.fc) is nn.Linear
    assert len([r for r in quantization_report(full) if r.quantized]) == 19
    same = quantize_model(model, 3, 5, first_last_bits="same")
    assert (same.conv1.w_bits, same.conv1.a_bits, same.fc.w_bits, same.fc.a_bits) == (3, 5, 3, 5)
    six = quantize_model(model, 4, 4, first_last_bits=6)
    assert (six.conv1.w_bits, six.fc.a_bits, six.layer1[0].conv1.w_bits) == (6, 6, 4)
    with pytest.raises(ValueError, match="first_last_bits"):
        quantize_model(model, first_last_bits=1)


def test_bits_overrides_skip_and_filter_fn():
    model = torchvision.models.resnet18()
    converted = quantize_model(
        model,
        4,
        4,
        bits_overrides={"layer1.*": 2, "*.downsample.0": (8, None), "layer4.1.conv2": None},
        skip=["layer3.0.*"],
        filter_fn=lambda name, module: not (name.startswith("layer2.1") and module.groups == 1),
    )
    assert (converted.layer1[1].conv2.w_bits, converted.layer1[1].conv2.a_bits) == (2, 2)
    downsample = converted.layer2[0].downsample[0]
    assert (downsample.w_bits, downsample.a_bits) == (8, None)
    assert downsample.input_quantizer is None
    assert type(converted.layer4[1].conv2) is nn.Conv2d
    assert type(converted.layer3[0].conv1) is nn.Conv2d
    assert type(converted.layer3[0].downsample[0]) is nn.Conv2d
    assert type(converted.layer2[1].conv1) is nn.Conv2d
    assert (converted.layer4[1].conv1.w_bits, converted.conv1.w_bits) == (4, 8)
    # An override wins over the first/last rule.
    ends = quantize_model(model, 4, 4, bits_overrides={"conv1": 3})
    assert (ends.conv1.w_bits, ends.fc.w_bits) == (3, 8)


def test_non_module_is_a_type_error_naming_the_argument():
    with pytest.raises(TypeError, match="quantize_model: model must be an nn.Module, got str"):
        quantize_model("resnet18")


def test_nothing_to_quantize_warns():
    with pytest.warns(UserWarning, match="nothing was quantized in Sequential: it holds no "
                                         "nn.Conv2d or nn.Linear$"):  # fmt: skip
        quantize_model(nn.Sequential(nn.ReLU(), nn.Flatten()))
    converted = quantize_model(_tiny_cnn())
    with pytest.warns(UserWarning, match=r"\(3 layers are already quantized\)"):
        quantize_model(converted)
    with pytest.warns(UserWarning, match="all 3 nn.Conv2d / nn.Linear layers stay in full"):
        quantize_model(_tiny_cnn(), skip=["*"])


def test_patterns_that_match_no_layer_warn():
    model = torchvision.models.resnet18()
    with pytest.warns(UserWarning) as caught:
        quantize_model(model, bits_overrides={"layer9.*": 8, "layer1.*": 2}, skip=["fc2"])
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2, messages
    assert messages[0].startswith("quantize_model: bits_overrides pattern 'layer9.*' matches no")
    assert messages[1].startswith("quantize_model: skip pattern 'fc2' matches no")
    assert "'conv1', 'layer1.0.conv1'" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # patterns that match, a model with layers: silent
        quantize_model(model, bits_overrides={"layer1.*": 2}, skip=["fc"])


def test_inplace_and_shared_modules():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.ReLU(), shared, nn.Conv2d(4, 2, 1))
    returned = quantize_model(model, 4, 4, first_last_bits=None, inplace=True)
    assert returned is model
    assert type(model[1]) is QuantConv2d and model[1] is model[3]
    assert type(model[0]) is nn.Conv2d and type(model[4]) is nn.Conv2d  # first and last (conv)


def test_disabled_quantizers_give_the_float_model_exactly():
    torch.manual_seed(0)
    model = resnet20().eval()
    converted = quantize_model(model, 2, 2)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(converted(x), model(x))
        set_quantization_enabled(converted, False)
        assert torch.equal(converted(x), model(x))


def test_fake_quantization_in_train_and_eval():
    """Every quantizer output lies on its integer grid, in train mode and in eval mode."""
    torch.manual_seed(0)
    converted = quantize_model(resnet20(), 4, 4)
    off_grid: list[float] = []

    def check(quantizer: LSQQuantizer, inputs, output) -> None:
        codes = output.detach() / quantizer.effective_scale().detach()
        qmin, qmax = quantizer.qrange
        off_grid.append(float((codes - codes.round()).abs().max()))
        assert codes.min() >= qmin - 1e-3 and codes.max() <= qmax + 1e-3

    for module in converted.modules():
        if isinstance(module, LSQQuantizer) and module.axis is None:
            module.register_forward_hook(check)
    x = torch.randn(4, 3, 32, 32)
    for mode in (True, False):
        off_grid.clear()
        converted.train(mode)
        with torch.no_grad():
            converted(x)
        assert len(off_grid) == 20 and max(off_grid) < 1e-3, mode


def test_state_dict_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    trained = quantize_model(resnet20(), 4, 4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.05)
    for _ in range(2):  # move the scales away from any value a fresh init could recompute
        optimizer.zero_grad()
        nn.functional.cross_entropy(trained(x), y).backward()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh = quantize_model(resnet20(), 4, 4)  # never saw data: its activations are not initialised
    fresh.load_state_dict(torch.load(buffer))
    x_new = torch.rand(8, 3, 32, 32) * 5  # a batch that would initialise to other scales
    for mode in (False, True):
        trained.train(mode)
        fresh.train(mode)
        with torch.no_grad():
            assert torch.equal(fresh(x_new), trained(x_new)), f"train={mode}"


def test_deepcopy_of_a_converted_model():
    torch.manual_seed(0)
    converted = quantize_model(torchvision.models.mobilenet_v2(), 4, 4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = converted(x)
        clone = copy.deepcopy(converted)
        assert torch.equal(clone(x), expected)
    first = next(m for m in clone.modules() if isinstance(m, LSQQuantizer))
    assert (
        first.scale is not next(m for m in converted.modules() if isinstance(m, LSQQuantizer)).scale
    )


def test_channels_last_network():
    """Each layer of a channels_last network computes what its contiguous twin computes.

    Compared layer by layer on the recorded inputs: end to end, last-ulp differences between
    conv algorithms flip a few activation codes, and a random-init ResNet-18 amplifies those.
    """
    torch.manual_seed(0)
    contiguous = quantize_model(torchvision.models.resnet18(), 4, 4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        contiguous(x)  # calibrate
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in channels_last.named_modules():
        if isinstance(module, QuantConv2d):
            module.register_forward_hook(
                lambda m, i, o, name=name: records.__setitem__(name, (i[0], o))
            )
    with torch.no_grad():
        channels_last(x.contiguous(memory_format=torch.channels_last))
        assert len(records) == 20
        for name, (layer_input, output) in records.items():
            assert layer_input.is_contiguous(memory_format=torch.channels_last), name
            assert output.is_contiguous(memory_format=torch.channels_last), name
            expected = contiguous.get_submodule(name)(layer_input.contiguous())
            torch.testing.assert_close(
                output, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=name
            )


def test_freeze_scales_stops_scale_gradients():
    torch.manual_seed(0)
    converted = quantize_model(_tiny_cnn(), 4, 4)
    x = torch.randn(2, 3, 8, 8)
    converted(x)
    freeze_scales(converted)
    converted(x).sum().backward()
    scales = [p for n, p in converted.named_parameters() if n.endswith("quantizer.scale")]
    assert len(scales) == 6 and all(p.grad is None for p in scales)
    assert converted[0].weight.grad is not None


def _scale_and_weight_grads(model: nn.Module, batches: list[torch.Tensor]) -> dict:
    """Every parameter's gradient of the per-batch mean loss, averaged over the batches (what
    DistributedDataParallel gives when each batch is one process's share)."""
    model.zero_grad()
    for x in batches:
        (model(x).square().mean() / len(batches)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("processes", [2, 4])
def test_data_parallel_size_makes_sharded_gradients_equal_the_whole_batch(processes):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))  # fmt: skip
    model = quantize_model(net, 3, 3)
    x = torch.randn(8, 3, 6, 6)
    model(x)  # calibration
    whole = _scale_and_weight_grads(model, [x])
    shards = list(x.chunk(processes))
    naive = _scale_and_weight_grads(model, shards)
    set_data_parallel_size(model, processes)
    sharded = _scale_and_weight_grads(model, shards)
    for name, grad in whole.items():
        torch.testing.assert_close(sharded[name], grad, msg=name)
    # Without it an activation step size gets sqrt(P) times its one-process gradient.
    name = "2.input_quantizer.scale"
    torch.testing.assert_close(naive[name], whole[name] * processes**0.5)
    torch.testing.assert_close(naive["2.weight_quantizer.scale"], whole["2.weight_quantizer.scale"])
    with pytest.raises(ValueError, match="size must be an int >= 1, got 0"):
        set_data_parallel_size(model, 0)


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) after one eager warm-up forward, forward and backward."""
    torch.manual_seed(0)
    # LSQ's init: the mse and absmax inits choose steps c * max|v| / qmax that put the largest
    # |v| of a channel exactly on the clip boundary, where a one-ulp difference in inductor's
    # arithmetic flips that element's gradient; the comparison is about the graph, not the init.
    eager = quantize_model(_tiny_cnn(), 4, 4, config=QuantConfig(init="lsq"))
    x = torch.randn(4, 3, 16, 16)
    eager(x)  # lazy init of the activation step sizes, outside the compiled graph
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    y_compiled = compiled(x)
    y_compiled.square().sum().backward()
    y = eager(x)
    y.square().sum().backward()
    torch.testing.assert_close(y_compiled, y, rtol=1e-5, atol=1e-6)
    for (name, p), p_compiled in zip(
        eager.named_parameters(), compiled_model.parameters(), strict=True
    ):
        torch.testing.assert_close(p_compiled.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_fullgraph_captures_converted_resnet20():
    """The whole converted ResNet-20 is one graph (dynamo + AOT autograd, no codegen)."""
    torch.manual_seed(0)
    model = quantize_model(resnet20(), 4, 4, config=QuantConfig(clip_test="before_round"))
    x = torch.randn(2, 3, 32, 32)
    model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y_compiled = compiled(x)
    y_compiled.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y = model(x)
    y.sum().backward()
    torch.testing.assert_close(y_compiled, y)
    for g_compiled, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g_compiled, p.grad)
