"""pytest-benchmark timings of one ResNet-20 W4A4 training step: float, ours, eager composite.

Variants and the step live in benchmarks/perf/qat_step_ratios.py (whose docstring says what each
one is); the ratio line comes from benchmarks/conftest.py (group with an "ours" entry). Each
test also checks that the step trained the model, so a broken step fails in quick mode
(``--benchmark-disable``) too.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.perf.qat_step_ratios import A_BITS, BATCH, VARIANTS, W_BITS, make_step
from benchmarks.report import synchronized
from bwrf_ext import LSQQuantizer, build_info


@pytest.mark.parametrize("variant", VARIANTS)
def test_qat_step(benchmark, bench_device: torch.device, variant: str):
    """Times one training step; ratios come from the group's shared table."""
    benchmark.group = f"qat_step resnet20 W{W_BITS}A{A_BITS} batch {BATCH}"
    benchmark.extra_info.update(impl=variant, backend=build_info()["backend"])
    qat_step = make_step(variant, bench_device)
    quantizers = [m for m in qat_step.model.modules() if isinstance(m, LSQQuantizer)]
    scales_before = [q.scale.detach().clone() for q in quantizers]
    weight_before = qat_step.model.conv1.weight.detach().clone()
    loss = benchmark(synchronized(qat_step, bench_device))
    assert torch.isfinite(loss)
    assert not torch.equal(qat_step.model.conv1.weight.detach(), weight_before)
    # 20 layers x (weight, input), and every step size moved.
    assert len(quantizers) == (0 if variant == "float" else 40)
    for quantizer, before in zip(quantizers, scales_before, strict=True):
        assert not torch.equal(quantizer.scale.detach(), before)
