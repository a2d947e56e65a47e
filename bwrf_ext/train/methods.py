"""The training methods behind ``bwrf-train --method``: one interface for the training loop.

Each method owns the model being trained and, where it has one, its wrapper (BWRF's partner,
Block-KD's teacher and connectors, ContSup's heads). The loop only calls ``step`` (forward and
backward of one batch) and ``evaluate`` (logits of every model the method tracks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bwrf_ext
from bwrf_ext.engine import BlockSplit

METHODS = ("fp", "lsq", "bwrf", "blockkd", "contsup")


@dataclass
class Method:
    """A method ready to train.

    Attributes:
        name: the --method value.
        model: the network being trained: the one saved as "model" in checkpoints and kept
            for inference.
        trainable: the module the optimizer takes parameters from and DistributedDataParallel
            wraps (the model itself, or a wrapper holding it and any auxiliary modules).
        forward_loss: (trainable or its DDP wrapper, x, y) -> (loss, {term: value}).
        evaluate: x -> {name: logits}; "model" is the trained network, other keys are the
            branches/stones/heads the method tracks (e.g. "mp1", "fp").
        partner: a frozen reference model saved beside the model (BWRF's FP twin), or None.
        quantized: whether the model holds quantizers.
        local_step: for methods that backpropagate inside their own step (ContSup's
            per-module backward): (x, y) -> {term: value}, gradients left in ``.grad``. Such
            a step cannot run inside DistributedDataParallel; the loop all-reduces the
            gradients after it instead.
    """

    name: str
    model: nn.Module
    trainable: nn.Module
    forward_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
    evaluate: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    partner: nn.Module | None = None
    quantized: bool = False
    local_step: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = None

    def step(
        self,
        module: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        autocast: contextlib.AbstractContextManager,
    ) -> dict[str, float]:
        """Forward and backward of one batch; returns the loss terms as floats."""
        if self.local_step is not None:
            return self.local_step(x, y)
        with autocast:
            loss, terms = self.forward_loss(module, x, y)
        loss.backward()
        return {"loss": loss.item(), **{k: float(v) for k, v in terms.items()}}


def _cross_entropy(module: nn.Module, x: torch.Tensor, y: torch.Tensor):
    loss = F.cross_entropy(module(x).float(), y)
    return loss, {}


def _bwrf_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """BWRF's and Block-KD's loss: both wrappers return the total and every term."""
    out = module(x, y)
    return out.loss, {k: v.detach() for k, v in out.losses.items()}


def plain_method(name: str, model: nn.Module, quantized: bool) -> Method:
    """fp or lsq: the model trained alone with cross-entropy."""

    @torch.no_grad()
    def evaluate(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"model": model(x)}

    return Method(name, model, model, _cross_entropy, evaluate, quantized=quantized)


def bwrf_method(
    lp_model: nn.Module,
    fp_model: nn.Module,
    config: bwrf_ext.BWRFConfig,
    lp_split: BlockSplit,
    fp_split: BlockSplit,
) -> Method:
    """BWRF: the LP model trained with its frozen FP partner's branches."""
    wrapper = bwrf_ext.BWRF(lp_model, fp_model, config, lp_split=lp_split, fp_split=fp_split)

    def evaluate(x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = wrapper.evaluate(x)
        logits["model"] = logits.pop("lp")
        return logits

    return Method(
        "bwrf", lp_model, wrapper, _bwrf_loss, evaluate, partner=fp_model, quantized=True
    )


def blockkd_method(
    student: nn.Module, teacher: nn.Module, config: bwrf_ext.BlockKDConfig,
    student_split: BlockSplit, teacher_split: BlockSplit, example_input: torch.Tensor,
    quantized: bool,
) -> Method:  # fmt: skip
    """Block-KD: the student distilled from a frozen teacher through stepping stones."""
    wrapper = bwrf_ext.BlockKD(
        student, teacher, config, student_split=student_split, teacher_split=teacher_split,
        example_input=example_input,
    )  # fmt: skip

    def evaluate(x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = wrapper.evaluate(x)
        logits["model"] = logits.pop("student")
        return logits

    return Method(
        "blockkd", student, wrapper, _bwrf_loss, evaluate, partner=teacher, quantized=quantized
    )


def contsup_method(
    model: nn.Module, config: bwrf_ext.ContSupConfig, split: BlockSplit,
    example_input: torch.Tensor, quantized: bool,
) -> Method:  # fmt: skip
    """ContSup: K gradient-isolated modules, each backpropagated at once inside the step."""
    wrapper = bwrf_ext.ContSup(model, config, split=split, example_input=example_input)

    def local_step(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        out = wrapper.train_step(x, y)  # backward only: the loop owns the optimizer
        return {"loss": out.loss.item(), **{k: float(v) for k, v in out.losses.items()}}

    @torch.no_grad()
    def evaluate(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"model": wrapper(x)}  # the main net with its context projectors

    # The model is the wrapper: its context projectors are part of the network at inference.
    return Method(
        "contsup", wrapper, wrapper, _cross_entropy, evaluate, quantized=quantized,
        local_step=local_step,
    )  # fmt: skip
