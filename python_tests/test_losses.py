"""Tests of the loss terms: DKD against its definition, the paper's KD identity and autograd."""

from __future__ import annotations

import pytest
import torch

from bwrf_ext.losses import LossTerms, dkd_loss, kd_loss


def _logits(batch: int = 6, classes: int = 10, seed: int = 0, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * scale
    teacher = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * scale
    targets = torch.randint(0, classes, (batch,), generator=gen)
    return student, teacher, targets


def _dkd_by_definition(s, t, y, temperature, tckd_weight, nckd_weight):
    """DKD written from the paper's definitions with probabilities, in float64, per sample."""
    p_s = torch.softmax(s.double() / temperature, 1)
    p_t = torch.softmax(t.double() / temperature, 1)
    rows = torch.arange(len(y))
    b_s = torch.stack([p_s[rows, y], 1 - p_s[rows, y]], 1)
    b_t = torch.stack([p_t[rows, y], 1 - p_t[rows, y]], 1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1)
    keep = torch.ones_like(p_s, dtype=torch.bool)
    keep[rows, y] = False
    q_s = p_s[keep].view(len(y), -1)
    q_t = p_t[keep].view(len(y), -1)
    q_s, q_t = q_s / q_s.sum(1, keepdim=True), q_t / q_t.sum(1, keepdim=True)
    nckd = (q_t * (q_t.log() - q_s.log())).sum(1)
    return (tckd_weight * tckd + nckd_weight * nckd) * temperature**2


@pytest.mark.parametrize(("temperature", "weights"), [(1.0, (1.0, 8.0)), (4.0, (0.5, 2.0))])
def test_dkd_matches_its_definition(temperature, weights):
    s, t, y = _logits()
    expected = _dkd_by_definition(s, t, y, temperature, *weights)
    got = dkd_loss(s.float(), t.float(), y, temperature, *weights, reduction="none")
    assert got.dtype == torch.float32 and got.shape == (6,)
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(
        dkd_loss(s.float(), t.float(), y, temperature, *weights).double(), expected.mean(),
        rtol=2e-5, atol=1e-6,
    )


def test_kd_decomposes_into_tckd_and_weighted_nckd():
    """Zhao et al. 2022, eq. 4: KD = TCKD + (1 - p_t^teacher) * NCKD, sample by sample."""
    s, t, y = _logits(batch=5, seed=3)
    temperature = 2.0
    tckd = dkd_loss(s, t, y, temperature, 1.0, 0.0, reduction="none")
    nckd = dkd_loss(s, t, y, temperature, 0.0, 1.0, reduction="none")
    p_target = torch.softmax(t / temperature, 1)[torch.arange(5), y]
    for k in range(5):
        kd = kd_loss(s[k : k + 1], t[k : k + 1], temperature)
        assert kd.dtype == torch.float64  # float64 logits keep their precision
        torch.testing.assert_close(tckd[k] + (1 - p_target[k]) * nckd[k], kd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_kd_loss_computes_in_float32_at_least(dtype):
    """Half logits are lifted to float32, float64 ones stay float64; the value is the
    definition T^2 KL(softmax(t/T) || softmax(s/T)) evaluated in float64 on the same logits."""
    s, t, _ = _logits(batch=4, classes=7, seed=2)
    s, t = s.to(dtype), t.to(dtype)
    loss = kd_loss(s, t, 3.0)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    p_t = torch.softmax(t.double() / 3, 1)
    expected = 9 * (p_t * (p_t.log() - torch.log_softmax(s.double() / 3, 1))).sum(1).mean()
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double(), expected, rtol=tolerance, atol=tolerance)


def test_dkd_gradients_match_autograd_of_the_definition():
    s, t, y = _logits(batch=4, classes=5, seed=1)
    s.requires_grad_(True)
    torch.autograd.gradcheck(lambda v: dkd_loss(v, t, y, 3.0, 1.0, 8.0).double(), (s,))
    (grad,) = torch.autograd.grad(dkd_loss(s.float(), t.float(), y, 3.0), s)
    (expected,) = torch.autograd.grad(_dkd_by_definition(s, t, y, 3.0, 1.0, 8.0).mean(), s)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_dkd_is_zero_at_the_teacher_and_finite_for_confident_logits():
    s, t, y = _logits(scale=1.0)
    assert dkd_loss(t, t, y).abs() < 1e-12
    confident = torch.zeros(3, 10)
    confident[torch.arange(3), torch.tensor([0, 4, 9])] = 200.0  # softmax underflows elsewhere
    student = (torch.randn(3, 10) * 50).requires_grad_(True)
    loss = dkd_loss(student, confident, torch.tensor([0, 4, 9]), temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_dkd_errors_name_the_argument():
    s, t, y = _logits()
    with pytest.raises(ValueError, match=r"one shape, got \(6, 10\) and \(6, 9\)"):
        dkd_loss(s, t[:, :9], y)
    with pytest.raises(ValueError, match=r"targets must be \(6,\) class indices, got shape \(5,\)"):
        dkd_loss(s, t, y[:5])
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        dkd_loss(s, t, y, temperature=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        dkd_loss(s[:, :1], t[:, :1], torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none', got 'sum'"):
        dkd_loss(s, t, y, reduction="sum")


@pytest.mark.parametrize("keep_zero_weights", [False, True])
def test_loss_terms_total_and_weight_zero_terms(keep_zero_weights: bool):
    a, b, c = (torch.tensor(v, requires_grad=True) for v in (1.5, -2.0, 4.0))
    terms = LossTerms(keep_zero_weights=keep_zero_weights)
    terms.add("a", a * 2, 0.5)
    terms.add("b", b * 1, 0.0)  # reported only, unless kept
    terms.add("c", c * 3, 2.0)
    assert terms.weights == {"a": 0.5, "b": 0.0, "c": 2.0}
    assert terms.total.item() == 0.5 * 3.0 + 2.0 * 12.0  # exact in binary
    assert terms.values["b"].requires_grad is keep_zero_weights
    terms.total.backward()
    assert a.grad.item() == 1.0 and c.grad.item() == 6.0
    assert (b.grad is not None and b.grad.item() == 0.0) if keep_zero_weights else b.grad is None
    with_only_zero = LossTerms()
    with_only_zero.add("z", a * 1, 0.0)
    assert with_only_zero.total is None and not with_only_zero.values["z"].requires_grad
