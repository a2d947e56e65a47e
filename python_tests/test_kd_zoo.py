"""Tests of the KD zoo models: sizes from their definitions, splits, quantized and lean copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bwrf_ext import FrozenPartner, quantize_model
from bwrf_ext.models import kd_zoo


def _resnet_parameters(depth: int, widths: tuple[int, ...], classes: int) -> int:
    """Parameter count of CRD's ResNet, summed layer by layer from its definition."""
    n = (depth - 2) // 6
    total = 27 * widths[0] + 2 * widths[0]  # conv3x3 stem + BN
    c_in = widths[0]
    for stage, c in enumerate(widths[1:]):
        for k in range(n):
            total += 9 * c_in * c + 9 * c * c + 4 * c  # two conv3x3, two BN
            if k == 0 and (stage > 0 or c_in != c):
                total += c_in * c + 2 * c  # 1x1 downsample conv + BN
            c_in = c
    return total + widths[-1] * classes + classes


def _wrn_parameters(depth: int, k: int, classes: int) -> int:
    """Parameter count of WRN-depth-k, summed layer by layer from its definition."""
    n = (depth - 4) // 6
    total = 27 * 16
    c_in = 16
    for c in (16 * k, 32 * k, 64 * k):
        for b in range(n):
            total += 2 * c_in + 9 * c_in * c + 2 * c + 9 * c * c  # BN, conv, BN, conv
            if b == 0 and c_in != c:
                total += c_in * c  # 1x1 shortcut conv
            c_in = c
    return total + 2 * c_in + c_in * classes + classes  # final BN + fc


ZOO = {
    # name: (constructor, parameters by the definition, millions as published (CRD, DKD tables))
    "resnet8x4": (kd_zoo.resnet8x4, _resnet_parameters(8, (32, 64, 128, 256), 100), 1.23),
    "resnet32x4": (kd_zoo.resnet32x4, _resnet_parameters(32, (32, 64, 128, 256), 100), 7.43),
    "wrn_16_2": (kd_zoo.wrn_16_2, _wrn_parameters(16, 2, 100), 0.70),
    "wrn_40_2": (kd_zoo.wrn_40_2, _wrn_parameters(40, 2, 100), 2.26),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_parameter_counts(name):
    build, by_definition, published = ZOO[name]
    count = sum(p.numel() for p in build().parameters())
    assert count == by_definition
    assert round(count / 1e6, 2) == published


def _warm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, then eval mode."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", list(ZOO))
def test_split_is_the_model_and_the_blocks_have_the_zoo_shapes(name):
    model = _warm(ZOO[name][0](num_classes=10))
    split = kd_zoo.kd_zoo_split(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = split.block_outputs(x)
        assert torch.equal(split.head(outputs[-1]), model(x))
    wide = (32, 64, 128) if name.startswith("wrn") else (64, 128, 256)
    assert [tuple(h.shape) for h in outputs] == [
        (2, wide[0], 32, 32), (2, wide[1], 16, 16), (2, wide[2], 8, 8)
    ]
    assert {p for p in split.parameters()} == set(model.parameters())


def test_state_dict_keys_are_repdistillers():
    """Checkpoints of the CRD/DKD repositories load: their module names and shapes."""
    resnet = kd_zoo.resnet8x4().state_dict()
    assert resnet["layer1.0.downsample.0.weight"].shape == (64, 32, 1, 1)
    assert resnet["layer3.0.downsample.1.running_var"].shape == (256,)
    assert resnet["fc.weight"].shape == (100, 256)
    wrn = kd_zoo.wrn_40_2().state_dict()
    assert wrn["block1.layer.0.convShortcut.weight"].shape == (32, 16, 1, 1)
    assert "block1.layer.1.convShortcut.weight" not in wrn
    assert wrn["block3.layer.5.conv2.weight"].shape == (128, 128, 3, 3)
    assert wrn["bn1.weight"].shape == (128,) and wrn["fc.weight"].shape == (100, 128)


def test_wrn_shortcut_reads_the_preactivated_input_when_the_shape_changes():
    """WRN's transition block: shortcut = conv1x1(ReLU(BN(x))); equal shapes: shortcut = x."""
    model = _warm(kd_zoo.wrn_16_2(num_classes=10))
    x = torch.randn(2, 32, 16, 16)
    block = model.block2.layer[0]  # 32 -> 64 channels, stride 2
    with torch.no_grad():
        residual = block(x) - block.conv2(block.relu2(block.bn2(block.conv1(
            torch.relu(block.bn1(x))))))
        torch.testing.assert_close(residual, block.convShortcut(torch.relu(block.bn1(x))))
        plain = model.block2.layer[1]
        y = torch.randn(2, 64, 8, 8)
        inner = plain.conv2(plain.relu2(plain.bn2(plain.conv1(torch.relu(plain.bn1(y))))))
        torch.testing.assert_close(plain(y) - inner, y)


def test_other_resolutions_pool_globally():
    model = kd_zoo.resnet8x4(num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 40)).shape == (1, 10)


def test_quantized_copy_splits_the_same_way():
    model = _warm(kd_zoo.wrn_16_2(num_classes=10))
    q = quantize_model(model, w_bits=4, a_bits=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(kd_zoo.kd_zoo_split(q)(x), expected)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2"])
def test_lean_teacher_is_fully_lean_with_the_plain_input_gradient(name):
    model = _warm(ZOO[name][0](num_classes=10))
    partner = FrozenPartner(model, kd_zoo.kd_zoo_split(model), lean=True)
    assert partner.lean_report() == []
    h = torch.randn(2, model.fc.in_features // 2, 16, 16, requires_grad=True)  # block 2 out
    lean = partner.branches({2: h})[2]
    (lean_grad,) = torch.autograd.grad(lean.square().sum(), h)
    plain = partner.split.head(partner.split.blocks[2](h))
    (plain_grad,) = torch.autograd.grad(plain.square().sum(), h)
    torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean_grad, plain_grad, rtol=1e-4, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="depth must be 6n\\+2 with n >= 1, got 10"):
        kd_zoo.KDResNet(10, (16, 16, 32, 64))
    with pytest.raises(ValueError, match="depth must be 6n\\+4 with n >= 1, got 12"):
        kd_zoo.WideResNet(12)
    with pytest.raises(TypeError, match="expected a KDResNet or WideResNet, got Linear"):
        kd_zoo.kd_zoo_split(nn.Linear(2, 2))
