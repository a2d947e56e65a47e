"""Loader for the pretrained CIFAR-10 ResNets in shared/weights, and their input normalisation."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from bwrf_ext.models.cifar_resnet import CifarResNet, cifar_resnet

SHARED_ENV = "BWRF_EXT_SHARED"
AKAMASTER_DIR = Path("weights") / "akamaster_resnet_cifar10"
# The akamaster weights were trained on ImageNet statistics, not CIFAR's (weights README).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_shared_dir() -> Path:
    """$BWRF_EXT_SHARED, else ``shared/`` beside the repository (a source checkout's layout)."""
    if os.environ.get(SHARED_ENV):
        return Path(os.environ[SHARED_ENV])
    return Path(__file__).resolve().parents[2].parent / "shared"


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """Normalises images with ImageNet mean/std, as the akamaster weights expect.

    Args:
        images: (N, 3, H, W) float in [0, 1] (ToTensor's output).

    Returns:
        (N, 3, H, W), images' dtype.
    """
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            "imagenet_normalize: images must be float (N, 3, H, W) in [0, 1], got "
            f"{images.dtype} {tuple(images.shape)}"
        )
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device)
    return (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def akamaster_weights_path(depth: int, shared_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``resnet{depth}-<sha8>.th`` under shared/weights/akamaster_resnet_cifar10.

    Raises:
        FileNotFoundError: naming the directory searched and the env var that overrides it.
    """
    directory = Path(shared_dir or default_shared_dir()) / AKAMASTER_DIR
    matches = sorted(directory.glob(f"resnet{depth}-*.th"))
    if not matches:
        raise FileNotFoundError(
            f"akamaster_weights_path: no resnet{depth}-*.th in {directory}; point "
            f"{SHARED_ENV} at the directory holding weights/ (or pass shared_dir)"
        )
    return matches[0]


def load_akamaster_state_dict(path: str | os.PathLike, check_sha: bool = True) -> dict:
    """Reads an akamaster checkpoint and strips the ``module.`` (DataParallel) prefix.

    Args:
        path: a ``resnet{depth}-<sha8>.th`` file.
        check_sha: verify that the sha256 starts with the 8 hex digits of the file name
            (torch-hub convention).

    Returns:
        The state_dict, keys as in :class:`CifarResNet`.
    """
    path = Path(path)
    if check_sha:
        expected = re.fullmatch(r".*-([0-9a-f]{8})\.th", path.name)
        if expected is None:
            raise ValueError(f"load_akamaster_state_dict: no sha256 prefix in the name {path.name}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(expected.group(1)):
            raise ValueError(
                f"load_akamaster_state_dict: {path} has sha256 {digest[:8]}..., the name says "
                f"{expected.group(1)}; the file is corrupt or not the published one"
            )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint)
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def load_state_dict_allowing_bn_counters(model: nn.Module, state_dict: dict) -> None:
    """load_state_dict that tolerates exactly one kind of gap: missing num_batches_tracked.

    Old PyTorch did not save those counters; any other missing or unexpected key raises.
    """
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"load_state_dict: missing keys {missing}, unexpected keys {result.unexpected_keys}"
        )


def pretrained_cifar_resnet(
    depth: int = 20,
    shared_dir: str | os.PathLike | None = None,
    check_sha: bool = True,
) -> CifarResNet:
    """A CIFAR-10 ResNet-{20,32,44,56} with the akamaster FP weights, in eval mode.

    Inputs must be normalised with :func:`imagenet_normalize`.

    Args:
        depth: 20, 32, 44 or 56.
        shared_dir: the directory holding ``weights/`` (default :func:`default_shared_dir`).
        check_sha: verify the file's sha256 prefix.
    """
    model = cifar_resnet(depth, num_classes=10)
    state_dict = load_akamaster_state_dict(akamaster_weights_path(depth, shared_dir), check_sha)
    load_state_dict_allowing_bn_counters(model, state_dict)
    return model.eval()
