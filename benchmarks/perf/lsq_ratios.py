"""Times bwrf_ext.lsq_fake_quant side by side with its alternatives and writes the ratio table.

Usage: ``python -m benchmarks.perf.lsq_ratios [--device cpu|cuda] [--quick] [--out STEM]``.

Every (size, dtype, mode) case times six implementations in one process, interleaved in rounds
so that drift and the allocator's state hit them alike, with
``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronizes CUDA around each block):

- ``ours``: ``bwrf_ext.lsq_fake_quant`` (compiled kernels, or the reference when not built);
- ``op``: ``torch.ops.bwrf_ext.lsq_fake_quant`` called directly: ours without the Python
  wrapper's argument checks (ours/op is the wrapper's per-call overhead; the 1-element case shows
  the fixed cost of a call through the dispatcher);
- ``eager``: the composite LSQ most research code uses (grad_scale + round_pass chain,
  ``benchmarks/perf/composite_lsq.py``);
- ``learnable``: ``torch._fake_quantize_learnable_per_tensor_affine`` with zero_point 0;
- ``compile``: ``torch.compile(composite, dynamic=False)``;
- ``clone``: ``x.clone()``, an out-of-place op of the same size with its allocation: the
  bandwidth limit for an op that returns a new tensor. In fwd+bwd its backward copies grad_y into
  x.grad (autograd's AccumulateGrad cannot steal a grad_y we keep): two out-of-place passes, a
  lower bound on the traffic of any fwd+bwd that returns new y and grad_x tensors.

``fwd`` is the training forward: x and scale require grad, so each implementation also saves what
its backward needs. ``fwd+bwd`` adds ``y.backward(grad_y)`` with a fixed grad_y and the .grad of x
and scale set to None before every call; ``fwd+bwd acc`` keeps them, so autograd adds into them
(as a weight's gradient over micro-batches, and a step size's always). Per-tensor signed 4-bit
(qmin=-8, qmax=7), scale at the LSQ init 2*mean|x|/sqrt(qmax), grad_factor 1/sqrt(numel*qmax).

Ratios are ours / other (below 1 ours is faster), taken per round from the interleaved medians:
the table gives their median over the rounds and the range [min, max] beside it, so a ratio
that swings says so. The minor page faults per call (fresh memory from the OS, which the CPU
allocator returns and refetches for large tensors) of ours and the best alternative are
recorded, since they move CPU timings of large tensors between runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import resource
import statistics
from collections.abc import Callable

import torch
from torch.utils import benchmark as torch_benchmark

import bwrf_ext
from benchmarks.perf.composite_lsq import composite_lsq_fake_quant
from benchmarks.report import (
    BUSY_SHARE,
    Run,
    add_common_arguments,
    cpu_clocks,
    others_share,
)

QMIN, QMAX = -8, 7
MODES = ("fwd", "fwd+bwd", "fwd+bwd acc")
ALTERNATIVES = ("eager", "learnable", "compile")  # what "best alternative" is chosen from


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked tensor: a size label, its shape and dtype."""

    size: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def name(self) -> str:
        """E.g. ``"16M fp32"``; also the pytest id."""
        return f"{self.size} {str(self.dtype).removeprefix('torch.').replace('float', 'fp')}"


CASES = (
    Case("1", (1,), torch.float32),  # nothing to compute: the fixed cost of one call
    Case("16K", (128, 128), torch.float32),  # a weight tensor (the largest ResNet-20 conv is 37K)
    Case("1M", (64, 16, 32, 32), torch.float32),  # an activation: batch 64, 16 channels, 32x32
    Case("16M", (256, 64, 32, 32), torch.float32),
    Case("1M", (64, 16, 32, 32), torch.float16),
)


@dataclasses.dataclass
class Inputs:
    """Leaf tensors of one case: x (case shape), scale (1,) in x's dtype, a fixed grad_y."""

    x: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor  # fp32 (1,) zeros, only for torch's learnable op
    grad_y: torch.Tensor
    grad_factor: float


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """Random normal x and grad_y (same values on every device), scale at the LSQ init."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, generator=gen).to(device, case.dtype)
    grad_y = torch.randn(case.shape, generator=gen).to(device, case.dtype)
    # A (1,) scale, not (): torch's learnable op rejects 0-dim scales. Same dtype as x, so the
    # composite's x / s stays in x's dtype (an fp32 (1,) tensor would promote y to fp32).
    scale = (2 * x.float().abs().mean() / math.sqrt(QMAX)).to(case.dtype).reshape(1)
    return Inputs(
        x=x.requires_grad_(),
        scale=scale.requires_grad_(),
        zero_point=torch.zeros(1, device=device),
        grad_y=grad_y,
        grad_factor=1.0 / math.sqrt(x.numel() * QMAX),
    )


compiled_composite = torch.compile(composite_lsq_fake_quant, dynamic=False)

IMPLS: dict[str, Callable[[Inputs], torch.Tensor]] = {
    "ours": lambda i: bwrf_ext.lsq_fake_quant(i.x, i.scale, QMIN, QMAX, i.grad_factor),
    "op": lambda i: torch.ops.bwrf_ext.lsq_fake_quant(i.x, i.scale, QMIN, QMAX, i.grad_factor),
    "eager": lambda i: composite_lsq_fake_quant(i.x, i.scale, QMIN, QMAX, i.grad_factor),
    "learnable": lambda i: torch._fake_quantize_learnable_per_tensor_affine(
        i.x, i.scale, i.zero_point, QMIN, QMAX, i.grad_factor
    ),
    "compile": lambda i: compiled_composite(i.x, i.scale, QMIN, QMAX, i.grad_factor),
    "clone": lambda i: i.x.clone(),
}


def unsupported(impl: str, case: Case, mode: str) -> str | None:
    """Why an implementation cannot run a case, or None when it can."""
    if impl == "learnable" and mode != "fwd" and case.dtype != torch.float32:
        return "torch's learnable fake-quant backward takes fp32 only"
    return None


def make_step(
    impl: Callable[[Inputs], torch.Tensor], inputs: Inputs, mode: str
) -> Callable[[], torch.Tensor]:
    """The timed callable: one forward, or forward + backward; returns y.

    Returns:
        A function of no arguments; after a ``fwd+bwd`` call x.grad and scale.grad hold the
        result (``fwd+bwd acc`` adds it to what they held).
    """
    if mode not in MODES:
        raise ValueError(f"make_step: mode must be one of {MODES}, got {mode!r}")
    if mode == "fwd":
        return lambda: impl(inputs)

    def fwd_bwd() -> torch.Tensor:
        if mode == "fwd+bwd":
            inputs.x.grad = None
            inputs.scale.grad = None
        y = impl(inputs)
        y.backward(inputs.grad_y)
        return y

    return fwd_bwd


def time_case(
    case: Case, mode: str, device: torch.device, min_run_time: float, rounds: int
) -> dict:
    """Median seconds per call of every implementation on one case, measured interleaved."""
    inputs = make_inputs(case, device)
    timers, notes = {}, {}
    for name, impl in IMPLS.items():
        notes[name] = unsupported(name, case, mode)
        if notes[name] is not None:
            continue
        step = make_step(impl, inputs, mode)
        step()  # warm-up: compiles, fills the caching allocator
        timers[name] = torch_benchmark.Timer(
            "step()",
            globals={"step": step},
            label="lsq_fake_quant",
            sub_label=f"{case.name} {mode}",
            description=name,
            num_threads=torch.get_num_threads(),  # Timer's default would time on 1 thread
        )
    runs: dict[str, list] = {name: [] for name in timers}
    faults = dict.fromkeys(timers, 0)
    calls = dict.fromkeys(timers, 0)
    before = cpu_clocks()
    for _ in range(rounds):
        for name, timer in timers.items():
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            runs[name].append(timer.blocked_autorange(min_run_time=min_run_time))
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
            calls[name] += runs[name][-1].number_per_run * len(runs[name][-1].raw_times)
    busy_share = others_share(before, cpu_clocks())
    medians = {
        name: (torch_benchmark.Measurement.merge(runs[name])[0].median if name in runs else None)
        for name in IMPLS
    }
    present = [n for n in ALTERNATIVES if medians[n] is not None]
    best = min(present, key=lambda n: medians[n])
    per_round = {  # ours / other in each round: both timed back to back, so drift cancels
        name: [o.median / m.median for o, m in zip(runs["ours"], runs[name], strict=True)]
        for name in timers
        if name != "ours"
    }
    ratios = {n: statistics.median(r) for n, r in per_round.items()}
    spread = {n: [min(r), max(r)] for n, r in per_round.items()}
    ratios.update({n: None for n in IMPLS if n not in timers})
    ratios["best"], spread["best"] = ratios[best], spread[best]
    return {
        "case": case.name,
        "size": case.size,
        "shape": list(case.shape),
        "dtype": str(case.dtype).removeprefix("torch."),
        "mode": mode,
        "median_s": medians,
        "best_alternative": best,
        "ours_over": ratios,
        "ours_over_range": spread,
        "rounds": rounds,
        "minor_faults_per_call": {n: faults[n] / calls[n] for n in timers},
        "notes": {n: v for n, v in notes.items() if v is not None},
        "other_processes_cpu_share": busy_share,
    }


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "n/a"
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"


def _fmt_range(r: dict, name: str) -> str:
    """A ratio with its range over the rounds: ``0.52 [0.48-0.61]``."""
    low_high = r["ours_over_range"].get(name)
    ratio = _fmt_ratio(r["ours_over"][name])
    return (
        ratio
        if low_high is None
        else f"{ratio} [{_fmt_ratio(low_high[0])}-{_fmt_ratio(low_high[1])}]"
    )


def to_markdown(meta: dict, rows: list[dict]) -> str:
    """The header and one table row per (size, dtype, mode): medians, then ours / other."""
    names = list(IMPLS)
    shares = [r["other_processes_cpu_share"] for r in rows]
    share = None if None in shares else max(shares)
    busy = meta["device"].startswith("cpu") and share is not None and share > BUSY_SHARE
    lines = [
        "# lsq_fake_quant: ours vs alternatives (medians, side by side in one run)",
        "",
        f"- bwrf_ext backend: **{meta['backend']}**; torch {meta['torch']}; {meta['date']}",
        f"- device: {meta['device']} ({meta['device_name']}), {meta['threads']} threads"
        + (" (quick mode: short timings)" if meta["quick"] else ""),
        "- most CPU time other processes took while a case was timed: "
        + ("unknown" if share is None else f"{share:.0%}")
        + (" **(busy machine: CPU timings unreliable)**" if busy else ""),
        "- CPU allocator: "
        + (", ".join(f"`{k}={v}`" for k, v in meta.get("allocator_env", {}).items())
           or "glibc defaults (blocks >= 32 MiB are mmap'ed and unmapped per call)"),
        f"- per-tensor qmin={QMIN}, qmax={QMAX}; fwd = training forward (inputs require grad); "
        "acc = gradients accumulate into x.grad and scale.grad",
        f"- ratios are ours / other, < 1 means ours is faster: the median of {meta['rounds']} "
        "interleaved rounds' ratios, [min-max] over the rounds",
        "",
        "| case | mode | " + " | ".join(names) + " | ours/best alt | ours/compile | "
        "ours/learnable | ours/op (wrapper) | ours/clone | page faults per call: ours, best alt |",
        "|---|---|" + "---:|" * (len(names) + 6),
    ]
    for r in rows:
        best = r["best_alternative"]
        faults = r["minor_faults_per_call"]
        cells = [_fmt_time(r["median_s"][n]) for n in names]
        cells += [f"{_fmt_range(r, 'best')} ({best})", _fmt_range(r, "compile"),
                  _fmt_range(r, "learnable"), _fmt_range(r, "op"), _fmt_range(r, "clone"),
                  f"{faults['ours']:.0f}, {faults[best]:.0f}"]  # fmt: skip
        flag = busy and (r["other_processes_cpu_share"] or 0) > BUSY_SHARE
        case = f"{r['case']}{' (busy)' if flag else ''}"
        lines.append(f"| {case} | {r['mode']} | " + " | ".join(cells) + " |")
    notes = sorted({f"{n}: {v}" for r in rows for n, v in r["notes"].items()})
    lines += [""] + [f"- n/a {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parses the command line, times every case, prints the table, writes .json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "lsq_ratios")
    run = Run.begin(
        "lsq_ratios",
        parser.parse_args(argv),
        quick=(0.03, 3),
        full=(0.15, 15),
        qmin=QMIN,
        qmax=QMAX,
    )
    rows = []
    for case in CASES:
        for mode in MODES:
            rows.append(time_case(case, mode, run.device, run.min_run_time, run.rounds))
            print(f"  timed {case.name} {mode}", flush=True)
    run.write({"rows": rows}, to_markdown(run.meta, rows))


if __name__ == "__main__":
    main()
