"""The frozen partner and its branches: running a frozen network from a trained one's blocks."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext.engine.branches import check_separate, check_split_of
from bwrf_ext.engine.split import BlockSplit, split_model
from bwrf_ext.losses import LossTerms, upcast


class FrozenPartner:
    """A frozen reference network seen through its split: BWRF's FP twin, Block-KD's teacher.

    Works on its own deep copy of the model (and of its split), frozen: ``requires_grad_(False)``
    and eval mode, kept in eval mode at every use (a ``.train()`` from outside is undone), so its
    BatchNorm is an affine map and its running statistics never change. The caller's model is
    left exactly as it was, trainable: quantizing or training it afterwards works (freezing it
    in place once left ``quantize_model(fp)`` after ``BWRF(..., fp)`` with frozen weights and
    only its step sizes to train). The copy costs one more set of the model's weights; drop
    the caller's reference if memory is tight. Not an ``nn.Module``, so a wrapper holding one
    does not hand its parameters to an optimizer nor put them in its ``state_dict``.

    Gradients still flow *through* it: a branch input that requires grad gets its gradient, the
    partner's parameters get none.

    With ``lean`` (the default) the branches run through a memory-lean copy of the blocks and
    head (:func:`bwrf_ext.lean.make_lean`, sharing the partner's weights): backward computes the
    same input gradients while saving a 1-bit mask per ReLU output instead of every conv and
    BatchNorm input. Layers the lean copy does not know run on plain autograd;
    ``lean_report()`` names them. The no-grad full forward always runs the original modules.

    Args:
        model: the reference network (copied; the copy is frozen).
        split: its BlockSplit (copied with it, so it runs the copy's modules).
        lean: run the branches through the lean copy (False: plain autograd).
    """

    def __init__(self, model: nn.Module, split: BlockSplit, lean: bool = True) -> None:
        # One deepcopy of both keeps the split's modules those of the copied model.
        self.model, self.split = copy.deepcopy((model, split))
        self.model.requires_grad_(False)
        self.model.eval()
        self.split.requires_grad_(False)  # glue modules the split may own
        self.split.eval()
        self.lean_split: BlockSplit | None = None
        if lean:
            from bwrf_ext.lean import make_lean  # bwrf_ext.lean imports the ops, not the engine

            self.lean_split = BlockSplit(
                make_lean(split.stem), [make_lean(b) for b in split.blocks], make_lean(split.head)
            )

    def lean_report(self) -> list[str]:
        """Modules of the lean copy left on plain autograd ("stem.", "blocks.j.", "head." names)."""
        if self.lean_split is None:
            return []
        from bwrf_ext.lean import lean_report

        return lean_report(self.lean_split)

    def _apply(self, fn) -> None:
        """Applies a module conversion (``.to()``, ``.half()``) to the model and both splits."""
        self.model._apply(fn)
        self.split._apply(fn)
        if self.lean_split is not None:
            self.lean_split._apply(fn)

    def ensure_frozen(self) -> None:
        """Puts every module back in eval mode if anything switched one to train mode."""
        if any(m.training for m in self.model.modules()) or self.split.training:
            self.model.eval()
            self.split.eval()
        if self.lean_split is not None and self.lean_split.training:
            self.lean_split.eval()

    @torch.no_grad()
    def block_outputs_and_logits(
        self, x: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The partner's full forward without grad: (its block outputs h_1..h_N, its output)."""
        self.ensure_frozen()
        outputs = self.split.block_outputs(x)
        return outputs, self.split.head(outputs[-1])

    def run_block(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Runs partner block j (0-based) on x, with autograd to x.

        Every branch goes through here: the hook point for a memory-lean execution of frozen
        blocks (saving only what input gradients need), which can replace this method.
        """
        return (self.lean_split or self.split).run_block(j, x)

    def run_head(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the partner's head on x, with autograd to x."""
        return (self.lean_split or self.split).head(x)

    def branches(
        self, entries: Mapping[int, torch.Tensor], batched: bool = True
    ) -> dict[int, torch.Tensor]:
        """Runs branches through the partner's blocks and head.

        Branch k enters the partner at block k (0-based), i.e. ``entries[k]`` is the input of
        block k and has the shape of partner block k-1's output; it then runs blocks k..N-1 and
        the head (k == N enters at the head). With ``batched``, at each block every branch
        passing through it is concatenated along dim 0 and the block runs once (exact since
        the partner is in eval mode: no batch statistics); the naive loop runs each branch on
        its own.

        Args:
            entries: block index (1..N; 0 means the whole network, N the head only) ->
                (B_k, ...) input.
            batched: one call per block (True) or one call per branch and block (False).

        Returns:
            block index -> the partner's output for that branch, (B_k, ...), same keys.
        """
        self.ensure_frozen()
        num_blocks = self.split.num_blocks
        for k in entries:
            if not 0 <= k <= num_blocks:
                raise ValueError(
                    f"FrozenPartner.branches: entry block must be in [0, {num_blocks}], got {k}"
                )
        order = sorted(entries)
        if not batched:
            outputs = {}
            for k in order:
                x = entries[k]
                for j in range(k, num_blocks):
                    x = self.run_block(j, x)
                outputs[k] = self.run_head(x)
            return outputs
        if not order:
            return {}
        running: list[int] = []  # branches in the stack, in stacking order
        sizes: list[int] = []
        stacked: torch.Tensor | None = None
        for j in range(order[0], num_blocks + 1):
            if j in entries:
                parts = [stacked] if stacked is not None else []
                stacked = torch.cat([*parts, entries[j]]) if parts else entries[j]
                running.append(j)
                sizes.append(entries[j].shape[0])
            if j < num_blocks:
                stacked = self.run_block(j, stacked)
        logits = self.run_head(stacked)
        return dict(zip(running, logits.split(sizes), strict=True))


def forward_with_branches(
    split: BlockSplit,
    x: torch.Tensor,
    partner: FrozenPartner,
    entries_from: Callable[[list[torch.Tensor]], dict[int, torch.Tensor]],
    last_entry: int,
    batched: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor, dict[int, torch.Tensor]]:
    """Runs a trained split on x and the partner's branches grafted onto its block outputs.

    The branches are recorded right after block ``last_entry`` and before the blocks above it:
    the autograd engine runs later-recorded nodes first, so backward frees the saved
    activations of those upper blocks before the branches' backward runs, and the gradients
    the branches leave pending on h_i never stack on every saved activation of the split. (With
    the branches recorded last, a BWRF step on ResNet-20 peaked at 1.10x LSQ's memory; this way
    1.005x.) BWRF's MP branches and Block-KD's stepping stones both run through here.

    Args:
        split: the trained model's split.
        x: its input batch.
        partner: the frozen network the branches run through.
        entries_from: h_1..h_last -> {k: input of partner block k} (k = N: its head), e.g.
            the block outputs themselves (BWRF) or connectors applied to them (Block-KD).
        last_entry: the highest k the branches enter after (0: no branch).
        batched: see :meth:`FrozenPartner.branches`.

    Returns:
        (h_1..h_N, the split's output, {k: partner output of branch k}).
    """
    outputs: list[torch.Tensor] = []
    h = x
    for j in range(last_entry):
        h = split.run_block(j, h)
        outputs.append(h)
    branch_outputs = partner.branches(entries_from(outputs), batched) if last_entry else {}
    for j in range(last_entry, split.num_blocks):
        h = split.run_block(j, h)
        outputs.append(h)
    return outputs, split.head(h), branch_outputs


@dataclass(frozen=True)
class PartnerRoles:
    """How a partnered method names itself and its two models, in its errors and outputs.

    Attributes:
        method: e.g. "BWRF".
        trained, frozen: the constructor's argument names, e.g. ("lp_model", "fp_model").
        trained_noun, frozen_noun: the models in prose, e.g. ("LP model", "FP partner").
        hint: how to fix a trained model that shares parameters with the frozen one.
        prefix: the trained model's loss terms' prefix, e.g. "lp" ("lp_ce").
    """

    method: str
    trained: str
    frozen: str
    trained_noun: str
    frozen_noun: str
    hint: str
    prefix: str


class PartneredModule(nn.Module):
    """Base of the wrappers that train one model beside a frozen partner (BWRF, Block-KD): the
    skeleton they share.

    :meth:`_attach` checks the two models and their splits, then holds the trained model's
    split (``trained_split``) and the :class:`FrozenPartner` (``partner``) outside the module
    tree, so neither duplicates state_dict keys nor reaches the optimizer; ``.train()`` keeps
    the partner in eval mode and ``.to()``/``.cuda()``/``.half()`` reach both. A subclass sets
    ``roles`` and keeps the trained model as a registered child.
    """

    roles: PartnerRoles

    def _attach(
        self,
        trained: nn.Module,
        frozen: nn.Module,
        trained_split: BlockSplit | None,
        frozen_split: BlockSplit | None,
        lean: bool,
    ) -> None:
        """Checks and holds the splits and the frozen copy of ``frozen`` (see the class)."""
        roles = self.roles
        check_separate(trained, frozen, roles.method, (roles.trained, roles.frozen), roles.hint)
        trained_split = trained_split or split_model(trained)
        frozen_split = frozen_split or split_model(frozen)
        check_split_of(trained_split, trained, roles.method, f"{roles.trained}_split")
        check_split_of(frozen_split, frozen, roles.method, f"{roles.frozen}_split")
        if trained_split.num_blocks != frozen_split.num_blocks:
            raise ValueError(
                f"{roles.method}: the {roles.trained_noun} splits into "
                f"{trained_split.num_blocks} blocks, the {roles.frozen_noun} into "
                f"{frozen_split.num_blocks}; split both into the same number of blocks"
            )
        # Through __dict__, outside the module tree (see the class); the trained model itself
        # is the subclass's registered child, referenced here too for the shared code.
        self.__dict__["trained_model"] = trained
        self.__dict__["trained_split"] = trained_split
        self.__dict__["partner"] = FrozenPartner(frozen, frozen_split, lean=lean)

    @property
    def num_blocks(self) -> int:
        """N, the number of blocks of both models."""
        return self.trained_split.num_blocks

    def _eval_terms(
        self, x: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[torch.Tensor, LossTerms]:
        """Eval mode: the trained model alone, and its cross-entropy when labels are given."""
        logits = self.trained_model(x)
        terms = LossTerms()
        if y is not None:
            terms.add(f"{self.roles.prefix}_ce", F.cross_entropy(upcast(logits), y), 1.0)
        return logits, terms

    def _partner_logits_and_shapes(
        self, x: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Size]]:
        """Train mode: the partner's logits and its block output shapes, without grad.

        Runs first, while no activation of the trained model is held yet, and keeps only the
        shapes of the partner's block outputs: its transient memory then never adds to the
        trained model's saved activations, the step's peak.
        """
        if y is None:
            raise ValueError(f"{self.roles.method}.forward: labels y are required in train mode")
        outputs, logits = self.partner.block_outputs_and_logits(x)
        return logits, [o.shape for o in outputs]

    def train(self, mode: bool = True):
        """Sets the trained model's mode; the frozen partner stays in eval mode."""
        super().train(mode)
        self.trained_split.train(mode)
        self.partner.ensure_frozen()
        return self

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() reach the unregistered partner and the split's own glue modules.
        super()._apply(fn, recurse)
        self.partner._apply(fn)
        self.trained_split._apply(fn, recurse)
        return self
