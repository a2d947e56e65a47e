"""Small models for tiny images (digits, Fashion-MNIST) and the CIFAR variant of ResNet-18."""

from __future__ import annotations

import torch
from torch import nn

from bwrf_ext.engine.split import register_split


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages and a linear head: the embedded demo's network.

    The stages are ``layer1..layer3`` (the blocks BWRF branches from) and the head is ``pool``,
    ``flatten``, ``fc``: ``split_model`` splits it by these names (``SMALL_CNN_SPLIT``).

    Args:
        num_classes: outputs of the head.
        in_channels: image channels.
        width: channels of the first stage (the others use 2x).

    Shape:
        (N, in_channels, H, W) float -> (N, num_classes); H, W >= 4 (8x8 digits work).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.layer1 = stage(in_channels, width, 1)
        self.layer2 = stage(width, 2 * width, 2)
        self.layer3 = stage(2 * width, 2 * width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layer3(self.layer2(self.layer1(x))))))


# Module names for bwrf_ext.split_model(model, blocks=..., head=...).
SMALL_CNN_SPLIT = {
    "blocks": [["layer1"], ["layer2"], ["layer3"]],
    "head": ["pool", "flatten", "fc"],
}
register_split(SmallCNN, SMALL_CNN_SPLIT, "the small CNN (layer1..layer3)")


class MLP(nn.Module):
    """Flatten, one hidden ReLU layer, linear: a BatchNorm-free baseline for tiny inputs.

    Without BatchNorm its training step does not depend on how a batch is sharded across
    processes, which makes it the model for checking multi-process runs against one process.

    Args:
        num_classes: outputs.
        in_features: C*H*W of the input images.
        hidden: width of the hidden layer.
    """

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.flatten = nn.Flatten(1)
        self.hidden = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.hidden(self.flatten(x))))


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-18 for 32x32 images: torchvision's ResNet-18 with a 3x3 stride-1 stem, no max-pool.

    The usual CIFAR variant (11.2 M parameters, 4 stages of 64..512 channels at 32..4 px). It is
    a torchvision ``ResNet`` instance, so :func:`bwrf_ext.split_model` splits it into
    ``layer1..layer4`` automatically.
    """
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model
