"""``--method blockkd``: the network distilled from a frozen teacher through stepping stones
(the teacher's blocks grafted onto the student's, with trained connectors)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import bwrf_ext
from bwrf_ext.train.errors import UsageError
from bwrf_ext.train.methods import branches
from bwrf_ext.train.methods.base import (
    Method,
    MethodSpec,
    Options,
    Parts,
    check_non_negative,
    given,
    wrapper_loss,
)

if TYPE_CHECKING:
    from bwrf_ext.train.config import RunConfig


def _add(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--teacher-model", default="resnet56", help="Block-KD's teacher architecture"
    )
    group.add_argument(
        "--teacher-from", default=None,
        help="Block-KD's teacher weights (formats as --init-from); required for blockkd",
    )  # fmt: skip
    group.add_argument("--beta", type=float, default=1.0, help="Block-KD: weight of the stones")
    group.add_argument(
        "--gamma", type=float, default=None,
        help="Block-KD: weight of the ensemble term (default 0: off; 1 is the paper's loss, gated)",
    )  # fmt: skip
    group.add_argument("--kd", default="kl", choices=("kl", "dkd"), help="Block-KD's KD loss")


def _check_options(config: RunConfig, used: bool) -> None:
    if not used and config.teacher_from is not None:
        raise UsageError("--teacher-from is Block-KD's teacher: use it with --method blockkd")
    for name in ("beta", "gamma"):
        if config.method_options[name] is not None:
            check_non_negative(name, config.method_options[name])


def _check(config: RunConfig) -> None:
    if config.teacher_from is None and not config.resume:
        raise UsageError("--method blockkd needs --teacher-from: the weights of the teacher")


def build(parts: Parts) -> Method:
    config, options = parts.config, parts.config.method_options
    library_config = bwrf_ext.BlockKDConfig(
        alpha=options["alpha"], beta=options["beta"], kd=options["kd"],
        **given(temperature=options["temperature"], stone_weights=options["branch_weights"],
                stones=options["branches"], gamma=options["gamma"]),
    )  # fmt: skip
    student_split = parts.split(config.model, parts.net)
    branches.check_branches(library_config, student_split, options["branches"])
    wrapper = bwrf_ext.BlockKD(
        parts.net, parts.teacher, library_config, student_split=student_split,
        teacher_split=parts.split(config.teacher_model, parts.teacher),
        example_input=parts.example,
    )  # fmt: skip

    return Method(
        "blockkd", parts.net, wrapper, wrapper_loss, wrapper.evaluate, partner=parts.teacher
    )


SPEC = MethodSpec(
    "blockkd", build, options=(branches.OPTIONS, Options(branches.TITLE, _add, _check_options)),
    check=_check, teacher=True,
)  # fmt: skip
