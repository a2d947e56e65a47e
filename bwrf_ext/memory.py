"""Activation memory of training: the bytes of the storages autograd saves for backward."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["saved_activation_bytes"]


class _Saved:
    """What the pack hook leaves in the graph: the tensor, in a holder whose death (the graph
    freed) can be observed."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class saved_activation_bytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the storages autograd saves for backward while active; a context manager.

    Named and used like the ``saved_tensors_hooks`` it extends. A saved tensor counts its whole
    storage, once however many saved tensors share it (views, repeated saves), from its first
    save until the last graph holding it is freed (by backward, or when dropped). Parameters are
    not counted (the model holds them anyway): no ``nn.Parameter``, and no storage of the tensors
    given as ``parameters``, which catches their views (``F.linear`` saves ``weight.t()``).

    Example::

        with saved_activation_bytes(model.parameters()) as saved:
            loss = F.cross_entropy(model(x), y)   # saved.total: what the forward saved
            loss.backward()                       # saved.current drops back to 0
        print(saved.total, saved.peak)

    Args:
        parameters: tensors whose storages are not counted, besides every ``nn.Parameter``.

    Attributes:
        total: bytes of every storage saved while active.
        current: bytes of those a live graph still holds.
        peak: the largest ``current`` while active.
        live: (device, data_ptr) -> [saved references, bytes] of the storages still held.
    """

    def __init__(self, parameters: Iterable[torch.Tensor] = ()) -> None:
        super().__init__(self._pack, self._unpack)
        self.exclude = {(str(p.device), p.untyped_storage().data_ptr()) for p in parameters}
        self.live: dict[tuple[str, int], list[int]] = {}
        self.total = self.current = self.peak = 0

    def __enter__(self) -> saved_activation_bytes:
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor | _Saved:
        key = (str(t.device), t.untyped_storage().data_ptr())
        if isinstance(t, nn.Parameter) or key in self.exclude:
            return t
        entry = self.live.get(key)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            self.live[key] = [1, nbytes]
            self.total += nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        holder = _Saved(t)
        weakref.finalize(holder, self._release, key)
        return holder

    @staticmethod
    def _unpack(packed: torch.Tensor | _Saved) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key: tuple[str, int]) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]
