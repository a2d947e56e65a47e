"""The options BWRF and Block-KD share: the KD weight and temperature, and which blocks get
BWRF's branches / Block-KD's stepping stones (--branches)."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from bwrf_ext.train.errors import UsageError
from bwrf_ext.train.methods.base import Options, check_non_negative

if TYPE_CHECKING:
    from bwrf_ext.engine import BlockSplit
    from bwrf_ext.train.config import RunConfig

TITLE = "BWRF and Block-KD"


def _add(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--alpha", type=float, default=1.0, help="KD weight")
    group.add_argument(
        "--temperature", type=float, default=None, help="KD temperature (BWRF 2, Block-KD 4)"
    )
    group.add_argument(
        "--branch-weights", default=None, choices=("uniform", "geometric"),
        help="weights of BWRF's branches / Block-KD's stones (BWRF uniform, Block-KD geometric)",
    )  # fmt: skip
    group.add_argument(
        "--branches", default=None,
        help="BWRF's branch entries / Block-KD's stones as comma-separated block indices, e.g. "
        "1,2, or none: plain KD from the partner (the ablation); default: all",
    )  # fmt: skip


def _check(config: RunConfig, used: bool) -> None:
    options = config.method_options
    if options["branches"] is not None:
        if not used:
            raise UsageError(f"--branches is for --method bwrf or blockkd, not {config.method}")
        options["branches"] = parse_branches(options["branches"])
    check_non_negative("alpha", options["alpha"])
    temperature = options["temperature"]
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--temperature must be a finite number > 0, got {temperature}")


OPTIONS = Options(TITLE, _add, _check)


def parse_branches(text: str) -> tuple[int, ...]:
    """The --branches text as block indices: "1,2" -> (1, 2); "none" -> () (plain KD)."""
    if text.strip().lower() == "none":
        return ()
    try:
        chosen = tuple(int(part) for part in text.split(","))
    except ValueError:
        chosen = ()
    if not chosen or min(chosen) < 1 or len(set(chosen)) != len(chosen):
        raise UsageError(
            f"--branches must be distinct block indices >= 1 like 1,2, or none; got {text!r}"
        )
    return chosen


def check_branches(library_config, split: BlockSplit, branches: tuple[int, ...] | None) -> None:
    """--branches names blocks the split has (the library config's message says which exist)."""
    try:
        library_config.resolve(len(split.blocks))
    except ValueError as error:
        given = ",".join(map(str, branches)) or "none"
        raise UsageError(f"--branches {given}: {error}") from None
