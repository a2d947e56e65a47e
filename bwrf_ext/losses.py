"""Loss terms of the block-wise methods: cross-entropy, temperature-scaled KD, DKD and SupCon."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["ce_and_kd", "dkd_loss", "kd_loss", "supervised_contrastive_loss", "upcast"]


def upcast(t: torch.Tensor) -> torch.Tensor:
    """t in float32 at least: fp16/bf16 logits are lifted (their softmax and log-sum-exp would
    overflow), float32 and float64 stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class LossTerms:
    """A step's named loss terms, each with its weight, and their weighted sum.

    What BWRF, Block-KD and ContSup report: ``values[k]`` unweighted, ``weights[k]`` its
    coefficient, ``total == sum(weights[k] * values[k])`` summed in the order added. A term of
    weight 0 is reported only (kept detached, out of the total), unless ``keep_zero_weights``:
    then it stays in the graph with coefficient 0, so the parameters it reaches get a zero
    gradient rather than none (ContSup's modules: weight decay and momentum still act on a
    decoder whose weight the published table sets to 0).

    Args:
        keep_zero_weights: keep weight-0 terms in the total (see above).
    """

    def __init__(self, keep_zero_weights: bool = False) -> None:
        self.keep_zero_weights = keep_zero_weights
        self.values: dict[str, torch.Tensor] = {}
        self.weights: dict[str, float] = {}
        self.total: torch.Tensor | None = None

    def add(self, name: str, value: torch.Tensor, weight: float) -> None:
        """Adds term ``name`` (0-dim) with its weight."""
        counted = bool(weight) or self.keep_zero_weights
        self.values[name] = value if counted else value.detach()
        self.weights[name] = weight
        if counted:
            self.total = weight * value if self.total is None else self.total + weight * value


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Hinton's distillation loss ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.

    The T^2 factor keeps the gradient's scale independent of T. The teacher gets no gradient
    only if it is detached by the caller (it usually comes from a no-grad forward).

    Args:
        student_logits: (B, C) float.
        teacher_logits: (B, C) float.
        temperature: T > 0.

    Returns:
        0-dim tensor: fp32 for fp16/bf16/fp32 logits (lifted, so they do not overflow),
        float64 when either is float64.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_loss: student and teacher logits must have one shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"kd_loss: temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(upcast(student_logits) / temperature, dim=1)
    log_p_teacher = F.log_softmax(upcast(teacher_logits) / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def ce_and_kd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy against the labels, :func:`kd_loss` against the teacher) of one model.

    Args:
        logits: (B, C) float.
        targets: (B,) int64 class indices.
        teacher_logits: (B, C) float.
        temperature: KD temperature T.

    Returns:
        Two 0-dim tensors.
    """
    return F.cross_entropy(upcast(logits), targets), kd_loss(logits, teacher_logits, temperature)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``tckd_weight * TCKD + nckd_weight * NCKD``.

    With p = softmax(z/T) and t the target class, TCKD is ``T^2 * KL(b_teacher || b_student)``
    over the binary distribution ``b = (p_t, 1 - p_t)`` and NCKD is ``T^2 * KL`` over the
    non-target classes, renormalised: ``p_k / (1 - p_t)``, k != t. Classical KD is
    ``TCKD + (1 - p_t^teacher) * NCKD`` per sample; DKD frees the NCKD weight (the paper's
    CIFAR-100 setting: 1 and 8, T = 4, which are the defaults here).

    Computed from log-sum-exps of the logits (no ``log(softmax)`` and no -1000 masking as in the
    reference code), so confident logits neither underflow nor leak mass into the masked class.

    Args:
        student_logits: (B, C) float, C >= 2.
        teacher_logits: (B, C) float (detach it: it gets a gradient otherwise).
        targets: (B,) int64 class indices.
        temperature: T > 0.
        tckd_weight: weight of the target-class term (the paper's alpha).
        nckd_weight: weight of the non-target-class term (the paper's beta).
        reduction: "mean" over the batch (0-dim) or "none" (B,).

    Returns:
        0-dim tensor ("mean") or (B,) ("none"), fp32 (float64 for float64 logits).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"dkd_loss: student and teacher logits must be (B, C) of one shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    batch, classes = student_logits.shape
    if classes < 2:
        raise ValueError(f"dkd_loss: need at least 2 classes, got logits {(batch, classes)}")
    if targets.shape != (batch,):
        raise ValueError(
            f"dkd_loss: targets must be ({batch},) class indices, got shape {tuple(targets.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"dkd_loss: temperature must be > 0, got {temperature}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"dkd_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    target_mask = F.one_hot(targets, classes).bool()

    def parts(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log b (B, 2) and the renormalised non-target log-probabilities (B, C), 0 at t."""
        z = upcast(logits) / temperature
        log_all = torch.logsumexp(z, dim=1)
        others = z.masked_fill(target_mask, float("-inf"))
        log_others = torch.logsumexp(others, dim=1)
        log_target = z.gather(1, targets[:, None]).squeeze(1)
        log_binary = torch.stack([log_target - log_all, log_others - log_all], dim=1)
        # A finite 0 at the target, not -inf: the KL below weighs it by p = 0, and -inf would
        # turn that product's gradient into NaN.
        return log_binary, (others - log_others[:, None]).masked_fill(target_mask, 0.0)

    binary_s, rest_s = parts(student_logits)
    binary_t, rest_t = parts(teacher_logits)
    tckd = (binary_t.exp() * (binary_t - binary_s)).sum(1)
    p_rest_t = rest_t.exp().masked_fill(target_mask, 0.0)
    nckd = (p_rest_t * (rest_t - rest_s)).sum(1)
    loss = (tckd_weight * tckd + nckd_weight * nckd) * temperature**2
    return loss.mean() if reduction == "mean" else loss


def supervised_contrastive_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L^sup_out), one view per sample.

    Features are L2-normalised here. For anchor i with positives P(i) = {p != i: y_p = y_i},
    ``l_i = -(T / T_base) * mean_{p in P(i)} log softmax_{a != i}(z_i.z_a / T)[p]``; the loss
    is the mean of l_i over all B anchors, an anchor without positives contributing 0 (as in
    the reference implementation, which the public ContSup code copies).

    Args:
        features: (B, D) float embeddings.
        labels: (B,) int64 classes.
        temperature: T.
        base_temperature: T_base (the loss is scaled by T / T_base).

    Returns:
        0-dim tensor, fp32 (float64 for float64 features).
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"supervised_contrastive_loss: expected features (B, D) and labels (B,), got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}"
        )
    z = F.normalize(upcast(features), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    # log-softmax over a != i; the diagonal is excluded by setting it to -inf.
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, -math.inf), 1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positives.sum(1)
    mean_log_prob = (log_prob * positives).sum(1) / count.clamp_min(1)
    return -(temperature / base_temperature) * mean_log_prob.mean()
