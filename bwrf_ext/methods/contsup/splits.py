"""Where ContSup's modules end: the model's units, the published tables, the computed splits."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from torch import nn

from bwrf_ext.engine import BlockSplit
from bwrf_ext.models.cifar_resnet import CifarResNet

if TYPE_CHECKING:
    from bwrf_ext.methods.contsup.config import ContSupConfig

__all__ = [
    "INFOPRO_BALANCED_SPLITS",
    "INFOPRO_BALANCED_SPLITS_STL10",
    "INFOPRO_SPLITS",
    "PUBLISHED_BALANCED_LOSS_WEIGHTS",
    "PUBLISHED_LOSS_WEIGHTS",
    "LossWeights",
    "Position",
    "balanced_split",
    "even_split",
    "published_loss_weights",
    "published_split",
    "resolve_split",
]

# Where a module ends: (stage, block). Stage 0 is the stem (block 0 only); stage s >= 1 is the
# s-th residual stage and block b its b-th residual block, 0-based. A module ends *after* that
# unit; the K-th module ends at the network's head. This is the public code's convention.
Position = tuple[int, int]

# InfoPro's equal-layer table (Wang et al., ICLR 2021), reconstructed from
# github.com/blackfeather-wang/InfoPro-Pytorch, "Experiments on CIFAR-SVHN-STL10/networks/
# configs.py" (commit f4e91f06), dict `InfoPro`; ContSup's `iso_module_loc`
# (github.com/Tab-ct/ContSup, networks_dev/configs.py, commit d0144a8d) is the same table.
# K = 1 (end to end) is the empty tuple.
INFOPRO_SPLITS: dict[str, dict[int, tuple[Position, ...]]] = {
    "resnet32": {
        1: (),
        2: ((2, 1),),
        3: ((1, 4), (2, 4)),
        4: ((1, 2), (2, 1), (3, 0)),
        8: ((1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)),
        16: ((0, 0), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 0), (2, 1), (2, 2), (2, 3),
             (2, 4), (3, 0), (3, 1), (3, 2), (3, 3)),
    },
    "resnet110": {
        1: (),
        2: ((2, 8),),
        3: ((1, 17), (2, 17)),
        4: ((1, 11), (2, 7), (3, 3)),
        8: ((1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)),
        16: ((1, 1), (1, 4), (1, 7), (1, 10), (1, 13), (1, 16), (2, 1), (2, 4), (2, 7), (2, 11),
             (2, 15), (3, 1), (3, 5), (3, 9), (3, 13)),
    },
}

# Memory-balanced tables (CIFAR-10 entries). resnet110: InfoPro's `InfoPro_balanced_memory`
# (same file as above), which publishes K <= 4 only. resnet32: ContSup's
# `iso_module_loc_for_memory_balance` (same file as above), K in {2, 4, 8, 16}; its K = 16 equals
# the equal-layer table. Entries not published (resnet110 K = 8, 16; resnet32 K = 3) are computed
# by :func:`balanced_split` instead, with a warning.
INFOPRO_BALANCED_SPLITS: dict[str, dict[int, tuple[Position, ...]]] = {
    "resnet32": {
        1: (),
        2: ((1, 3),),
        4: ((1, 2), (1, 4), (2, 2)),
        8: ((1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 1), (3, 2)),
        16: INFOPRO_SPLITS["resnet32"][16],
    },
    "resnet110": {
        1: (),
        2: ((1, 14),),
        3: ((1, 9), (2, 2)),
        4: ((1, 6), (1, 14), (2, 8)),
    },
}

# ContSup's memory-balanced resnet110 table for STL-10 (96x96 images; same file, the "stl10"
# entry of `iso_module_loc_for_memory_balance`): only K = 3 differs from CIFAR-10's.
INFOPRO_BALANCED_SPLITS_STL10: dict[str, dict[int, tuple[Position, ...]]] = {
    "resnet110": {
        1: (),
        2: ((1, 14),),
        3: ((1, 8), (2, 1)),
        4: ((1, 6), (1, 14), (2, 8)),
    },
}


def published_split(
    arch: str, num_modules: int, balanced: bool, dataset: str = "cifar10"
) -> tuple[Position, ...] | None:
    """The published boundary positions for (arch, K), or None where none were published.

    Args:
        arch: "resnet32" or "resnet110" (other names have no table).
        num_modules: K.
        balanced: the memory-balanced table instead of the equal-layer one.
        dataset: selects the memory-balanced table: "stl10" has its own (resnet110 only); every
            other data set uses CIFAR-10's (the public code has none for them). The equal-layer
            table does not depend on the data set.
    """
    if not balanced:
        return INFOPRO_SPLITS.get(arch, {}).get(num_modules)
    table = INFOPRO_BALANCED_SPLITS_STL10 if dataset == "stl10" else INFOPRO_BALANCED_SPLITS
    return table.get(arch, {}).get(num_modules)


class LossWeights(NamedTuple):
    """(first, last) weights of the local loss and of the reconstruction loss.

    Local module m of 1..K-1 gets ``first + (last - first) * (m - 1) / (K - 2)`` (K = 2:
    ``first``), for each of the two losses.
    """

    local: tuple[float, float]
    recon: tuple[float, float]


# The public code's loss weights, arch -> dataset -> K (github.com/Tab-ct/ContSup,
# networks_dev/configs.py, commit d0144a8d, dicts `local_loss_scale` and
# `local_loss_scale_for_memory_balance`). Each of its entries is four numbers that train.py
# passes to the model as (ixx_1, ixy_1, ixx_2, ixy_2): the reconstruction ("I(x, h)") and the
# local-loss ("I(h, y)") weight of the first local module, then of the last one. The model
# multiplies them in only when the decoder is on (`--h_reconstruct`); without it every local
# loss has weight 1. Several entries give the first modules a local weight of 0: those modules
# learn from the reconstruction alone, as published.
PUBLISHED_LOSS_WEIGHTS: dict[str, dict[str, dict[int, LossWeights]]] = {
    "resnet32": {
        "cifar10": {
            2: LossWeights(local=(1.0, 0.0), recon=(5.0, 0.0)),
            4: LossWeights(local=(0.0, 2.0), recon=(6.0, 1.0)),
            8: LossWeights(local=(0.0, 2.0), recon=(5.0, 0.0)),
            16: LossWeights(local=(0.05, 0.5), recon=(5.0, 0.2)),
        },
    },
    "resnet110": {
        "cifar10": {
            2: LossWeights(local=(0.5, 0.0), recon=(5.0, 0.0)),
            4: LossWeights(local=(0.0, 1.0), recon=(1.0, 0.0)),
            8: LossWeights(local=(0.0, 1.0), recon=(5.0, 0.0)),
            16: LossWeights(local=(0.0, 1.0), recon=(5.0, 0.5)),
        },
        "stl10": {
            2: LossWeights(local=(1.0, 0.0), recon=(10.0, 0.0)),
            4: LossWeights(local=(0.2, 2.0), recon=(20.0, 5.0)),
            8: LossWeights(local=(0.2, 1.0), recon=(20.0, 5.0)),
            16: LossWeights(local=(0.5, 0.1), recon=(20.0, 10.0)),
        },
        "svhn": {
            2: LossWeights(local=(0.1, 0.0), recon=(1.0, 0.0)),
            4: LossWeights(local=(0.0, 0.0), recon=(5.0, 0.5)),
            8: LossWeights(local=(0.0, 2.0), recon=(5.0, 0.5)),
            16: LossWeights(local=(0.2, 1.0), recon=(5.0, 0.5)),
        },
    },
}

# The memory-balanced runs' weights (CIFAR-10 only; same file). Note resnet32 K = 3 has
# weights but no published split, and K = 16 a split but no weights.
PUBLISHED_BALANCED_LOSS_WEIGHTS: dict[str, dict[str, dict[int, LossWeights]]] = {
    "resnet32": {
        "cifar10": {
            2: LossWeights(local=(0.1, 0.0), recon=(5.0, 0.0)),
            3: LossWeights(local=(0.0, 0.1), recon=(5.0, 5.0)),
            4: LossWeights(local=(0.0, 0.1), recon=(5.0, 0.0)),
            8: LossWeights(local=(0.0, 2.0), recon=(5.0, 0.0)),
        },
    },
    "resnet110": {
        "cifar10": {
            2: LossWeights(local=(0.1, 0.0), recon=(5.0, 0.0)),
            3: LossWeights(local=(0.0, 0.1), recon=(5.0, 5.0)),
            4: LossWeights(local=(0.0, 0.1), recon=(5.0, 0.0)),
        },
    },
}


def published_loss_weights(
    arch: str, dataset: str, num_modules: int, balanced: bool
) -> LossWeights | None:
    """The public code's loss weights for (arch, dataset, K), or None where it has none.

    Args:
        arch: "resnet32" or "resnet110" (other names have no table).
        dataset: "cifar10"; resnet110 also "stl10" and "svhn".
        num_modules: K.
        balanced: the memory-balanced runs' table instead of the equal-layer one.
    """
    table = PUBLISHED_BALANCED_LOSS_WEIGHTS if balanced else PUBLISHED_LOSS_WEIGHTS
    return table.get(arch, {}).get(dataset, {}).get(num_modules)


def even_split(num_units: int, num_modules: int) -> list[int]:
    """Unit indices after which modules end, for K modules of (nearly) equal unit counts.

    Module k (1-based) ends after unit ``ceil(U * k / K) - 1``; on ResNet-32 (U = 16 units: the
    stem and 15 blocks) this reproduces InfoPro's equal-layer table for every published K.

    Args:
        num_units: U, the number of units (stem + residual blocks).
        num_modules: K, 1 <= K <= U.

    Returns:
        K - 1 increasing unit indices in [0, U - 2].
    """
    _check_num_modules(num_units, num_modules)
    return [math.ceil(num_units * k / num_modules) - 1 for k in range(1, num_modules)]


def balanced_split(costs: Sequence[float], num_modules: int) -> list[int]:
    """Unit indices after which modules end, minimising the largest module's summed cost.

    Exact (dynamic programming over contiguous partitions, O(K U^2)); ties go to the partition
    whose earlier modules end first. ContSup uses each unit's saved-activation bytes as its
    cost, so the result balances the per-module training memory (the auxiliary heads' share is
    not included).

    Args:
        costs: U >= 1 non-negative unit costs, in order.
        num_modules: K, 1 <= K <= U.

    Returns:
        K - 1 increasing unit indices in [0, U - 2].
    """
    num_units = len(costs)
    _check_num_modules(num_units, num_modules)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    # best[k][u]: the smallest possible max cost splitting units 0..u-1 into k modules.
    best = [[math.inf] * (num_units + 1) for _ in range(num_modules + 1)]
    cut = [[0] * (num_units + 1) for _ in range(num_modules + 1)]
    best[0][0] = 0.0
    for k in range(1, num_modules + 1):
        for u in range(k, num_units + 1):
            for v in range(k - 1, u):  # the k-th module is units v..u-1
                value = max(best[k - 1][v], prefix[u] - prefix[v])
                if value < best[k][u]:
                    best[k][u], cut[k][u] = value, v
    ends, u = [], num_units
    for k in range(num_modules, 1, -1):
        u = cut[k][u]
        ends.append(u - 1)
    return ends[::-1]


def _check_num_modules(num_units: int, num_modules: int) -> None:
    if not 1 <= num_modules <= num_units:
        raise ValueError(
            f"ContSup: num_modules must be in [1, {num_units}] (one module needs at least one "
            f"unit: the stem or a residual block), got {num_modules}"
        )


def resolve_split(
    config: ContSupConfig, positions: list[Position], costs: list[int], arch: str | None
) -> tuple[list[int], str]:
    """(unit indices after which modules 1..K-1 end, a description of where they came from).

    Args:
        config: the options; ``split``, ``num_modules`` and ``table_dataset`` are read.
        positions: the (stage, block) position of every unit (:meth:`BlockSplit.units`).
        costs: every unit's saved-activation bytes, the "balanced" split's costs.
        arch: the table key, or None (no table: the computed fallback, with a warning).
    """
    k, num_units = config.num_modules, len(positions)
    index = {p: u for u, p in enumerate(positions)}
    if not isinstance(config.split, str):
        unknown = [p for p in config.split if p not in index]
        if unknown:
            raise ValueError(
                f"ContSup: split positions {unknown} do not exist; this model's units are "
                f"(0, 0) (stem) and (stage, block) for stage sizes "
                f"{_stage_sizes(positions)}"
            )
        ends = [index[p] for p in config.split]
        if any(b <= a for a, b in zip(ends, ends[1:], strict=False)):
            raise ValueError(
                f"ContSup: split positions must be strictly increasing, got {config.split}"
            )
        return ends, "user"
    if k == 1:
        return [], "end-to-end"
    if k > num_units:
        raise ValueError(
            f"ContSup: num_modules must be in [1, {num_units}] for this model ({num_units} "
            f"units: the stem and {num_units - 1} blocks), got {k}"
        )
    if config.split == "even":
        return even_split(num_units, k), "even"
    if config.split == "balanced":
        return balanced_split(costs, k), "balanced"
    balanced = config.split == "infopro_balanced"
    table = (
        published_split(arch, k, balanced, config.table_dataset) if arch is not None else None
    )
    fallback = "balanced" if balanced else "even"
    if table is None:
        warnings.warn(
            f"ContSup: no published {config.split!r} split for {arch or 'this model'} with "
            f"K={k}; using the computed {fallback!r} split",
            stacklevel=3,
        )
        return (balanced_split(costs, k) if balanced else even_split(num_units, k)), fallback
    if any(p not in index for p in table):
        raise ValueError(
            f"ContSup: the {config.split!r} table for {arch} K={k} does not fit this model "
            f"(stage sizes {_stage_sizes(positions)}); is table_arch right?"
        )
    return [index[p] for p in table], f"{config.split} table ({arch}, K={k})"


def _stage_sizes(positions: list[Position]) -> list[int]:
    sizes: dict[int, int] = {}
    for s, _ in positions[1:]:
        sizes[s] = sizes.get(s, 0) + 1
    return list(sizes.values())


def _table_arch(model: nn.Module, split: BlockSplit) -> str | None:
    """"resnet{6n+2}" for a CIFAR ResNet (or its quantized copy), else None."""
    if not isinstance(model, CifarResNet):
        return None
    sizes = [len(b) for b in split.blocks]
    if len(sizes) != 3 or len(set(sizes)) != 1:
        return None
    return f"resnet{6 * sizes[0] + 2}"
