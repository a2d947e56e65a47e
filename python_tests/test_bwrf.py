"""Tests of BWRF: loss and gradients against plain autograd, batched vs naive, frozen partner."""

from __future__ import annotations

import copy
import inspect
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext import BWRF, BWRFConfig, LSQQuantizer, kd_loss, quantize_model
from bwrf_ext.models import resnet20

SHAPE = (8, 3, 16, 16)


def _fp_model(seed: int = 0) -> nn.Module:
    """A ResNet-20 with non-trivial BatchNorm running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = resnet20()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(SHAPE) * 2 + 0.5)
    return model.eval()


def _lp_model(fp: nn.Module) -> nn.Module:
    """quantize_model(fp) at W2A2, step sizes initialised by one forward (before any deepcopy)."""
    lp = quantize_model(fp, w_bits=2, a_bits=2).train()
    with torch.no_grad():
        lp(torch.randn(SHAPE))
    return lp


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=gen), torch.randint(0, 10, (SHAPE[0],), generator=gen)


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


def _explicit_kd(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    p = torch.softmax(teacher.double() / t, 1)
    log_q = torch.log_softmax(student.double() / t, 1)
    return t * t * (p * (p.log() - log_q)).sum(1).mean()


def test_kd_loss_is_the_temperature_scaled_kl():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen) * 3
    for temperature in (1.0, 2.0, 4.0):
        torch.testing.assert_close(
            kd_loss(s, t, temperature).double(), _explicit_kd(s, t, temperature)
        )
    assert kd_loss(t, t, 2.0).abs() < 1e-6


def test_loss_and_gradients_match_plain_autograd():
    """The wrapper against the loss written out with the models' own modules."""
    fp = _fp_model()
    lp = _lp_model(fp)
    oracle_lp = copy.deepcopy(lp)
    x, y = _batch()
    config = BWRFConfig(alpha=0.7, temperature=3.0, branch_weights="geometric")
    out = BWRF(lp, fp, config).train()(x, y)
    out.loss.backward()

    def stem_block1(m, v):
        return m.layer1(F.relu(m.bn1(m.conv1(v))))

    def head(m, v):
        return m.linear(v.mean((2, 3)))

    with torch.no_grad():
        z_f = fp(x)
    h1 = stem_block1(oracle_lp, x)
    h2 = oracle_lp.layer2(h1)
    z_q = head(oracle_lp, oracle_lp.layer3(h2))
    z_m1 = head(fp, fp.layer3(fp.layer2(h1)))
    z_m2 = head(fp, fp.layer3(h2))

    def term(z):
        return F.cross_entropy(z.double(), y) + 0.7 * _explicit_kd(z, z_f, 3.0)

    expected = term(z_q) + 0.25 * term(z_m1) + 0.5 * term(z_m2)  # w_i = 2^-(3-i)
    expected.backward()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    for name, z in (("lp", z_q), ("mp1", z_m1), ("mp2", z_m2)):
        logits = out.lp_logits if name == "lp" else out.mp_logits[int(name[2])]
        torch.testing.assert_close(logits, z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.losses[f"{name}_ce"].double(),
                                   F.cross_entropy(z.double(), y), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.fp_logits, z_f)
    assert out.loss_weights == {"lp_ce": 1.0, "lp_kd": 0.7, "mp1_ce": 0.25, "mp1_kd": 0.25 * 0.7,
                                "mp2_ce": 0.5, "mp2_kd": 0.5 * 0.7}
    recombined = sum(out.loss_weights[k] * v for k, v in out.losses.items())
    torch.testing.assert_close(recombined, out.loss)
    for (name, got), want in zip(_grads(lp).items(), _grads(oracle_lp).values(), strict=True):
        assert got is not None and want is not None, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def _run(lp: nn.Module, fp: nn.Module, config: BWRFConfig, x, y):
    out = BWRF(lp, fp, config).train()(x, y)
    out.loss.backward()
    return out, _grads(lp)


@pytest.mark.parametrize("branches", [None, (1,), (2,)])
def test_batched_equals_naive_loop(branches):
    fp = _fp_model()
    lp_batched = _lp_model(fp)
    lp_naive = copy.deepcopy(lp_batched)  # after the warm-up: same step sizes, same BN state
    x, y = _batch()
    out_b, grads_b = _run(lp_batched, fp, BWRFConfig(branches=branches, batched=True), x, y)
    out_n, grads_n = _run(lp_naive, fp, BWRFConfig(branches=branches, batched=False), x, y)
    assert out_b.losses.keys() == out_n.losses.keys()
    for key, value in out_b.losses.items():
        torch.testing.assert_close(value, out_n.losses[key], rtol=1e-5, atol=1e-6, msg=key)
    for name, grad in grads_b.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, grads_n[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in fp.parameters())


def test_mp_gradient_reaches_block1_through_the_frozen_partner():
    """LP terms off, branch M^1 only: LP block 1 (with the stem) learns, nothing else does."""
    fp = _fp_model()
    lp = _lp_model(fp)
    _, grads = _run(lp, fp, BWRFConfig(lp_loss=False, branches=(1,)), *_batch())
    block1 = [n for n in grads if n.startswith(("conv1.", "bn1.", "layer1."))]
    rest = [n for n in grads if n not in block1]
    assert len(block1) > 10 and rest
    for name in block1:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    for name in rest:  # layer2, layer3, linear only produced the (detached) LP logits
        assert grads[name] is None, name
    assert all(p.grad is None for p in fp.parameters())


def test_detached_branch_inputs_give_lp_no_mp_gradient():
    fp = _fp_model()
    lp = _lp_model(fp)
    lp_without = copy.deepcopy(lp)
    x, y = _batch()
    out, grads = _run(lp, fp, BWRFConfig(detach_branch_inputs=True), x, y)
    _, grads_without = _run(lp_without, fp, BWRFConfig(branches=()), x, y)
    assert out.losses["mp1_ce"] > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_without[name], msg=name)


def test_partner_bitwise_unchanged_after_training_steps():
    fp = _fp_model()
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    lp = _lp_model(fp)
    lp_before = copy.deepcopy(lp.state_dict())
    bwrf = BWRF(lp, fp)
    optimizer = torch.optim.SGD(bwrf.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(3):
        bwrf.train()
        bwrf.fp_model.train()  # an outside .train() must not reach the partner's BatchNorm
        out = bwrf(*_batch(seed=step))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    for model in (fp, bwrf.fp_model):  # the caller's model and the partner's frozen copy
        after = model.state_dict()
        assert before.keys() == after.keys()
        for key, value in before.items():  # weights and BN running statistics alike
            assert torch.equal(value, after[key]), key
        assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in bwrf.fp_model.parameters())
    assert not any(m.training for m in bwrf.fp_model.modules())
    assert all(p.requires_grad for p in fp.parameters())  # the caller's: left as it was
    assert not torch.equal(lp.state_dict()["layer1.0.conv1.weight"],
                           lp_before["layer1.0.conv1.weight"])


def test_wrapper_hands_only_lp_parameters_and_state():
    fp = _fp_model()
    lp = _lp_model(fp)
    bwrf = BWRF(lp, fp)
    assert [id(p) for p in bwrf.parameters()] == [id(p) for p in lp.parameters()]
    assert [id(p) for p in bwrf.lp_parameters()] == [id(p) for p in lp.parameters()]
    assert list(bwrf.state_dict()) == [f"lp_model.{k}" for k in lp.state_dict()]
    assert bwrf.fp_model is not fp  # a frozen copy
    bwrf.train()
    assert lp.training and not bwrf.fp_model.training


def test_quantizing_after_wrapping_still_trains_every_weight():
    """The issue-18 trap: BWRF(.., fp) once froze fp in place, so quantize_model(fp) afterwards
    gave a model with only its step sizes trainable."""
    fp = _fp_model()
    BWRF(_lp_model(fp), fp)  # e.g. an LSQ+KD baseline built first from the same fp
    lp = _lp_model(fp)
    bwrf = BWRF(lp, fp)
    assert all(p.requires_grad for p in lp.parameters())
    assert sum(p.numel() for p in bwrf.parameters() if p.requires_grad) == sum(
        p.numel() for p in lp.parameters()
    )


def test_eval_runs_only_the_lp_model():
    fp = _fp_model()
    lp = _lp_model(fp)
    bwrf = BWRF(lp, fp).eval()
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in fp.modules()]
    x, y = _batch()
    out = bwrf(x, y)
    for handle in handles:
        handle.remove()
    assert not calls
    assert not lp.training
    with torch.no_grad():
        torch.testing.assert_close(out.lp_logits, lp(x), rtol=0, atol=0)
    assert out.fp_logits is None and out.mp_logits == {}
    torch.testing.assert_close(out.loss, F.cross_entropy(out.lp_logits, y))
    assert bwrf(x).loss is None


class _SignSTEConv2d(nn.Conv2d):
    """Someone else's fake quantizer: 1-bit sign weights (scaled by mean |w|), straight-through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        q = torch.sign(w) * w.abs().mean()
        return self._conv_forward(x, w + (q - w).detach(), self.bias)


def _with_sign_convs(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Conv2d:
            new = _SignSTEConv2d(module.in_channels, module.out_channels, module.kernel_size,
                                 module.stride, module.padding, bias=module.bias is not None)
            new.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model


def test_works_with_a_foreign_quantizer():
    fp = _fp_model()
    lp = _with_sign_convs(fp).train()
    assert not any(isinstance(m, LSQQuantizer) for m in lp.modules())
    assert sum(isinstance(m, _SignSTEConv2d) for m in lp.modules()) == 19
    lp_naive = copy.deepcopy(lp)
    x, y = _batch()
    out_b, grads_b = _run(lp, fp, BWRFConfig(), x, y)
    out_n, grads_n = _run(lp_naive, fp, BWRFConfig(batched=False), x, y)
    torch.testing.assert_close(out_b.loss, out_n.loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads_b.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, grads_n[name], rtol=1e-4, atol=1e-6, msg=name)
    assert lp.conv1.weight.grad.abs().sum() > 0


def test_config_and_input_errors():
    fp = _fp_model()
    lp = _lp_model(fp)
    with pytest.raises(ValueError, match=r"branch 3 does not exist; with 3 blocks the branches"):
        BWRF(lp, fp, BWRFConfig(branches=(3,)))
    with pytest.raises(ValueError, match="2 branch_weights for 1 branches"):
        BWRF(lp, fp, BWRFConfig(branches=(1,), branch_weights=(1.0, 2.0)))
    with pytest.raises(ValueError, match="branch_weights must be"):
        BWRFConfig(branch_weights="linear")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        BWRFConfig(temperature=0.0)
    with pytest.raises(ValueError, match="must be two models"):
        BWRF(fp, fp)
    with pytest.raises(ValueError, match="shares parameters"):
        BWRF(copy.copy(fp), fp)  # a shallow copy shares the parameters
    bwrf = BWRF(_lp_model(_fp_model()), _fp_model(), BWRFConfig(lp_loss=False, branches=()))
    with pytest.raises(ValueError, match="labels y are required"):
        bwrf.train()(torch.randn(SHAPE))
    with pytest.raises(ValueError, match="every loss term has weight 0"):
        bwrf(*_batch())


def test_different_class_counts_are_refused_at_construction():
    """Checked when the wrapper is built, not at the first forward's KD."""
    fp = resnet20(num_classes=10)
    lp = quantize_model(resnet20(num_classes=100), w_bits=2, a_bits=2)
    with pytest.raises(ValueError, match="BWRF: the LP model outputs 100 classes, the FP "
                                         "partner 10"):  # fmt: skip
        BWRF(lp, fp)


def test_docstring_example_runs():
    """The Example block of BWRF's docstring, as pasted."""
    doc = inspect.getdoc(BWRF)
    block = doc.split("Example::\n", 1)[1].split("\nArgs:", 1)[0]
    namespace: dict = {}
    exec(textwrap.dedent(block), namespace)  # noqa: S102 - our own docstring
    lp = namespace["lp"]
    assert any(p.grad is not None for p in lp.parameters())
    assert torch.isfinite(namespace["out"].loss)


def test_torchvision_resnet18_has_three_branches():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    fp = torchvision.models.resnet18(num_classes=10).eval()
    lp = quantize_model(fp, w_bits=4, a_bits=4).train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    out = BWRF(lp, fp, BWRFConfig(branch_weights="geometric"))(x, y)
    assert sorted(out.mp_logits) == [1, 2, 3]
    assert out.loss_weights["mp1_ce"] == 0.125 and out.loss_weights["mp3_ce"] == 0.5
    out.loss.backward()
    assert lp.layer1[0].conv1.weight.grad.abs().sum() > 0
