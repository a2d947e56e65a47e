"""Short real-data run: ResNet-32 from scratch on the CIFAR-10 JPEG copy, E2E vs ContSup K=8.

Usage: ``python benchmarks/contsup_cifar_run.py [--epochs 3] [--train-images 10000]
[--monitor-images 2000] [--methods e2e k8_r0 k8_e] [--out STEM]``.

Budget (documented, CPU-sized): a stratified subset of ``--train-images`` images of the JPEG
q75 train split, ``--epochs`` epochs per method, batch 128, one seed; after every epoch the
accuracy on a fixed stratified subset of ``--monitor-images`` test images, and at the end on
the full 10,000-image JPEG test split (the reported number). Every method starts from the same
randomly initialised ResNet-32, sees the same batches and crops in the same order, and trains
with SGD, peak lr 0.1 (the public ContSup code's 0.8 at batch 1024, scaled to 128), Nesterov
momentum 0.9, weight decay 1e-4; the lr rises linearly from 0.01 over the first epoch (the
public code warms up too, over 10 of its 160 epochs), then decays to 0 on a cosine, per step;
random crop (pad 4) + flip:

- ``e2e``: ``ContSup`` with K=1, i.e. plain end-to-end training (equal to it step for step,
  python_tests/test_contsup.py);
- ``k8_r0``: K=8 gradient-isolated modules (InfoPro equal-layer table), 1c2f CE heads, no
  context (greedy local learning);
- ``k8_e``: the same with context E (the image through the public code's encoder, added at
  every boundary; kept at inference).

Inputs are normalised with the ImageNet statistics of ``benchmarks.bwrf_cifar_run.decode_split``
(fine from scratch; no decoder is used, so ``ContSupConfig.image_mean/std`` do not matter).
The data is a lossy JPEG copy of CIFAR-10 (shared/data/README.md); a few epochs on a subset are
far from convergence, so the numbers show the early-training gap only and are not comparable
with paper numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `benchmarks` (and an uninstalled bwrf_ext)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bwrf_ext  # noqa: E402
from benchmarks.bwrf_cifar_run import JPEG_NPZ, accuracy, augment, decode_split  # noqa: E402
from benchmarks.report import RESULTS_DIR, device_description  # noqa: E402
from bwrf_ext.methods.contsup import ContSup, ContSupConfig  # noqa: E402
from bwrf_ext.models import resnet32  # noqa: E402
from bwrf_ext.models.pretrained import default_shared_dir  # noqa: E402

METHODS = {
    "e2e": ContSupConfig(num_modules=1),
    "k8_r0": ContSupConfig(num_modules=8, context="R0"),
    "k8_e": ContSupConfig(num_modules=8, context="E"),
}


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """lr factor of step t: linear 0.1 -> 1 over ``warmup`` steps, then cosine 1 -> 0."""

    def factor(t: int) -> float:
        if t < warmup:
            return 0.1 + 0.9 * t / warmup
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(total - warmup, 1)))

    return factor


def train_method(method: str, train, monitor, test, epochs: int, batch: int, seed: int) -> dict:
    """Trains one ResNet-32 from scratch; returns its accuracies, losses and timings."""
    torch.manual_seed(seed)
    net = resnet32()
    contsup = ContSup(net, METHODS[method])
    cost = contsup.cost_report((1, 3, 32, 32))
    optimizer = torch.optim.SGD(contsup.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    per_epoch = len(train[1]) // batch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(per_epoch, epochs * per_epoch)
    )
    generator = torch.Generator().manual_seed(seed)  # same batches and crops for every method
    curve, losses, final_ce, train_seconds = [], [], [], 0.0
    for epoch in range(epochs):
        contsup.train()
        order = torch.randperm(len(train[1]), generator=generator)
        start = time.perf_counter()
        running, running_final = [], []
        for b in range(len(order) // batch):
            idx = order[b * batch : (b + 1) * batch]
            x, y = augment(train[0][idx], generator), train[1][idx]
            out = contsup.train_step(x, y, optimizer)
            schedule.step()
            running.append(out.loss.item())
            running_final.append(out.losses["final_ce"].item())
        train_seconds += time.perf_counter() - start
        curve.append(accuracy(contsup, *monitor))
        losses.append(float(np.mean(running)))
        final_ce.append(float(np.mean(running_final)))
        print(
            f"{method:>6} epoch {epoch + 1}/{epochs}: sum of module losses {losses[-1]:.3f}, "
            f"last-module CE {final_ce[-1]:.3f}, monitor acc {curve[-1]:.2f} %, "
            f"{train_seconds:.0f} s training so far",
            flush=True,
        )
    test_acc = accuracy(contsup, *test)
    print(f"{method:>6}: test acc {test_acc:.2f} % on {len(test[1])} images", flush=True)
    return {
        "test_acc": test_acc,
        "monitor_acc": curve,
        "train_loss_sum": losses,
        "train_final_ce": final_ce,
        "train_seconds": train_seconds,
        "boundaries": [list(p) for p in contsup.boundaries],
        "inference_params": cost.inference.params,
        "inference_macs": cost.inference.macs,
    }


def main(argv: list[str] | None = None) -> None:
    """Runs the methods, prints the table, writes .json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--monitor-images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a CPU shared with other "
                        "jobs, 1 avoids OpenMP barrier stalls (6x faster here)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    tag, device_name = device_description(torch.device("cpu"))
    npz = np.load(default_shared_dir() / JPEG_NPZ)
    labels = npz["train_labels"]
    rng = np.random.default_rng(args.seed)
    per_class = args.train_images // 10
    subset = np.sort(np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    ))
    train = decode_split(npz, "train", subset)
    test = decode_split(npz, "test", np.arange(len(npz["test_labels"])))
    # The test split is class-sorted: every k-th image is a stratified subset.
    step = max(len(test[1]) // args.monitor_images, 1)
    monitor = (test[0][::step], test[1][::step])
    results = {m: train_method(m, train, monitor, test, args.epochs, args.batch, args.seed)
               for m in args.methods}
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": tag,
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "backend": bwrf_ext.build_info()["backend"],
        "data": "CIFAR-10 JPEG q75 copy (lossy; not comparable with paper numbers)",
        "train_images": int(len(subset)),
        "test_images": int(len(test[1])),
        "monitor_images": int(len(monitor[1])),
        "epochs": args.epochs,
        "batch": args.batch,
        "seed": args.seed,
        "optimizer": "SGD lr 0.1 Nesterov momentum 0.9 wd 1e-4, 1-epoch linear warmup from "
        "0.01, cosine to 0, crop+flip",
        "command": "python benchmarks/contsup_cifar_run.py " + " ".join(sys.argv[1:] or []),
        "wall_seconds": time.perf_counter() - wall_start,
    }
    lines = [
        "# ResNet-32 from scratch on the CIFAR-10 JPEG q75 copy: E2E vs ContSup K=8 (one seed)",
        "",
        f"- {meta['train_images']} train images (stratified subset), {args.epochs} epochs each, "
        f"batch {args.batch}; per-epoch monitor: {meta['monitor_images']} stratified test "
        f"images; final: all {meta['test_images']} JPEG test images",
        f"- {meta['optimizer']}; seed {args.seed}; K=8: InfoPro equal-layer split, 1c2f CE "
        "heads; E: the public image encoder, kept at inference",
        f"- {device_name}, {meta['threads']} threads, torch {meta['torch']}; total wall time "
        f"{meta['wall_seconds']:.0f} s; {meta['date']}",
        "- short budget, far from convergence; lossy JPEG data: not comparable with paper numbers",
        "",
        "| method | monitor acc per epoch (%) | test acc (10k) | train time | inference params "
        "| MMACs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for method, r in results.items():
        curve = ", ".join(f"{a:.2f}" for a in r["monitor_acc"])
        lines.append(
            f"| {method} | {curve} | {r['test_acc']:.2f} | {r['train_seconds']:.0f} s | "
            f"{r['inference_params']:,} | {r['inference_macs'] / 1e6:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    stem = args.out or RESULTS_DIR / f"contsup_cifar_run_{tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    )
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
