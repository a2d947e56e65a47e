"""The CIFAR distillation zoo's models (resnet8x4/32x4, WRN-16-2/40-2) and their block splits.

The architectures and module names are those of the CRD repository (HobbitLong/RepDistiller,
``models/resnet.py`` and ``models/wrn.py``), which the DKD repository (megvii-research/mdistiller)
reuses, so their CIFAR-100 checkpoints load with ``load_state_dict``. Two deliberate differences,
neither of which changes a parameter, a buffer or an output at 32x32:

- ``forward(x)`` returns the logits only: no ``is_feat``/``preact`` outputs, and no block returns
  a ``(out, preact)`` tuple, so every model is the plain chain stem -> blocks -> head that the
  block engine splits.
- Global pooling is ``nn.AdaptiveAvgPool2d(1)`` (a module, also in WRN, where the original calls
  ``F.avg_pool2d(out, 8)``): the original ``AvgPool2d(8)`` is global pooling at 32x32 input and
  breaks at any other size.

ReLUs are not in place (same values; an in-place ReLU can overwrite a tensor that autograd
saved, e.g. for the backward of a fake quantizer that ``quantize_model`` put before it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext.engine.split import BlockSplit, register_split

__all__ = [
    "KDResNet",
    "WideResNet",
    "kd_zoo_split",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_2",
    "wrn_40_2",
]


class KDBasicBlock(nn.Module):
    """CRD's ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    The shortcut is ``downsample`` (1x1 conv + BN, "option B") when the shape changes.

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of the first conv.

    Shape:
        (N, inplanes, H, W) -> (N, planes, H/stride, W/stride).
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class KDResNet(nn.Module):
    """CRD's CIFAR ResNet-(6n+2) with configurable widths (resnet8x4, resnet32x4, ...).

    Module names match RepDistiller's ``ResNet`` (``conv1``, ``bn1``, ``layer1..3``, ``fc``).

    Args:
        depth: 6n+2 (8, 14, 20, 32, ...); n BasicBlocks per stage.
        num_filters: 4 widths: the stem's, then the three stages'.
        num_classes: outputs of the classifier.

    Shape:
        (N, 3, H, W) float -> (N, num_classes) logits; stage strides 1, 2, 2.
    """

    def __init__(self, depth: int, num_filters: tuple[int, int, int, int],
                 num_classes: int = 100) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"KDResNet: depth must be 6n+2 with n >= 1, got {depth}")
        if len(num_filters) != 4:
            raise ValueError(f"KDResNet: num_filters must hold 4 widths, got {num_filters}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU()
        self.layer1 = _stage(KDBasicBlock, num_filters[0], num_filters[1], n, stride=1)
        self.layer2 = _stage(KDBasicBlock, num_filters[1], num_filters[2], n, stride=2)
        self.layer3 = _stage(KDBasicBlock, num_filters[2], num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3], num_classes)
        for m in self.modules():  # RepDistiller's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WideBasicBlock(nn.Module):
    """WRN's pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the shortcut.

    As in the original: when the shape changes, the shortcut (``convShortcut``, a 1x1 conv) reads
    the pre-activated input BN-ReLU(x); otherwise it is the raw x.

    Args:
        in_planes: input channels.
        out_planes: output channels.
        stride: stride of the first conv.
        drop_rate: dropout probability between the convs (0: none, the zoo's setting).

    Shape:
        (N, in_planes, H, W) -> (N, out_planes, H/stride, W/stride).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Module | None = None  # noqa: N815 (RepDistiller's state_dict key)
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A WRN stage: ``nb_layers`` WideBasicBlocks in ``self.layer`` (RepDistiller's key)."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                           stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016) as in the CRD repository.

    Module names match RepDistiller's ``WideResNet`` (``conv1``, ``block1..3``, ``bn1``, ``fc``).
    Pre-activation blocks, so the final BN-ReLU sits in the head, after block 3.

    Args:
        depth: 6n+4 (16, 40, ...); n blocks per stage.
        num_classes: outputs of the classifier.
        widen_factor: k; stage widths 16k, 32k, 64k.
        drop_rate: dropout inside the blocks (0 in the zoo).

    Shape:
        (N, 3, H, W) float -> (N, num_classes) logits; stage strides 1, 2, 2.
    """

    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth must be 6n+4 with n >= 1, got {depth}")
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():  # RepDistiller's initialisation
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def _stage(block: type[nn.Module], in_planes: int, planes: int, n: int,
           stride: int) -> nn.Sequential:
    strides = [stride] + [1] * (n - 1)
    layers = []
    for s in strides:
        layers.append(block(in_planes, planes, s))
        in_planes = planes
    return nn.Sequential(*layers)


def resnet8x4(num_classes: int = 100) -> KDResNet:
    """resnet8x4: 1 block per stage, widths 32/64/128/256 (1.2 M parameters at 100 classes)."""
    return KDResNet(8, (32, 64, 128, 256), num_classes)


def resnet32x4(num_classes: int = 100) -> KDResNet:
    """resnet32x4: 5 blocks per stage, widths 32/64/128/256 (7.4 M parameters at 100 classes)."""
    return KDResNet(32, (32, 64, 128, 256), num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2: 2 blocks per stage, widths 32/64/128 (0.7 M parameters at 100 classes)."""
    return WideResNet(16, num_classes, widen_factor=2)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2: 6 blocks per stage, widths 32/64/128 (2.2 M parameters at 100 classes)."""
    return WideResNet(40, num_classes, widen_factor=2)


def kd_zoo_split(model: nn.Module) -> BlockSplit:
    """The 3-block split of a zoo model (or of its ``quantize_model`` copy, same module names).

    - :class:`KDResNet`: stem ``conv1, bn1, relu``; blocks ``layer1..layer3``; head
      ``avgpool, flatten, fc`` (as ``split_model`` splits the CIFAR ResNets).
    - :class:`WideResNet`: stem ``conv1``; blocks ``block1..block3``; head
      ``bn1, relu, avgpool, flatten, fc`` (the final pre-activation belongs to the head, so a
      block boundary is the output of a residual sum, as in the ResNets).

    Args:
        model: a KDResNet or WideResNet.

    Returns:
        A BlockSplit sharing the model's modules.

    Raises:
        TypeError: another model type.
    """
    if isinstance(model, KDResNet):
        return BlockSplit(
            nn.Sequential(model.conv1, model.bn1, model.relu),
            [model.layer1, model.layer2, model.layer3],
            nn.Sequential(model.avgpool, nn.Flatten(1), model.fc),
            (["conv1", "bn1", "relu"], [["layer1"], ["layer2"], ["layer3"]],
             ["avgpool", "flatten", "fc"]),
        )
    if isinstance(model, WideResNet):
        return BlockSplit(
            model.conv1,
            [model.block1, model.block2, model.block3],
            nn.Sequential(model.bn1, model.relu, model.avgpool, nn.Flatten(1), model.fc),
            (["conv1"], [["block1"], ["block2"], ["block3"]],
             ["bn1", "relu", "avgpool", "flatten", "fc"]),
        )
    raise TypeError(
        f"kd_zoo_split: expected a KDResNet or WideResNet, got {type(model).__name__}; use "
        "bwrf_ext.split_model for other models"
    )


register_split(KDResNet, kd_zoo_split, "the KD zoo's resnet8x4/32x4 (layer1..layer3)")
register_split(WideResNet, kd_zoo_split, "WRN-16-2/40-2 (block1..block3)")
