"""Fidelity check: ``bwrf-train --method lsq`` against an independent LSQ loop, same budget.

Usage: ``python -m benchmarks.accuracy.lsq_fidelity [--bits 2 4] [--seeds 0] [--pad black|mean]
[--init-from PATH] [--parallel 2] [--threads 1]``.

Side by side, for each bit width and seed: one epoch of ``bwrf-train --method lsq`` (ResNet-20,
CIFAR-10 JPEG copy, first/last layer 8-bit, SGD lr 0.01 cosine, batch 128, from the akamaster
FP weights by default), and one epoch of the plain-PyTorch LSQ below, written from the paper
(Esser et al. 2020) and importing none of bwrf_ext's quantizers, data pipeline or training loop
(only the ResNet-20 definition and the weight-file reader). It prints both test accuracies and
their difference, and writes
``benchmarks/results/accuracy/lsq_fidelity_<start>_init-<init>[_ep<n>]_pad-<pad>_<device>.md``
and ``.json``, keeping the pairs of earlier calls with other bits or seeds (a table grows seed
by seed). Both sides pad their random crops alike (``--pad``): the first tables (no ``_pad-``)
padded the independent loop's crops grey and bwrf-train's black, which alone was worth 0.2
points at W4A4.
A library whose LSQ trails this loop by more than the seeds' spread has a bug: that is how the
ATen clip test and the eval-mode calibration were found (issue 16).

Each run lives in ``runs/results/fidelity/<name>``: a finished one is skipped, an interrupted
``bwrf-train`` run resumed; the independent loop (one epoch, minutes) restarts from scratch.

The independent implementation (:class:`PaperLSQ`, :func:`paper_quantize`) is also the oracle
of ``python_tests/test_fidelity.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RUNS = Path("runs/results/fidelity")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the akamaster weights' normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------ LSQ, as the paper writes it
def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in value, its gradient times scale."""
    return (x - x * scale).detach() + x * scale


def round_pass(x: torch.Tensor) -> torch.Tensor:
    """round(x) in value, the identity's gradient (straight-through)."""
    return (x.round() - x).detach() + x


class PaperLSQ(nn.Module):
    """LSQ: v_hat = round(clip(v / s, -Qn, Qp)) * s, g = 1 / sqrt(N * Qp), s initialised to
    2 * mean|v| / sqrt(Qp) on the first tensor it sees; per-channel over dim 0 with channels."""

    def __init__(self, bits: int, signed: bool, channels: int | None = None) -> None:
        super().__init__()
        self.qn = 2 ** (bits - 1) if signed else 0
        self.qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.per_channel = channels is not None
        self.s = nn.Parameter(torch.ones(channels or ()))
        self.initialised = False

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        dims = list(range(1, v.dim())) if self.per_channel else list(range(v.dim()))
        if not self.initialised:
            with torch.no_grad():
                self.s.copy_(2 * v.abs().mean(dim=dims) / math.sqrt(self.qp))
            self.initialised = True
        per_step = v.numel() // (v.shape[0] if self.per_channel else 1)
        s = grad_scale(self.s, 1.0 / math.sqrt(per_step * self.qp))
        if self.per_channel:
            s = s.reshape(-1, *([1] * (v.dim() - 1)))
        return round_pass(torch.clamp(v / s, -self.qn, self.qp)) * s


class PaperQConv(nn.Module):
    """A conv whose weights (per output channel) and input (per tensor) go through PaperLSQ."""

    def __init__(self, conv: nn.Conv2d, bits: int, input_signed: bool) -> None:
        super().__init__()
        self.conv = conv
        self.wq = PaperLSQ(bits, True, conv.out_channels)
        self.aq = PaperLSQ(bits, input_signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(self.aq(x), self.wq(c.weight), c.bias, c.stride, c.padding, c.dilation,
                        c.groups)  # fmt: skip


class PaperQLinear(nn.Module):
    """A linear layer with PaperLSQ weights (per output unit) and unsigned input (after ReLU)."""

    def __init__(self, linear: nn.Linear, bits: int) -> None:
        super().__init__()
        self.linear = linear
        self.wq = PaperLSQ(bits, True, linear.out_features)
        self.aq = PaperLSQ(bits, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.aq(x), self.wq(self.linear.weight), self.linear.bias)


def paper_quantize(model: nn.Module, bits: int, first_last_bits: int = 8) -> nn.Module:
    """Every Conv2d/Linear of a ReLU network (in place): the first and the last at
    first_last_bits, the rest at bits; only the first layer's input is signed (the image)."""
    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for index, (name, module) in enumerate(layers):
        edge = index in (0, len(layers) - 1)
        b = first_last_bits if edge else bits
        if isinstance(module, nn.Conv2d):
            quantized = PaperQConv(module, b, input_signed=index == 0)
        else:
            quantized = PaperQLinear(module, b)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)
    return model


# ------------------------------------------------------------------ the independent loop
def load_cifar10_jpeg(npz_path: Path) -> dict[str, torch.Tensor]:
    """Train/test images as uint8 (N, 3, 32, 32) and int64 labels, decoded with torchvision."""
    from torchvision.io import decode_jpeg

    data = np.load(npz_path)
    out = {}
    for split in ("train", "test"):
        jpeg, offsets = data[f"{split}_jpeg"], data[f"{split}_offsets"]
        buffers = [torch.from_numpy(jpeg[offsets[i]:offsets[i + 1]].copy())
                   for i in range(len(offsets) - 1)]  # fmt: skip
        out[f"{split}_x"] = torch.stack(decode_jpeg(buffers))
        out[f"{split}_y"] = torch.from_numpy(data[f"{split}_labels"].astype(np.int64))
    return out


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def cosine_sgd(
    params, lr: float, steps: int, nesterov: bool = False
) -> Callable[[torch.Tensor], float]:
    """SGD (momentum 0.9, weight decay 1e-4), the rate decayed to 0 by a per-step cosine over
    ``steps``; returns ``step(loss)``: backward, one optimiser and schedule step, ``loss.item()``.
    The independent loops' optimiser (this one, ``fp_reference``, ``blockkd_reference``)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4,
                                nesterov=nesterov)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )

    def step(loss: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss.item()

    return step


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of the 4-pixel zero-padded images, half of them mirrored."""
    n = images.shape[0]
    padded = F.pad(images, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2, n), generator=g)
    crops = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


def crop_batches(
    images: torch.Tensor, pad_black: bool
) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """``batch(index, g)``: the augmented, normalised training images at ``index``. The crops
    pad the normalised image with zeros (mean grey), or with ``pad_black`` the uint8 image with
    black before normalising (as bwrf-train and the akamaster training pad)."""
    if pad_black:
        return lambda index, g: normalize(augment(images[index], g))
    normalized = normalize(images)  # once: grey padding crops the normalised set
    return lambda index, g: augment(normalized[index], g)


def independent_run(
    bits: int, seed: int, init_from: str, data_dir: Path, epochs: int = 1, lr: float = 0.01,
    batch_size: int = 128, pad_black: bool = False,
) -> dict:  # fmt: skip
    """Trains ResNet-20 LSQ W<bits>A<bits> with plain PyTorch; returns its test accuracy.
    ``pad_black``: the crops' border, see :func:`crop_batches`."""
    from bwrf_ext.models.cifar_resnet import cifar_resnet  # the architecture only
    from bwrf_ext.train.checkpoint import fp_weights, load_into  # reads the weight file only

    started = time.perf_counter()
    torch.manual_seed(seed)
    data = load_cifar10_jpeg(data_dir / "cifar10_jpeg_q75.npz")
    model = cifar_resnet(20, num_classes=10)
    state, _ = fp_weights(init_from)
    load_into(model, state, init_from)
    paper_quantize(model, bits)
    model.train()  # the step sizes start on the first training batch, in its forward
    g = torch.Generator().manual_seed(seed)
    batch = crop_batches(data["train_x"], pad_black)
    n = len(data["train_y"])
    step = cosine_sgd(model.parameters(), lr, epochs * (n // batch_size))
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            step(F.cross_entropy(model(batch(index, g)), data["train_y"][index]))
    model.eval()
    correct = 0
    with torch.no_grad():
        x_test = normalize(data["test_x"])
        for start in range(0, len(x_test), 500):
            logits = model(x_test[start:start + 500])
            correct += int((logits.argmax(1) == data["test_y"][start:start + 500]).sum())
    return {"acc": 100.0 * correct / len(x_test), "wall_s": time.perf_counter() - started,
            "bits": bits, "seed": seed, "init_from": init_from, "epochs": epochs,
            "pad": "black" if pad_black else "grey"}  # fmt: skip


# ------------------------------------------------------------------ the side-by-side driver
def _independent_job(bits: int, seed: int, args: argparse.Namespace) -> dict:
    out = _independent_dir(bits, seed, args)
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "benchmarks.accuracy.lsq_fidelity", "--independent-only",
               "--bits", str(bits), "--seeds", str(seed), "--init-from", args.init_from,
               "--epochs", str(args.epochs), "--pad", args.pad]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    import subprocess

    with open(out / "console.txt", "a") as console:
        result = subprocess.run(command, stdout=console, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"independent run W{bits} seed {seed} failed: see {out}/console.txt")
    return json.loads((out / "summary.json").read_text())


def _independent_dir(bits: int, seed: int, args: argparse.Namespace) -> Path:
    pad = "" if args.pad == "mean" else f"_pad{args.pad}"  # "mean": the first runs' grey
    return RUNS / f"paper{pad}_w{bits}a{bits}" / f"seed{seed}"


def main(argv: list[str] | None = None) -> None:
    from benchmarks.accuracy.results_runs import mean_sd, run
    from benchmarks.report import ACCURACY_RESULTS as RESULTS_DIR
    from benchmarks.report import write_results
    from bwrf_ext._backend import describe_device
    from bwrf_ext.models.pretrained import akamaster_weights_path, default_shared_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--init-from", default=None, help="default: akamaster ResNet-20")
    parser.add_argument(
        "--step-init", default="lsq", choices=("lsq", "absmax", "mse"),
        help="bwrf-train's step-size init; the independent loop always uses the paper's (lsq), "
        "so lsq compares like with like",
    )  # fmt: skip
    parser.add_argument(
        "--pad", default="black", choices=("black", "mean"),
        help="both sides' crop border: black pixels (bwrf-train's default) or the mean "
        "(bwrf-train --pad-fill mean; the independent loop pads the normalised image with 0)",
    )  # fmt: skip
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--independent-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    data_dir = default_shared_dir() / "data" / "cifar10_jpeg_q75"
    args.init_from = args.init_from or str(akamaster_weights_path(20))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.independent_only:  # one run of the independent loop, in its own process
        for bits in args.bits:
            for seed in args.seeds:
                summary = independent_run(bits, seed, args.init_from, data_dir, args.epochs,
                                          pad_black=args.pad == "black")  # fmt: skip
                out = _independent_dir(bits, seed, args)
                out.mkdir(parents=True, exist_ok=True)
                (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
                print(json.dumps(summary))
        return

    from concurrent.futures import ThreadPoolExecutor

    tag = "akamaster" if "akamaster" in args.init_from else Path(args.init_from).name
    jobs = []
    for bits in args.bits:
        for seed in args.seeds:
            options = ["--method", "lsq", "--model", "resnet20", "--dataset", "cifar10",
                       "--data-dir", str(data_dir), "--init-from", args.init_from,
                       "--w-bits", str(bits), "--a-bits", str(bits), "--epochs", str(args.epochs),
                       "--lr", "0.01", "--seed", str(seed),
                       "--step-init", args.step_init, "--pad-fill", args.pad]  # fmt: skip
            extra = [f"--threads={args.threads}"] if args.threads else []
            pad = "_padmean" if args.pad == "mean" else ""
            name = f"ours_{tag}_init-{args.step_init}{pad}_w{bits}a{bits}_seed{seed}"
            jobs.append(("ours", bits, seed, (name, "fidelity", options, extra, True)))
            jobs.append(("paper", bits, seed, None))
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(run, *job) if kind == "ours" else
                   pool.submit(_independent_job, bits, seed, args)
                   for kind, bits, seed, job in jobs]  # fmt: skip
        results = [f.result() for f in futures]
    rows, table = [], {}
    for (kind, bits, seed, _), summary in zip(jobs, results, strict=True):
        acc = summary["final"]["acc"] if kind == "ours" else summary["acc"]
        table.setdefault(bits, {}).setdefault(kind, {})[seed] = acc
    device = describe_device(torch.device("cpu"))[0]
    epochs = "" if args.epochs == 1 else f"_ep{args.epochs}"
    pad = f"_pad-{args.pad}"
    stem = RESULTS_DIR / f"lsq_fidelity_{tag}_init-{args.step_init}{epochs}{pad}_{device}"
    # The table grows run by run: pairs of earlier calls (other bits or seeds) are kept, this
    # call's results replace theirs.
    if stem.with_suffix(".json").is_file():
        for row in json.loads(stem.with_suffix(".json").read_text()):
            for kind, key in (("ours", "ours"), ("paper", "independent")):
                kept = table.setdefault(row["bits"], {}).setdefault(kind, {})
                for seed, acc in zip(row["seeds"], row[key], strict=True):
                    kept.setdefault(seed, acc)
    lines = [
        "# LSQ fidelity: bwrf-train against an independent plain-PyTorch LSQ, same budget",
        "",
        f"ResNet-20 from `{args.init_from.replace(str(default_shared_dir()), '../shared')}`, "
        f"CIFAR-10 JPEG-q75 copy, {args.epochs} epoch(s), SGD lr 0.01 cosine, batch 128, "
        f"first/last layer 8-bit; bwrf-train with `--step-init {args.step_init}`, the "
        "independent loop with the paper's init; crops padded "
        + ("black on both sides" if args.pad == "black" else
           "with the mean (bwrf-train `--pad-fill mean`, the independent loop zeros after "
           "normalising)")
        + f"; written by `python -m benchmarks.accuracy.lsq_fidelity --pad {args.pad}`.",
        "",
        "| bits | seeds | bwrf-train LSQ (%) | independent LSQ (%) | ours − independent |"
        " per seed (ours / independent) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for bits, kinds in sorted(table.items()):
        seeds = sorted(set(kinds["ours"]) & set(kinds["paper"]))
        ours = [kinds["ours"][s] for s in seeds]
        paper = [kinds["paper"][s] for s in seeds]
        diff = [o - p for o, p in zip(ours, paper, strict=True)]
        lines.append(
            f"| W{bits}A{bits} | {len(seeds)} | {mean_sd(ours)} | {mean_sd(paper)} | "
            f"{mean_sd(diff, '+')} | "
            + " ; ".join(f"{o:.2f} / {p:.2f}" for o, p in zip(ours, paper, strict=True)) + " |"
        )
        rows.append({"bits": bits, "seeds": seeds, "ours": ours, "independent": paper})
    write_results(stem, lines, rows)


if __name__ == "__main__":
    main()
