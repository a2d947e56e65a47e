"""ContSup's parts: split and loss-weight tables, auxiliary heads, context, decoder."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext.losses import supervised_contrastive_loss

__all__ = [
    "INFOPRO_BALANCED_SPLITS",
    "INFOPRO_BALANCED_SPLITS_STL10",
    "INFOPRO_SPLITS",
    "PUBLISHED_BALANCED_LOSS_WEIGHTS",
    "PUBLISHED_LOSS_WEIGHTS",
    "AuxHead",
    "ContextProjector",
    "LossWeights",
    "Position",
    "ReconstructionDecoder",
    "balanced_split",
    "even_split",
    "parse_aux_head",
    "parse_context",
    "published_loss_weights",
    "published_split",
    "supervised_contrastive_loss",
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


_AUX_HEAD = re.compile(r"(\d+)c(\d+)f")


def parse_aux_head(spec: str) -> tuple[int, int]:
    """Parses an auxiliary-head string ``"<n>c<m>f"`` into (n convs, m linear layers).

    Grammar: ``n`` >= 0 conv3x3-BN-ReLU layers, then global average pooling, then ``m`` >= 1
    linear layers with ReLU between them. The public code's "0c1f", "0c2f", "1c1f", "1c2f",
    "1c3f" and "2c2f" are all of this form; "0c1f" is greedy supervised learning's linear probe.
    """
    match = _AUX_HEAD.fullmatch(spec) if isinstance(spec, str) else None
    if match is None or int(match[2]) < 1:
        raise ValueError(
            f"ContSupConfig: aux_head must look like '<n>c<m>f' with n >= 0 conv layers and "
            f"m >= 1 linear layers (e.g. '1c2f', '0c1f', '2c2f'), got {spec!r}"
        )
    return int(match[1]), int(match[2])


_CONTEXT = re.compile(r"R(\d+)(E?)|E")


def parse_context(mode: str) -> tuple[int, bool]:
    """Parses a context mode into (n, image): n recent module inputs, and the image encoder.

    Grammar: ``"R0"`` (no context), ``"E"`` (the image), ``"R<n>"`` (the inputs of the last n
    modules, n >= 1), ``"R<n>E"`` (both; "R1E" is the paper's). With E on, the image itself is
    never also an R source, as in the public code.
    """
    match = _CONTEXT.fullmatch(mode) if isinstance(mode, str) else None
    if match is None or (match[0] != "E" and int(match[1]) == 0 and match[2]):
        raise ValueError(
            f"ContSupConfig: context must be 'R0', 'E', 'R<n>' or 'R<n>E' with n >= 1 "
            f"(e.g. 'R1', 'R2', 'R1E'), got {mode!r}"
        )
    if match[0] == "E":
        return 0, True
    return int(match[1]), bool(match[2])


class AuxHead(nn.Module):
    """A local auxiliary head ``"<n>c<m>f"`` (see :func:`parse_aux_head`).

    The first conv maps C to 2C channels with stride 2; further convs keep the width, stride 1.
    With ``channel_cap`` set, an input whose 2C would exceed the cap keeps ``cap`` channels and
    stride 1 instead (the public code's rule with cap 64: its 64-channel heads are 64->64,
    stride 1). Hidden linear layers have ``feature_dim`` units; the last one outputs
    ``out_features`` (classes for CE, the embedding size for SupCon). Widths scale by ``widen``.

    Args:
        in_channels: C, channels of the boundary output.
        spec: the head string, e.g. "1c2f".
        out_features: outputs of the last linear layer.
        feature_dim: hidden linear width (before widen).
        widen: width multiplier of the convs and hidden linear layers.
        channel_cap: None, or the cap described above.

    Shape:
        (B, C, H, W) -> (B, out_features).
    """

    def __init__(
        self,
        in_channels: int,
        spec: str,
        out_features: int,
        feature_dim: int = 128,
        widen: float = 1.0,
        channel_cap: int | None = None,
    ) -> None:
        super().__init__()
        num_convs, num_linear = parse_aux_head(spec)
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(num_convs):
            if i == 0:
                stride, width = 2, 2 * in_channels
                if channel_cap is not None and width > channel_cap:
                    stride, width = 1, channel_cap
                width = int(width * widen)
            else:
                stride, width = 1, channels
            layers += [
                nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        hidden = int(feature_dim * widen)
        for i in range(num_linear):
            last = i == num_linear - 1
            layers.append(nn.Linear(channels, out_features if last else hidden))
            if not last:
                layers.append(nn.ReLU())
            channels = hidden
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


# The public code gives the convs before BatchNorm a bias; BN's mean subtraction cancels it (its
# gradient is exactly 0), so here they have none: same functions, fewer dead parameters.


def _image_encoder(in_channels: int, out_channels: int, hidden: int) -> nn.Sequential:
    # The public Encoder: two conv3x3-BN-ReLU at the input's resolution; pooled to the
    # boundary's size by ContextProjector.
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _input_encoder(in_channels: int, out_channels: int) -> nn.Sequential:
    # The public ResEncoder: conv1x1-BN-ReLU, pooled to the boundary's size by ContextProjector.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class ContextProjector(nn.Module):
    """The context supplied at one module boundary: ``h.detach() + E(x) + sum_j R_j(in_j)``.

    Every source is detached, so the projector's parameters learn from the next module's loss
    only, and no gradient reaches the current module or anything before it. Each projected
    source is average-pooled to the boundary output's spatial size (skipped when equal). With
    no source (mode R0) this is ``h.detach()``.

    The image encoder runs at the input's resolution and is pooled afterwards (the public
    code), or, with ``image_at_boundary``, on the image average-pooled to the boundary's size
    first: the same layers at a fraction of the MACs and activation memory (1/16 at a stride-4
    boundary), a deviation from the public code.

    Args:
        channels: C, channels of the boundary output h.
        image_channels: channels of the network input for the image encoder E, or None (no E).
        recent_channels: channels of the recent module inputs, most recent first (the current
            module's own input, then the one before, ...); one 1x1 projector each.
        hidden: hidden width of E (the public code's 12).
        image_at_boundary: pool the image to the boundary's size before E (see above).

    Shape:
        h: (B, C, H, W); image: (B, C_in, H_in, W_in); recent[j]: (B, C_j, H_j, W_j)
        -> (B, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        image_channels: int | None,
        recent_channels: Sequence[int],
        hidden: int = 12,
        image_at_boundary: bool = False,
    ) -> None:
        super().__init__()
        self.image_at_boundary = image_at_boundary
        self.image = (
            _image_encoder(image_channels, channels, hidden) if image_channels is not None else None
        )
        self.recent = nn.ModuleList(_input_encoder(c, channels) for c in recent_channels)

    @property
    def num_recent(self) -> int:
        """How many recent module inputs this projector takes."""
        return len(self.recent)

    def forward(
        self, h: torch.Tensor, image: torch.Tensor, recent: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        if len(recent) != len(self.recent):
            raise ValueError(
                f"ContextProjector: expected {len(self.recent)} recent inputs, got {len(recent)}"
            )
        out = h.detach()
        size = h.shape[-2:]
        if self.image_at_boundary and image.shape[-2:] != size:
            image = F.adaptive_avg_pool2d(image.detach(), size)
        sources = [(self.image, image)] if self.image is not None else []
        sources += list(zip(self.recent, recent, strict=True))
        for encoder, source in sources:
            context = encoder(source.detach())
            if context.shape[-2:] != size:
                context = F.adaptive_avg_pool2d(context, size)
            out = out + context
        return out


class ReconstructionDecoder(nn.Module):
    """InfoPro's local decoder: upsample h to the image size, then conv3x3-BN-ReLU-conv3x3.

    Returns the reconstruction's logits; the loss is BCE between their sigmoid and the image
    restored to [0, 1], computed from the logits (``binary_cross_entropy_with_logits``: the
    public code's Sigmoid + BCELoss, without its log(0) clamping).

    Args:
        in_channels: C, channels of h.
        image_channels: channels of the image.
        hidden: hidden width (the public code's 12).
        interpolation: "bilinear" (align_corners=True, as the public code) or "nearest".

    Shape:
        h: (B, C, H, W), size (H_img, W_img) -> (B, image_channels, H_img, W_img) logits.
    """

    def __init__(
        self, in_channels: int, image_channels: int, hidden: int = 12,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        self.interpolation = interpolation
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, image_channels, 3, padding=1),
        )

    def forward(self, h: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.interpolation == "bilinear":
            h = F.interpolate(h, size=tuple(size), mode="bilinear", align_corners=True)
        else:
            h = F.interpolate(h, size=tuple(size), mode="nearest")
        return self.net(h)
