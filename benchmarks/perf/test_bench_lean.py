"""The lean FP partner's memory claim, checked in quick mode too: MP branches save >= 20x less."""

from __future__ import annotations

import torch

from benchmarks.perf.bwrf_step_ratios import make_step
from benchmarks.perf.lean_partner_ratios import BRANCH_TARGET, branch_saved_bytes


def test_lean_branches_save_20x_less(bench_device: torch.device):
    plain = branch_saved_bytes(make_step("bwrf_plain", bench_device, batch=16))
    lean = branch_saved_bytes(make_step("bwrf_batched", bench_device, batch=16))
    assert plain >= BRANCH_TARGET * lean, (plain, lean)
