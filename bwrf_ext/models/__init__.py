"""Model definitions and pretrained loaders."""

from bwrf_ext.models import timm_splits, torchvision_splits  # noqa: F401 - register their splits
from bwrf_ext.models.cifar_resnet import (
    CifarResNet,
    cifar_resnet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
)
from bwrf_ext.models.kd_zoo import (
    KDResNet,
    WideResNet,
    kd_zoo_split,
    resnet8x4,
    resnet32x4,
    wrn_16_2,
    wrn_40_2,
)
from bwrf_ext.models.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_normalize,
    pretrained_cifar_resnet,
)

__all__ = [
    "KDResNet",
    "WideResNet",
    "kd_zoo_split",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_2",
    "wrn_40_2",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CifarResNet",
    "cifar_resnet",
    "imagenet_normalize",
    "pretrained_cifar_resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
]
