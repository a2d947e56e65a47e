"""``--method contsup``: K gradient-isolated modules, each backpropagated at once inside the
step, with context supply between them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch

import bwrf_ext
from bwrf_ext.methods.contsup.config import parse_aux_head, parse_context
from bwrf_ext.train.errors import UsageError
from bwrf_ext.train.methods.base import Method, MethodSpec, Options, Parts, cross_entropy

if TYPE_CHECKING:
    from bwrf_ext.train.config import RunConfig

SPLITS = ("infopro", "infopro_balanced", "even", "balanced")


def _add(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--contsup-k", type=int, default=8, help="K gradient-isolated modules")
    group.add_argument(
        "--contsup-split", default="infopro",
        help="infopro, infopro_balanced, even or balanced (see bwrf_ext.ContSupConfig)",
    )  # fmt: skip
    group.add_argument("--contsup-context", default="E", help="R0, E, R<n> or R<n>E")
    group.add_argument("--contsup-aux-head", default="1c2f", help="auxiliary head, <n>c<m>f")
    group.add_argument(
        "--contsup-preset", default="published", choices=("published", "uniform"),
        help="published: the public ContSup code's heads, loss and loss-weight tables; uniform: "
        "C->2C heads, CE, flat weights (see bwrf_ext.ContSupConfig)",
    )  # fmt: skip
    group.add_argument(
        "--contsup-loss", default=None, choices=("ce", "supcon"),
        help="local loss; default: the preset's (published: supcon, uniform: ce)",
    )  # fmt: skip
    group.add_argument("--contsup-reconstruction", action="store_true", help="add the decoder")


def _check_options(config: RunConfig, used: bool) -> None:
    """Checked whatever the method (their defaults are valid)."""
    options = config.method_options
    if options["contsup_k"] < 1:
        raise UsageError(f"--contsup-k must be >= 1, got {options['contsup_k']}")
    if options["contsup_split"] not in SPLITS:
        raise UsageError(f"--contsup-split must be one of {', '.join(SPLITS)}, got "
                         f"{options['contsup_split']!r}")  # fmt: skip
    try:
        parse_context(options["contsup_context"])
    except ValueError:
        raise UsageError(f"--contsup-context must be R0, E, R<n> or R<n>E with n >= 1 (e.g. R1, "
                         f"R1E), got {options['contsup_context']!r}") from None  # fmt: skip
    try:
        parse_aux_head(options["contsup_aux_head"])
    except ValueError:
        raise UsageError(
            f"--contsup-aux-head must look like <n>c<m>f with n >= 0 conv and m >= 1 linear "
            f"layers (e.g. 1c2f), got {options['contsup_aux_head']!r}"
        ) from None


def _check(config: RunConfig) -> None:
    if config.amp:
        raise UsageError("--amp does not apply to --method contsup (backward per module)")
    if config.compile:  # its step backpropagates inside itself: no forward to compile alone
        raise UsageError("--compile does not apply to --method contsup (backward per module "
                         "inside its step)")  # fmt: skip


def build(parts: Parts) -> Method:
    options = parts.config.method_options
    config = bwrf_ext.ContSupConfig(
        num_modules=options["contsup_k"], split=options["contsup_split"],
        context=options["contsup_context"], aux_head=options["contsup_aux_head"],
        local_loss=options["contsup_loss"], reconstruction=options["contsup_reconstruction"],
        preset=options["contsup_preset"],
        image_mean=parts.data.mean, image_std=parts.data.std,
    )  # fmt: skip
    split = parts.split(parts.config.model, parts.net)
    wrapper = bwrf_ext.ContSup(parts.net, config, split=split, example_input=parts.example)

    def local_step(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        out = wrapper.train_step(x, y)  # backward only: the loop owns the optimizer
        return {"loss": out.loss.item(), **{k: float(v) for k, v in out.losses.items()}}

    # The model is the wrapper: its context projectors are part of the network at inference.
    return Method("contsup", wrapper, wrapper, cross_entropy, wrapper.evaluate,
                  local_step=local_step)  # fmt: skip


def _out_tag(config: RunConfig) -> str:
    return f"-k{config.method_options['contsup_k']}{config.method_options['contsup_context']}"


SPEC = MethodSpec(
    "contsup", build, options=(Options("ContSup", _add, _check_options),), check=_check,
    out_tag=_out_tag,
)  # fmt: skip
