"""An independent plain-PyTorch FP training loop, to check ``bwrf-train --method fp`` from scratch.

Usage: ``python -m benchmarks.accuracy.fp_reference [--depth 32] [--seed 0] [--epochs 2]
[--lr 0.1] [--threads 1]``.

The budget of the ``contsup`` suite's E2E rows (CIFAR-10 JPEG copy, CIFAR ResNet from scratch,
SGD momentum 0.9 Nesterov, weight decay 1e-4, cosine per step, batch 128, crop-flip, the training
split's own channel statistics), written from scratch: only the ResNet definition and the JPEG
reader/augmentation of the LSQ fidelity loop are shared, none of bwrf_ext's data pipeline or
training loop. It prints one JSON line per epoch (train loss, test accuracy, seconds). Measured
2026-12-03, ResNet-32, seed 0, 2 epochs: 37.56 % then 47.63 % (bwrf-train's E2E: 51.70 % for seed
0, 53.20 ± 5.66 over 3 seeds), so bwrf-train does not trail a plain loop at this budget.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from benchmarks.accuracy.lsq_fidelity import augment, cosine_sgd, load_cifar10_jpeg
from bwrf_ext.models.cifar_resnet import cifar_resnet  # the architecture only
from bwrf_ext.models.pretrained import default_shared_dir

BATCH = 128


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_cifar10_jpeg(default_shared_dir() / "data" / "cifar10_jpeg_q75" /
                             "cifar10_jpeg_q75.npz")  # fmt: skip
    pixels = data["train_x"].float() / 255
    mean = pixels.mean((0, 2, 3)).view(1, 3, 1, 1)
    std = pixels.std((0, 2, 3)).view(1, 3, 1, 1)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - mean) / std

    model = cifar_resnet(args.depth, num_classes=10)
    n = len(data["train_y"])
    step = cosine_sgd(model.parameters(), args.lr, args.epochs * (n // BATCH), nesterov=True)
    g = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order, total = torch.randperm(n, generator=g), 0.0
        for start in range(0, n - BATCH + 1, BATCH):
            index = order[start : start + BATCH]
            x = normalize(augment(data["train_x"][index], g))
            total += step(F.cross_entropy(model(x), data["train_y"][index]))
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(data["test_y"]), 500):
                logits = model(normalize(data["test_x"][start : start + 500]))
                correct += int((logits.argmax(1) == data["test_y"][start : start + 500]).sum())
        print(json.dumps({"epoch": epoch + 1, "train_loss": total / (n // BATCH),
                          "acc": 100.0 * correct / len(data["test_y"]),
                          "s": round(time.perf_counter() - started, 1)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
