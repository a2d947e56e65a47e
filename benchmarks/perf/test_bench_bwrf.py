"""pytest-benchmark timings of one ResNet-20 W2A2 step: LSQ alone, BWRF naive, BWRF batched.

Variants and the step live in benchmarks/perf/bwrf_step_ratios.py (its docstring says what each one
is); BWRF batched is "ours" in the ratio line of benchmarks/conftest.py. Each test also checks
that the step trained the LP model and left the FP partner bitwise unchanged, so a broken step
fails in quick mode (``--benchmark-disable``) too.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.perf.bwrf_step_ratios import A_BITS, BATCH, VARIANTS, W_BITS, make_step
from benchmarks.report import synchronized
from bwrf_ext import build_info


@pytest.mark.parametrize("variant", VARIANTS)
def test_bwrf_step(benchmark, bench_device: torch.device, variant: str):
    """Times one training step; ratios come from the group's shared table."""
    benchmark.group = f"bwrf_step resnet20 W{W_BITS}A{A_BITS} batch {BATCH}"
    impl = "ours" if variant == "bwrf_batched" else variant
    benchmark.extra_info.update(impl=impl, backend=build_info()["backend"])
    step = make_step(variant, bench_device)
    weight_before = step.lp_model.layer1[0].conv1.weight.detach().clone()
    fp_before = None
    if step.fp_model is not None:
        fp_before = {k: v.clone() for k, v in step.fp_model.state_dict().items()}
    loss = benchmark(synchronized(step, bench_device))
    assert torch.isfinite(loss)
    assert not torch.equal(step.lp_model.layer1[0].conv1.weight.detach(), weight_before)
    if fp_before is not None:
        for key, value in step.fp_model.state_dict().items():
            assert torch.equal(value, fp_before[key]), key
