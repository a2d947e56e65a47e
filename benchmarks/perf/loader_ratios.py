"""Times the data path (per-sample, batched) against a ResNet-20 LSQ training step; prints ratios.

Usage: ``python -m benchmarks.perf.loader_ratios [--device cpu|cuda] [--quick] [--out STEM]``.

Data: CIFAR-10-shaped random uint8 images, 3x32x32, 10 classes (50,000; 10,000 with
``--quick``), augmented with crop-flip (4-pixel zero padding, horizontal flip) and normalised,
batch 128, shuffled, as ``bwrf-train`` feeds a one-process run. Variants:

- ``batched`` (ours): ``bwrf_ext.data.InMemoryLoader``, the images on the device, a whole batch
  cropped, flipped and normalised at once;
- ``per_sample``: a DataLoader (``--workers 0``, the default) over a DistributedSampler of the
  ``InMemoryImages`` items, each image padded, cropped and flipped with its own numpy
  generator: the path before issue 20 (on cuda each batch is then copied to the device);
- ``step``: one ResNet-20 W4A4 LSQ training step (``bwrf_ext.quantize_model``, first conv and
  last linear 8-bit; zero_grad, forward, cross-entropy, backward, SGD), built as
  ``benchmarks/perf/qat_step_ratios.py`` builds its ``ours``.

One call of a loader makes one batch (an epoch's end starts the next epoch, whose shuffle is
part of the cost). Time: interleaved rounds of ``torch.utils.benchmark.Timer.blocked_autorange``,
medians. The table gives images/s, each loader's time per batch over the step's, and the
batched speed-up over per-sample. Targets (issue 20): batched / step <= 2 % on CPU; on a GPU the
batched loader >= 20x the step's images/s.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from benchmarks.perf.qat_step_ratios import A_BITS, W_BITS, make_step
from benchmarks.report import (
    Run,
    add_common_arguments,
    busy_lines,
    cpu_clocks,
    others_share,
    time_interleaved,
)
from bwrf_ext.data import InMemoryImages, InMemoryLoader, channel_stats

BATCH = 128
IMAGES, QUICK_IMAGES = 50_000, 10_000
CPU_TARGET = 0.02  # batched loader time / step time
GPU_TARGET = 20.0  # batched loader images/s / step images/s
LOADERS = ("batched", "per_sample")


def cifar10_shaped(count: int, seed: int = 0) -> InMemoryImages:
    """``count`` random uint8 3x32x32 images with labels 0..9, crop-flip, their own statistics."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (count,), generator=gen)
    mean, std = channel_stats(images)
    return InMemoryImages(images, labels, mean, std, augment="crop-flip", seed=seed)


def make_loader(variant: str, dataset: InMemoryImages, device: torch.device) -> NextBatch:
    """The training loader of a variant, as ``bwrf-train`` builds it for one process."""
    if variant == "batched":
        loader = InMemoryLoader(dataset, BATCH, shuffle=True, drop_last=True, device=device)
        return NextBatch(loader, loader.set_epoch, device)
    if variant == "per_sample":
        sampler = DistributedSampler(dataset, 1, 0, shuffle=True, seed=dataset.seed)
        loader = DataLoader(dataset, BATCH, sampler=sampler, drop_last=True,
                            pin_memory=device.type == "cuda")  # fmt: skip
        return NextBatch(loader, sampler.set_epoch, device)
    raise ValueError(f"make_loader: variant must be one of {LOADERS}, got {variant!r}")


class NextBatch:
    """Calling it returns the loader's next batch on the device, going on to the next epoch
    (``set_epoch``, as the trainer does) when one ends."""

    def __init__(
        self, loader: Iterable, set_epoch: Callable[[int], None], device: torch.device
    ) -> None:
        self.loader, self.set_epoch, self.device = loader, set_epoch, device
        self.epoch = 0
        self.batches: Iterator = iter(loader)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x, y = next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            x, y = next(self.batches)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def time_variants(
    device: torch.device, images: int, min_run_time: float, rounds: int
) -> dict[str, float]:
    """Median seconds per batch of each loader and per step, measured interleaved."""
    dataset = cifar10_shaped(images)
    calls: dict[str, Callable[[], object]] = {v: make_loader(v, dataset, device) for v in LOADERS}
    calls["step"] = make_step("ours", device, BATCH)
    return time_interleaved(calls, device, min_run_time, rounds, label="loader")


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """Each loader's time over the step's, and the batched speed-up over per-sample."""
    return {
        "batched_over_step": medians["batched"] / medians["step"],
        "per_sample_over_step": medians["per_sample"] / medians["step"],
        "batched_speedup": medians["per_sample"] / medians["batched"],
    }


def verdict(device: torch.device, medians: dict[str, float]) -> str:
    """The issue's target on this device, met or not, with the measured value."""
    if device.type == "cuda":
        rate = medians["step"] / medians["batched"]
        met = "met" if rate >= GPU_TARGET else "NOT met"
        return f"Target batched >= {GPU_TARGET:.0f}x the step's images/s: **{met}** ({rate:.1f}x)."
    share = medians["batched"] / medians["step"]
    met = "met" if share <= CPU_TARGET else "NOT met"
    return f"Target batched / step <= {100 * CPU_TARGET:.0f} %: **{met}** ({100 * share:.2f} %)."


def to_markdown(meta: dict, medians: dict[str, float], device: torch.device) -> str:
    """Header, one row per variant (median per batch, images/s, / step) and the verdict."""
    r = ratios(medians)
    busy = meta.get("other_processes_cpu_share")
    lines = [
        f"# Data path vs ResNet-20 W{W_BITS}A{A_BITS} LSQ step, batch {BATCH} (medians, one run)",
        "",
        f"- bwrf_ext backend: **{meta['backend']}**; torch {meta['torch']}; {meta['date']}",
        f"- device: {meta['device']} ({meta['device_name']}), {meta['threads']} threads"
        + (" (quick mode: short timings)" if meta["quick"] else ""),
        f"- data: {meta['images']} random uint8 3x32x32 images, crop-flip (padding 4), "
        "normalised, shuffled; loader time = one batch on the device",
        "- step: forward + cross-entropy + backward + SGD step, train mode; first conv and "
        "last linear 8-bit",
    ]
    lines += busy_lines(busy)
    lines += [
        "",
        "| variant | median per batch | images/s | time / step |",
        "|---|---:|---:|---:|",
    ]
    for variant, seconds in medians.items():
        lines.append(
            f"| {variant} | {seconds * 1e3:.2f} ms | {BATCH / seconds:,.0f} | "
            f"{100 * seconds / medians['step']:.2f} % |"
        )
    lines += [
        "",
        f"batched / per_sample speed-up: {r['batched_speedup']:.1f}x; loader / step: batched "
        f"{100 * r['batched_over_step']:.2f} %, per_sample {100 * r['per_sample_over_step']:.2f} "
        f"%. {verdict(device, medians)}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parses the command line, times the variants, prints the table, writes .json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "loader_ratios")
    args = parser.parse_args(argv)
    images = QUICK_IMAGES if args.quick else IMAGES
    run = Run.begin("loader_ratios", args, quick=(0.5, 2), full=(2.0, 5), batch=BATCH,
                    w_bits=W_BITS, a_bits=A_BITS, images=images)  # fmt: skip
    before = cpu_clocks()
    medians = time_variants(run.device, images, run.min_run_time, run.rounds)
    if run.device.type == "cpu":
        run.meta["other_processes_cpu_share"] = others_share(before, cpu_clocks())
    record = {
        "median_s": medians,
        "images_per_s": {v: BATCH / s for v, s in medians.items()},
        "ratios": ratios(medians),
    }
    run.write(record, to_markdown(run.meta, medians, run.device))


if __name__ == "__main__":
    main()
