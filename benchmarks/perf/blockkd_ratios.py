"""Times one ResNet-56 -> ResNet-20 distillation step: plain KD vs Block-KD; prints the ratios.

Usage: ``python -m benchmarks.perf.blockkd_ratios [--device cpu|cuda] [--quick] [--out STEM]``.

One step = zero_grad, forward, loss, backward, SGD (momentum 0.9) step, batch 128 of random
3x32x32 inputs. Every variant starts from the same ResNet-56 teacher (random weights: the cost
does not depend on them; eval mode, frozen) and the same FP ResNet-20 student:

- ``ce``: the student alone, cross-entropy (context: what distillation adds);
- ``kd``: plain KD written out: the teacher under no_grad, ``CE + kd_loss(T=4)`` (the baseline);
- ``blockkd`` (ours): ``BlockKD(student, teacher)``, default config: stones N_1, N_2 with
  1x1 conv + BN connectors, their teacher suffixes batched through each teacher block and run
  through the memory-lean teacher (``bwrf_ext.lean``);
- ``blockkd_naive``: ``BlockKDConfig(batched=False)``: each stone through the teacher alone;
- ``blockkd_plain``: ``BlockKDConfig(lean_teacher=False)``: batched, teacher on plain autograd.

Time: interleaved rounds of ``torch.utils.benchmark.Timer.blocked_autorange``, medians. Memory:
saved tensors (bytes of the unique non-parameter storages autograd saves in one forward,
``torch.autograd.graph.saved_tensors_hooks``) and the peak RSS of a fresh subprocess per variant
over 3 steps, reset after setup, with its growth over the RSS after setup (CPU only); see
benchmarks/perf/bwrf_step_ratios.py, whose measuring functions this script shares.

What to expect: a stone runs the teacher's later blocks forward and backward (input gradients
only), so Block-KD costs about one extra teacher forward+backward per step over plain KD; the
lean teacher keeps the stones' saved memory to a 1-bit mask per teacher ReLU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.perf.bwrf_step_ratios import _status_kib, saved_tensor_bytes
from benchmarks.report import (
    Run,
    add_common_arguments,
    busy_lines,
    cpu_clocks,
    others_share,
    time_interleaved,
)
from bwrf_ext.losses import kd_loss
from bwrf_ext.methods.blockkd import BlockKD, BlockKDConfig
from bwrf_ext.models import resnet20, resnet56

BATCH = 128
TEMPERATURE = 4.0
VARIANTS = ("blockkd", "kd", "ce", "blockkd_naive", "blockkd_plain")
RSS_STEPS = 3


@dataclasses.dataclass
class DistillStep:
    """One training step on fixed data; calling it returns the loss (a 0-dim tensor).

    Attributes:
        model: what the optimizer trains and ``saved_tensor_bytes`` skips the parameters of:
            the student (ce, kd) or the BlockKD wrapper (student and connectors).
        student: the model being distilled.
        fp_model: the frozen teacher (None for ce); the name ``saved_tensor_bytes`` reads.
        wrapper: the BlockKD wrapper, None for ce and kd.
    """

    variant: str
    model: nn.Module
    student: nn.Module
    fp_model: nn.Module | None
    wrapper: BlockKD | None
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor

    def loss(self) -> torch.Tensor:
        """Forward and loss only."""
        if self.wrapper is not None:
            return self.wrapper(self.x, self.y).loss
        logits = self.student(self.x)
        loss = F.cross_entropy(logits, self.y)
        if self.fp_model is not None:
            with torch.no_grad():
                teacher_logits = self.fp_model(self.x)
            loss = loss + kd_loss(logits, teacher_logits, TEMPERATURE)
        return loss

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def make_step(variant: str, device: torch.device, batch: int = BATCH) -> DistillStep:
    """A DistillStep, not yet stepped; same teacher, student and data for every variant."""
    if variant not in VARIANTS:
        raise ValueError(f"make_step: variant must be one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(0)
    teacher = resnet56().to(device).eval().requires_grad_(False)
    student = resnet20().to(device).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    wrapper = None
    if variant.startswith("blockkd"):
        config = BlockKDConfig(
            temperature=TEMPERATURE,
            batched=variant != "blockkd_naive",
            lean_teacher=variant != "blockkd_plain",
        )
        wrapper = BlockKD(student, teacher, config).train()
    model = wrapper or student
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    partner = None if variant == "ce" else teacher
    return DistillStep(variant, model, student, partner, wrapper, optimizer, x, y)


def rss_child(variant: str) -> None:
    """In a fresh process: prints JSON with the RSS after setup and its high-water in the steps.

    The high-water mark is reset after setup (``5`` into /proc/self/clear_refs), as in
    benchmarks/perf/bwrf_step_ratios.py.
    """
    step = make_step(variant, torch.device("cpu"))
    setup = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(RSS_STEPS):
        step()
    print(json.dumps({"setup_kib": setup, "peak_kib": _status_kib("VmHWM")}))


def peak_rss(variant: str) -> dict[str, int]:
    """{"setup_kib", "peak_kib"} of a fresh subprocess running RSS_STEPS steps of the variant."""
    result = subprocess.run(
        [sys.executable, "-m", __spec__.name, "--rss-child", variant],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def to_markdown(meta: dict, medians: dict, saved: dict, rss: dict) -> str:
    """Header, one row per variant with its ratios over plain KD, and the summary line."""
    busy = meta.get("other_processes_cpu_share")
    lines = [
        f"# Distillation step, ResNet-56 -> ResNet-20 (FP), batch {BATCH} (medians, one run)",
        "",
        f"- bwrf_ext backend: **{meta['backend']}**; torch {meta['torch']}; {meta['date']}",
        f"- device: {meta['device']} ({meta['device_name']}), {meta['threads']} threads"
        + (" (quick mode: short timings)" if meta["quick"] else ""),
        "- step: forward + loss + backward + SGD step; KD: CE + KL KD (T=4); Block-KD: default "
        "config (stones N_1, N_2, w = 1/4, 1/2; CE + KD + ensemble terms; 1x1 conv+BN "
        "connectors)",
        "- memory: saved = unique non-parameter storages autograd saves in one forward "
        "(saved_tensors_hooks); peak RSS = VmHWM of a fresh process over "
        f"{RSS_STEPS} steps, reset after setup (growth = peak - RSS after setup)",
    ]
    lines += busy_lines(busy)
    lines += [
        "",
        "| variant | median step | / kd | saved tensors | / kd | peak RSS | RSS growth in steps |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, seconds in medians.items():
        r = rss.get(variant)
        rss_cells = (
            f"{r['peak_kib'] / 1024:.0f} MiB | {(r['peak_kib'] - r['setup_kib']) / 1024:.0f} MiB"
            if r else "n/a | n/a"
        )
        lines.append(
            f"| {variant} | {seconds * 1e3:.1f} ms | {seconds / medians['kd']:.2f} | "
            f"{saved[variant] / 2**20:.1f} MiB | {saved[variant] / saved['kd']:.2f} | "
            f"{rss_cells} |"
        )
    lines += [
        "",
        f"Block-KD / plain KD: step time {medians['blockkd'] / medians['kd']:.2f}, saved "
        f"tensors {saved['blockkd'] / saved['kd']:.2f}; batched / naive stones "
        f"{medians['blockkd'] / medians['blockkd_naive']:.2f}; lean / plain teacher saved "
        f"tensors {saved['blockkd'] / saved['blockkd_plain']:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parses the command line, measures, prints the table, writes .json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "blockkd_ratios")
    parser.add_argument("--rss-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child)
        return
    run = Run.begin("blockkd_ratios", args, quick=(0.5, 1), full=(3.0, 4),
                    batch=BATCH, temperature=TEMPERATURE)
    saved = {v: saved_tensor_bytes(make_step(v, run.device)) for v in VARIANTS}
    rss = {v: peak_rss(v) for v in VARIANTS} if run.device.type == "cpu" else {}
    steps = {v: make_step(v, run.device) for v in VARIANTS}
    before = cpu_clocks()
    medians = time_interleaved(steps, run.device, run.min_run_time, run.rounds,
                               label="blockkd_step")
    if run.device.type == "cpu":
        run.meta["other_processes_cpu_share"] = others_share(before, cpu_clocks())
    record = {
        "median_s": medians,
        "over_kd": {v: s / medians["kd"] for v, s in medians.items()},
        "saved_tensor_bytes": saved,
        "saved_over_kd": {v: b / saved["kd"] for v, b in saved.items()},
        "rss_kib": rss,
    }
    run.write(record, to_markdown(run.meta, medians, saved, rss))


if __name__ == "__main__":
    main()
