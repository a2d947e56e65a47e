"""The loop of a ``bwrf-train`` run: epochs, evaluation, checkpoints, metrics and the log.

What it trains is built by :mod:`bwrf_ext.train.build`; where it writes is kept by
:class:`~bwrf_ext.train.run_dir.RunDirectory` (nothing before the first checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import bwrf_ext
from bwrf_ext._backend import describe_device
from bwrf_ext.train import build, distributed
from bwrf_ext.train.checkpoint import FORMAT, save_checkpoint
from bwrf_ext.train.config import RunConfig
from bwrf_ext.train.errors import RunError, RunInterrupted
from bwrf_ext.train.methods import Method
from bwrf_ext.train.reporting import MetricsLog, plot_accuracy
from bwrf_ext.train.run_dir import RunDirectory


def train(config: RunConfig) -> dict[str, Any]:
    """Runs (or resumes) one training run as a checked RunConfig describes it.

    Returns:
        The run summary (also written to ``<out>/summary.json``).

    Raises:
        UsageError, CheckpointError, DataError, RunError: one-line failures (exit status 2).
        RunInterrupted: Ctrl-C, saying what was kept.
    """
    dist_state = distributed.setup(config.device)
    run = None
    try:
        run = _Run(config, dist_state)
        return run.run()
    except KeyboardInterrupt:
        kept = run.out.kept(interrupted=True) if run is not None else "nothing was written"
        raise RunInterrupted(kept) from None
    finally:
        if run is not None:
            run.out.close()
        distributed.teardown(dist_state)


class _Run:
    """One run: its directory locked, its config merged with the checkpoint it resumes."""

    def __init__(self, config: RunConfig, dist_state: distributed.Distributed) -> None:
        self.dist = dist_state
        self.out = RunDirectory(Path(config.out), dist_state)
        try:
            self.resumed = self.out.prepare(config.resume, config.overwrite)
            self.config = config if self.resumed is None else config.resumed(self.resumed["args"])
            self.config.check_processes(dist_state)
        except BaseException:
            self.out.close()
            raise

    def run(self) -> dict[str, Any]:
        config, dist_state, out = self.config, self.dist, self.out
        started = time.perf_counter()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        built = build.build(config, dist_state, self.resumed)
        data, method = built.data, built.method
        bits = f"W{config.w_bits}A{config.a_bits}" if config.quantized else ""
        out.log(
            f"{config.method} {config.model} on {config.dataset} ({data.source}; "
            f"{len(data.train)} train / {len(data.test)} test, {data.shape.channels}x"
            f"{data.shape.height}x{data.shape.width}, normalization {built.normalization})"
            + (f", {bits}" if bits else "")
            + f", device {dist_state.device}, {dist_state.world_size} process(es)"
            + (f", from {built.weights_note}" if built.weights_note else "")
        )
        for note in data.notes:
            out.log(f"note: {note}")
        loader, test_loader = build.loaders(config, dist_state, data)
        optimizer, scheduler = build.optimizer(config, method, len(loader))
        start_epoch, history = 0, []
        if self.resumed is not None:
            optimizer.load_state_dict(self.resumed["optimizer"])
            scheduler.load_state_dict(self.resumed["scheduler"])
            torch.set_rng_state(self.resumed["rng"])
            start_epoch, history = self.resumed["epoch"], self.resumed["history"]
            out.log(f"resumed after epoch {start_epoch} from {out.path / 'last.pt'}")
        module: nn.Module = method.trainable
        if dist_state.enabled and method.local_step is None:
            device_ids = [dist_state.device] if dist_state.device.type == "cuda" else None
            module = DistributedDataParallel(method.trainable, device_ids=device_ids)
        if config.compile:
            # Only runs the step: checkpoints and evaluation use the plain modules, so state_dict
            # keys carry no "_orig_mod." prefix. The quantizers were initialised (calibrated or
            # loaded) in build, so the graph holds no step-size initialisation.
            module = torch.compile(module)
        # A fresh run creates its metrics files when it commits (end of epoch 1).
        metrics = (
            MetricsLog(out.path, history, config.tensorboard)
            if dist_state.is_main and out.committed else None
        )  # fmt: skip
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if config.amp
            else contextlib.nullcontext()
        )  # fmt: skip
        title = f"{config.method} {config.model} {config.dataset}" + (f" {bits}" if bits else "")
        record: dict[str, Any] = history[-1] if history else {}
        try:
            for epoch in range(start_epoch, config.epochs):
                loader.set_epoch(epoch)
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
                    if not out.committed:
                        out.commit()
                        metrics = MetricsLog(out.path, history, config.tensorboard)
                    metrics.append(record)
                    self._save(method, optimizer, scheduler, epoch + 1, metrics.records, data,
                               built.normalization)  # fmt: skip
                    plot_accuracy(metrics.records, out.path / "accuracy.png", title)
                out.committed, out.checkpoint_epoch = True, epoch + 1  # on every rank
                accs = ", ".join(
                    f"{k} {v:.2f}" for k, v in record.items() if k.startswith("acc")
                )
                out.log(
                    f"epoch {epoch + 1}/{config.epochs}: loss {record['train_loss']:.4f}, {accs} "
                    f"(lr {record['lr']:.4g}, {train_s:.1f} s)"
                )
                dist_state.barrier()
        finally:
            if metrics is not None:
                metrics.close()
        summary = {
            "method": config.method, "model": config.model, "dataset": config.dataset,
            "data_source": data.source, "notes": data.notes,
            "w_bits": config.w_bits, "a_bits": config.a_bits, "epochs": config.epochs,
            "final": record, "wall_s": round(time.perf_counter() - started, 1),
            "world_size": dist_state.world_size, "device": _device_name(dist_state.device),
            "torch": torch.__version__, "backend": bwrf_ext.build_info().get("backend"),
            "args": config.args(),
        }  # fmt: skip
        if dist_state.is_main:
            (out.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            out.log(f"done: {out.path} (last.pt, metrics.jsonl/csv, accuracy.png)")
        return summary

    def _train_epoch(self, method, module, loader, optimizer, scheduler, autocast, epoch):
        config, device = self.config, self.dist.device
        method.trainable.train()
        sums: dict[str, float] = defaultdict(float)
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, dynamic_ncols=True,
            disable=not (self.dist.is_main and config.progress), file=sys.stderr,
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
                    f"{self.out.kept()}; try a lower --lr than {config.lr}"
                    + (" in a new run (--overwrite or another --out)" if self.out.committed else "")
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
            "args": self.config.args(),
            "quantized": self.config.quantized,
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
        save_checkpoint(ckpt, self.out.path / "last.pt")


def _device_name(device: torch.device) -> str:
    tag, description = describe_device(device)
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    return f"{description} ({tag}{threads})"
