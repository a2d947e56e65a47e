"""pytest-benchmark timings of one training batch: the batched InMemoryLoader vs per-sample items.

Variants and the data live in benchmarks/perf/loader_ratios.py (whose docstring says what each
one is; the step comparison is there, not here); the ratio line comes from benchmarks/conftest.py
(group with an "ours" entry). A small CIFAR-10-shaped set keeps it cheap. Each test also checks
the batch it made (shape, dtype, device, pixels a normalised uint8 value), so a broken loader
fails in quick mode (``--benchmark-disable``) too.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.perf.loader_ratios import BATCH, LOADERS, cifar10_shaped, make_loader

IMAGES = 2048
IMPL = {"batched": "ours", "per_sample": "per_sample"}


@pytest.mark.parametrize("variant", LOADERS)
def test_loader(benchmark, bench_device: torch.device, variant: str):
    """Times one batch (crop-flip, normalised, on the device); ratios from the group's table."""
    benchmark.group = f"loader cifar10-shaped crop-flip batch {BATCH}"
    benchmark.extra_info.update(impl=IMPL[variant])
    dataset = cifar10_shaped(IMAGES)
    next_batch = make_loader(variant, dataset, bench_device)

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next_batch()
        if bench_device.type == "cuda":
            torch.cuda.synchronize(bench_device)
        return x, y

    x, y = benchmark(call)
    assert x.shape == (BATCH, 3, 32, 32) and x.dtype == torch.float32
    assert x.device.type == y.device.type == bench_device.type
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) <= 9
    # Undoing the normalisation gives whole uint8 values (padding included: 0).
    pixels = x.cpu() * dataset.std + dataset.mean
    levels = pixels * 255.0
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)
    assert 0 <= int(levels.round().min()) and int(levels.round().max()) <= 255
