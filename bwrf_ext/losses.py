"""Loss terms shared by the block-wise methods: cross-entropy and temperature-scaled KD."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ce_and_kd", "kd_loss"]


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
        0-dim tensor, fp32 math (logits are upcast, so fp16/bf16 logits do not overflow).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_loss: student and teacher logits must have one shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"kd_loss: temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
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
    return F.cross_entropy(logits.float(), targets), kd_loss(logits, teacher_logits, temperature)
