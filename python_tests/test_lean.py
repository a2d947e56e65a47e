"""The lean frozen partner (bwrf_ext.lean) against plain autograd: outputs, input grads, memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext.engine import FrozenPartner, split_model
from bwrf_ext.lean import lean_report, make_lean
from bwrf_ext.memory import saved_activation_bytes
from bwrf_ext.models import resnet20

torchvision = pytest.importorskip("torchvision")


def _with_bn_statistics(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Gives BatchNorm non-trivial running statistics and affine parameters, then eval."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(shape) * 2 + 0.5)
    return model.eval().requires_grad_(False)


MODELS = {
    # name: (factory, input shape)
    "resnet20": (resnet20, (4, 3, 16, 16)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 64, 64)),
}


def saved_bytes(fn) -> tuple[object, int]:
    """Runs fn() and returns (its result, bytes of the unique non-parameter storages autograd
    saved for backward)."""
    with saved_activation_bytes() as saved:
        result = fn()
    return result, saved.total


def _branch_inputs(partner: FrozenPartner, x: torch.Tensor) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        h = partner.split.block_outputs(x)
    return {k: h[k - 1].clone().requires_grad_() for k in range(1, partner.split.num_blocks)}


@pytest.mark.parametrize("name", list(MODELS))
def test_lean_branches_give_plain_gradients_with_far_less_saved(name: str):
    factory, shape = MODELS[name]
    model = _with_bn_statistics(factory(), shape)
    split = split_model(model)
    plain = FrozenPartner(model, split, lean=False)
    lean = FrozenPartner(model, split, lean=True)
    assert lean.lean_report() == []
    x = torch.randn(shape)
    results = {}
    for label, partner in (("plain", plain), ("lean", lean)):
        entries = _branch_inputs(partner, x)
        out, nbytes = saved_bytes(lambda p=partner, e=entries: p.branches(e))
        # A loss whose gradient is not uniform, so masks and pooling are exercised.
        loss = sum((o * torch.linspace(-1, 2, o.shape[-1])).square().sum() for o in out.values())
        loss.backward()
        results[label] = (out, {k: v.grad for k, v in entries.items()}, nbytes)
    (out_p, grad_p, bytes_p), (out_l, grad_l, bytes_l) = results["plain"], results["lean"]
    for k in out_p:
        torch.testing.assert_close(out_l[k], out_p[k], rtol=1e-5, atol=1e-5)
        scale = grad_p[k].abs().max()
        torch.testing.assert_close(grad_l[k], grad_p[k], rtol=1e-4, atol=1e-5 * scale)
    assert bytes_p >= 10 * bytes_l, (bytes_p, bytes_l)
    assert all(p.grad is None for p in model.parameters())


def test_lean_forward_equals_plain_forward_bitwise_for_resnet20():
    model = _with_bn_statistics(resnet20(), (4, 3, 16, 16))
    lean = make_lean(model)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(lean(x.requires_grad_()), expected)


def test_lean_copy_shares_weights_and_leaves_the_original_alone():
    model = _with_bn_statistics(resnet20(), (4, 3, 16, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    lean = make_lean(model)
    assert [type(m) for m in model.modules()] == types
    lean_ptrs = {p.data_ptr() for p in lean.parameters()}
    assert lean_ptrs == {p.data_ptr() for p in model.parameters()}
    lean(torch.randn(2, 3, 16, 16, requires_grad=True)).sum().backward()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class _Gelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


def test_unknown_layers_fall_back_and_are_reported():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), _Gelu(), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.MaxPool2d(3, 2, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 4),
    )
    model = _with_bn_statistics(model, (4, 3, 12, 12))
    lean = make_lean(model)
    assert lean_report(lean) == ["module.2", "module.4"]
    assert lean_report(model) == ["2", "4"]
    x = torch.randn(4, 3, 12, 12)
    x_plain, x_lean = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = torch.randn(4, 4)
    (model(x_plain) * weight).sum().backward()
    (lean(x_lean) * weight).sum().backward()
    torch.testing.assert_close(x_lean.grad, x_plain.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_relu_and_pooling_are_lean(dtype):
    """A block calling F.relu / F.adaptive_avg_pool2d in its forward saves only masks."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.adaptive_avg_pool2d(F.relu(self.conv(x) + x), 2).relu()

    block = Block().to(dtype).eval().requires_grad_(False)
    lean = make_lean(block)
    x = torch.randn(2, 4, 8, 8, dtype=dtype)
    grads = []
    for module in (block, lean):
        xi = x.clone().requires_grad_()
        out, nbytes = saved_bytes(lambda m=module, t=xi: m(t))
        (out * torch.arange(out.numel(), dtype=dtype).reshape(out.shape)).sum().backward()
        grads.append((xi.grad, nbytes))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    assert grads[1][1] <= (x.numel() + 7) // 8 + 2 * 4 * 4  # two masks
    assert grads[0][1] >= 2 * x.numel() * x.element_size()


def test_partner_conversion_reaches_the_lean_copy():
    """FrozenPartner._apply (BWRF's .to()/.double()) converts the lean copy's shared weights and
    its own references to the BatchNorm statistics."""
    model = _with_bn_statistics(resnet20(), (4, 3, 16, 16))
    partner = FrozenPartner(model, split_model(model))
    partner._apply(lambda t: t.double())
    assert all(t.dtype == torch.float64 for t in partner.lean_split.state_dict().values())
    h = torch.randn(2, 32, 8, 8, dtype=torch.float64, requires_grad=True)
    out = partner.branches({2: h})[2]
    out.sum().backward()
    assert out.dtype == torch.float64 and h.grad is not None


def test_bwrf_config_switch():
    from bwrf_ext import BWRF, BWRFConfig, quantize_model

    fp = _with_bn_statistics(resnet20(), (4, 3, 16, 16))
    lp = quantize_model(fp, w_bits=2, a_bits=2)
    assert BWRF(lp, fp).partner.lean_split is not None
    assert BWRF(lp, fp, BWRFConfig(lean_partner=False)).partner.lean_split is None
