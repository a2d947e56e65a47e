"""``--method bwrf``: the low-bit network trained with its frozen FP partner's branches."""

from __future__ import annotations

from typing import TYPE_CHECKING

import bwrf_ext
from bwrf_ext.train.errors import UsageError
from bwrf_ext.train.methods import branches
from bwrf_ext.train.methods.base import Method, MethodSpec, Parts, given, wrapper_loss

if TYPE_CHECKING:
    from bwrf_ext.train.config import RunConfig


def _check(config: RunConfig) -> None:
    # The partner is the FP model itself: its weights come from --init-from (or the checkpoint).
    if config.init_from is None and not config.resume:
        raise UsageError("--method bwrf needs --init-from: the FP weights of the frozen partner")


def build(parts: Parts) -> Method:
    options = parts.config.method_options
    config = bwrf_ext.BWRFConfig(alpha=options["alpha"], **given(
        temperature=options["temperature"], branch_weights=options["branch_weights"],
        branches=options["branches"],
    ))  # fmt: skip
    lp_split = parts.split(parts.config.model, parts.net)
    branches.check_branches(config, lp_split, options["branches"])
    fp_split = parts.split(parts.config.model, parts.model)
    wrapper = bwrf_ext.BWRF(parts.net, parts.model, config, lp_split=lp_split, fp_split=fp_split)

    return Method("bwrf", parts.net, wrapper, wrapper_loss, wrapper.evaluate, partner=parts.model)


SPEC = MethodSpec("bwrf", build, options=(branches.OPTIONS,), check=_check, quantized=True)
