"""Short real-data run: ResNet-20 W2A2 on the CIFAR-10 JPEG copy, LSQ vs LSQ+KD vs BWRF.

Usage: ``python benchmarks/bwrf_cifar_run.py [--epochs 3] [--train-images 10000] [--out STEM]``.

Budget (documented, CPU-sized): a stratified subset of ``--train-images`` images of the JPEG
q75 train split (1/5 of it by default), ``--epochs`` epochs per method, batch 128, evaluated on
the full 10,000-image JPEG test split. Every method starts from the akamaster FP ResNet-20
(shared/weights) quantized by ``quantize_model(fp, w_bits=2, a_bits=2)`` (first conv and last
linear 8-bit), SGD lr 0.01 momentum 0.9 weight decay 5e-4, cosine decay to 0, random crop
(pad 4) + flip, and sees the same batches in the same order:

- ``lsq``: cross-entropy on the LP logits (plain LSQ QAT);
- ``lsq_kd``: ``BWRF`` with ``branches=()``: CE + KD from the FP logits, no MP branches (an
  ablation that separates the distillation from the branches);
- ``bwrf``: ``BWRF`` with the default config (alpha 1, T 2, branches M^1, M^2, weights 1).

The data is a lossy JPEG copy of CIFAR-10 (shared/data/README.md): the FP model loses about
10 points on it, and none of these numbers are comparable with paper numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `benchmarks` (and an uninstalled bwrf_ext)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.io import decode_jpeg  # noqa: E402

import bwrf_ext  # noqa: E402
from benchmarks.report import RESULTS_DIR, device_description  # noqa: E402
from bwrf_ext.models import imagenet_normalize, pretrained_cifar_resnet  # noqa: E402
from bwrf_ext.models.pretrained import default_shared_dir  # noqa: E402

JPEG_NPZ = Path("data") / "cifar10_jpeg_q75" / "cifar10_jpeg_q75.npz"
METHODS = ("lsq", "lsq_kd", "bwrf")
BITS = 2


def decode_split(npz, split: str, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) float in [0, 1] normalised for the akamaster weights, (N,) int64 labels."""
    data, offsets = npz[f"{split}_jpeg"], npz[f"{split}_offsets"]
    buffers = [torch.from_numpy(data[offsets[i] : offsets[i + 1]].copy()) for i in indices]
    images = torch.stack(decode_jpeg(buffers)).float() / 255.0
    labels = torch.from_numpy(npz[f"{split}_labels"][indices].astype(np.int64))
    return imagenet_normalize(images), labels


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for k in range(n):
        crop = padded[k, :, dy[k] : dy[k] + h, dx[k] : dx[k] + w]
        out[k] = crop.flip(-1) if flip[k] else crop
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        (model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum().item()
        for i in range(0, len(y), 500)
    )
    return 100.0 * correct / len(y)


def train_method(method: str, fp, train, test, epochs: int, batch: int, seed: int) -> dict:
    """Trains one W2A2 model from the FP weights; returns its curve and timings."""
    torch.manual_seed(seed)
    lp = bwrf_ext.quantize_model(fp, w_bits=BITS, a_bits=BITS)
    if method == "lsq":
        wrapper = None
        params = lp.parameters()
    else:
        config = bwrf_ext.BWRFConfig(branches=() if method == "lsq_kd" else None)
        wrapper = bwrf_ext.BWRF(lp, fp, config)
        params = wrapper.parameters()
    return train_loop(method, lp, wrapper, params, train, test, epochs, batch, seed)


def train_loop(
    label: str, model, wrapper, params, train, test, epochs: int, batch: int, seed: int
) -> dict:
    """SGD + cosine over fixed seeded batches: CE of ``model`` alone, or ``wrapper(x, y).loss``.

    Shared by the real-data comparison scripts so that every method sees the same batches and
    crops. Returns the per-epoch test accuracy of ``model``, mean train loss and train time.
    """
    params = list(params)
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (len(train[1]) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)  # same batches and crops for every method
    curve, losses, train_seconds = [], [], 0.0
    for epoch in range(epochs):
        (wrapper or model).train()
        order = torch.randperm(len(train[1]), generator=generator)
        start = time.perf_counter()
        running = []
        for b in range(len(order) // batch):
            idx = order[b * batch : (b + 1) * batch]
            x, y = augment(train[0][idx], generator), train[1][idx]
            loss = F.cross_entropy(model(x), y) if wrapper is None else wrapper(x, y).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running.append(loss.item())
        train_seconds += time.perf_counter() - start
        curve.append(accuracy(model, *test))
        losses.append(float(np.mean(running)))
        print(
            f"{label:>7} epoch {epoch + 1}/{epochs}: train loss {losses[-1]:.3f}, "
            f"test acc {curve[-1]:.2f} %, {train_seconds:.0f} s training so far",
            flush=True,
        )
    return {"test_acc": curve, "train_loss": losses, "train_seconds": train_seconds}


def main(argv: list[str] | None = None) -> None:
    """Runs the three methods, prints the table, writes .json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
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
    fp = pretrained_cifar_resnet(20)
    fp_acc = accuracy(fp, *test)
    print(f"FP ResNet-20 on the JPEG test split: {fp_acc:.2f} %", flush=True)
    results = {}
    for method in args.methods:
        results[method] = train_method(
            method, fp, train, test, args.epochs, args.batch, args.seed
        )
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
        "epochs": args.epochs,
        "batch": args.batch,
        "seed": args.seed,
        "bits": f"W{BITS}A{BITS}, first conv and last linear 8-bit",
        "optimizer": "SGD lr 0.01 momentum 0.9 wd 5e-4, cosine to 0, crop+flip",
        "wall_seconds": time.perf_counter() - wall_start,
    }
    lines = [
        f"# ResNet-20 W{BITS}A{BITS} on the CIFAR-10 JPEG q75 copy: LSQ vs BWRF (one seed)",
        "",
        f"- {meta['train_images']} train images (stratified subset), {args.epochs} epochs each, "
        f"batch {args.batch}; test: all {meta['test_images']} JPEG test images",
        f"- {meta['optimizer']}; {meta['bits']}; seed {args.seed}",
        f"- FP start: akamaster ResNet-20, {fp_acc:.2f} % on this test split",
        f"- {device_name}, {meta['threads']} threads, torch {meta['torch']}, backend "
        f"{meta['backend']}; total wall time {meta['wall_seconds']:.0f} s; {meta['date']}",
        "- lossy JPEG data: not comparable with paper numbers",
        "",
        "| method | test acc per epoch (%) | final | train time |",
        "|---|---|---:|---:|",
    ]
    for method, r in results.items():
        curve = ", ".join(f"{a:.2f}" for a in r["test_acc"])
        lines.append(
            f"| {method} | {curve} | {r['test_acc'][-1]:.2f} | {r['train_seconds']:.0f} s |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    stem = args.out or RESULTS_DIR / f"bwrf_cifar_run_{tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "fp_acc": fp_acc, "results": results}, indent=2) + "\n"
    )
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
