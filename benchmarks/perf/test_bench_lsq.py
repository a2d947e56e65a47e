"""pytest-benchmark timings of bwrf_ext.lsq_fake_quant against its alternatives, one group per case.

Implementations, cases and the timed step live in benchmarks/perf/lsq_ratios.py (whose docstring
says what each one is); this file times them with pytest-benchmark and checks every result against
bwrf_ext.reference, so a broken op fails even in quick mode (``--benchmark-disable``).
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.perf.lsq_ratios import (
    CASES,
    IMPLS,
    MODES,
    QMAX,
    QMIN,
    Case,
    Inputs,
    make_inputs,
    make_step,
    unsupported,
)
from bwrf_ext import build_info, reference

# The composites clamp x/s before rounding (round_pass(clamp(x/s))), the LSQ paper's clip test.
CLIPS_BEFORE_ROUND = {"eager", "compile"}
# Fraction of elements allowed one quantization step apart: the composite divides by s in x's
# dtype where the kernels multiply by the fp32 reciprocal, so rounding ties can land apart.
FORWARD_MISMATCH = {torch.float32: 1e-3, torch.float16: 1e-2}


@functools.cache
def _inputs(case: Case, device: torch.device) -> Inputs:
    """Inputs shared by all tests of a case (16M elements are worth building once)."""
    return make_inputs(case, device)


@functools.cache
def _expected(case: Case, device: torch.device, clip_before_round: bool):
    """(y, grad_x, grad_scale, terms): the reference's, grad_scale in fp64.

    ``terms`` is grad_factor * sum|grad_y * x / s|: summing grad_scale's N terms in a dtype with
    epsilon eps errs by up to about eps * terms (measured: at most 0.04 of that).
    """
    i = _inputs(case, device)
    x, s = i.x.detach(), i.scale.detach()
    y = reference.lsq_fake_quant(x, s, QMIN, QMAX)
    grad_x, _ = reference.lsq_fake_quant_backward(
        i.grad_y, x, s, QMIN, QMAX, i.grad_factor, clip_before_round=clip_before_round
    )
    x64, s64, grad_y64 = x.double(), s.double(), i.grad_y.double()
    _, grad_scale = reference.lsq_fake_quant_backward(
        grad_y64, x64, s64, QMIN, QMAX, i.grad_factor, clip_before_round=clip_before_round
    )
    terms = i.grad_factor * float((grad_y64 * x64 / s64).abs().sum())
    return y, grad_x, float(grad_scale), terms


def _check(impl: str, case: Case, mode: str, inputs: Inputs, y: torch.Tensor) -> None:
    """Asserts the benchmarked call computed LSQ (or, for clone, a copy)."""
    x, dtype = inputs.x.detach(), case.dtype
    if impl == "clone":
        assert torch.equal(y, x)
        if mode != "fwd":
            assert torch.equal(inputs.x.grad, inputs.grad_y)
        return
    y_ref, gx_ref, gs_ref, terms = _expected(case, x.device, impl in CLIPS_BEFORE_ROUND)
    assert y.dtype == dtype and y.shape == x.shape
    step = float(inputs.scale.detach())
    off = (y != y_ref).float().mean().item()
    assert off <= FORWARD_MISMATCH[dtype], f"{impl}: y differs from the reference at {off:.2%}"
    worst = (y.float() - y_ref.float()).abs().max().item()
    assert worst <= 1.01 * step, f"{impl}: y is {worst} off the reference (step {step})"
    if mode == "fwd":
        return
    eps = torch.finfo(dtype).eps
    bad = (inputs.x.grad.float() - gx_ref.float()).abs() > 8 * eps * gx_ref.float().abs()
    assert bad.float().mean().item() <= 1e-4, f"{impl}: grad_x differs at {bad.sum()} elements"
    # Ours sums in fp32 whatever x's dtype; the composites sum in x's dtype.
    tol = torch.finfo(torch.float32 if impl in ("ours", "op") else dtype).eps * terms
    tol += torch.finfo(inputs.scale.dtype).eps * abs(gs_ref)  # grad_scale is stored in s's dtype
    got = float(inputs.scale.grad)
    assert abs(got - gs_ref) <= tol, f"{impl}: grad_scale {got} vs {gs_ref} (tol {tol:.2e})"


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "-"))
def test_lsq_fake_quant(benchmark, bench_device: torch.device, case: Case, mode: str, impl: str):
    """Times one implementation on one case; ratios come from the group's shared table."""
    reason = unsupported(impl, case, mode)
    if reason is not None:
        pytest.skip(reason)
    benchmark.group = f"lsq {case.name} {mode}"
    benchmark.extra_info.update(impl=impl, backend=build_info()["backend"])
    inputs = _inputs(case, bench_device)
    step = make_step(IMPLS[impl], inputs, mode)
    if bench_device.type == "cuda":  # pytest-benchmark's wall clock needs the kernels finished
        unsynced = step

        def step() -> torch.Tensor:
            y = unsynced()
            torch.cuda.synchronize()
            return y

    if not benchmark.disabled:
        step()  # warm-up outside the calibration: torch.compile compiles on its first call
    y = benchmark(step)
    if mode == "fwd+bwd acc":  # the gradients hold a sum over every call: check one call's
        inputs.x.grad = inputs.scale.grad = None
        y = step()
    _check(impl, case, mode, inputs, y)
