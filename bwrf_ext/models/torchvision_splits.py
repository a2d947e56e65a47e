"""The automatic splits of torchvision's ResNets and MobileNetV2, registered by class name (so
that torchvision, optional, is imported only by whoever builds such a model)."""

from __future__ import annotations

from torch import nn

from bwrf_ext.engine.split import BlockSplit, register_split


def split_torchvision_resnet(model: nn.Module) -> BlockSplit:
    """4 blocks ``layer1..layer4``; stem ``conv1, bn1, relu, maxpool``; head ``avgpool,
    flatten, fc``."""
    return BlockSplit(
        nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool),
        [model.layer1, model.layer2, model.layer3, model.layer4],
        nn.Sequential(model.avgpool, nn.Flatten(1), model.fc),
        (["conv1", "bn1", "relu", "maxpool"], [[f"layer{i}"] for i in range(1, 5)],
         ["avgpool", "flatten", "fc"]),
    )  # fmt: skip


def split_torchvision_mobilenet_v2(model: nn.Module) -> BlockSplit:
    """4 blocks by output resolution (stride 4/8/16/32): stem ``features.0``; blocks
    ``features.1-3`` (24 ch), ``features.4-6`` (32 ch), ``features.7-13`` (64 and 96 ch),
    ``features.14-18`` (160, 320 and the 1280-ch conv); head ``avgpool, flatten, classifier``.

    Raises:
        TypeError: a MobileNetV2 without torchvision's default 19 feature modules.
    """
    features = model.features
    if len(features) != 19:
        raise TypeError(
            f"split_model: the automatic MobileNetV2 grouping expects 19 feature modules "
            f"(torchvision's default inverted-residual setting), got {len(features)}; pass "
            "module names"
        )
    bounds = [(1, 4), (4, 7), (7, 14), (14, 19)]
    return BlockSplit(
        features[0],
        [features[a:b] for a, b in bounds],
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier),
        (["features.0"], [[f"features.{i}" for i in range(a, b)] for a, b in bounds],
         ["avgpool", "flatten", "classifier"]),
    )  # fmt: skip


register_split("torchvision.models.resnet.ResNet", split_torchvision_resnet,
               "torchvision ResNets (layer1..layer4)")  # fmt: skip
register_split("torchvision.models.mobilenetv2.MobileNetV2", split_torchvision_mobilenet_v2,
               "torchvision MobileNetV2 (4 blocks by resolution)")  # fmt: skip
