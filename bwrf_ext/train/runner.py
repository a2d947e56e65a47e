"""The training run behind ``bwrf-train``: data, model, method, epochs, checkpoints, reports.

How a run treats its directory (``--out``): it takes the directory's lock first (a second run
on it is refused, naming the holder), then checks everything it can before training: options,
data files, weights, the model's fit to the images. It writes nothing until it is about to
write its first checkpoint, at the end of epoch 1: log lines wait in memory, and the files of
an old run it replaces (``--overwrite``) are deleted only then. So a run that fails or is
interrupted before that leaves the directory as it found it (one it created is removed again),
and an old run survives a replacement that could not start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import bwrf_ext
from bwrf_ext._backend import describe_device
from bwrf_ext.data import (
    GRAYSCALE_DATASETS,
    DataError,
    ImageData,
    InMemoryImages,
    load_image_data,
)
from bwrf_ext.models.registry import build_model, needs_rgb, split_named_model
from bwrf_ext.train import distributed
from bwrf_ext.train.checkpoint import (
    FORMAT,
    fp_weights,
    load_checkpoint,
    load_into,
    remove_stale_temp_files,
    save_checkpoint,
)
from bwrf_ext.train.cli import RESUME_MAY_CHANGE, UsageError, option_defaults
from bwrf_ext.train.lock import DirectoryInUse, RunDirectoryLock
from bwrf_ext.train.methods import (
    Method,
    blockkd_method,
    bwrf_method,
    contsup_method,
    plain_method,
)
from bwrf_ext.train.reporting import MetricsLog, plot_accuracy

# Files a run writes in its directory; --overwrite removes exactly these.
RUN_FILES = ("last.pt", "metrics.jsonl", "metrics.csv", "accuracy.png", "summary.json",
             "log.txt", "config.json", "tensorboard")  # fmt: skip
EVAL_BATCH = 256


class RunError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss): reported as one line, exit status 2."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what was kept (a checkpoint to resume, or nothing): main prints it."""

    def __init__(self, kept: str) -> None:
        super().__init__(kept)
        self.kept = kept


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Runs (or resumes) one training run as described by parsed ``bwrf-train`` options.

    Returns:
        The run summary (also written to ``<out>/summary.json``).

    Raises:
        UsageError, CheckpointError, DataError, RunError: one-line failures (exit status 2).
        RunInterrupted: Ctrl-C, saying what was kept.
    """
    dist_state = distributed.setup(args.device)
    run = None
    try:
        run = _Run(args, dist_state)
        return run.run()
    except KeyboardInterrupt:
        kept = run.kept(interrupted=True) if run is not None else "nothing was written"
        raise RunInterrupted(kept) from None
    finally:
        if run is not None:
            run.close()
        distributed.teardown(dist_state)


class _Run:
    def __init__(self, args: argparse.Namespace, dist_state: distributed.Distributed) -> None:
        self.dist = dist_state
        self.out = Path(args.out)
        self.log_path = self.out / "log.txt"
        # Whether --out holds this run's files yet (a resumed run's: from the start), the epoch
        # of its last checkpoint, and the files of an old run it replaces when it commits.
        self.committed = False
        self.checkpoint_epoch: int | None = None
        self.replaces: list[str] = []
        self._pending_log: list[str] = []
        self._weights: dict[str, tuple[dict, dict]] = {}  # --init-from/--teacher-from, read once
        self.lock = self._lock_out_dir()
        try:
            self.resumed = self._prepare_out_dir(args)
            self.args = args if self.resumed is None else self._resumed_args(args, self.resumed)
            if self.args.batch_size % dist_state.world_size:
                raise UsageError(
                    f"--batch-size {self.args.batch_size} must be divisible by the "
                    f"{dist_state.world_size} processes"
                )
            if self.args.sync_bn and not (
                dist_state.enabled and dist_state.device.type == "cuda"
            ):
                raise UsageError("--sync-bn needs multi-process CUDA training (torchrun on GPUs)")
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------- set-up
    def _lock_out_dir(self) -> RunDirectoryLock | None:
        """Rank 0 takes --out's lock (creating the directory); every rank learns the outcome."""
        error, lock = None, None
        if self.dist.is_main:
            try:
                lock = RunDirectoryLock.acquire(self.out)
            except DirectoryInUse as in_use:
                error = UsageError(f"--out {in_use}")
            except OSError as os_error:
                error = UsageError(
                    f"--out {self.out}: cannot create or lock the run directory: "
                    f"{os_error.strerror or os_error}"
                )
        if self.dist.enabled:  # the other ranks must not train on when rank 0 was refused
            locked = int(self.dist.sum(torch.tensor([0 if error else 1]))[0])
            if error is None and locked < self.dist.world_size:
                error = UsageError(f"rank 0 could not lock --out {self.out} (see its message)")
        if error is not None:
            if lock is not None:
                lock.release(remove_created=True)
            raise error
        return lock

    def _prepare_out_dir(self, args: argparse.Namespace) -> dict | None:
        """Refuses to touch an existing run unless told; returns the checkpoint to resume.

        Deletes nothing of an existing run: with --overwrite its files are listed in
        ``replaces`` and deleted by :meth:`_commit`.
        """
        if self.dist.is_main:  # under the lock: no other run can be writing them
            remove_stale_temp_files(self.out / "last.pt")
        existing = [name for name in RUN_FILES if (self.out / name).exists()]
        if args.resume:
            if not (self.out / "last.pt").is_file():
                raise UsageError(
                    f"--resume: no checkpoint {self.out / 'last.pt'} to continue (a run stopped "
                    "before the end of its first epoch writes none: start it without --resume)"
                )
            ckpt = load_checkpoint(self.out / "last.pt")
            self.committed, self.checkpoint_epoch = True, ckpt["epoch"]
            return ckpt
        if existing and not args.overwrite:
            raise UsageError(
                f"--out {self.out} already holds a run ({', '.join(existing[:3])}); continue it "
                "with --resume, replace it with --overwrite, or choose another --out"
            )
        self.replaces = existing
        return None

    def _commit(self) -> None:
        """Makes --out this run's, right before its first checkpoint is written.

        Only now, with the data loaded, the model built and an epoch trained, are the old run's
        files deleted (its last.pt is replaced atomically by the new one) and the log lines
        held so far written.
        """
        for name in self.replaces:
            path = self.out / name
            if name == "last.pt":
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.committed = True
        with open(self.log_path, "a") as f:
            f.writelines(line + "\n" for line in self._pending_log)
        self._pending_log.clear()

    def kept(self, interrupted: bool = False) -> str:
        """What a run stopped now leaves, and (interrupted) what to do next."""
        if self.checkpoint_epoch is not None:
            note = f"the checkpoint of epoch {self.checkpoint_epoch} is kept in {self.out}"
            return note + (": continue with --resume" if interrupted else "")
        if self.replaces:
            return f"no epoch finished, so nothing was written: the run in {self.out} is as it was"
        note = "no epoch finished, so nothing was written"
        return note + (": run the same command to start again" if interrupted else "")

    def close(self) -> None:
        """Drops the lock; a run that never committed also removes the directories it made."""
        if self.lock is not None:
            self.lock.release(remove_created=not self.committed)
            self.lock = None

    def _resumed_args(self, args: argparse.Namespace, ckpt: dict) -> argparse.Namespace:
        saved = {**option_defaults(), **ckpt["args"]}  # options newer than the checkpoint
        for name in sorted(getattr(args, "explicit", set()) - RESUME_MAY_CHANGE):
            if getattr(args, name) != saved.get(name):
                raise UsageError(
                    f"--{name.replace('_', '-')} {getattr(args, name)} differs from the resumed "
                    f"run's {saved.get(name)}; drop it or start a new --out"
                )
        saved.update({name: getattr(args, name) for name in RESUME_MAY_CHANGE})
        return argparse.Namespace(**saved)

    def log(self, message: str) -> None:
        """Prints a line; log.txt gets it too, once the run has committed (held until then)."""
        if not self.dist.is_main:
            return
        tqdm.write(message, file=sys.stdout)
        if not self.committed:
            self._pending_log.append(message)
            return
        with open(self.log_path, "a") as f:
            f.write(message + "\n")

    def _data(self, normalization: str) -> ImageData:
        args = self.args
        if args.download and self.dist.enabled and not self.dist.is_main:
            self.dist.barrier()  # rank 0 downloads first
        try:
            data = load_image_data(
                args.dataset, args.data_dir, download=args.download and self.dist.is_main,
                augment=args.augment, normalization=normalization, seed=args.seed,
                rgb=needs_rgb(args.model), image_size=args.image_size,
            )  # fmt: skip
        except DataError:
            raise
        except ValueError as error:  # an option the data set cannot take
            raise UsageError(f"--dataset {args.dataset}: {error}") from None
        if args.download and self.dist.enabled and self.dist.is_main:
            self.dist.barrier()
        for split in ("train", "test"):
            size = getattr(args, f"{split}_subset")
            if size is not None:
                setattr(data, split, _stratified_subset(getattr(data, split), size, split))
        return data

    def _model_and_method(self, data: ImageData) -> Method:
        args = self.args
        torch.manual_seed(args.seed)  # the same initial weights on every rank and on resume
        model = self._build("model", args.model, data)
        # The frozen partner: BWRF's is the FP model itself, Block-KD's a teacher of its own.
        teacher = (
            self._build("teacher-model", args.teacher_model, data)
            if args.method == "blockkd" else None
        )  # fmt: skip
        example = _example_batch(data)
        for option, name, net in (("model", args.model, model),
                                  ("teacher-model", args.teacher_model, teacher)):  # fmt: skip
            if net is not None:
                _check_takes_images(option, name, net, example, data)
        partner = teacher if teacher is not None else model
        ckpt = self.resumed
        if ckpt is not None:
            if ckpt.get("partner") is not None:
                load_into(partner, ckpt["partner"], "the checkpoint's partner")
        else:
            sources = (("init_from", model, args.model),
                       ("teacher_from", teacher, args.teacher_model))  # fmt: skip
            for option, target, name in sources:
                path = getattr(args, option)
                if path is None:
                    continue
                state, info = self._fp_weights(path)
                if info["model"] is not None and info["model"] != name:
                    raise UsageError(
                        f"--{option.replace('_', '-')} {path} holds a {info['model']}, not "
                        f"the {name} it is given for"
                    )
                load_into(target, state, f"--{option.replace('_', '-')} {path}")
        quantized = args.w_bits is not None
        net = model
        if quantized:
            config = bwrf_ext.QuantConfig(clip_test=args.clip_test, init=args.step_init)
            net = bwrf_ext.quantize_model(
                model, args.w_bits, args.a_bits, args.first_last_bits or None, config=config
            )
        if args.sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        try:
            method = self._method(net, model, teacher, data, example, quantized)
        except ValueError as error:  # a method option that does not fit this model or data
            raise UsageError(f"--method {args.method}: {error}") from None
        method.trainable.to(self.dist.device)
        self._weights.clear()  # loaded into the models: no second copy for the whole run
        if ckpt is not None:
            load_into(method.trainable, ckpt["trainable"], "the checkpoint's model")
        elif method.quantized:
            self._calibrate(method, data)
        if method.quantized:  # LSQ's gradient factor counts the global batch (1 process: no-op)
            bwrf_ext.set_data_parallel_size(method.trainable, self.dist.world_size)
        return method

    def _build(self, option: str, name: str, data: ImageData) -> nn.Module:
        try:
            return build_model(name, data.shape)
        except ValueError as error:  # e.g. an RGB-only model on grayscale images
            raise UsageError(f"--{option} {name}: {error}") from None

    def _method(self, net, model, teacher, data: ImageData, example, quantized: bool) -> Method:
        """The --method around the (quantized) net; config errors raise ValueError."""
        args = self.args
        if args.method in ("fp", "lsq"):
            method = plain_method(args.method, net, quantized)
        elif args.method == "bwrf":
            config = bwrf_ext.BWRFConfig(alpha=args.alpha, **_given(
                temperature=args.temperature, branch_weights=args.branch_weights,
                branches=args.branches,
            ))  # fmt: skip
            lp_split = self._split(args.model, net, example)
            self._check_branches(config, lp_split)
            method = bwrf_method(
                net, model, config, lp_split, self._split(args.model, model, example)
            )
        elif args.method == "blockkd":
            config = bwrf_ext.BlockKDConfig(
                alpha=args.alpha, beta=args.beta, gamma=args.gamma, kd=args.kd,
                **_given(temperature=args.temperature, stone_weights=args.branch_weights,
                         stones=args.branches),
            )  # fmt: skip
            student_split = self._split(args.model, net, example)
            self._check_branches(config, student_split)
            method = blockkd_method(
                net, teacher, config, student_split,
                self._split(args.teacher_model, teacher, example), example, quantized,
            )  # fmt: skip
        else:
            config = bwrf_ext.ContSupConfig(
                num_modules=args.contsup_k, split=args.contsup_split,
                context=args.contsup_context, aux_head=args.contsup_aux_head,
                local_loss=args.contsup_loss, reconstruction=args.contsup_reconstruction,
                preset=args.contsup_preset,
                image_mean=data.mean, image_std=data.std,
            )  # fmt: skip
            split = self._split(args.model, net, example)
            method = contsup_method(net, config, split, example, quantized)
        return method

    def _fp_weights(self, path: str) -> tuple[dict, dict]:
        if path not in self._weights:
            self._weights[path] = fp_weights(path)
        return self._weights[path]

    def _split(self, name: str, model: nn.Module, example: torch.Tensor):
        try:
            return split_named_model(name, model, example)
        except TypeError:  # a model without an automatic split
            raise UsageError(
                f"--method {self.args.method} grafts blocks, but {name} has no block split "
                "(CIFAR ResNets, resnet8x4/32x4, WRNs, cifar_resnet18, small_cnn, torchvision "
                "ResNets and MobileNetV2 have one)"
            ) from None

    def _check_branches(self, config, split) -> None:
        """--branches names blocks the split has (the config's message says which exist)."""
        try:
            config.resolve(len(split.blocks))
        except ValueError as error:
            given = ",".join(map(str, self.args.branches)) or "none"
            raise UsageError(f"--branches {given}: {error}") from None

    @torch.no_grad()
    def _calibrate(self, method: Method, data: ImageData) -> None:
        """Initialises the step sizes on one fixed batch (the same on every rank) in train
        mode, as training runs; BatchNorm's running statistics stay those of the FP weights."""
        g = torch.Generator().manual_seed(self.args.seed)
        count = min(self.args.batch_size, len(data.train))
        indices = torch.randperm(len(data.train), generator=g)[:count].tolist()
        x = torch.stack([data.train[i][0] for i in indices]).to(self.dist.device)
        try:
            bwrf_ext.calibrate(method.model, x)
        except ValueError as error:
            raise RunError(str(error)) from None

    def _optimizer(self, method: Method, steps_per_epoch: int):
        args = self.args
        params = [p for p in method.trainable.parameters() if p.requires_grad]
        if args.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                nesterov=args.nesterov,
            )  # fmt: skip
        else:
            optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        total = args.epochs * steps_per_epoch
        warmup = args.warmup_epochs * steps_per_epoch

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(1, total - warmup)
            if args.schedule == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * t))
            if args.schedule == "step":  # /10 at half and at three quarters of the run
                return 0.1 ** ((t >= 0.5) + (t >= 0.75))
            return 1.0

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # ----------------------------------------------------------------------------- running
    def run(self) -> dict[str, Any]:
        args, dist_state = self.args, self.dist
        started = time.perf_counter()
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        normalization, init_info = self._normalization()
        data = self._data(normalization)
        method = self._model_and_method(data)
        self.log(
            f"{args.method} {args.model} on {args.dataset} ({data.source}; {len(data.train)} "
            f"train / {len(data.test)} test, {data.shape.channels}x{data.shape.height}x"
            f"{data.shape.width}, normalization {normalization})"
            + (f", W{args.w_bits}A{args.a_bits}" if method.quantized else "")
            + f", device {dist_state.device}, {dist_state.world_size} process(es)"
            + (f", from {init_info}" if init_info else "")
        )
        for note in data.notes:
            self.log(f"note: {note}")
        per_rank = args.batch_size // dist_state.world_size
        sampler = DistributedSampler(
            data.train, dist_state.world_size, dist_state.rank, shuffle=True, seed=args.seed
        )
        loader = DataLoader(
            data.train, per_rank, sampler=sampler, num_workers=args.workers, drop_last=True,
            pin_memory=dist_state.device.type == "cuda",
        )  # fmt: skip
        if len(loader) == 0:
            raise UsageError(
                f"--batch-size {args.batch_size} exceeds the {len(data.train)} training images"
            )
        if len(data.test) < dist_state.world_size:
            raise UsageError(f"{len(data.test)} test images for {dist_state.world_size} processes")
        test_loader = DataLoader(
            Subset(data.test, range(dist_state.rank, len(data.test), dist_state.world_size)),
            EVAL_BATCH,
        )
        optimizer, scheduler = self._optimizer(method, len(loader))
        start_epoch, history = 0, []
        if self.resumed is not None:
            optimizer.load_state_dict(self.resumed["optimizer"])
            scheduler.load_state_dict(self.resumed["scheduler"])
            torch.set_rng_state(self.resumed["rng"])
            start_epoch, history = self.resumed["epoch"], self.resumed["history"]
            self.log(f"resumed after epoch {start_epoch} from {self.out / 'last.pt'}")
        module: nn.Module = method.trainable
        if dist_state.enabled and method.local_step is None:
            device_ids = [dist_state.device] if dist_state.device.type == "cuda" else None
            module = DistributedDataParallel(method.trainable, device_ids=device_ids)
        # A fresh run creates its metrics files when it commits (end of epoch 1).
        metrics = (
            MetricsLog(self.out, history, args.tensorboard)
            if dist_state.is_main and self.committed else None
        )  # fmt: skip
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if args.amp
            else contextlib.nullcontext()
        )  # fmt: skip
        title = f"{args.method} {args.model} {args.dataset}" + (
            f" W{args.w_bits}A{args.a_bits}" if method.quantized else ""
        )
        record: dict[str, Any] = history[-1] if history else {}
        try:
            for epoch in range(start_epoch, args.epochs):
                sampler.set_epoch(epoch)
                data.set_epoch(epoch)
                tic = time.perf_counter()
                terms = self._train_epoch(method, module, loader, optimizer, scheduler, autocast,
                                          epoch)  # fmt: skip
                train_s = time.perf_counter() - tic
                record = {
                    "epoch": epoch + 1,
                    "lr": scheduler.get_last_lr()[0],
                    "train_s": round(train_s, 3),
                    **{f"train_{k}": v for k, v in terms.items()},
                    **self._evaluate(method, test_loader, autocast),
                }
                if dist_state.is_main:
                    if not self.committed:
                        self._commit()
                        metrics = MetricsLog(self.out, history, args.tensorboard)
                    metrics.append(record)
                    self._save(method, optimizer, scheduler, epoch + 1, metrics.records, data,
                               normalization)  # fmt: skip
                    plot_accuracy(metrics.records, self.out / "accuracy.png", title)
                self.committed, self.checkpoint_epoch = True, epoch + 1  # on every rank
                accs = ", ".join(
                    f"{k} {v:.2f}" for k, v in record.items() if k.startswith("acc")
                )
                self.log(
                    f"epoch {epoch + 1}/{args.epochs}: loss {record['train_loss']:.4f}, {accs} "
                    f"(lr {record['lr']:.4g}, {train_s:.1f} s)"
                )
                dist_state.barrier()
        finally:
            if metrics is not None:
                metrics.close()
        summary = {
            "method": args.method, "model": args.model, "dataset": args.dataset,
            "data_source": data.source, "notes": data.notes,
            "w_bits": args.w_bits, "a_bits": args.a_bits, "epochs": args.epochs,
            "final": record, "wall_s": round(time.perf_counter() - started, 1),
            "world_size": dist_state.world_size, "device": _device_name(dist_state.device),
            "torch": torch.__version__, "backend": bwrf_ext.build_info().get("backend"),
            "args": _plain_args(args),
        }  # fmt: skip
        if dist_state.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.log(f"done: {self.out} (last.pt, metrics.jsonl/csv, accuracy.png)")
        return summary

    def _normalization(self) -> tuple[str, str]:
        """(normalisation, a note on the init weights): auto follows how they were trained."""
        args = self.args
        if self.resumed is not None:
            return self.resumed["normalization"], ""
        weights = args.init_from or args.teacher_from
        info = self._fp_weights(weights)[1] if weights else None
        if args.normalization != "auto":
            chosen = args.normalization
        else:
            chosen = (info or {}).get("normalization") or "dataset"
        if (chosen == "imagenet" and args.dataset in GRAYSCALE_DATASETS
                and not needs_rgb(args.model)):  # fmt: skip
            option = "--init-from" if args.init_from else "--teacher-from"
            raise UsageError(
                f"{option} {weights} holds {info['source']} weights, trained on RGB images with "
                f"ImageNet statistics: they do not fit {args.model} on the grayscale "
                f"{args.dataset} images"
            )
        note = f"{weights} ({info['source']} weights)" if info else ""
        return chosen, note

    def _train_epoch(self, method, module, loader, optimizer, scheduler, autocast, epoch):
        args, device = self.args, self.dist.device
        method.trainable.train()
        sums: dict[str, float] = defaultdict(float)
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True,
            disable=not (self.dist.is_main and args.progress), file=sys.stderr,
        )  # fmt: skip
        for step, (x, y) in enumerate(bar):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            terms = method.step(module, x, y, autocast)
            if self.dist.enabled and method.local_step is not None:
                self._average_gradients(method)
            if not math.isfinite(terms["loss"]):
                raise RunError(
                    f"the loss is {terms['loss']} at epoch {epoch + 1}, step {step + 1}; "
                    f"{self.kept()}; try a lower --lr than {args.lr}"
                    + (" in a new run (--overwrite or another --out)" if self.committed else "")
                )
            optimizer.step()
            scheduler.step()
            for key, value in terms.items():
                sums[key] += value
            if step % 10 == 0:
                bar.set_postfix(loss=f"{terms['loss']:.3f}")
        keys = sorted(sums)
        totals = self.dist.sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        steps = len(loader) * self.dist.world_size
        return {k: float(v) / steps for k, v in zip(keys, totals, strict=True)}

    def _average_gradients(self, method: Method) -> None:
        """What DDP does for one-backward methods, for a method that backpropagates itself."""
        grads = [p.grad for p in method.trainable.parameters() if p.grad is not None]
        flat = self.dist.sum(torch.cat([g.flatten() for g in grads])) / self.dist.world_size
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(mean.view_as(grad))

    @torch.no_grad()
    def _evaluate(self, method: Method, loader: DataLoader, autocast) -> dict[str, float]:
        """Test accuracy (%) of the model and of every branch, summed exactly over ranks."""
        method.trainable.eval()
        correct: dict[str, int] = defaultdict(int)
        seen = 0
        for x, y in loader:
            x, y = x.to(self.dist.device), y.to(self.dist.device)
            with autocast:
                logits = method.evaluate(x)
            for key, value in logits.items():
                correct[key] += int((value.argmax(1) == y).sum())
            seen += len(y)
        method.trainable.train()
        # The trained model first, then branches, then fixed references (the FP partner).
        keys = sorted(correct, key=lambda k: (k != "model", k in ("fp", "teacher"), k))
        counts = self.dist.sum(torch.tensor([correct[k] for k in keys] + [seen], dtype=torch.int64))
        total = int(counts[-1])
        return {
            ("acc" if k == "model" else f"acc_{k}"): 100.0 * int(c) / total
            for k, c in zip(keys, counts[:-1], strict=True)
        }

    def _save(self, method, optimizer, scheduler, epoch, records, data, normalization) -> None:
        ckpt = {
            "format": FORMAT,
            "epoch": epoch,
            "args": _plain_args(self.args),
            "quantized": method.quantized,
            "normalization": normalization,
            "data": {"name": data.name, "source": data.source, "mean": list(data.mean),
                     "std": list(data.std), "num_classes": data.shape.num_classes},  # fmt: skip
            "model": method.model.state_dict(),
            # What resuming restores: the model plus any trained module of the method
            # (Block-KD's connectors); the same tensors as "model" where there is none.
            "trainable": method.trainable.state_dict(),
            "partner": None if method.partner is None else method.partner.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": list(records),
        }
        save_checkpoint(ckpt, self.out / "last.pt")


def _given(**options: Any) -> dict[str, Any]:
    """The options that were set (None: keep the method config's own default)."""
    return {k: v for k, v in options.items() if v is not None}


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


def _stratified_subset(dataset, size: int, split: str):
    """A class-stratified subset of ``size`` items, the same for every seed (random_state 0)."""
    if not isinstance(dataset, InMemoryImages):
        raise UsageError(f"--{split}-subset works on in-memory data sets, not imagefolder")
    if size > len(dataset):
        raise UsageError(f"--{split}-subset {size} exceeds the {len(dataset)} {split} images")
    if size == len(dataset):
        return dataset
    from sklearn.model_selection import train_test_split

    labels = dataset.labels.numpy()
    classes = len(np.unique(labels))
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
    index = torch.tensor(sorted(indices))
    subset = InMemoryImages.__new__(InMemoryImages)
    subset.__dict__.update(dataset.__dict__)
    subset.images, subset.labels = dataset.images[index], dataset.labels[index]
    return subset


def _plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options as plain values (what ``torch.load(weights_only=True)`` reads back)."""
    return {k: v for k, v in vars(args).items() if k != "explicit"}


def _device_name(device: torch.device) -> str:
    tag, description = describe_device(device)
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    return f"{description} ({tag}{threads})"
