"""Times a ResNet-20 training step of FP, LSQ and BWRF, eager and compiled; prints the ratios.

Usage: ``python -m benchmarks.perf.compile_step_ratios [--device cpu|cuda] [--quick] [--out STEM]``.

One step = zero_grad, forward, loss, backward, SGD (momentum 0.9) step, batch 128 of random
3x32x32 inputs, as ``bwrf-train --compile`` runs it: the module the step calls is compiled
(``torch.compile``, default inductor backend, after the LSQ step sizes are initialised), the
loss of FP/LSQ and the optimizer step stay eager. Every method starts from the same ResNet-20:

- ``fp``: the full-precision ResNet-20, cross-entropy;
- ``lsq``: its ``quantize_model(fp, w_bits=4, a_bits=4)`` copy (first conv and last linear
  8-bit), cross-entropy;
- ``bwrf``: the default ``BWRF(lp, fp)`` around that copy (CE + KD, branches M^1 and M^2
  through the memory-lean FP partner), the wrapper's whole forward compiled.

The first calls of a compiled step compile it; they are timed apart (``first_call_s``, the
compile time) and excluded from the step times. The six steps are then timed interleaved in
rounds (drift hits them alike) with ``torch.utils.benchmark.Timer.blocked_autorange``; the
table gives medians with their IQR, compiled / eager of the medians, and the range of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils import benchmark as torch_benchmark

import bwrf_ext
from benchmarks.perf.bwrf_step_ratios import TrainStep
from benchmarks.report import (
    Run,
    add_common_arguments,
    busy_lines,
    cpu_clocks,
    others_share,
    synchronized,
    time_rounds,
)
from bwrf_ext.models import resnet20

BATCH = 128
W_BITS = A_BITS = 4
METHODS = ("fp", "lsq", "bwrf")
MODES = ("eager", "compiled")
WARMUP_CALLS = 3  # compiles on the first; the others catch a recompile (e.g. grads now set)


def make_step(method: str, mode: str, device: torch.device, batch: int = BATCH) -> TrainStep:
    """A TrainStep with initialised quantizers, not yet stepped; same weights for every step."""
    if method not in METHODS or mode not in MODES:
        raise ValueError(f"make_step: expected a method of {METHODS} and a mode of {MODES}, got "
                         f"{method!r}, {mode!r}")  # fmt: skip
    torch.manual_seed(0)
    fp = resnet20().to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    partner = None
    if method == "fp":
        model: nn.Module = fp.train()
    else:
        lp = bwrf_ext.quantize_model(fp.eval(), W_BITS, A_BITS).train()
        with torch.no_grad():
            lp(x)  # LSQ init of the activation step sizes: eager, before any compile
        model = lp
        if method == "bwrf":
            model, partner = bwrf_ext.BWRF(lp, fp, bwrf_ext.BWRFConfig()).train(), fp
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    run = torch.compile(model) if mode == "compiled" else model
    return TrainStep(f"{method}_{mode}", run, model, partner, optimizer, x, y)


def warm_up(steps: dict[str, TrainStep], device: torch.device) -> dict[str, float]:
    """Seconds of each step's first WARMUP_CALLS calls (compiled: mostly the compile)."""
    seconds = {}
    for name, step in steps.items():
        tic = time.perf_counter()
        for _ in range(WARMUP_CALLS):
            synchronized(step, device)()
        seconds[name] = time.perf_counter() - tic
    return seconds


def summarize(runs: dict[str, list]) -> dict[str, dict]:
    """Per method: median and IQR of both modes, compiled / eager, and its per-round range."""
    summary = {}
    for method in METHODS:
        eager, compiled = (runs[f"{method}_{mode}"] for mode in MODES)
        merged = {m: torch_benchmark.Measurement.merge(r)[0]
                  for m, r in zip(MODES, (eager, compiled), strict=True)}  # fmt: skip
        per_round = [c.median / e.median for e, c in zip(eager, compiled, strict=True)]
        summary[method] = {
            **{f"{m}_median_s": merged[m].median for m in MODES},
            **{f"{m}_iqr_s": merged[m].iqr for m in MODES},
            "compiled_over_eager": merged["compiled"].median / merged["eager"].median,
            "per_round_ratio_min": min(per_round),
            "per_round_ratio_max": max(per_round),
        }
    return summary


def to_markdown(meta: dict, summary: dict, first_call: dict) -> str:
    """Header, one row per method with both modes and the ratio."""
    busy = meta.get("other_processes_cpu_share")
    lines = [
        f"# Training step, ResNet-20 (FP, LSQ W{W_BITS}A{A_BITS}, BWRF W{W_BITS}A{A_BITS}), "
        f"batch {BATCH}: torch.compile / eager (medians, one run)",
        "",
        f"- bwrf_ext backend: **{meta['backend']}**; torch {meta['torch']}; {meta['date']}",
        f"- device: {meta['device']} ({meta['device_name']}), {meta['threads']} threads"
        + (" (quick mode: short timings)" if meta["quick"] else ""),
        "- step: forward + loss + backward + SGD step; compiled: torch.compile (inductor) of the "
        "module the step calls (the model, or the BWRF wrapper), as `bwrf-train --compile`; "
        f"the first {WARMUP_CALLS} calls (compile) excluded and shown apart",
        "- spread: IQR of the step times over all blocks; per-round: compiled / eager of each "
        "interleaved round's medians (min..max)",
    ]
    lines += busy_lines(busy)
    lines += [
        "",
        "| method | eager (IQR) | compiled (IQR) | compiled / eager | per-round | "
        f"first {WARMUP_CALLS} calls eager / compiled |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, row in summary.items():
        lines.append(
            f"| {method} | {row['eager_median_s'] * 1e3:.1f} ms "
            f"({row['eager_iqr_s'] * 1e3:.1f}) | {row['compiled_median_s'] * 1e3:.1f} ms "
            f"({row['compiled_iqr_s'] * 1e3:.1f}) | **{row['compiled_over_eager']:.2f}** | "
            f"{row['per_round_ratio_min']:.2f}..{row['per_round_ratio_max']:.2f} | "
            f"{first_call[f'{method}_eager']:.1f} s / {first_call[f'{method}_compiled']:.1f} s |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parses the command line, measures, prints the table, writes .json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "compile_step_ratios")
    run = Run.begin("compile_step_ratios", parser.parse_args(argv), quick=(0.5, 3),
                    full=(2.0, 5), batch=BATCH, w_bits=W_BITS, a_bits=A_BITS,
                    backend_compile="inductor", warmup_calls=WARMUP_CALLS)  # fmt: skip
    steps = {f"{m}_{mode}": make_step(m, mode, run.device) for m in METHODS for mode in MODES}
    first_call = warm_up(steps, run.device)
    before = cpu_clocks()
    runs = time_rounds(steps, run.device, run.min_run_time, run.rounds, label="compile_step")
    if run.device.type == "cpu":
        run.meta["other_processes_cpu_share"] = others_share(before, cpu_clocks())
    summary = summarize(runs)
    run.write({"methods": summary, "first_calls_s": first_call},
              to_markdown(run.meta, summary, first_call))  # fmt: skip


if __name__ == "__main__":
    main()
