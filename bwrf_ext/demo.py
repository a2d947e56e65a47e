"""`make demo`: FP training, then 2-bit LSQ and 2-bit BWRF from it, on scikit-learn's digits.

Needs no download (the digits ship inside scikit-learn) and runs in about a minute on 2 idle CPU
cores. It prints an accuracy table and writes accuracy curves to runs/demo/. The full training
CLI (real data sets, Block-KD, ContSup) is `bwrf-train` once it lands; this is its small twin.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import bwrf_ext
from bwrf_ext.blocks import split_model


def digits_loaders(batch_size: int, seed: int):
    """scikit-learn's 1,797 8x8 digits, split 80/20 (stratified), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels)
    train_idx, test_idx = train_test_split(
        range(len(y)), test_size=0.2, stratify=labels, random_state=seed
    )
    train = torch.utils.data.TensorDataset(x[train_idx], y[train_idx])
    test = torch.utils.data.TensorDataset(x[test_idx], y[test_idx])
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.utils.data.DataLoader(train, batch_size, shuffle=True, generator=generator),
        torch.utils.data.DataLoader(test, 512),
    )


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    """Three conv-BN-ReLU stages and a linear head: (N, 1, 8, 8) -> (N, num_classes)."""

    def stage(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *stage(1, 32, 1), *stage(32, 64, 2), *stage(64, 64, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return 100.0 * correct / len(loader.dataset)


def train(model, loss_fn, train_loader, test_loader, epochs: int, lr: float, label: str):
    """SGD + cosine on loss_fn(x, y) over model's parameters; test accuracy after each epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(train_loader))
    curve = []
    for epoch in range(epochs):
        model.train()
        for x, y in train_loader:
            loss = loss_fn(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        curve.append(accuracy(model, test_loader))
        print(f"  {label:>10} epoch {epoch + 1:2d}/{epochs}  test acc {curve[-1]:6.2f} %")
    return curve


def cross_entropy_of(model):
    return lambda x, y: F.cross_entropy(model(x), y)


def small_cnn_split(model: nn.Module, example: torch.Tensor):
    """small_cnn's three conv-BN-ReLU stages as blocks, pool/flatten/linear as the head."""
    blocks = [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"]]
    return split_model(model, blocks=blocks, head=["9", "10", "11"], example_input=example)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp-epochs", type=int, default=15)
    parser.add_argument("--qat-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    info = bwrf_ext.build_info()
    print(f"bwrf_ext {bwrf_ext.__version__}: backend={info['backend']}, "
          f"cuda_kernels={info['cuda_kernels']}, torch {info['torch']}")
    train_loader, test_loader = digits_loaders(batch_size=64, seed=args.seed)

    results, curves = [], {}
    start = time.perf_counter()
    fp_model = small_cnn()
    curves["FP32"] = train(fp_model, cross_entropy_of(fp_model), train_loader, test_loader,
                           args.fp_epochs, 0.05, "FP32")
    results.append(("FP32", "-", curves["FP32"][-1], time.perf_counter() - start))
    first_batch = next(iter(train_loader))[0]  # initialises the activation step sizes
    for method in ("LSQ", "BWRF"):
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        lp_model = bwrf_ext.quantize_model(fp_model, w_bits=2, a_bits=2, first_last_bits=8)
        if method == "LSQ":
            loss_fn = cross_entropy_of(lp_model)
        else:  # the frozen FP model guides the LP one through mixed-precision branches
            partner = copy.deepcopy(fp_model)
            bwrf = bwrf_ext.BWRF(lp_model, partner,
                                 lp_split=small_cnn_split(lp_model, first_batch),
                                 fp_split=small_cnn_split(partner, first_batch))
            loss_fn = lambda x, y, bwrf=bwrf: bwrf(x, y).loss  # noqa: E731
        label = f"{method} W2A2"
        curves[label] = train(lp_model, loss_fn, train_loader, test_loader, args.qat_epochs,
                              0.01, label)
        results.append((label, "first/last 8-bit", curves[label][-1], time.perf_counter() - start))

    print("\n| model | notes | test accuracy | time |\n|---|---|---:|---:|")
    for label, notes, acc, seconds in results:
        print(f"| {label} | {notes} | {acc:.2f} % | {seconds:.1f} s |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps({"curves": curves, "build": info}, indent=1))
    plot_curves(curves, args.out / "accuracy.png")
    print(f"\nwrote {args.out / 'metrics.json'} and {args.out / 'accuracy.png'}")


def plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, label=label)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="digits: FP, then 2-bit from it")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
