"""CIFAR ResNet-20/32/44/56 (He et al. 2016) with parameter-free option-A shortcuts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext.engine.split import BlockSplit, register_split


class OptionAShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels (no parameters).

    A module rather than a lambda so that models deepcopy, pickle and compile.

    Args:
        planes: output channels; planes // 4 zero channels go on each side (in = planes / 2).

    Shape:
        (N, planes/2, H, W) -> (N, planes, ceil(H/2), ceil(W/2)).
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first conv (2 halves H and W).

    Shape:
        (N, in_planes, H, W) -> (N, planes, H/stride, W/stride).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = OptionAShortcut(planes) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, n BasicBlocks per stage.

    Module names match the akamaster weights (``conv1``, ``bn1``, ``layer1..3``, ``linear``).
    Those weights expect ImageNet normalisation, see ``bwrf_ext.models.pretrained``.

    Args:
        blocks_per_stage: n (3/5/7/9 for ResNet-20/32/44/56).
        num_classes: outputs of the linear head.
        in_channels: image channels (3; 1 for grayscale data).

    Shape:
        (N, in_channels, H, W) float -> (N, num_classes) logits.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"CifarResNet: blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        strides = [stride] + [1] * (blocks - 1)
        layers = []
        for s in strides:
            layers.append(BasicBlock(in_planes, planes, s))
            in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def split_cifar_resnet(model: CifarResNet) -> BlockSplit:
    """The 3-block split: stem ``conv1, bn1, ReLU``; blocks ``layer1..layer3``; head
    ``avgpool, flatten, linear`` (also of the model's ``quantize_model`` copy)."""
    # CifarResNet's forward applies ReLU functionally after bn1.
    return BlockSplit(
        nn.Sequential(model.conv1, model.bn1, nn.ReLU()),
        [model.layer1, model.layer2, model.layer3],
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.linear),
        (["conv1", "bn1", "relu"], [["layer1"], ["layer2"], ["layer3"]],
         ["avgpool", "flatten", "linear"]),
    )  # fmt: skip


register_split(CifarResNet, split_cifar_resnet, "CIFAR ResNets (layer1..layer3)")


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (3 blocks per stage, 0.27 M parameters)."""
    return cifar_resnet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (5 blocks per stage, 0.46 M parameters)."""
    return cifar_resnet(32, num_classes, in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-44 (7 blocks per stage, 0.66 M parameters)."""
    return cifar_resnet(44, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (9 blocks per stage, 0.85 M parameters)."""
    return cifar_resnet(56, num_classes, in_channels)


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet of a given depth 6n+2 (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"cifar_resnet: depth must be 6n+2 with n >= 1, got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes, in_channels)
