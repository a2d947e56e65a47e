"""Building a ``bwrf-train`` run: its data, model, method (weights loaded, step sizes
calibrated), loaders and optimizer. Everything that needs a file is checked here, before the
loop writes anything; failures raise UsageError, DataError or CheckpointError naming the option.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

import bwrf_ext
from bwrf_ext.data import (
    GRAYSCALE_DATASETS,
    DataError,
    ImageData,
    InMemoryImages,
    InMemoryLoader,
    load_image_data,
)
from bwrf_ext.engine import registered_splits, split_model
from bwrf_ext.models.registry import build_model, needs_rgb
from bwrf_ext.train import distributed
from bwrf_ext.train.checkpoint import fp_weights, load_into
from bwrf_ext.train.config import RunConfig
from bwrf_ext.train.errors import RunError, UsageError
from bwrf_ext.train.methods import METHODS, Method, Parts

EVAL_BATCH = 256


@dataclass
class Built:
    """A run's data and method, ready for the loaders and the optimizer.

    Attributes:
        data: the data set (subsets taken).
        normalization: "dataset" or "imagenet", as --normalization resolved it.
        weights_note: where the initial weights came from, for the log ("" if nowhere).
        method: the method, on the run's device, its weights loaded (or calibrated).
    """

    data: ImageData
    normalization: str
    weights_note: str
    method: Method


def build(config: RunConfig, dist: distributed.Distributed, ckpt: dict | None) -> Built:
    """Builds the data and the method of a fresh run, or of one resumed from ``ckpt``."""
    weights: dict[str, tuple[dict, dict]] = {}  # --init-from/--teacher-from, each read once
    normalization, note = _normalization(config, ckpt, weights)
    data = _data(config, dist, normalization)
    method = _method(config, dist, data, ckpt, weights)
    return Built(data, normalization, note, method)


def loaders(
    config: RunConfig, dist: distributed.Distributed, data: ImageData
) -> tuple[InMemoryLoader | SampledLoader, Iterable[tuple[torch.Tensor, torch.Tensor]]]:
    """(this rank's training loader, its share of the test images).

    In-memory sets are batched on the run's device by InMemoryLoader (the same global batches
    for any number of processes); file-backed ones (imagefolder) go through a DataLoader with
    --workers over a DistributedSampler. Either reshuffles with ``set_epoch``.
    """
    if isinstance(data.train, InMemoryImages):
        loader = InMemoryLoader(
            data.train, config.batch_size, shuffle=True, drop_last=True,
            world_size=dist.world_size, rank=dist.rank, device=dist.device,
        )  # fmt: skip
    else:
        sampler = DistributedSampler(
            data.train, dist.world_size, dist.rank, shuffle=True, seed=config.seed
        )
        loader = SampledLoader(DataLoader(
            data.train, config.batch_size // dist.world_size, sampler=sampler,
            num_workers=config.workers, drop_last=True, pin_memory=dist.device.type == "cuda",
        ), sampler)  # fmt: skip
    if len(loader) == 0:
        raise UsageError(
            f"--batch-size {config.batch_size} exceeds the {len(data.train)} training images"
        )
    if len(data.test) < dist.world_size:
        raise UsageError(f"{len(data.test)} test images for {dist.world_size} processes")
    test_loader: Iterable[tuple[torch.Tensor, torch.Tensor]]
    if isinstance(data.test, InMemoryImages):
        # Rows rank::world_size of global batches of EVAL_BATCH * world_size: the images a
        # DataLoader over Subset(range(rank, n, world_size)) gives in batches of EVAL_BATCH.
        test_loader = InMemoryLoader(
            data.test, EVAL_BATCH * dist.world_size, world_size=dist.world_size,
            rank=dist.rank, device=dist.device,
        )  # fmt: skip
    else:
        test_loader = DataLoader(
            Subset(data.test, range(dist.rank, len(data.test), dist.world_size)), EVAL_BATCH
        )
    return loader, test_loader


@dataclass
class SampledLoader:
    """A DataLoader over a DistributedSampler whose ``set_epoch`` reshuffles (file-backed sets).

    Attributes:
        loader: this rank's DataLoader, drawing from ``sampler``.
        sampler: its DistributedSampler.
    """

    loader: DataLoader
    sampler: DistributedSampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def optimizer(config: RunConfig, method: Method, steps_per_epoch: int):
    """(optimizer, per-step LambdaLR scheduler) over the method's trainable parameters."""
    params = [p for p in method.trainable.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
            nesterov=config.nesterov,
        )  # fmt: skip
    else:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if config.schedule == "step":  # /10 at half and at three quarters of the run
            return 0.1 ** ((t >= 0.5) + (t >= 0.75))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _read_weights(weights: dict[str, tuple[dict, dict]], path: str) -> tuple[dict, dict]:
    if path not in weights:
        weights[path] = fp_weights(path)
    return weights[path]


def _normalization(config: RunConfig, ckpt: dict | None, weights: dict) -> tuple[str, str]:
    """(normalisation, a note on the init weights): auto follows how they were trained."""
    if ckpt is not None:
        return ckpt["normalization"], ""
    path = config.init_from or config.teacher_from
    info = _read_weights(weights, path)[1] if path else None
    if config.normalization != "auto":
        chosen = config.normalization
    else:
        chosen = (info or {}).get("normalization") or "dataset"
    if (chosen == "imagenet" and config.dataset in GRAYSCALE_DATASETS
            and not needs_rgb(config.model)):  # fmt: skip
        option = "--init-from" if config.init_from else "--teacher-from"
        raise UsageError(
            f"{option} {path} holds {info['source']} weights, trained on RGB images with "
            f"ImageNet statistics: they do not fit {config.model} on the grayscale "
            f"{config.dataset} images"
        )
    note = f"{path} ({info['source']} weights)" if info else ""
    return chosen, note


def _data(config: RunConfig, dist: distributed.Distributed, normalization: str) -> ImageData:
    if config.download and dist.enabled and not dist.is_main:
        dist.barrier()  # rank 0 downloads first
    try:
        data = load_image_data(
            config.dataset, config.data_dir, download=config.download and dist.is_main,
            augment=config.augment, pad_fill=config.pad_fill, normalization=normalization,
            seed=config.seed, rgb=needs_rgb(config.model), image_size=config.image_size,
        )  # fmt: skip
    except DataError:
        raise
    except ValueError as error:  # an option the data set cannot take
        raise UsageError(f"--dataset {config.dataset}: {error}") from None
    if config.download and dist.enabled and dist.is_main:
        dist.barrier()
    if config.workers and isinstance(data.train, InMemoryImages):
        data.notes.append(
            f"--workers {config.workers} unused: {config.dataset} is held in memory and "
            "batched on the run's device (workers read file-backed imagefolder sets)"
        )
    for split in ("train", "test"):
        size = getattr(config, f"{split}_subset")
        if size is not None:
            setattr(data, split, _stratified_subset(getattr(data, split), size, split))
    return data


def _stratified_subset(dataset: Any, size: int, split: str) -> InMemoryImages:
    """A class-stratified subset of ``size`` images, the same for every seed (random_state 0),
    in their order in ``dataset``."""
    if not isinstance(dataset, InMemoryImages):
        raise UsageError(f"--{split}-subset works on in-memory data sets, not imagefolder")
    if size > len(dataset):
        raise UsageError(f"--{split}-subset {size} exceeds the {len(dataset)} {split} images")
    if size == len(dataset):
        return dataset
    from sklearn.model_selection import train_test_split

    labels = dataset.labels.numpy()
    classes = len(set(labels.tolist()))
    if size < classes:
        raise UsageError(
            f"--{split}-subset {size} is fewer than the {classes} classes: a stratified subset "
            "takes at least one image of each"
        )
    try:
        indices, _ = train_test_split(
            range(len(labels)), train_size=size, stratify=labels, random_state=0
        )
    except ValueError as error:  # e.g. fewer images left out than classes
        raise UsageError(f"--{split}-subset {size}: no stratified subset of that size of the "
                         f"{len(labels)} {split} images: {error}") from None  # fmt: skip
    return dataset.subset(sorted(indices))


def _method(
    config: RunConfig, dist: distributed.Distributed, data: ImageData, ckpt: dict | None,
    weights: dict,
) -> Method:  # fmt: skip
    """The --method around the (quantized) model, its weights loaded and on the device."""
    spec = METHODS[config.method]
    torch.manual_seed(config.seed)  # the same initial weights on every rank and on resume
    model = _model("model", config.model, data)
    # The frozen partner: BWRF's is the FP model itself, Block-KD's a teacher of its own.
    teacher = _model("teacher-model", config.teacher_model, data) if spec.teacher else None
    example = _example_batch(data)
    for option, name, net in (("model", config.model, model),
                              ("teacher-model", config.teacher_model, teacher)):  # fmt: skip
        if net is not None:
            _check_takes_images(option, name, net, example, data)
    partner = teacher if teacher is not None else model
    if ckpt is not None:
        if ckpt.get("partner") is not None:
            load_into(partner, ckpt["partner"], "the checkpoint's partner")
    else:
        sources = (("init_from", model, config.model),
                   ("teacher_from", teacher, config.teacher_model))  # fmt: skip
        for option, target, name in sources:
            path = getattr(config, option)
            if path is None:
                continue
            state, info = _read_weights(weights, path)
            if info["model"] is not None and info["model"] != name:
                raise UsageError(
                    f"--{option.replace('_', '-')} {path} holds a {info['model']}, not "
                    f"the {name} it is given for"
                )
            load_into(target, state, f"--{option.replace('_', '-')} {path}")
    net = model
    if config.quantized:
        quant = bwrf_ext.QuantConfig(clip_test=config.clip_test, init=config.step_init)
        net = bwrf_ext.quantize_model(
            model, config.w_bits, config.a_bits, config.first_last_bits or None, config=quant
        )
    if config.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)

    def split(name: str, network: nn.Module):
        try:
            return split_model(network, example_input=example)
        except TypeError:  # a model without a registered split
            raise UsageError(
                f"--method {config.method} grafts blocks, but {name} has no block split "
                f"(registered: {'; '.join(registered_splits())})"
            ) from None

    try:
        method = spec.build(Parts(config, net, model, teacher, data, example, split))
    except ValueError as error:  # a method option that does not fit this model or data
        raise UsageError(f"--method {config.method}: {error}") from None
    method.trainable.to(dist.device)
    weights.clear()  # loaded into the models: no second copy for the whole run
    if ckpt is not None:
        load_into(method.trainable, ckpt["trainable"], "the checkpoint's model")
    elif config.quantized:
        _calibrate(config, dist, method, data)
    if config.quantized:  # LSQ's gradient factor counts the global batch (1 process: no-op)
        bwrf_ext.set_data_parallel_size(method.trainable, dist.world_size)
    return method


def _model(option: str, name: str, data: ImageData) -> nn.Module:
    try:
        return build_model(name, data.shape)
    except ValueError as error:  # e.g. an RGB-only model on grayscale images
        raise UsageError(f"--{option} {name}: {error}") from None


@torch.no_grad()
def _calibrate(
    config: RunConfig, dist: distributed.Distributed, method: Method, data: ImageData
) -> None:
    """Initialises the step sizes on one fixed batch (the same on every rank) in train mode, as
    training runs; BatchNorm's running statistics stay those of the FP weights."""
    g = torch.Generator().manual_seed(config.seed)
    count = min(config.batch_size, len(data.train))
    indices = torch.randperm(len(data.train), generator=g)[:count].tolist()
    x = torch.stack([data.train[i][0] for i in indices]).to(dist.device)
    try:
        bwrf_ext.calibrate(method.model, x)
    except ValueError as error:
        raise RunError(str(error)) from None


def _example_batch(data: ImageData) -> torch.Tensor:
    """Two copies of the first training image: what shape probes and split checks run on."""
    try:
        image = data.train[0][0]
    except Exception as error:  # a lazily read file (imagefolder) that does not decode
        raise DataError(f"{data.source}: cannot read the first training image: "
                        f"{type(error).__name__}: {error}") from None  # fmt: skip
    return image.unsqueeze(0).repeat(2, 1, 1, 1)


def _check_takes_images(
    option: str, name: str, model: nn.Module, example: torch.Tensor, data: ImageData
) -> None:
    """One eval-mode forward of the example: a model that cannot take these images (too small
    for it, or of another kind) is refused now, before anything is written, not in epoch 1."""
    was_training = model.training
    shape = data.shape
    images = f"the {shape.channels}x{shape.height}x{shape.width} images of {data.name}"
    try:
        # eval mode and a forked RNG: BatchNorm statistics and the random streams stay as
        # they were, so the run is the one it would be without this check.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()
            logits = model(example)
    except Exception as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(f"--{option} {name} cannot take {images}: {type(error).__name__}"
                         f"{': ' + text if text else ''}") from None  # fmt: skip
    finally:
        model.train(was_training)
    if tuple(logits.shape) != (len(example), shape.num_classes):
        raise UsageError(
            f"--{option} {name} gives outputs of shape {tuple(logits.shape)} on {images}, not "
            f"({len(example)}, {shape.num_classes}): one score per class"
        )
