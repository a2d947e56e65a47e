"""Multi-process training under torchrun: process group, rank, and helpers for rank 0 only."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank, the world size and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, plots and writes checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (a copy; in place on every rank's copy)."""
        if self.enabled:
            values = values.clone()
            dist.all_reduce(values)
        return values


def setup(device: str) -> Distributed:
    """Joins torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA).

    Args:
        device: "cpu", "cuda" or "auto" (CUDA when available); under torchrun each process
            takes ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device")
        chosen = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, chosen)


def teardown(state: Distributed) -> None:
    if state.enabled and dist.is_initialized():
        dist.destroy_process_group()
