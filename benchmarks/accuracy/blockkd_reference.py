"""An independent plain-PyTorch Block-KD, to check ``bwrf-train --method blockkd`` beside it.

Usage: ``python -m benchmarks.accuracy.blockkd_reference [--methods ce kd blockkd] [--seeds 0 1 2]
[--epochs 1] [--lr 0.1] [--ensemble off] [--threads 1]``.

The budget of the ``blockkd-fp`` suite of ``results_runs.py`` (CIFAR-10 JPEG copy, ResNet-20
student from scratch, frozen akamaster ResNet-56 teacher, ImageNet normalisation for both, SGD
momentum 0.9, weight decay 1e-4, cosine per step, batch 128, crop-flip), written from the
paper's description (DESIGN.md §1.2) without any of bwrf_ext's engine, losses, data pipeline or
training loop: only the ResNet definition, the weight-file reader and the JPEG reader and
augmentation of the LSQ fidelity loop are shared. Stepping stone N_i = student stem and blocks
1..i -> a 1x1 conv + BatchNorm connector C_i -> teacher blocks i+1..3 (eval mode, frozen, the
gradient passing through) -> the teacher's pooling and linear head; every model m (the student
and each stone) has the loss ``CE(z_m, y) + KD_4(z_m || z_T)`` (``KD_T = T^2 * KL(softmax(z_T/T)
|| softmax(z_m/T))``, batch mean), stone i weighs ``1 / 2^(3-i)``, and ``--ensemble always``
adds ``KD_4(z_m || mean_i z_i)`` (the stones' ensemble, detached) for every model.
``--methods kd`` is the student's terms alone, ``ce`` its cross-entropy alone. The crops pad
the normalised image with zeros (mean grey); ``--pad black`` pads the image black before
normalising, as bwrf-train and the teacher's own training do.

Each run writes ``runs/results/blockkd-reference/<method>[_ens]_seed<k>.json`` (per-epoch test
accuracy of the student, of each stone for Block-KD, and seconds); a finished run is skipped,
an unfinished one restarts (one epoch: minutes). At the end (or with ``--table-only``) the runs
are copied to ``benchmarks/results/accuracy/runs/blockkd-reference/`` and tabulated beside the
``blockkd-fp`` suite's ``bwrf-train`` records in
``benchmarks/results/accuracy/blockkd_reference_<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.accuracy.lsq_fidelity import cosine_sgd, crop_batches, load_cifar10_jpeg, normalize
from bwrf_ext.models.cifar_resnet import cifar_resnet  # the architecture only
from bwrf_ext.models.pretrained import akamaster_weights_path, default_shared_dir
from bwrf_ext.train.checkpoint import fp_weights, load_into  # reads the weight file only

RUNS = Path("runs/results/blockkd-reference")
LABELS = {"ce": "CE", "kd": "KD", "kd_padblack": "KD (independent: black padding)",
          "blockkd": "Block-KD", "blockkd_ens": "Block-KD + ensemble"}  # fmt: skip
BATCH = 128
T = 4.0


def stem(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.relu(net.bn1(net.conv1(x)))


def head(net: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return net.linear(F.adaptive_avg_pool2d(h, 1).flatten(1))


def kd(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return T * T * F.kl_div(F.log_softmax(student / T, 1), F.softmax(target / T, 1),
                            reduction="batchmean")  # fmt: skip


def stone_logits(student: nn.Module, teacher: nn.Module, connectors: nn.ModuleList,
                 x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """(student logits, [z_1, z_2, z_3]) with z_i = teacher suffix after block i of C_i(h_i)."""
    student_layers = [student.layer1, student.layer2, student.layer3]
    teacher_layers = [teacher.layer1, teacher.layer2, teacher.layer3]
    h, stones = stem(student, x), []
    for i, layer in enumerate(student_layers):
        h = layer(h)
        z = connectors[i](h)
        for later in teacher_layers[i + 1 :]:
            z = later(z)
        stones.append(head(teacher, z))
    return head(student, h), stones


def train(method: str, seed: int, epochs: int, lr: float, ensemble: bool,
          pad_black: bool = False) -> dict:  # fmt: skip
    torch.manual_seed(seed)
    data = load_cifar10_jpeg(default_shared_dir() / "data" / "cifar10_jpeg_q75" /
                             "cifar10_jpeg_q75.npz")  # fmt: skip
    student = cifar_resnet(20, num_classes=10)
    teacher = cifar_resnet(56, num_classes=10)
    path = str(akamaster_weights_path(56))
    load_into(teacher, fp_weights(path)[0], path)
    teacher.eval().requires_grad_(False)
    connectors = nn.ModuleList(
        nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) for c in (16, 32, 64)
    )
    trained = list(student.parameters())
    if method == "blockkd":
        trained += list(connectors.parameters())
    n = len(data["train_y"])
    step = cosine_sgd(trained, lr, epochs * (n // BATCH))
    stone_weights = [1 / 4, 1 / 2, 1.0]
    g = torch.Generator().manual_seed(seed)
    batch = crop_batches(data["train_x"], pad_black)
    x_test = normalize(data["test_x"])
    started, history = time.perf_counter(), []
    for epoch in range(epochs):
        student.train()
        connectors.train()
        order, total = torch.randperm(n, generator=g), 0.0
        for start in range(0, n - BATCH + 1, BATCH):
            index = order[start : start + BATCH]
            x = batch(index, g)
            y = data["train_y"][index]
            if method == "ce":
                loss = F.cross_entropy(student(x), y)
            else:
                with torch.no_grad():
                    z_t = teacher(x)
                if method == "kd":
                    z_s = student(x)
                    loss = F.cross_entropy(z_s, y) + kd(z_s, z_t)
                else:
                    z_s, stones = stone_logits(student, teacher, connectors, x)
                    z_e = torch.stack(stones).mean(0).detach()
                    models = [(1.0, z_s)] + list(zip(stone_weights, stones, strict=True))
                    loss = sum(w * (F.cross_entropy(z, y) + kd(z, z_t)
                                    + (kd(z, z_e) if ensemble else 0.0))
                               for w, z in models)  # fmt: skip
            total += step(loss)
        student.eval()
        connectors.eval()
        correct = torch.zeros(4)
        with torch.no_grad():
            for start in range(0, len(x_test), 500):
                x, y = x_test[start : start + 500], data["test_y"][start : start + 500]
                if method == "blockkd":
                    z_s, stones = stone_logits(student, teacher, connectors, x)
                else:  # no trained stones to score
                    z_s, stones = student(x), []
                for k, z in enumerate([z_s, *stones]):
                    correct[k] += (z.argmax(1) == y).sum()
        acc = (100.0 * correct / len(x_test)).tolist()
        record = {"epoch": epoch + 1, "train_loss": total / (n // BATCH), "acc": acc[0],
                  "s": round(time.perf_counter() - started, 1)}  # fmt: skip
        if method == "blockkd":
            record.update({f"acc_stone{i}": acc[i] for i in (1, 2, 3)})
        print(json.dumps(record), flush=True)
        history.append(record)
    return {"method": method, "ensemble": ensemble, "seed": seed, "epochs": epochs, "lr": lr,
            "threads": torch.get_num_threads(), "history": history,
            "acc": history[-1]["acc"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["ce", "kd", "blockkd"],
                        choices=("ce", "kd", "blockkd"))  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--ensemble", choices=("off", "always"), default="off")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--pad",
        choices=("mean", "black"),
        default="mean",
        help="crop padding: zeros after normalising (mean grey) or black pixels",
    )
    parser.add_argument("--table-only", action="store_true", help="train nothing, tabulate")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    RUNS.mkdir(parents=True, exist_ok=True)
    for seed in [] if args.table_only else args.seeds:
        for method in args.methods:
            ensemble = method == "blockkd" and args.ensemble == "always"
            name = f"{method}{'_ens' if ensemble else ''}_seed{seed}"
            if args.pad == "black":
                name = name.replace("_seed", "_padblack_seed")
            if args.epochs != 1 or args.lr != 0.1:
                name += f"_ep{args.epochs}_lr{args.lr:g}"
            out = RUNS / f"{name}.json"
            if out.is_file():
                print(f"[{name}] done before: {json.loads(out.read_text())['acc']:.2f} %")
                continue
            result = train(method, seed, args.epochs, args.lr, ensemble, args.pad == "black")
            out.write_text(json.dumps(result, indent=1) + "\n")
            print(f"[{name}] {result['acc']:.2f} %", flush=True)
    write_table()


def write_table() -> None:
    """The independent runs (1 epoch, lr 0.1) beside bwrf-train's blockkd-fp records, by seed."""
    from benchmarks.accuracy.results_runs import mean_sd
    from benchmarks.report import ACCURACY_RESULTS, write_results
    from bwrf_ext._backend import describe_device

    kept = ACCURACY_RESULTS / "runs" / "blockkd-reference"
    kept.mkdir(parents=True, exist_ok=True)
    for path in RUNS.glob("*.json"):
        shutil.copy(path, kept / path.name)
    lines = [
        "# Block-KD: bwrf-train beside an independent plain-PyTorch Block-KD, same budget",
        "",
        "ResNet-20 student from scratch, frozen akamaster ResNet-56 teacher, CIFAR-10 JPEG-q75 "
        "copy, 1 epoch, SGD lr 0.1 cosine, batch 128, T = 4, alpha = 1, stones 1..3 weighted "
        "1/4, 1/2, 1. bwrf-train: the `blockkd-fp` suite of `benchmarks/accuracy/results_runs.py`"
        " (Block-KD without the ensemble term, bwrf-train's default; `+ ensemble`: `--gamma 1`, "
        "the term gated on the ensemble's batch accuracy). Independent: "
        "`python -m benchmarks.accuracy.blockkd_reference` (`+ ensemble`: the paper's term "
        "always on).",
        "",
        "| method | seeds | bwrf-train (%) | independent (%) | ours − independent | per seed "
        "(ours / independent) | independent stones 1 / 2 / 3 (%) |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    rows = []
    for key, label in LABELS.items():  # the keys name the suite's runs too (less "_padblack")
        found = {}
        for path in sorted(kept.glob(f"{key}_seed*.json")):
            if (seed := path.stem.removeprefix(f"{key}_seed")).isdigit():
                found[int(seed)] = json.loads(path.read_text())
        if not found:
            continue
        ours, suite = {}, ACCURACY_RESULTS / "runs" / "blockkd-fp"
        for seed in found:
            run = key.removesuffix("_padblack") + (f"_seed{seed}" if seed else "")
            summary = suite / run / "summary.json"
            if summary.is_file():
                ours[seed] = json.loads(summary.read_text())["final"]["acc"]
        seeds = sorted(found)
        theirs = [found[s]["acc"] for s in seeds]
        paired = [s for s in seeds if s in ours]
        stones = "-"
        if key.startswith("blockkd"):
            last = [found[s]["history"][-1] for s in seeds]
            stones = " / ".join(mean_sd([r[f"acc_stone{i}"] for r in last]) for i in (1, 2, 3))
        per_seed = " ; ".join(
            f"{ours[s]:.2f} / {found[s]['acc']:.2f}" if s in ours else f"- / {found[s]['acc']:.2f}"
            for s in seeds
        )
        difference = mean_sd([ours[s] - found[s]["acc"] for s in paired], "+") if paired else "-"
        ours_mean = mean_sd([ours[s] for s in paired]) if paired else "-"
        lines.append(f"| {label} | {len(seeds)} | {ours_mean} | {mean_sd(theirs)} | {difference} "
                     f"| {per_seed} | {stones} |")  # fmt: skip
        rows.append({"method": key, "seeds": seeds, "ours": [ours.get(s) for s in seeds],
                     "independent": theirs})  # fmt: skip
    device = describe_device(torch.device("cpu"))[0]
    stem = ACCURACY_RESULTS / f"blockkd_reference_{device}"
    write_results(stem, lines, rows)


if __name__ == "__main__":
    main()
