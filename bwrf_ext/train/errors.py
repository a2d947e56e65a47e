"""What ``bwrf-train`` reports instead of a traceback: its own errors, in one module so the
command line, the run config, the builder and the loop raise them without importing each other.

``main`` prints each as one line with exit status 2 (as it does CheckpointError and DataError),
and a RunInterrupted with status 130.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad or incompatible options: reported as one line, exit status 2."""


class RunError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss): reported as one line, exit status 2."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what was kept (a checkpoint to resume, or nothing): main prints it."""

    def __init__(self, kept: str) -> None:
        super().__init__(kept)
        self.kept = kept
