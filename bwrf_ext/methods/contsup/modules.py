"""ContSup's trainable parts besides the network: auxiliary heads, context projectors, decoders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext.methods.contsup.config import parse_aux_head

__all__ = ["AuxHead", "ContextProjector", "ReconstructionDecoder"]


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
