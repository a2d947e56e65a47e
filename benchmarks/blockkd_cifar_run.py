"""Short real-data run: W2A2 ResNet-20 from an FP ResNet-56 teacher, no KD vs KD vs Block-KD.

Usage: ``python benchmarks/blockkd_cifar_run.py [--epochs 2] [--train-images 10000] [--out STEM]``.

The "low-bit student from a larger FP teacher" case: the student is the akamaster FP ResNet-20
(shared/weights) quantized by ``quantize_model(fp, w_bits=2, a_bits=2)`` (first conv and last
linear 8-bit), the teacher the akamaster FP ResNet-56, frozen. A student trained from scratch
stays near chance at this CPU budget for every method, which would compare nothing. Equal
budget: a stratified subset of ``--train-images`` images of the JPEG q75 train split,
``--epochs`` epochs per method, batch 128, the same batches and crops in the same order; SGD
lr 0.01 momentum 0.9 weight decay 5e-4 (student and connectors), cosine decay to 0; evaluated
on the full 10,000-image JPEG test split after every epoch.

- ``no_kd``: cross-entropy on the student's logits (plain LSQ QAT);
- ``kd``: ``BlockKD`` with ``stones=()``: CE + KD (KL, T = 4, alpha 1) from the teacher;
- ``blockkd``: ``BlockKD`` with the default config: stones N_1, N_2 (weights 1/4, 1/2), 1x1
  conv + BN connectors, KD and ensemble terms (alpha = beta = gamma = 1, T = 4).

The data is a lossy JPEG copy of CIFAR-10 (shared/data/README.md): the FP models lose about
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

import bwrf_ext  # noqa: E402
from benchmarks.bwrf_cifar_run import JPEG_NPZ, accuracy, decode_split, train_loop  # noqa: E402
from benchmarks.report import RESULTS_DIR, device_description  # noqa: E402
from bwrf_ext.methods.blockkd import BlockKD, BlockKDConfig  # noqa: E402
from bwrf_ext.models import pretrained_cifar_resnet  # noqa: E402
from bwrf_ext.models.pretrained import default_shared_dir  # noqa: E402

METHODS = ("no_kd", "kd", "blockkd")
BITS = 2


def train_method(method: str, student_fp, teacher, train, test, epochs: int, batch: int,
                 seed: int) -> dict:
    """Trains one W2A2 student from the FP ResNet-20 weights; returns its curve and timings."""
    torch.manual_seed(seed)
    student = bwrf_ext.quantize_model(student_fp, w_bits=BITS, a_bits=BITS)
    if method == "no_kd":
        wrapper = None
        params = list(student.parameters())
    else:
        config = BlockKDConfig(stones=() if method == "kd" else None)
        wrapper = BlockKD(student, teacher, config)
        params = list(wrapper.parameters())
    result = train_loop(method, student, wrapper, params, train, test, epochs, batch, seed)
    return {**result, "trained_parameters": sum(p.numel() for p in params)}


def main(argv: list[str] | None = None) -> None:
    """Runs the three methods, prints the table, writes .json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
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
    student_fp = pretrained_cifar_resnet(20)
    teacher = pretrained_cifar_resnet(56)
    fp_acc = {"resnet20": accuracy(student_fp, *test), "resnet56": accuracy(teacher, *test)}
    print(f"FP accuracies on the JPEG test split: {fp_acc}", flush=True)
    results = {}
    for method in args.methods:
        results[method] = train_method(
            method, student_fp, teacher, train, test, args.epochs, args.batch, args.seed
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
        "student": f"akamaster FP ResNet-20 -> quantize_model W{BITS}A{BITS} "
                   "(first conv and last linear 8-bit)",
        "teacher": "akamaster FP ResNet-56, frozen",
        "optimizer": "SGD lr 0.01 momentum 0.9 wd 5e-4, cosine to 0, crop+flip",
        "blockkd_config": "BlockKDConfig() defaults: alpha=beta=gamma=1, T=4, stones 1,2 "
                          "(w=1/4, 1/2), KL, 1x1 conv+BN connectors",
        "arguments": vars(args) | {"out": str(args.out) if args.out else None},
        "wall_seconds": time.perf_counter() - wall_start,
    }
    lines = [
        f"# W{BITS}A{BITS} ResNet-20 from an FP ResNet-56 teacher, CIFAR-10 JPEG q75 copy: "
        "no KD vs KD vs Block-KD (one seed)",
        "",
        f"- {meta['train_images']} train images (stratified subset), {args.epochs} epochs each, "
        f"batch {args.batch}; test: all {meta['test_images']} JPEG test images",
        f"- student: {meta['student']}, starting from the FP weights; teacher: {meta['teacher']}",
        f"- {meta['optimizer']}; seed {args.seed}; Block-KD: {meta['blockkd_config']}; "
        "KD: the same wrapper with stones=() (CE + KD, T=4)",
        f"- FP on this test split: ResNet-20 {fp_acc['resnet20']:.2f} %, ResNet-56 "
        f"{fp_acc['resnet56']:.2f} %",
        f"- {device_name}, {meta['threads']} threads, torch {meta['torch']}, backend "
        f"{meta['backend']}; total wall time {meta['wall_seconds']:.0f} s; {meta['date']}",
        "- lossy JPEG data, one seed, a short budget: not comparable with paper numbers",
        "",
        "| method | test acc per epoch (%) | final | train time | trained parameters |",
        "|---|---|---:|---:|---:|",
    ]
    for method, r in results.items():
        curve = ", ".join(f"{a:.2f}" for a in r["test_acc"])
        lines.append(
            f"| {method} | {curve} | {r['test_acc'][-1]:.2f} | {r['train_seconds']:.0f} s | "
            f"{r['trained_parameters']:,} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    stem = args.out or RESULTS_DIR / f"blockkd_cifar_run_{tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "fp_acc": fp_acc, "results": results}, indent=2) + "\n"
    )
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
