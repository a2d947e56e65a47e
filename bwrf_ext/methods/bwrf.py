"""BWRF: a frozen full-precision partner grafted block by block onto a low-precision model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from bwrf_ext.engine.branches import (
    check_same_classes,
    normalize_branch_choice,
    resolve_branch_weights,
)
from bwrf_ext.engine.partner import PartneredModule, PartnerRoles, forward_with_branches
from bwrf_ext.engine.split import BlockSplit
from bwrf_ext.losses import LossTerms, ce_and_kd

__all__ = ["BWRF", "BWRFConfig", "BWRFOutput"]


@dataclass(frozen=True)
class BWRFConfig:
    """Options of :class:`BWRF`; the defaults are those of DESIGN.md §1.1.

    The loss is ``lp_weight * [CE(z_Q, y) + alpha * KD_T(z_Q || z_F)]
    + sum_i w_i * [CE(z_Mi, y) + alpha * KD_T(z_Mi || z_F)]`` with
    ``KD_T = T^2 * KL(softmax(z_F/T) || softmax(z/T))``; z_Q the LP logits, z_F the FP logits,
    z_Mi the logits of the mixed-precision model M^i (LP blocks 1..i, then FP blocks i+1..N and
    FP head).

    Attributes:
        alpha: KD weight, for the LP model and every branch.
        temperature: KD temperature T.
        branch_weights: "uniform" (w_i = 1), "geometric" (w_i = 2^-(N-i): the branch with the
            most LP blocks weighs most) or one float per selected branch, in branch order.
        branches: which M^i to build (i in 1..N-1); None for all, () for none (LP CE + KD only).
        lp_loss: include the LP terms in the total (off: they are still reported, detached).
        detach_branch_inputs: feed h_i.detach() to the branches, so MP losses give the LP
            blocks no gradient (an ablation: the branches then only report).
        batched: run all branches through an FP block as one call (exact, faster); False is the
            naive loop over branches, kept as a reference.
        lean_partner: run the branches through a memory-lean copy of the FP blocks
            (:mod:`bwrf_ext.lean`: same gradients, a 1-bit mask per ReLU instead of every conv
            and BatchNorm input saved); False for plain autograd.
    """

    alpha: float = 1.0
    temperature: float = 2.0
    branch_weights: Literal["uniform", "geometric"] | tuple[float, ...] = "uniform"
    branches: tuple[int, ...] | None = None
    lp_loss: bool = True
    detach_branch_inputs: bool = False
    batched: bool = True
    lean_partner: bool = True

    def __post_init__(self) -> None:
        if not self.alpha >= 0:
            raise ValueError(f"BWRFConfig: alpha must be >= 0, got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"BWRFConfig: temperature must be > 0, got {self.temperature}")
        branches, weights = normalize_branch_choice(
            self.branches, self.branch_weights, "BWRFConfig", ("branch", "branches")
        )
        object.__setattr__(self, "branches", branches)
        object.__setattr__(self, "branch_weights", weights)

    def resolve(self, num_blocks: int) -> dict[int, float]:
        """Branch index i -> weight w_i, for a split into num_blocks blocks."""
        return resolve_branch_weights(
            self.branches, self.branch_weights, num_blocks, num_blocks - 1, "BWRFConfig",
            ("branch", "branches"),
        )  # fmt: skip


@dataclass
class BWRFOutput:
    """What one BWRF forward returns.

    Attributes:
        lp_logits: (B, C) logits of the LP model, z_Q.
        fp_logits: (B, C) logits of the FP partner, z_F (no grad); None in eval mode.
        mp_logits: branch i -> (B, C) logits of M^i; empty in eval mode.
        losses: every term, unweighted: "lp_ce", "lp_kd", "mp{i}_ce", "mp{i}_kd" (eval mode:
            "lp_ce" when labels are given). Terms outside the total are detached.
        loss_weights: the coefficient of each term in ``loss``;
            ``loss == sum(loss_weights[k] * losses[k])``.
        loss: the total, 0-dim; None in eval mode without labels.
    """

    lp_logits: torch.Tensor
    fp_logits: torch.Tensor | None = None
    mp_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)
    loss: torch.Tensor | None = None


class BWRF(PartneredModule):
    """Block-wise replacement framework for QAT: an LP model trained with a frozen FP partner.

    Works with any LP model that splits into the same blocks as its FP partner, however it was
    quantized (``bwrf_ext.quantize_model``, another fake-quant module, or none): the wrapper
    only runs blocks. In train mode one call runs the LP model once keeping its block outputs
    h_1..h_N, the FP partner under no_grad for z_F, and the MP branches M^i: h_i through FP
    blocks i+1..N and the FP head, batched by default. MP gradients reach LP blocks 1..i
    through the frozen FP blocks. In eval mode only the LP model runs.

    The FP partner is a frozen copy of ``fp_model`` (``requires_grad_(False)``, eval mode kept
    through ``.train()``; the caller's model is left as it was, so it can still be quantized or
    trained in any order) and held outside the module tree: ``parameters()`` and
    ``state_dict()`` are the LP model's only, so ``torch.optim.SGD(bwrf.parameters(), ...)``
    trains the LP model alone, and a checkpoint is ``bwrf.lp_model.state_dict()``.
    ``.to()``/``.cuda()`` move the partner too. For inference keep ``bwrf.lp_model``.

    Example::

        import torch
        from bwrf_ext import BWRF, BWRFConfig, quantize_model
        from bwrf_ext.models import resnet20

        fp = resnet20()  # trained weights: bwrf_ext.models.pretrained_cifar_resnet(20)
        lp = quantize_model(fp, w_bits=2, a_bits=2)  # a copy; fp is left as it is
        bwrf = BWRF(lp, fp, BWRFConfig())
        optimizer = torch.optim.SGD(bwrf.parameters(), lr=0.01, momentum=0.9)
        images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        out = bwrf(images, labels)  # the first call initialises the LP step sizes
        out.loss.backward()
        optimizer.step()

    Args:
        lp_model: the model to train (its quantizers may initialise lazily on the first call).
        fp_model: the full-precision partner; frozen in place, never modified.
        config: loss and branch options (default BWRFConfig()).
        lp_split, fp_split: explicit splits (from :func:`bwrf_ext.split_model` with
            module names) for models without an automatic one.
    """

    roles = PartnerRoles(
        "BWRF", "lp_model", "fp_model", "LP model", "FP partner",
        "quantize a copy (quantize_model(fp_model, ..., inplace=False))", "lp",
    )  # fmt: skip

    def __init__(
        self,
        lp_model: nn.Module,
        fp_model: nn.Module,
        config: BWRFConfig | None = None,
        *,
        lp_split: BlockSplit | None = None,
        fp_split: BlockSplit | None = None,
    ) -> None:
        super().__init__()
        self.config = config or BWRFConfig()
        self.lp_model = lp_model
        self._attach(lp_model, fp_model, lp_split, fp_split, self.config.lean_partner)
        check_same_classes(self.lp_split, self.partner.split, "BWRF",
                           ("the LP model", "the FP partner"))  # fmt: skip
        self.branch_weights = self.config.resolve(self.num_blocks)

    @property
    def fp_model(self) -> nn.Module:
        """The frozen FP partner (a copy of the model given: the caller's stays trainable)."""
        return self.partner.model

    @property
    def lp_split(self) -> BlockSplit:
        """The LP model's split (sharing its modules)."""
        return self.trained_split

    def lp_parameters(self) -> Iterator[nn.Parameter]:
        """The LP model's parameters (the same as ``parameters()``), for the optimizer."""
        return self.lp_model.parameters()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> BWRFOutput:
        """One BWRF forward.

        Args:
            x: a batch the models take, e.g. (B, 3, H, W) float.
            y: (B,) int64 labels; required in train mode.

        Returns:
            A BWRFOutput; in eval mode only ``lp_logits`` (and "lp_ce"/``loss`` when y is given).
        """
        if not self.training:
            logits, terms = self._eval_terms(x, y)
            return BWRFOutput(logits, losses=terms.values, loss_weights=terms.weights,
                              loss=terms.total)  # fmt: skip
        config = self.config
        fp_logits, fp_shapes = self._partner_logits_and_shapes(x, y)
        def branch_entries(outputs: list[torch.Tensor]) -> dict[int, torch.Tensor]:
            entries = {}
            for i in self.branch_weights:
                h_i = outputs[i - 1]
                if h_i.shape[1:] != fp_shapes[i - 1][1:]:
                    raise ValueError(
                        f"BWRF: LP block {i} outputs {tuple(h_i.shape)}, FP block {i} "
                        f"{tuple(fp_shapes[i - 1])}; branch {i} needs them to match"
                    )
                entries[i] = h_i.detach() if config.detach_branch_inputs else h_i
            return entries

        # Entering the partner at 0-based block i means running FP blocks i+1..N (1-based).
        _, lp_logits, mp_logits = forward_with_branches(
            self.lp_split, x, self.partner, branch_entries,
            max(self.branch_weights, default=0), config.batched,
        )  # fmt: skip

        terms = LossTerms()
        scored = [("lp", lp_logits, 1.0 if config.lp_loss else 0.0)]
        scored += [(f"mp{i}", mp_logits[i], w) for i, w in self.branch_weights.items()]
        for name, logits, weight in scored:
            if weight == 0.0:
                logits = logits.detach()  # reported only: keep it out of the graph
            ce, kd = ce_and_kd(logits, y, fp_logits, config.temperature)
            terms.add(f"{name}_ce", ce, weight)
            terms.add(f"{name}_kd", kd, weight * config.alpha)
        if terms.total is None:
            raise ValueError(
                "BWRF.forward: every loss term has weight 0 (lp_loss=False and no branches)"
            )
        return BWRFOutput(lp_logits, fp_logits, mp_logits, terms.values, terms.weights,
                          terms.total)  # fmt: skip


    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every model involved, without grad, in the current mode of the LP model.

        For tracking how the branches fare during training (DESIGN.md §1.1's figure of the MP
        models against the LP backbone); call ``.eval()`` first for test accuracy.

        Args:
            x: a batch, e.g. (B, 3, H, W).

        Returns:
            "model": the LP model (first, as every method's evaluate), "fp": the FP partner,
            "mp{i}": each branch M^i; (B, C) each.
        """
        fp_logits = self.partner.block_outputs_and_logits(x)[1]
        _, lp_logits, branches = forward_with_branches(
            self.lp_split, x, self.partner,
            lambda outputs: {i: outputs[i - 1] for i in self.branch_weights},
            max(self.branch_weights, default=0), self.config.batched,
        )  # fmt: skip
        logits = {"model": lp_logits, "fp": fp_logits}
        logits.update({f"mp{i}": branches[i] for i in sorted(branches)})
        return logits
