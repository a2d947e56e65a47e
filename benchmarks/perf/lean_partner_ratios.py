"""Memory and time of a BWRF step with the lean FP partner vs plain autograd; prints the ratios.

Usage: ``python -m benchmarks.perf.lean_partner_ratios [--device cpu|cuda] [--quick] [--out STEM]``.

The ResNet-20 W2A2 step of benchmarks/perf/bwrf_step_ratios.py (batch 128, branches M^1 and M^2) in
three variants: ``bwrf_batched`` (ours: the default, lean partner), ``bwrf_plain``
(``BWRFConfig(lean_partner=False)``) and ``lsq`` (LSQ alone, the memory baseline). Measures:

- branch saved bytes: unique non-parameter storages autograd saves while the MP branches alone
  run (``FrozenPartner.branches`` on the LP block outputs; saved_tensors_hooks);
- step saved bytes: the same over the whole forward of the step;
- peak tensor memory: the high-water mark of the bytes of live tensor storages allocated during
  one step (after a warm-up step), counted by a TorchDispatchMode (CPU; the allocator's view,
  free of malloc caching), or ``torch.cuda.max_memory_allocated`` minus the memory before the
  step (CUDA); and on CPU the peak RSS growth: VmHWM of a fresh process over 3 steps minus its
  RSS after setup (includes glibc heap caching and fragmentation);
- step time: interleaved medians.

Targets (issue #5): branch saved bytes plain / lean >= 20; peak memory growth of the BWRF step
<= 1.1x the LSQ step's; step time lean <= plain.
"""

from __future__ import annotations

import argparse
import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.perf.bwrf_step_ratios import (
    A_BITS,
    BATCH,
    W_BITS,
    TrainStep,
    make_step,
    peak_rss,
    saved_tensor_bytes,
)
from benchmarks.report import (
    Run,
    add_common_arguments,
    busy_lines,
    cpu_clocks,
    others_share,
    time_interleaved,
)
from bwrf_ext.memory import saved_activation_bytes

VARIANTS = ("bwrf_batched", "bwrf_plain", "lsq")
BRANCH_TARGET, PEAK_TARGET = 20.0, 1.1


def branch_saved_bytes(step: TrainStep) -> int:
    """Bytes autograd saves while the step's MP branches alone run through the FP partner."""
    bwrf = step.model
    with torch.no_grad():
        outputs = bwrf.lp_split.block_outputs(step.x)
    entries = {i: outputs[i - 1].detach().requires_grad_() for i in bwrf.branch_weights}
    with saved_activation_bytes() as saved:
        logits = bwrf.partner.branches(entries, batched=bwrf.config.batched)
    del logits
    return saved.total


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages ops allocate while it is active, and their peak.

    A storage is counted once, from the op that returns it until it is freed (a weakref
    finalizer); tensors that exist before the mode starts (weights, data) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def tensor_peak_growth(variant: str, device: torch.device) -> int:
    """Peak bytes of live tensors one step allocates (after a warm-up step)."""
    step = make_step(variant, device)
    step()  # optimizer state
    with LiveTensorBytes() as tracker:
        step()
    return tracker.peak


def cuda_peak_growth(variant: str, device: torch.device) -> int:
    """Bytes of CUDA memory one step allocates at its peak above what was allocated before it."""
    step = make_step(variant, device)
    step()  # optimizer state and allocator warm-up
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def to_markdown(
    meta: dict, medians: dict, saved: dict, branch: dict, peak: dict, rss: dict
) -> str:
    """Header, one row per variant, and the verdict on each target."""
    branch_ratio = branch["bwrf_plain"] / max(branch["bwrf_batched"], 1)
    peak_ratio = peak["bwrf_batched"] / peak["lsq"]
    time_ratio = medians["bwrf_batched"] / medians["bwrf_plain"]
    unit = "CUDA peak growth" if meta["device"].startswith("cuda") else "peak tensor memory"
    busy = meta.get("other_processes_cpu_share")
    lines = [
        f"# Lean FP partner, BWRF step, ResNet-20 W{W_BITS}A{A_BITS}, batch {BATCH}",
        "",
        f"- bwrf_ext backend: **{meta['backend']}**; torch {meta['torch']}; {meta['date']}",
        f"- device: {meta['device']} ({meta['device_name']}), {meta['threads']} threads"
        + (" (quick mode: short timings)" if meta["quick"] else ""),
        "- bwrf_batched = default BWRF (lean partner); bwrf_plain = lean_partner=False",
        "- saved = unique non-parameter storages autograd saves (saved_tensors_hooks): of the MP "
        "branches alone, and of the whole step's forward",
    ]
    lines += busy_lines(busy)
    lines += [
        "",
        f"| variant | median step | branch saved | step saved | {unit} | peak RSS growth |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        branch_cell = f"{branch[variant] / 2**20:.2f} MiB" if variant in branch else "-"
        rss_cell = f"{rss[variant] / 2**20:.0f} MiB" if variant in rss else "n/a"
        lines.append(
            f"| {variant} | {medians[variant] * 1e3:.1f} ms | {branch_cell} | "
            f"{saved[variant] / 2**20:.1f} MiB | {peak[variant] / 2**20:.1f} MiB | {rss_cell} |"
        )

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines += [
        "",
        f"- branch saved bytes plain / lean >= {BRANCH_TARGET:g}: "
        f"**{verdict(branch_ratio >= BRANCH_TARGET)}** ({branch_ratio:.1f}x)",
        f"- {unit} BWRF (lean) / LSQ <= {PEAK_TARGET}: **{verdict(peak_ratio <= PEAK_TARGET)}** "
        f"({peak_ratio:.3f}; plain: {peak['bwrf_plain'] / peak['lsq']:.3f})",
        f"- step time lean / plain <= 1: **{verdict(time_ratio <= 1.0)}** ({time_ratio:.2f})",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parses the command line, measures, prints the table, writes .json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "lean_partner_ratios")
    args = parser.parse_args(argv)
    run = Run.begin("lean_partner_ratios", args, quick=(0.5, 1), full=(3.0, 4),
                    batch=BATCH, w_bits=W_BITS, a_bits=A_BITS)
    saved = {v: saved_tensor_bytes(make_step(v, run.device)) for v in VARIANTS}
    branch = {v: branch_saved_bytes(make_step(v, run.device)) for v in VARIANTS if v != "lsq"}
    rss: dict[str, int] = {}
    if run.device.type == "cpu":
        peak = {v: tensor_peak_growth(v, run.device) for v in VARIANTS}
        for v in VARIANTS:
            r = peak_rss(v)
            rss[v] = (r["peak_kib"] - r["setup_kib"]) * 1024
    else:
        peak = {v: cuda_peak_growth(v, run.device) for v in VARIANTS}
    before = cpu_clocks()
    steps = {v: make_step(v, run.device) for v in VARIANTS}
    medians = time_interleaved(steps, run.device, run.min_run_time, run.rounds, label="lean")
    if run.device.type == "cpu":
        run.meta["other_processes_cpu_share"] = others_share(before, cpu_clocks())
    record = {
        "median_s": medians,
        "saved_tensor_bytes": saved,
        "branch_saved_bytes": branch,
        "peak_growth_bytes": peak,
        "peak_rss_growth_bytes": rss,
        "branch_saved_plain_over_lean": branch["bwrf_plain"] / max(branch["bwrf_batched"], 1),
        "peak_bwrf_over_lsq": peak["bwrf_batched"] / peak["lsq"],
        "time_lean_over_plain": medians["bwrf_batched"] / medians["bwrf_plain"],
    }
    run.write(record, to_markdown(run.meta, medians, saved, branch, peak, rss))


if __name__ == "__main__":
    main()
