"""pytest-benchmark timings of one ResNet-32 ContSup step (E2E, K=16 R0, K=8 E), and its memory.

The step lives in benchmarks/perf/contsup_memory.py (its docstring says what is measured), the
live-saved-bytes tracker in bwrf_ext/memory.py; K=16 R0 is "ours" in the ratio line of
benchmarks/conftest.py. Each test also checks that the step trained every part and, against
E2E, the memory target, so a broken step fails in quick mode (``--benchmark-disable``) too.
Batch 16 keeps quick mode short; the saved bytes scale with the batch, so the ratio is the one
at batch 128.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.perf.contsup_memory import TARGET, batch_of, make_contsup
from benchmarks.report import synchronized
from bwrf_ext import build_info
from bwrf_ext.memory import saved_activation_bytes

BATCH = 16
CASES = {"e2e": (1, "R0"), "k16_r0": (16, "R0"), "k8_e": (8, "E")}


def _peak_saved(num_modules: int, variant: str, device: torch.device) -> int:
    cs = make_contsup(num_modules, variant, device)
    x, y = batch_of(BATCH, device)
    with saved_activation_bytes(cs.parameters()) as tracker:
        cs.train_step(x, y)
    assert not tracker.live  # every graph was freed by its backward
    return tracker.peak


@pytest.fixture
def one_thread():
    """Memory checks do not time anything: one thread avoids OpenMP barrier stalls on shared
    CPU cores (the timed steps keep torch's default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def e2e_peak(bench_device: torch.device, one_thread) -> int:
    return _peak_saved(1, "R0", bench_device)


def test_live_tracker_on_e2e_equals_all_saved_storages(bench_device: torch.device, e2e_peak):
    """End to end, the peak is every storage one forward saves (an independent count)."""
    cs = make_contsup(1, "R0", bench_device)
    x, y = batch_of(BATCH, bench_device)
    params = {p.untyped_storage().data_ptr() for p in cs.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(cs.model(x), y)
    del loss
    assert e2e_peak == sum(storages.values()) > 0


def test_k16_r0_meets_the_memory_target(bench_device: torch.device, e2e_peak, one_thread):
    k16 = _peak_saved(16, "R0", bench_device)
    assert k16 <= TARGET * e2e_peak, f"K=16 R0 peak saved {k16 / e2e_peak:.1%} of E2E"


@pytest.mark.parametrize("case", CASES)
def test_contsup_step(benchmark, bench_device: torch.device, case: str):
    """Times one training step; ratios come from the group's shared table."""
    num_modules, variant = CASES[case]
    benchmark.group = f"contsup_step resnet32 batch {BATCH}"
    benchmark.extra_info.update(impl="ours" if case == "k16_r0" else case,
                                backend=build_info()["backend"])
    cs = make_contsup(num_modules, variant, bench_device)
    optimizer = torch.optim.SGD(cs.parameters(), lr=0.05, momentum=0.9)
    x, y = batch_of(BATCH, bench_device)
    before = {n: p.detach().clone() for n, p in cs.named_parameters()}

    def step() -> torch.Tensor:
        return cs.train_step(x, y, optimizer).loss

    loss = benchmark(synchronized(step, bench_device))
    assert torch.isfinite(loss)
    for name, p in cs.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name
