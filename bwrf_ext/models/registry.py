"""Models by name: what ``bwrf-train --model`` accepts, and how each one splits into blocks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from bwrf_ext.models import kd_zoo
from bwrf_ext.models.cifar_resnet import cifar_resnet
from bwrf_ext.models.small import MLP, SmallCNN, cifar_resnet18


@dataclass(frozen=True)
class ImageShape:
    """What a data set feeds a model: (channels, height, width) and the number of classes."""

    channels: int
    height: int
    width: int
    num_classes: int


@dataclass(frozen=True)
class ModelEntry:
    """A named model: its builder and a line about it (its split is registered with its class)."""

    build: Callable[[ImageShape], nn.Module]
    description: str = ""


def _cifar_resnet_entry(depth: int) -> ModelEntry:
    return ModelEntry(
        lambda s: cifar_resnet(depth, s.num_classes, s.channels),
        description=f"CIFAR ResNet-{depth} (option-A shortcuts; ../shared weights for 20..56)",
    )


def _kd_zoo_entry(name: str) -> ModelEntry:
    def build(shape: ImageShape) -> nn.Module:
        if shape.channels != 3:
            raise ValueError(f"model {name} takes 3-channel images, the data has {shape.channels}")
        return getattr(kd_zoo, name)(shape.num_classes)

    return ModelEntry(build, description="as in the KD literature (CRD/DKD code), RGB input")


MODELS: dict[str, ModelEntry] = {
    **{f"resnet{d}": _cifar_resnet_entry(d) for d in (20, 32, 44, 56, 110)},
    "cifar_resnet18": ModelEntry(
        lambda s: cifar_resnet18(s.num_classes, s.channels), description="ResNet-18, 3x3 stem"
    ),
    **{name: _kd_zoo_entry(name) for name in ("resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2")},
    "small_cnn": ModelEntry(
        lambda s: SmallCNN(s.num_classes, s.channels),
        description="3 conv-BN-ReLU stages (the digits demo's net)",
    ),
    "mlp": ModelEntry(
        lambda s: MLP(s.num_classes, s.channels * s.height * s.width),
        description="one hidden layer, no BatchNorm",
    ),
}


TIMM_PREFIX = "timm:"  # --model timm:<name>: a timm model (timm is an optional dependency)


def _torchvision_names() -> list[str]:
    try:
        import torchvision.models as tvm
    except ImportError:
        return []
    return sorted(tvm.list_models(module=tvm))


def model_names() -> list[str]:
    """The names :func:`build_model` accepts besides ``timm:<name>``: ours, then torchvision's
    classification models."""
    ours = list(MODELS)
    return ours + [n for n in _torchvision_names() if n not in MODELS]


def model_name_problem(name: str) -> str | None:
    """Why :func:`build_model` would refuse ``name`` (a phrase after the name), or None."""
    if name.startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError:
            return "needs timm, an optional dependency: pip install timm"
        if name[len(TIMM_PREFIX):] not in timm.list_models():
            return "is not a timm model name (see timm.list_models())"
        return None
    if name in model_names():
        return None
    return (f"is unknown; ours: {', '.join(MODELS)}; or a torchvision classification model name "
            "(e.g. resnet18, mobilenet_v2), or timm:<name>")  # fmt: skip


def build_model(name: str, shape: ImageShape) -> nn.Module:
    """A freshly initialised model for images of ``shape``.

    Torchvision models are built with ``weights=None`` and ``num_classes``; they take 3-channel
    input (the data pipeline repeats grayscale channels for them, see ``needs_rgb``). timm
    models (``timm:<name>``) are built with ``pretrained=False``, ``num_classes`` and
    ``in_chans``; their splits come from their ``feature_info``.

    Raises:
        ValueError: a name :func:`model_name_problem` refuses, saying why.
    """
    problem = model_name_problem(name)
    if problem is not None:
        raise ValueError(f"model {name!r} {problem}")
    if name in MODELS:
        return MODELS[name].build(shape)
    if name.startswith(TIMM_PREFIX):
        import timm

        return timm.create_model(
            name[len(TIMM_PREFIX):], pretrained=False, num_classes=shape.num_classes,
            in_chans=shape.channels,
        )  # fmt: skip
    import torchvision.models as tvm

    return tvm.get_model(name, weights=None, num_classes=shape.num_classes)


def needs_rgb(name: str) -> bool:
    """True for models whose stems take 3 channels whatever the data has (torchvision's)."""
    return name not in MODELS and not name.startswith(TIMM_PREFIX)
