"""Times one ResNet-20 W2A2 training step of LSQ, BWRF naive and BWRF batched; prints the ratios.

Usage: ``python -m benchmarks.perf.bwrf_step_ratios [--device cpu|cuda] [--quick] [--out STEM]``.

One step = zero_grad, forward, loss, backward, SGD (momentum 0.9) step, batch 128 of random
3x32x32 inputs. Every variant starts from the same ResNet-20 (the FP partner, eval mode) and its
``quantize_model(fp, w_bits=2, a_bits=2)`` copy (first conv and last linear 8-bit), step sizes
initialised by one forward before timing:

- ``lsq``: LSQ QAT alone, cross-entropy on the LP logits;
- ``bwrf_naive``: ``BWRF(lp, fp, BWRFConfig(batched=False))``: LP forward, FP forward (no grad),
  branches M^1 and M^2 each run through the FP blocks on their own;
- ``bwrf_batched`` (ours): the default ``BWRF``: at each FP block all branches in one call,
  through the memory-lean partner (``bwrf_ext.lean``);
- ``bwrf_plain``: ``BWRFConfig(lean_partner=False)``: batched, the partner on plain autograd
  (benchmarks/perf/lean_partner_ratios.py compares it with bwrf_batched).

Time: interleaved rounds of ``torch.utils.benchmark.Timer.blocked_autorange``, medians. Memory,
two measures (tracemalloc does not see torch's CPU allocator):

- saved tensors: bytes of the unique storages autograd saves for backward in one forward
  (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded), the activation memory;
- peak RSS: the resident-set high-water of a fresh subprocess per variant over 3 steps (reset
  after setup, see :func:`rss_child`), and its growth over the RSS after setup (models, data,
  one no-grad forward).

Target: bwrf_batched / lsq <= 1.8 (stretch 1.6).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

import bwrf_ext
from benchmarks.report import (
    Run,
    add_common_arguments,
    busy_lines,
    cpu_clocks,
    others_share,
    time_interleaved,
)
from bwrf_ext.memory import saved_activation_bytes
from bwrf_ext.models import resnet20

BATCH = 128
W_BITS = A_BITS = 2
TARGET, STRETCH = 1.8, 1.6
VARIANTS = ("bwrf_batched", "lsq", "bwrf_naive", "bwrf_plain")
RSS_STEPS = 3


@dataclasses.dataclass
class TrainStep:
    """One training step on fixed data; calling it returns the loss (a 0-dim tensor).

    Attributes:
        model: what is called on (x, y): the LP model (lsq) or the BWRF wrapper.
        lp_model: the model being trained.
        fp_model: the FP partner (None for lsq).
    """

    variant: str
    model: nn.Module
    lp_model: nn.Module
    fp_model: nn.Module | None
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor

    def loss(self) -> torch.Tensor:
        """Forward and loss only."""
        if self.fp_model is None:
            return F.cross_entropy(self.model(self.x), self.y)
        return self.model(self.x, self.y).loss

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def make_step(variant: str, device: torch.device, batch: int = BATCH) -> TrainStep:
    """A TrainStep with initialised quantizers, not yet stepped; same weights for every variant."""
    if variant not in VARIANTS:
        raise ValueError(f"make_step: variant must be one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(0)
    fp = resnet20().to(device).eval()
    lp = bwrf_ext.quantize_model(fp, W_BITS, A_BITS).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    with torch.no_grad():
        lp(x)  # LSQ init of the activation step sizes, outside the timed steps
    if variant == "lsq":
        model, partner = lp, None
    else:
        config = bwrf_ext.BWRFConfig(
            batched=variant != "bwrf_naive", lean_partner=variant != "bwrf_plain"
        )
        model, partner = bwrf_ext.BWRF(lp, fp, config).train(), fp
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return TrainStep(variant, model, lp, partner, optimizer, x, y)


def saved_tensor_bytes(step: TrainStep) -> int:
    """Bytes of the unique non-parameter storages autograd saves in one forward of the step."""
    parameters = [*step.model.parameters()]
    if step.fp_model is not None:
        parameters += step.fp_model.parameters()
    with saved_activation_bytes(parameters) as saved:
        loss = step.loss()
    del loss
    return saved.total


def _status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_child(variant: str) -> None:
    """In a fresh process: prints JSON with the RSS after setup and its high-water in the steps.

    Importing torch and building the models peaks above what the steps use, so the high-water
    mark is reset after setup (``5`` into /proc/self/clear_refs, Linux >= 4.0); without that,
    ``ru_maxrss`` over the whole process is reported and ``reset`` is False.
    """
    step = make_step(variant, torch.device("cpu"))
    setup = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(RSS_STEPS):
        step()
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"setup_kib": setup, "peak_kib": peak, "reset": reset}))


def peak_rss(variant: str) -> dict[str, int]:
    """ru_maxrss (KiB) of a fresh subprocess running RSS_STEPS steps of the variant."""
    result = subprocess.run(
        [sys.executable, "-m", __spec__.name, "--rss-child", variant],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_variants(device: torch.device, min_run_time: float, rounds: int) -> dict[str, float]:
    """Median seconds per step of every variant, measured interleaved."""
    steps = {variant: make_step(variant, device) for variant in VARIANTS}
    return time_interleaved(steps, device, min_run_time, rounds, label="bwrf_step")


def to_markdown(meta: dict, medians: dict, saved: dict, rss: dict) -> str:
    """Header, one row per variant, and the verdict on the target."""
    ratio = medians["bwrf_batched"] / medians["lsq"]
    verdict = "met" if ratio <= TARGET else "NOT met"
    stretch = "met" if ratio <= STRETCH else "not met"
    busy = meta.get("other_processes_cpu_share")
    lines = [
        f"# BWRF step, ResNet-20 W{W_BITS}A{A_BITS}, batch {BATCH} (medians, one run)",
        "",
        f"- bwrf_ext backend: **{meta['backend']}**; torch {meta['torch']}; {meta['date']}",
        f"- device: {meta['device']} ({meta['device_name']}), {meta['threads']} threads"
        + (" (quick mode: short timings)" if meta["quick"] else ""),
        "- step: forward + loss + backward + SGD step; LP first conv and last linear 8-bit; "
        "BWRF default loss (CE + KD, T=2, alpha=1, branches M^1, M^2, w=1)",
        "- memory: saved = unique non-parameter storages autograd saves in one forward "
        "(saved_tensors_hooks); peak RSS = VmHWM of a fresh process over "
        f"{RSS_STEPS} steps, reset after setup (growth = peak - RSS after setup)",
    ]
    lines += busy_lines(busy)
    lines += [
        "",
        "| variant | median step | / lsq | saved tensors | peak RSS | RSS growth in steps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant, seconds in medians.items():
        r = rss.get(variant)
        rss_cells = (
            f"{r['peak_kib'] / 1024:.0f} MiB | {(r['peak_kib'] - r['setup_kib']) / 1024:.0f} MiB"
            if r else "n/a | n/a"
        )
        lines.append(
            f"| {variant} | {seconds * 1e3:.1f} ms | {seconds / medians['lsq']:.2f} | "
            f"{saved[variant] / 2**20:.1f} MiB | {rss_cells} |"
        )
    lines += [
        "",
        f"Target bwrf_batched / lsq <= {TARGET}: **{verdict}** ({ratio:.2f}); stretch "
        f"<= {STRETCH}: {stretch}. bwrf_batched / bwrf_naive: "
        f"{medians['bwrf_batched'] / medians['bwrf_naive']:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parses the command line, measures, prints the table, writes .json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "bwrf_step_ratios")
    parser.add_argument("--rss-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child)
        return
    run = Run.begin("bwrf_step_ratios", args, quick=(0.5, 1), full=(3.0, 4),
                    batch=BATCH, w_bits=W_BITS, a_bits=A_BITS)
    saved = {v: saved_tensor_bytes(make_step(v, run.device)) for v in VARIANTS}
    rss = {v: peak_rss(v) for v in VARIANTS} if run.device.type == "cpu" else {}
    before = cpu_clocks()
    medians = time_variants(run.device, run.min_run_time, run.rounds)
    if run.device.type == "cpu":
        run.meta["other_processes_cpu_share"] = others_share(before, cpu_clocks())
    record = {
        "median_s": medians,
        "over_lsq": {v: s / medians["lsq"] for v, s in medians.items()},
        "saved_tensor_bytes": saved,
        "rss_kib": rss,
    }
    run.write(record, to_markdown(run.meta, medians, saved, rss))


if __name__ == "__main__":
    main()
