"""``bwrf-train``, the training command: FP, LSQ and BWRF runs with checkpoints and reports.

Run ``bwrf-train --help`` (or ``python -m bwrf_ext.train --help``); multi-process with
``torchrun --nproc_per_node=N -m bwrf_ext.train ...``.
"""

from bwrf_ext.train.cli import main

__all__ = ["main"]
