"""Tests of Block-KD: loss and gradients against plain autograd, stones, frozen teacher, errors."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext import LSQQuantizer, kd_loss, quantize_model, split_model
from bwrf_ext.losses import dkd_loss
from bwrf_ext.methods.blockkd import BlockKD, BlockKDConfig, ConvBNConnector
from bwrf_ext.models import resnet20, resnet56
from bwrf_ext.models.kd_zoo import resnet8x4, resnet32x4, wrn_16_2, wrn_40_2

SHAPE = (4, 3, 16, 16)


def _warm(model: nn.Module, seed: int = 0) -> nn.Module:
    """The model with non-trivial BatchNorm running statistics, in eval mode."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(SHAPE) * 2 + 0.5)
    return model.eval()


@functools.cache
def _cached_teacher() -> nn.Module:
    teacher = _warm(resnet56())
    with torch.no_grad():
        # Random residual stacks reach logits ~1e3, where fp32 log-softmax keeps ~5 digits:
        # scaled to ~10, like a trained net's, the fp32-vs-fp64 comparisons are well posed.
        teacher.linear.weight.mul_(0.01)
    return teacher


def _teacher() -> nn.Module:
    """A ResNet-56 (random weights, warm BatchNorm statistics), a fresh copy per test."""
    return copy.deepcopy(_cached_teacher())


def _student(seed: int = 1) -> nn.Module:
    return _warm(resnet20(), seed).train()


def _batch(seed: int = 2, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randint(0, 10, (shape[0],), generator=gen)


def _explicit_kd(student: torch.Tensor, target: torch.Tensor, t: float) -> torch.Tensor:
    p = torch.softmax(target.double() / t, 1)
    log_q = torch.log_softmax(student.double() / t, 1)
    return t * t * (p * (p.log() - log_q)).sum(1).mean()


def _named_grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in module.named_parameters()}


def _assert_grad_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """fp32 gradients through 27 teacher blocks, two summation orders: error scales with |g|."""
    atol = 1e-6 + 1e-5 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=name)


def test_loss_and_gradients_match_plain_autograd():
    """The wrapper against the documented loss written out with the models' own modules."""
    teacher, student = _teacher(), _student()
    x, y = _batch()
    alpha, beta, gamma, t = 0.7, 0.6, 0.3, 3.0
    config = BlockKDConfig(alpha=alpha, beta=beta, gamma=gamma, temperature=t, stones=(1, 2),
                           ensemble_gate="always")  # fmt: skip
    blockkd = BlockKD(student, teacher, config).train()
    oracle_student = copy.deepcopy(student)
    c1, c2 = copy.deepcopy(blockkd.connector(1)), copy.deepcopy(blockkd.connector(2))
    out = blockkd(x, y)
    out.loss.backward()

    def head(m, v):
        return m.linear(v.mean((2, 3)))

    s = oracle_student
    with torch.no_grad():
        z_t = teacher(x)
    h1 = s.layer1(F.relu(s.bn1(s.conv1(x))))
    h2 = s.layer2(h1)
    z_s = head(s, s.layer3(h2))
    z_1 = head(teacher, teacher.layer3(teacher.layer2(c1(h1))))
    z_2 = head(teacher, teacher.layer3(c2(h2)))
    z_e = ((z_1 + z_2) / 2).detach()

    def per_model(z):
        return (F.cross_entropy(z.double(), y) + alpha * _explicit_kd(z, z_t, t)
                + gamma * _explicit_kd(z, z_e, t))

    expected = per_model(z_s) + beta * (per_model(z_1) / 4 + per_model(z_2) / 2)  # 1/2^(n-i)
    expected.backward()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in ((out.student_logits, z_s), (out.stone_logits[1], z_1),
                      (out.stone_logits[2], z_2), (out.ensemble_logits, z_e),
                      (out.teacher_logits, z_t)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not out.ensemble_logits.requires_grad
    for module, oracle in ((student, s), (blockkd.connector(1), c1), (blockkd.connector(2), c2)):
        for (name, got), want in zip(_named_grads(module).items(),
                                     _named_grads(oracle).values(), strict=True):
            assert got is not None and want is not None, name
            _assert_grad_close(got, want, name)


def test_float64_models_keep_float64_losses():
    """Every term of a float64 student and teacher is computed in float64 (no cast down to
    float32): the default loss (CE + KD of the student and each stone) equals its float64
    definition to 1e-10."""
    teacher, student = _teacher().double(), _student().double()
    x, y = _batch()
    blockkd = BlockKD(student, teacher, BlockKDConfig(stones=(3,))).train()
    out = blockkd(x.double(), y)
    assert all(v.dtype == torch.float64 for v in out.losses.values())
    expected = sum(
        F.cross_entropy(z, y) + _explicit_kd(z, out.teacher_logits, 4.0)
        for z in (out.student_logits, out.stone_logits[3])
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-10)


def test_total_is_the_documented_combination_of_the_reported_terms():
    """Recomputes the total from ``losses`` with the documented weights, not loss_weights."""
    teacher, student = _teacher(), _student()
    alpha, beta, gamma = 0.5, 2.0, 0.25
    config = BlockKDConfig(alpha=alpha, beta=beta, gamma=gamma, ensemble_gate="always")
    out = BlockKD(student, teacher, config).train()(*_batch())  # stones 1..n by default
    terms = out.losses
    n = 3

    def model_loss(name):
        return terms[f"{name}_ce"] + alpha * terms[f"{name}_kd"] + gamma * terms[f"{name}_ens"]

    expected = model_loss("student") + beta * sum(
        model_loss(f"stone{i}") / 2 ** (n - i) for i in (1, 2, 3)
    )
    torch.testing.assert_close(out.loss, expected)
    assert out.loss_weights["stone1_ce"] == beta / 4
    assert out.loss_weights["stone3_kd"] == beta * alpha
    assert out.loss_weights["student_ens"] == gamma
    recombined = sum(out.loss_weights[k] * v for k, v in terms.items())
    torch.testing.assert_close(recombined, out.loss)
    ensemble = (out.stone_logits[1] + out.stone_logits[2] + out.stone_logits[3]) / 3
    torch.testing.assert_close(out.ensemble_logits, ensemble.detach())
    torch.testing.assert_close(terms["student_kd"], kd_loss(out.student_logits,
                                                            out.teacher_logits, 4.0))


def test_stone_gradients_reach_the_student_prefix_and_its_connector():
    teacher, student = _teacher(), _student()
    blockkd = BlockKD(student, teacher).train()
    for i, prefix in ((1, ("conv1.", "bn1.", "layer1.")), (2, ("conv1.", "bn1.", "layer1.",
                                                               "layer2."))):
        blockkd.zero_grad(set_to_none=True)
        out = blockkd(*_batch())
        out.losses[f"stone{i}_ce"].backward()
        grads = _named_grads(student)
        reached = [n for n in grads if n.startswith(prefix)]
        assert len(reached) > 10
        for name, grad in grads.items():
            if name in reached:
                assert grad is not None and grad.abs().sum() > 0, (i, name)
            else:  # None, or zeros: the batched teacher suffixes share a cat with stone 2
                assert grad is None or not grad.any(), (i, name)
        for j in (1, 2):
            conv = blockkd.connector(j).conv.weight.grad
            if j == i:
                assert conv is not None and conv.abs().sum() > 0
            else:
                assert conv is None or not conv.any()
        assert all(p.grad is None for p in teacher.parameters())


def test_ensemble_target_is_detached_by_default():
    """student_ens moves the connectors only when the ensemble target is not detached."""
    for detach in (True, False):
        teacher, student = _teacher(), _student()
        config = BlockKDConfig(detach_ensemble=detach, gamma=1.0, ensemble_gate="always")
        blockkd = BlockKD(student, teacher, config).train()
        out = blockkd(*_batch())
        out.losses["student_ens"].backward()
        grad = blockkd.connector(1).conv.weight.grad
        if detach:
            assert grad is None
        else:
            assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize(("batched", "lean"), [(False, True), (True, False)])
def test_batched_lean_equals_naive_and_plain(batched, lean):
    teacher = _teacher()
    student = _student()
    reference = BlockKD(copy.deepcopy(student), teacher).train()
    other = BlockKD(student, teacher, BlockKDConfig(batched=batched, lean_teacher=lean)).train()
    other.connectors.load_state_dict(reference.connectors.state_dict())
    x, y = _batch()
    outs = []
    for wrapper in (reference, other):
        out = wrapper(x, y)
        out.loss.backward()
        outs.append(out)
    assert outs[0].losses.keys() == outs[1].losses.keys()
    for key, value in outs[0].losses.items():
        torch.testing.assert_close(value, outs[1].losses[key], rtol=1e-5, atol=1e-5, msg=key)
    for (name, got), want in zip(_named_grads(other).items(),
                                 _named_grads(reference).values(), strict=True):
        assert got is not None, name
        _assert_grad_close(got, want, name)


def test_teacher_bitwise_unchanged_after_training_steps():
    teacher, student = _teacher(), _student()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = copy.deepcopy(student.state_dict())
    blockkd = BlockKD(student, teacher)
    connector_before = blockkd.connector(2).conv.weight.detach().clone()
    optimizer = torch.optim.SGD(blockkd.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(3):
        blockkd.train()
        blockkd.teacher.train()  # an outside .train() must not reach the teacher's BatchNorm
        out = blockkd(*_batch(seed=step))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    for model in (teacher, blockkd.teacher):  # the caller's model and the frozen copy
        after = model.state_dict()
        assert before.keys() == after.keys()
        for key, value in before.items():  # weights and BN running statistics alike
            assert torch.equal(value, after[key]), key
        assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in blockkd.teacher.parameters())
    assert not any(m.training for m in blockkd.teacher.modules())
    assert not torch.equal(student.state_dict()["layer1.0.conv1.weight"],
                           student_before["layer1.0.conv1.weight"])
    assert not torch.equal(blockkd.connector(2).conv.weight, connector_before)


def test_parameters_state_and_eval_mode():
    teacher, student = _teacher(), _student()
    blockkd = BlockKD(student, teacher)
    own = [*student.parameters(), *blockkd.connectors.parameters()]
    assert [id(p) for p in blockkd.parameters()] == [id(p) for p in own]
    assert [id(p) for p in blockkd.student_parameters()] == [id(p) for p in student.parameters()]
    keys = [k for k in blockkd.state_dict() if k != "steps_done"]  # the warm-up's step count
    assert keys[: len(student.state_dict())] == [f"student.{k}" for k in student.state_dict()]
    assert all(k.startswith(("student.", "connectors.")) for k in keys)
    assert blockkd.teacher is not teacher  # a frozen copy
    blockkd.eval()
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in teacher.modules()]
    x, y = _batch()
    out = blockkd(x, y)
    for handle in handles:
        handle.remove()
    assert not calls and not student.training
    with torch.no_grad():
        torch.testing.assert_close(out.student_logits, student(x), rtol=0, atol=0)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.student_logits, y))
    assert out.teacher_logits is None and out.stone_logits == {} and blockkd(x).loss is None


def test_no_stones_is_plain_kd():
    teacher, student = _teacher(), _student()
    x, y = _batch()
    out = BlockKD(student, teacher, BlockKDConfig(stones=(), alpha=0.8, temperature=2.0))(x, y)
    assert set(out.losses) == {"student_ce", "student_kd"} and out.ensemble_logits is None
    with torch.no_grad():
        z_t = teacher(x)
    expected = F.cross_entropy(out.student_logits, y) + 0.8 * _explicit_kd(
        out.student_logits, z_t, 2.0)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_dkd_and_custom_kd_are_pluggable():
    teacher, student = _teacher(), _student()
    x, y = _batch()
    config = BlockKDConfig(kd="dkd", dkd_tckd_weight=2.0, dkd_nckd_weight=3.0, temperature=5.0,
                           stones=(1, 2))  # fmt: skip
    out = BlockKD(student, teacher, config).train()(x, y)
    torch.testing.assert_close(out.losses["stone1_kd"], dkd_loss(
        out.stone_logits[1], out.teacher_logits, y, 5.0, 2.0, 3.0))
    torch.testing.assert_close(out.losses["student_ens"], dkd_loss(
        out.student_logits, out.ensemble_logits, y, 5.0, 2.0, 3.0))
    seen = []

    def mse_kd(student_logits, target_logits, labels, temperature):
        seen.append((labels, temperature))
        return (student_logits - target_logits).square().mean()

    config = BlockKDConfig(kd=mse_kd, temperature=1.5, stones=(1, 2))
    out = BlockKD(_student(), _teacher(), config)(x, y)
    torch.testing.assert_close(
        out.losses["student_kd"], (out.student_logits - out.teacher_logits).square().mean()
    )
    assert len(seen) == 6 and all(labels is y and t == 1.5 for labels, t in seen)


def test_quantized_student_from_a_larger_teacher():
    """A W2A2 student: construction leaves its LSQ quantizers untouched; one step trains it."""
    teacher = _teacher()
    student = quantize_model(_warm(resnet20()), w_bits=2, a_bits=2).train()
    quantizers = [m for m in student.modules() if isinstance(m, LSQQuantizer)]
    lazy = [q for q in quantizers if not q.is_initialized]  # activations; weights init at once
    blockkd = BlockKD(student, teacher)
    assert len(lazy) >= 19 and not any(q.is_initialized for q in lazy)
    x, y = _batch()
    out = blockkd(x, y)  # the first batch initialises the step sizes
    assert all(q.is_initialized for q in quantizers if q.enabled)
    out.loss.backward()
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert blockkd.connector(1).conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


class _Strided(nn.Module):
    """A tiny student whose blocks run at half the teacher's resolution (named split)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(12, 24, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.b3(self.b2(self.b1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _strided_split(model):
    return split_model(model, [["b1"], ["b2"], ["b3"]], stem=["stem"], head=["pool", "fc"],
                       example_input=torch.randn(2, 3, 32, 32))


def test_default_connector_resizes_between_spatial_sizes():
    teacher = _teacher()
    student = _Strided().train()
    blockkd = BlockKD(student, teacher, student_split=_strided_split(student)).train()
    c1 = blockkd.connector(1)
    assert isinstance(c1, ConvBNConnector) and c1.size_ratio == (2.0, 2.0)
    assert (c1.conv.in_channels, c1.conv.out_channels) == (8, 16)
    assert blockkd.connector(2).conv.out_channels == 32
    h = torch.randn(2, 8, 5, 6)
    expected = c1.bn(c1.conv(F.interpolate(h, size=(10, 12), mode="bilinear")))
    torch.testing.assert_close(c1(h), expected)
    shrink = ConvBNConnector(8, 4, (0.5, 0.5)).eval()
    h = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(shrink(h), shrink.bn(shrink.conv(F.avg_pool2d(h, 2))))
    for shape in (SHAPE, (2, 3, 32, 32)):  # the ratio holds at every resolution
        out = blockkd(*_batch(shape=shape))
        out.loss.backward()
        assert sorted(out.stone_logits) == [1, 2, 3]
    assert student.stem.weight.grad.abs().sum() > 0


def test_connector_factory_sees_the_example_shapes():
    calls = []

    def factory(i, student_shape, teacher_shape):
        calls.append((i, tuple(student_shape), tuple(teacher_shape)))
        return nn.Sequential(nn.Upsample(scale_factor=2.0),
                             nn.Conv2d(student_shape[1], teacher_shape[1], 1))

    student = _Strided().train()
    blockkd = BlockKD(student, _teacher(), BlockKDConfig(stones=(2, 3)), connectors=factory,
                      student_split=_strided_split(student),
                      example_input=torch.randn(1, 3, 16, 16))
    assert calls == [(2, (1, 12, 4, 4), (1, 32, 8, 8)), (3, (1, 24, 2, 2), (1, 64, 4, 4))]
    assert sorted(blockkd.connectors) == ["2", "3"]


def test_shape_mismatches_name_the_block_and_the_shapes():
    teacher = _teacher()
    wrong = {1: nn.Conv2d(16, 16, 1), 2: nn.Conv2d(32, 48, 1)}
    with pytest.raises(ValueError, match=(
        r"stone 2: connector C_2 maps student block 2's output \(2, 32, 16, 16\) to "
        r"\(2, 48, 16, 16\), but teacher block 3 takes teacher block 2's output shape "
        r"\(2, 32, 16, 16\)"
    )):
        BlockKD(_student(), teacher, BlockKDConfig(stones=(1, 2)), connectors=wrong)
    # A connector built for one resolution, run at another: caught at the forward.
    fixed = {1: nn.Conv2d(16, 16, 1),
             2: nn.Sequential(nn.Upsample(size=(16, 16)), nn.Conv2d(32, 32, 1))}
    blockkd = BlockKD(_student(), teacher, BlockKDConfig(stones=(1, 2)), connectors=fixed).train()
    with pytest.raises(ValueError, match=(
        r"stone 2: .* student block 2's output \(4, 32, 8, 8\) to \(4, 32, 16, 16\), but "
        r"teacher block 3 takes teacher block 2's output shape \(4, 32, 8, 8\)"
    )):
        blockkd(*_batch())
    with pytest.raises(ValueError, match="the teacher's head takes teacher block 3's output"):
        BlockKD(_student(), teacher, BlockKDConfig(stones=(3,)),
                connectors={3: nn.Conv2d(64, 32, 1)})
    with pytest.raises(ValueError, match=r"the student outputs \(2, 100\), the teacher \(2, 10\)"):
        BlockKD(_warm(resnet8x4()).train(), teacher)


def _four_block_split():
    """A 4-block split of a plain chain (for the block-count error)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1),
                          nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10))
    return model, split_model(model, ["0", "1", "2", "3"], head=["4", "5", "6"],
                              example_input=torch.randn(1, 3, 8, 8))


def test_config_and_input_errors():
    teacher = _teacher()
    with pytest.raises(ValueError, match=r"stone 4 does not exist; with 3 blocks the stones"):
        BlockKD(_student(), teacher, BlockKDConfig(stones=(4,)))
    with pytest.raises(ValueError, match="2 stone_weights for 1 stones"):
        BlockKD(_student(), teacher, BlockKDConfig(stones=(1,), stone_weights=(1.0, 2.0)))
    with pytest.raises(ValueError, match="connectors are given for stones \\[1\\], the config"):
        BlockKD(_student(), teacher, connectors={1: nn.Identity()})
    for field, value in (("alpha", -1.0), ("gamma", float("nan")), ("temperature", 0.0)):
        with pytest.raises(ValueError, match=f"{field} must be"):
            BlockKDConfig(**{field: value})
    with pytest.raises(ValueError, match="kd must be 'kl', 'dkd' or a callable"):
        BlockKDConfig(kd="mse")
    with pytest.raises(ValueError, match="stones has duplicates"):
        BlockKDConfig(stones=(1, 1))
    with pytest.raises(ValueError, match="BlockKDConfig: stone_weights must be 'uniform', 'geo"):
        BlockKDConfig(stone_weights="linear")
    with pytest.raises(ValueError, match="must be two models"):
        BlockKD(teacher, teacher)
    with pytest.raises(ValueError, match="shares parameters"):
        BlockKD(copy.copy(teacher), teacher)
    blockkd = BlockKD(_student(), teacher)
    with pytest.raises(ValueError, match="labels y are required"):
        blockkd.train()(torch.randn(SHAPE))
    model, split = _four_block_split()
    with pytest.raises(ValueError, match="the student splits into 3 blocks, the teacher into 4"):
        BlockKD(_student(), model, teacher_split=split)


ZOO_PAIRS = [(resnet32x4, resnet8x4, 3), (wrn_40_2, wrn_16_2, 3)]


@pytest.mark.parametrize(("make_teacher", "make_student", "stones"), ZOO_PAIRS)
def test_kd_zoo_pairs_train_through_lean_stones(make_teacher, make_student, stones):
    teacher = make_teacher(num_classes=10).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = make_student(num_classes=10).train()
    blockkd = BlockKD(student, teacher)
    assert blockkd.partner.lean_report() == []
    out = blockkd(*_batch(shape=(2, 3, 32, 32)))
    assert sorted(out.stone_logits) == list(range(1, stones + 1))
    out.loss.backward()
    assert all(blockkd.connector(i).conv.weight.grad.abs().sum() > 0 for i in (1, 2))
    assert student.conv1.weight.grad.abs().sum() > 0
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_torchvision_resnet34_to_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    teacher = torchvision.models.resnet34(num_classes=10).eval()
    student = torchvision.models.resnet18(num_classes=10).train()
    blockkd = BlockKD(student, teacher, BlockKDConfig(kd="dkd"))
    out = blockkd(*_batch(shape=(2, 3, 32, 32)))
    assert sorted(out.stone_logits) == [1, 2, 3, 4]
    assert out.loss_weights["stone1_ce"] == 1 / 8 and out.loss_weights["stone4_ce"] == 1
    out.loss.backward()
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert blockkd.connector(3).conv.weight.shape == (256, 256, 1, 1)


def test_default_stones_are_all_blocks_with_the_last_weighing_one():
    blockkd = BlockKD(_student(), _teacher())
    assert blockkd.stone_weights == {1: 0.25, 2: 0.5, 3: 1.0}


def test_ensemble_term_is_reported_but_off_by_default():
    """Default loss: student and stones' CE + KD only (oracle: explicit KD of the reported logits);
    the ensemble terms are reported, detached, with weight 0, and the gate stays shut."""
    teacher, student = _teacher(), _student()
    x, y = _batch()
    out = BlockKD(student, teacher).train()(x, y)
    assert BlockKDConfig().gamma == 0 and not out.ensemble_active
    want = sum(w * (F.cross_entropy(z, y) + _explicit_kd(z, out.teacher_logits, 4.0))
               for w, z in [(1.0, out.student_logits), (0.25, out.stone_logits[1]),
                            (0.5, out.stone_logits[2]), (1.0, out.stone_logits[3])])  # fmt: skip
    torch.testing.assert_close(out.loss, want.to(out.loss.dtype))
    ensemble = torch.stack(list(out.stone_logits.values())).mean(0)
    want_ens = _explicit_kd(out.student_logits, ensemble, 4.0).detach()
    torch.testing.assert_close(out.losses["student_ens"], want_ens.to(out.loss.dtype))
    assert all(out.loss_weights[k] == 0 and not out.losses[k].requires_grad
               for k in out.losses if k.endswith("_ens"))  # fmt: skip


def test_ensemble_gate_counts_the_term_only_while_the_stones_beat_the_student():
    """Oracle: the batch accuracies of the reported logits decide the term's weight."""
    teacher, student = _teacher(), _student()
    x, y = _batch()
    torch.manual_seed(7)  # the connectors' initialisation, the same in every wrapper below
    out = BlockKD(copy.deepcopy(student), teacher, BlockKDConfig(gamma=0.5)).train()(x, y)
    better = (out.ensemble_logits.argmax(1) == y).float().mean() > (
        out.student_logits.argmax(1) == y).float().mean()
    assert out.ensemble_active == bool(better)
    assert out.loss_weights["student_ens"] == (0.5 if better else 0.0)
    # A batch labelled as the ensemble predicts opens the gate; as the student predicts, closes it.
    for labels, active in ((out.ensemble_logits.argmax(1), True),
                           (out.student_logits.argmax(1), False)):
        torch.manual_seed(7)
        blockkd = BlockKD(copy.deepcopy(student), teacher, BlockKDConfig(gamma=0.5)).train()
        gated = blockkd(x, labels)
        agree = bool((gated.ensemble_logits.argmax(1) == gated.student_logits.argmax(1)).all())
        if not agree:
            assert gated.ensemble_active is active
            assert gated.loss_weights["stone1_ens"] == (0.5 / 4 if active else 0.0)
        recombined = sum(gated.loss_weights[k] * v for k, v in gated.losses.items())
        torch.testing.assert_close(recombined, gated.loss)


def test_connector_warmup_trains_only_the_connectors_then_everything():
    teacher, student = _teacher(), _student()
    blockkd = BlockKD(student, teacher, BlockKDConfig(connector_warmup_steps=2)).train()
    for step in range(3):
        blockkd.zero_grad(set_to_none=True)
        out = blockkd(*_batch(seed=step))
        out.loss.backward()
        student_grads = [p.grad for p in student.parameters()]
        if step < 2:
            assert all(g is None or not g.any() for g in student_grads)
            assert out.loss_weights["student_ce"] == 0 and not out.ensemble_active
        else:
            assert student.conv1.weight.grad.abs().sum() > 0
            assert out.loss_weights["student_ce"] == 1
        assert all(blockkd.connector(i).conv.weight.grad.abs().sum() > 0 for i in (1, 2, 3))
    assert int(blockkd.steps_done) == 3  # in the state_dict: a resumed run goes on counting
    with pytest.raises(ValueError, match="connector_warmup_steps must be an int >= 0, got -1"):
        BlockKDConfig(connector_warmup_steps=-1)
    with pytest.raises(ValueError, match="ensemble_gate must be 'accuracy' or 'always'"):
        BlockKDConfig(ensemble_gate="sometimes")
