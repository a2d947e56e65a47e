"""What ContSup costs: each unit's saved activations, each part's parameters and MACs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bwrf_ext.engine import BlockSplit, probing
from bwrf_ext.memory import saved_activation_bytes

__all__ = ["ContSupCost", "PartCost"]


@dataclass(frozen=True)
class PartCost:
    """Parameters and multiply-accumulates (conv and linear layers, per sample) of a part."""

    params: int
    macs: int


@dataclass(frozen=True)
class ContSupCost:
    """Cost report of a ContSup model: inference keeps the main net and the context projectors.

    Attributes:
        input_shape: the (B, C, H, W) input the MACs were counted on (then divided by B).
        main: the network itself.
        context: the context projectors (kept at inference).
        aux_heads: the auxiliary heads (training only).
        decoders: the reconstruction decoders (training only).
    """

    input_shape: tuple[int, ...]
    main: PartCost
    context: PartCost
    aux_heads: PartCost
    decoders: PartCost

    @classmethod
    def measure(
        cls, parts: dict[str, nn.Module], run: Callable[[], object], input_shape: Sequence[int]
    ) -> ContSupCost:
        """Counts the MACs of each part's conv and linear layers while ``run()`` runs.

        Args:
            parts: "main", "context", "aux_heads" and "decoders", in that order.
            run: one forward of every part on an input of ``input_shape``.
            input_shape: (B, C, H, W); MACs are divided by B.
        """
        owner = {id(mod): (name, mod) for name, part in parts.items() for mod in part.modules()}
        macs = dict.fromkeys(parts, 0)

        def count(module: nn.Module, inputs, output: torch.Tensor) -> None:
            per_output = (
                module.in_channels // module.groups * math.prod(module.kernel_size)
                if isinstance(module, nn.Conv2d) else module.in_features
            )
            macs[owner[id(module)][0]] += output.numel() * per_output

        handles = [mod.register_forward_hook(count) for _, mod in owner.values()
                   if isinstance(mod, (nn.Conv2d, nn.Linear))]
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
        batch = input_shape[0]
        return cls(
            tuple(input_shape),
            *(PartCost(sum(p.numel() for p in part.parameters()), macs[name] // batch)
              for name, part in parts.items()),
        )

    @property
    def inference(self) -> PartCost:
        """What deployment runs: main net + context projectors."""
        return PartCost(self.main.params + self.context.params, self.main.macs + self.context.macs)

    @property
    def context_overhead(self) -> tuple[float, float]:
        """(params, MACs) of the context projectors relative to the main net."""
        return (self.context.params / max(self.main.params, 1),
                self.context.macs / max(self.main.macs, 1))

    def table(self) -> str:
        """A Markdown table of every part."""
        rows = [("main net", self.main), ("context projectors", self.context),
                ("inference total", self.inference), ("aux heads (training)", self.aux_heads),
                ("decoders (training)", self.decoders)]
        lines = [f"input {self.input_shape}; MACs of conv/linear layers per sample", "",
                 "| part | params | MMACs |", "|---|---:|---:|"]
        lines += [f"| {name} | {c.params:,} | {c.macs / 1e6:.2f} |" for name, c in rows]
        return "\n".join(lines) + "\n"


def probe_units(
    model: nn.Module, split: BlockSplit, units: Sequence[nn.Module], example_input: torch.Tensor
) -> tuple[list[torch.Size], list[int], int]:
    """(output shape of each unit, saved-activation bytes of each unit, classes).

    Runs the units in order, then the split's head, once on ``example_input`` under
    :func:`~bwrf_ext.engine.probing` (no trace on the model).
    """
    parameters = list(model.parameters())
    shapes, costs = [], []
    # The input requires grad so that every unit saves its activations even when the
    # model's parameters are frozen; only shapes and byte counts are kept.
    h = example_input.detach().clone().requires_grad_(example_input.is_floating_point())
    with probing(model, split), torch.enable_grad():
        for unit in units:
            with saved_activation_bytes(parameters) as saved:
                h = unit(h)
            shapes.append(h.shape)
            costs.append(saved.total)
        logits = split.head(h.detach())
    if logits.dim() != 2:
        raise ValueError(
            f"ContSup: the model's head returns shape {tuple(logits.shape)}; expected "
            "(B, classes) logits"
        )
    return shapes, costs, logits.shape[1]
