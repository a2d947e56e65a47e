"""Times one QAT training step of ResNet-20 (float, ours, eager composite) and prints the ratios.

Usage: ``python -m benchmarks.perf.qat_step_ratios [--device cpu|cuda] [--quick] [--out STEM]``.

One step = zero_grad, forward, cross-entropy, backward, SGD (momentum 0.9) step, batch 128 of
random 3x32x32 inputs, model in train mode. Variants, built from the same initial weights:

- ``float``: the full-precision ResNet-20;
- ``ours``: ``bwrf_ext.quantize_model(model, w_bits=4, a_bits=4)`` (W4A4, first conv and last
  linear 8-bit), quantizers running the fused ``bwrf_ext.lsq_fake_quant``;
- ``composite``: the same layers switched by ``use_composite``
  (``benchmarks/perf/composite_lsq.py``) to the eager research-code LSQ (grad_scale +
  round_pass chain of ATen ops).

The variants are timed interleaved in rounds (drift hits them alike) with
``torch.utils.benchmark.Timer.blocked_autorange``; the table gives medians and ours / other.
Target: ours / float <= 1.3.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import bwrf_ext
from benchmarks.perf.composite_lsq import use_composite
from benchmarks.report import Run, add_common_arguments, time_interleaved
from bwrf_ext.models import resnet20

BATCH = 128
W_BITS = A_BITS = 4
TARGET_OURS_OVER_FLOAT = 1.3
VARIANTS = ("ours", "float", "composite")


def build_model(variant: str, device: torch.device, seed: int = 0) -> nn.Module:
    """ResNet-20 with the same initial weights for every variant, converted as the variant says."""
    torch.manual_seed(seed)
    model = resnet20().to(device)
    if variant == "float":
        return model
    if variant not in VARIANTS:
        raise ValueError(f"build_model: variant must be one of {VARIANTS}, got {variant!r}")
    model = bwrf_ext.quantize_model(model, W_BITS, A_BITS, inplace=True)
    # The composite clamps x/s before rounding: the paper's clip test, the default.
    return use_composite(model) if variant == "composite" else model


@dataclasses.dataclass
class QatStep:
    """One training step on fixed data; calling it returns the loss (a 0-dim tensor)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def make_step(variant: str, device: torch.device, batch: int = BATCH) -> QatStep:
    """A QatStep whose quantizers are initialised (one forward on the batch), not yet stepped."""
    model = build_model(variant, device).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    with torch.no_grad():
        model(x)  # LSQ init of the activation step sizes, outside the timed steps
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return QatStep(model, optimizer, x, y)


def time_variants(device: torch.device, min_run_time: float, rounds: int) -> dict[str, float]:
    """Median seconds per step of every variant, measured interleaved."""
    steps = {variant: make_step(variant, device) for variant in VARIANTS}
    return time_interleaved(steps, device, min_run_time, rounds, label="qat_step")


def to_markdown(meta: dict, medians: dict[str, float]) -> str:
    """The header, one row per variant (median, img/s, ours / variant) and the target verdict."""
    ours = medians["ours"]
    verdict = "met" if ours / medians["float"] <= TARGET_OURS_OVER_FLOAT else "NOT met"
    lines = [
        f"# QAT step, ResNet-20 W{W_BITS}A{A_BITS}, batch {BATCH} (medians, one run)",
        "",
        f"- bwrf_ext backend: **{meta['backend']}**; torch {meta['torch']}; {meta['date']}",
        f"- device: {meta['device']} ({meta['device_name']}), {meta['threads']} threads"
        + (" (quick mode: short timings)" if meta["quick"] else ""),
        "- step: forward + cross-entropy + backward + SGD step, train mode; first conv and "
        "last linear 8-bit",
        "",
        "| variant | median step | images/s | ours / variant |",
        "|---|---:|---:|---:|",
    ]
    for variant, seconds in medians.items():
        lines.append(
            f"| {variant} | {seconds * 1e3:.1f} ms | {BATCH / seconds:.0f} | {ours / seconds:.2f} |"
        )
    lines += [
        "",
        f"Target ours / float <= {TARGET_OURS_OVER_FLOAT}: **{verdict}** "
        f"({ours / medians['float']:.2f}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parses the command line, times the variants, prints the table, writes .json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "qat_step_ratios")
    run = Run.begin("qat_step_ratios", parser.parse_args(argv), quick=(0.3, 2), full=(2.0, 5),
                    batch=BATCH, w_bits=W_BITS, a_bits=A_BITS)
    medians = time_variants(run.device, run.min_run_time, run.rounds)
    ours_over = {v: medians["ours"] / s for v, s in medians.items() if v != "ours"}
    run.write({"median_s": medians, "ours_over": ours_over}, to_markdown(run.meta, medians))


if __name__ == "__main__":
    main()
