"""pytest-benchmark timings of one ResNet-56 -> ResNet-20 distillation step: KD vs Block-KD.

Variants and the step live in benchmarks/perf/blockkd_ratios.py (its docstring says what each one
is); Block-KD with its defaults is "ours" in the ratio line of benchmarks/conftest.py. Each test
also checks that the step trained the student and left the teacher bitwise unchanged, so a
broken step fails in quick mode (``--benchmark-disable``, batch 16 there) too.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.perf.blockkd_ratios import BATCH, VARIANTS, make_step
from benchmarks.report import synchronized
from bwrf_ext import build_info


@pytest.mark.parametrize("variant", VARIANTS)
def test_blockkd_step(benchmark, bench_device: torch.device, variant: str):
    """Times one training step; ratios come from the group's shared table."""
    # Quick mode (--benchmark-disable) runs the step once, as a check: a small batch will do.
    batch = 16 if benchmark.disabled else BATCH
    benchmark.group = f"distill_step resnet56->resnet20 batch {batch}"
    impl = "ours" if variant == "blockkd" else variant
    benchmark.extra_info.update(impl=impl, backend=build_info()["backend"])
    step = make_step(variant, bench_device, batch)
    weight_before = step.student.layer1[0].conv1.weight.detach().clone()
    teacher_before = None
    if step.fp_model is not None:
        teacher_before = {k: v.clone() for k, v in step.fp_model.state_dict().items()}
    loss = benchmark(synchronized(step, bench_device))
    assert torch.isfinite(loss)
    assert not torch.equal(step.student.layer1[0].conv1.weight.detach(), weight_before)
    if step.wrapper is not None:
        assert all(p.grad is not None for p in step.wrapper.connectors.parameters())
    if teacher_before is not None:
        for key, value in step.fp_model.state_dict().items():
            assert torch.equal(value, teacher_before[key]), key
