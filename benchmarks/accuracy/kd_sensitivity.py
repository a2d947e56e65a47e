"""Why bwrf-train's plain KD and the independent KD differ by seed only: one stream, two loops.

Usage: ``python -m benchmarks.accuracy.kd_sensitivity [--steps 12] [--seed 0]``.

The ``blockkd-fp`` suite's KD run (``bwrf-train --method blockkd --branches none``: ResNet-20
from scratch, akamaster ResNet-56 teacher, lr 0.1) and the independent KD of
``blockkd_reference.py`` (black padding: the same images, normalisation and augmentation) are
fed the same batches from bwrf-train's loader and start from the same weights. Beside them the
independent loop runs a second time from those weights multiplied by ``1 + 3e-8 * N(0, 1)``
(float32 rounding's size). It prints, per step, both loops' losses and the relative distance
of their weights, ours vs independent and independent vs its perturbed copy: when the two
distances grow alike, the loops are the same computation up to rounding, and from-scratch
training at this rate amplifies rounding into a different run within a few steps, so seeds (and
implementations) differ by what the seeds' spread says, nothing more.
Needs ``../shared`` (the CIFAR-10 JPEG copy and the teacher); about a minute on one core.
"""

from __future__ import annotations

import argparse
import copy
import itertools

import torch
import torch.nn.functional as F

from benchmarks.accuracy.blockkd_reference import kd
from benchmarks.accuracy.lsq_fidelity import cosine_sgd
from bwrf_ext.models.cifar_resnet import cifar_resnet
from bwrf_ext.models.pretrained import akamaster_weights_path, default_shared_dir
from bwrf_ext.train import build, distributed
from bwrf_ext.train.checkpoint import fp_weights, load_into
from bwrf_ext.train.config import parse_args


def distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """||w_a - w_b|| / ||w_b|| over all parameters."""
    wa = torch.cat([p.detach().flatten() for p in a.parameters()])
    wb = torch.cat([p.detach().flatten() for p in b.parameters()])
    return float((wa - wb).norm() / wb.norm())


def trajectories(steps: int = 12, seed: int = 0) -> list[dict[str, float]]:
    """Per step: both loops' losses and the two relative weight distances (see the module)."""
    torch.set_num_threads(1)
    shared = default_shared_dir()
    teacher_path = str(akamaster_weights_path(56))
    config = parse_args([
        "--dataset", "cifar10", "--data-dir", str(shared / "data" / "cifar10_jpeg_q75"),
        "--model", "resnet20", "--method", "blockkd", "--branches", "none", "--teacher-from",
        teacher_path, "--normalization", "imagenet", "--lr", "0.1", "--seed", str(seed),
        "--out", "runs/kd_sensitivity", "--threads", "1",
    ])  # fmt: skip
    dist = distributed.setup(config.device)
    built = build.build(config, dist, None)
    ours = built.method
    loader, _ = build.loaders(config, dist, built.data)
    loader.set_epoch(0)
    optimizer, scheduler = build.optimizer(config, ours, len(loader))

    teacher = cifar_resnet(56, num_classes=10)
    load_into(teacher, fp_weights(teacher_path)[0], teacher_path)
    teacher.eval().requires_grad_(False)
    independent = cifar_resnet(20, num_classes=10)
    independent.load_state_dict(ours.model.state_dict())
    perturbed = copy.deepcopy(independent)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.mul_(1 + 3e-8 * torch.randn(p.shape, generator=generator))
    loops = [(net, cosine_sgd(net.parameters(), config.lr, len(loader)))
             for net in (independent, perturbed)]  # fmt: skip

    ours.trainable.train()
    rows = []
    for x, y in itertools.islice(loader, steps):
        optimizer.zero_grad(set_to_none=True)
        loss_ours = ours.step(ours.trainable, x, y, torch.autocast("cpu", enabled=False))["loss"]
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            target = teacher(x)
        losses = []
        for net, step in loops:
            logits = net(x)
            losses.append(step(F.cross_entropy(logits, y) + kd(logits, target)))
        rows.append({"loss_ours": loss_ours, "loss_independent": losses[0],
                     "ours_vs_independent": distance(ours.model, independent),
                     "independent_vs_perturbed": distance(independent, perturbed)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("step | loss ours | loss independent | ours vs independent | independent vs perturbed")
    for k, row in enumerate(trajectories(args.steps, args.seed)):
        print(
            f"{k + 1:4d} | {row['loss_ours']:9.5f} | {row['loss_independent']:16.5f} | "
            f"{row['ours_vs_independent']:19.2e} | {row['independent_vs_perturbed']:24.2e}"
        )


if __name__ == "__main__":
    main()
