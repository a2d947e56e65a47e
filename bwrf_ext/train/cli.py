"""``bwrf-train``: parses the command line, runs, and maps failures to exit codes.

Every bad input is refused before anything is written: one line on stderr, exit status 2.
Options are checked first (:mod:`bwrf_ext.train.config`), before any file is read; data files,
weights and the model's fit to the images are checked by the builder before training starts,
and a run writes nothing until its first checkpoint. An interrupted run (Ctrl-C) exits with 130
and says what was kept.
"""

from __future__ import annotations

import sys

from bwrf_ext.data import DataError
from bwrf_ext.train.checkpoint import CheckpointError
from bwrf_ext.train.config import PROG, parse_args
from bwrf_ext.train.errors import RunError, RunInterrupted, UsageError
from bwrf_ext.train.runner import train


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bwrf-train`` and ``python -m bwrf_ext.train``; returns the exit status."""
    try:
        train(parse_args(argv))
    except (UsageError, CheckpointError, DataError, RunError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        kept = interrupt.kept if isinstance(interrupt, RunInterrupted) else "nothing was written"
        print(f"{PROG}: interrupted; {kept}", file=sys.stderr)
        return 130
    return 0
