"""bwrf-train against an independent loop on one stream: same batches, same starting point.

Usage: ``python -m benchmarks.accuracy.same_stream [--method kd|lsq] [--bits 4] [--steps 12]
[--seed 0] [--evaluate]``.

Two loops are fed the batches of bwrf-train's loader from the same weights (and, for LSQ, the
same step sizes), so that data order, augmentation and initialisation cannot differ:

- ``kd``: the ``blockkd-fp`` suite's KD run (``bwrf-train --method blockkd --branches none``:
  ResNet-20 from scratch, akamaster ResNet-56 teacher, lr 0.1) against the independent KD of
  ``blockkd_reference.py``;
- ``lsq``: the fidelity benchmark's run (``bwrf-train --method lsq --step-init lsq``: ResNet-20
  from the raw akamaster weights, W<bits>A<bits>, lr 0.01) against the independent LSQ of
  ``lsq_fidelity.py``, its step sizes copied from bwrf-train's calibration.

Beside them the independent loop runs a third time from its weights multiplied by
``1 + 3e-8 * N(0, 1)`` (float32 rounding's size). It prints, per step, both loops' losses and the
relative distance of their weights, ours vs independent and independent vs its perturbed copy:
when the two distances grow alike, the loops are one computation up to rounding, and training
amplifies rounding into a different run, so implementations differ by what the seeds' spread
says, nothing more. ``--evaluate`` trains all three for ``--steps`` (one epoch: 390) and prints
their test accuracies: what is left of a gap between bwrf-train and an independent loop once
the data and the starting point are shared.
Needs ``../shared`` (the CIFAR-10 JPEG copy and the weights); the default is about a minute on
one core, an evaluated epoch of LSQ about 12 minutes.
"""

from __future__ import annotations

import argparse
import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bwrf_ext
from benchmarks.accuracy.blockkd_reference import kd
from benchmarks.accuracy.lsq_fidelity import cosine_sgd, paper_quantize
from bwrf_ext.models.cifar_resnet import cifar_resnet
from bwrf_ext.models.pretrained import akamaster_weights_path, default_shared_dir
from bwrf_ext.train import build, distributed
from bwrf_ext.train.checkpoint import fp_weights, load_into
from bwrf_ext.train.config import parse_args


def distance(a: nn.Module, b: nn.Module) -> float:
    """||w_a - w_b|| / ||w_b|| over all parameters (the same layout in both)."""
    wa = torch.cat([p.detach().flatten() for p in a.parameters()])
    wb = torch.cat([p.detach().flatten() for p in b.parameters()])
    return float((wa - wb).norm() / wb.norm())


@dataclass
class Pair:
    """bwrf-train's run and the independent network it is compared with.

    Attributes:
        config: the run's configuration.
        built: its data and method (built and calibrated as bwrf-train builds them).
        independent: the independent network, starting where the method's model starts.
        loss: the independent loop's loss of (logits, x, y).
    """

    config: object
    built: build.Built
    independent: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _kd_pair(seed: int, shared) -> Pair:
    teacher_path = str(akamaster_weights_path(56))
    config = parse_args([
        "--dataset", "cifar10", "--data-dir", str(shared / "data" / "cifar10_jpeg_q75"),
        "--model", "resnet20", "--method", "blockkd", "--branches", "none", "--teacher-from",
        teacher_path, "--normalization", "imagenet", "--lr", "0.1", "--epochs", "1", "--seed",
        str(seed), "--out", "runs/same_stream", "--threads", "1",
    ])  # fmt: skip
    built = build.build(config, distributed.setup(config.device), None)
    teacher = cifar_resnet(56, num_classes=10)
    load_into(teacher, fp_weights(teacher_path)[0], teacher_path)
    teacher.eval().requires_grad_(False)
    independent = cifar_resnet(20, num_classes=10)
    independent.load_state_dict(built.method.model.state_dict())

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(x)
        return F.cross_entropy(logits, y) + kd(logits, target)

    return Pair(config, built, independent, loss)


def _lsq_pair(seed: int, bits: int, shared) -> Pair:
    init_from = str(akamaster_weights_path(20))
    config = parse_args([
        "--dataset", "cifar10", "--data-dir", str(shared / "data" / "cifar10_jpeg_q75"),
        "--model", "resnet20", "--method", "lsq", "--init-from", init_from, "--w-bits",
        str(bits), "--a-bits", str(bits), "--step-init", "lsq", "--lr", "0.01", "--epochs", "1",
        "--seed", str(seed), "--out", "runs/same_stream", "--threads", "1",
    ])  # fmt: skip
    built = build.build(config, distributed.setup(config.device), None)
    independent = cifar_resnet(20, num_classes=10)
    load_into(independent, fp_weights(init_from)[0], init_from)
    paper_quantize(independent, bits)
    quantizers = [m for m in built.method.model.modules() if isinstance(m, bwrf_ext.LSQQuantizer)]
    paper = [m for m in independent.modules() if hasattr(m, "initialised")]
    with torch.no_grad():  # weight then input quantizer of each layer, in both
        for mine, theirs in zip(quantizers, paper, strict=True):
            theirs.s.copy_(mine.scale.reshape(theirs.s.shape))
            theirs.initialised = True
    return Pair(config, built, independent, lambda logits, x, y: F.cross_entropy(logits, y))


@torch.no_grad()
def _accuracy(net: nn.Module, test_loader) -> float:
    net.eval()
    correct = total = 0
    for x, y in test_loader:
        correct += int((net(x).argmax(1) == y).sum())
        total += len(y)
    net.train()
    return 100.0 * correct / total


def trajectories(
    method: str = "kd", steps: int = 12, seed: int = 0, bits: int = 4, evaluate: bool = False
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """(per step: both loops' losses, our rate and the two relative weight distances; the
    three test accuracies after the last step, empty unless ``evaluate``), see the module."""
    torch.set_num_threads(1)
    shared = default_shared_dir()
    pair = _kd_pair(seed, shared) if method == "kd" else _lsq_pair(seed, bits, shared)
    config, ours, independent = pair.config, pair.built.method, pair.independent
    loader, test_loader = build.loaders(config, distributed.setup(config.device), pair.built.data)
    loader.set_epoch(0)
    optimizer, scheduler = build.optimizer(config, ours, len(loader))
    perturbed = copy.deepcopy(independent)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.mul_(1 + 3e-8 * torch.randn(p.shape, generator=generator))
    # Both schedules decay to 0 over one epoch (config.epochs is 1), as the measured runs do.
    loops = [(net, cosine_sgd(net.parameters(), config.lr, config.epochs * len(loader)))
             for net in (independent, perturbed)]  # fmt: skip

    ours.trainable.train()
    independent.train()
    perturbed.train()
    no_autocast = torch.autocast("cpu", enabled=False)
    rows = []
    for x, y in itertools.islice(loader, steps):
        optimizer.zero_grad(set_to_none=True)
        lr_ours = scheduler.get_last_lr()[0]
        loss_ours = ours.step(ours.trainable, x, y, no_autocast)["loss"]
        optimizer.step()
        scheduler.step()
        losses = [step(pair.loss(net(x), x, y)) for net, step in loops]
        rows.append({"loss_ours": loss_ours, "loss_independent": losses[0], "lr_ours": lr_ours,
                     "ours_vs_independent": distance(ours.model, independent),
                     "independent_vs_perturbed": distance(independent, perturbed)})  # fmt: skip
    accuracies = {}
    if evaluate:
        accuracies = {name: _accuracy(net, test_loader) for name, net in
                      (("ours", ours.model), ("independent", independent),
                       ("perturbed", perturbed))}  # fmt: skip
    return rows, accuracies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="kd", choices=("kd", "lsq"))
    parser.add_argument("--bits", type=int, default=4, help="LSQ's weight and input bits")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", action="store_true", help="test accuracies at the end")
    args = parser.parse_args(argv)
    rows, accuracies = trajectories(args.method, args.steps, args.seed, args.bits, args.evaluate)
    print("step | loss ours | loss independent | ours vs independent | independent vs perturbed")
    for k, row in enumerate(rows):
        print(
            f"{k + 1:4d} | {row['loss_ours']:9.5f} | {row['loss_independent']:16.5f} | "
            f"{row['ours_vs_independent']:19.2e} | {row['independent_vs_perturbed']:24.2e}"
        )
    for name, acc in accuracies.items():
        print(f"test accuracy {name}: {acc:.2f} %")


if __name__ == "__main__":
    main()
