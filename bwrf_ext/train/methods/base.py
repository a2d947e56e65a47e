"""What a ``bwrf-train --method`` is: its options, how it builds, and what the loop calls.

Each method owns the model being trained and, where it has one, its wrapper (BWRF's partner,
Block-KD's teacher and connectors, ContSup's heads). The loop only calls ``step`` (forward and
backward of one batch) and ``evaluate`` (logits of every model the method tracks).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext.train.errors import UsageError

if TYPE_CHECKING:
    from bwrf_ext.data import ImageData
    from bwrf_ext.engine import BlockSplit
    from bwrf_ext.train.config import RunConfig


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


@dataclass
class Parts:
    """What the builder made for a method to wrap, weights loaded, on the CPU.

    Attributes:
        config: the run's options.
        net: the network to train: ``model`` quantized when ``config.quantized``, else itself.
        model: the full-precision network (BWRF's frozen partner).
        teacher: the frozen teacher of a method that has one (``MethodSpec.teacher``), or None.
        data: the data set (its shape, mean and std).
        example: (2, C, H, W) float32, two copies of the first training image.
        split: (model name, network) -> its block split; a UsageError names the model when it
            has none.
    """

    config: RunConfig
    net: nn.Module
    model: nn.Module
    teacher: nn.Module | None
    data: ImageData
    example: torch.Tensor
    split: Callable[[str, nn.Module], BlockSplit]


@dataclass(frozen=True)
class Options:
    """Command-line options of one or more methods, declared once however many take them.

    Attributes:
        title: the --help group they are listed under (options of equal titles share it).
        add: declares them on the group (argparse ``add_argument``).
        check: (config, whether the chosen method takes them) -> None; raises UsageError
            naming the option. It may fill in what a value means (e.g. parse "1,2").
    """

    title: str
    add: Callable[[argparse._ArgumentGroup], None]
    check: Callable[[RunConfig, bool], None]


@dataclass(frozen=True)
class MethodSpec:
    """One --method: what the command line, the checks and the builder need to know of it.

    Attributes:
        name: the --method value.
        build: the method around the built networks; a ValueError (an option that does not
            fit this model or data) is reported as ``--method <name>: <message>``.
        options: its option groups, shared ones included.
        check: checks that only apply when it is the chosen method (e.g. a required option).
        quantized: True: always low-bit (default W4A4); False: never (--w-bits refused);
            None: low-bit when given --w-bits/--a-bits.
        teacher: builds a frozen teacher from --teacher-model and --teacher-from.
        out_tag: what the default --out names after the model and data set (before the bits).
    """

    name: str
    build: Callable[[Parts], Method]
    options: tuple[Options, ...] = ()
    check: Callable[[RunConfig], None] = lambda config: None
    quantized: bool | None = None
    teacher: bool = False
    out_tag: Callable[[RunConfig], str] = lambda config: ""


def cross_entropy(module: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The plain loss: cross-entropy of the module's logits (in float32 under autocast)."""
    loss = F.cross_entropy(module(x).float(), y)
    return loss, {}


def wrapper_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """BWRF's and Block-KD's loss: both wrappers return the total and every term."""
    out = module(x, y)
    return out.loss, {k: v.detach() for k, v in out.losses.items()}


def plain_method(parts: Parts) -> Method:
    """The network trained alone with cross-entropy (fp, lsq)."""
    net = parts.net

    @torch.no_grad()
    def evaluate(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"model": net(x)}

    return Method(parts.config.method, net, net, cross_entropy, evaluate)


def given(**options: Any) -> dict[str, Any]:
    """The options that were set (None: keep the method config's own default)."""
    return {k: v for k, v in options.items() if v is not None}


def check_non_negative(option: str, value: float) -> None:
    """A weight option: finite and >= 0 (NaN fails every comparison, hence the ``not``)."""
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"--{option} must be a finite number >= 0, got {value}")
