"""Block splits: a model seen as stem -> blocks -> head, and the registry of automatic splits.

The engine imports no model: each model family registers its split (:func:`register_split`)
where the family is defined, and :func:`split_model` looks the model's class up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["BlockSplit", "check_split", "named_split", "probing", "register_split",
           "registered_splits", "split_model"]  # fmt: skip

# Names of the blocks an automatic split produces, for repr and error messages.
_GroupNames = list[list[str]]


class BlockSplit(nn.Module):
    """A model seen as ``stem -> blocks[0] -> ... -> blocks[N-1] -> head``.

    The stem, blocks and head hold the model's own modules (shared, not copied), so training
    through the split trains the model; only parameter-free glue (``nn.ReLU`` for a functional
    ReLU, ``nn.Flatten``, pooling) is new. The stem joins block 1: ``run_block(0, x)`` is
    ``blocks[0](stem(x))``, and the block outputs h_1..h_N are what the methods branch from.

    Build one with :func:`split_model`.

    Args:
        stem: the modules before block 1 (``nn.Identity()`` when there are none).
        blocks: N >= 1 modules, in order.
        head: the modules after block N (pooling, flatten, classifier).
        names: the model's module names in stem, each block and head, for repr and errors.

    Shape:
        input: what the model takes; output: what the model returns.
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        names: tuple[list[str], _GroupNames, list[str]] | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) < 1:
            raise ValueError("BlockSplit: need at least one block, got none")
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.names = names

    @property
    def num_blocks(self) -> int:
        """N, the number of blocks (the stem counts as part of block 1)."""
        return len(self.blocks)

    def run_block(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Block j (0-based) on its input; for j == 0 the stem runs first."""
        if j == 0:
            x = self.stem(x)
        return self.blocks[j](x)

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """h_1..h_N: the output of every block, in order (the last one feeds the head)."""
        outputs = []
        for j in range(self.num_blocks):
            x = self.run_block(j, x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block_outputs(x)[-1])

    def units(self) -> tuple[list[nn.Module], list[tuple[int, int]], list[str]]:
        """The split as a finer chain of units, for methods that cut inside blocks (ContSup's
        gradient-isolated modules): the stem, then each block's children (a block that is not
        a non-empty ``nn.Sequential`` is one unit).

        Returns:
            (units, positions, names): position (0, 0) is the stem, (s, b) child b of block s
            (1-based); names like "layer1.0" (the block's module names, or "blocks.<j>").
        """
        units: list[nn.Module] = [self.stem]
        positions = [(0, 0)]
        block_names = self.names[1] if self.names is not None else None
        names = ["stem"]
        for s, block in enumerate(self.blocks, 1):
            label = ",".join(block_names[s - 1]) if block_names else f"blocks.{s - 1}"
            children = list(block) if isinstance(block, nn.Sequential) and len(block) else [block]
            for b, child in enumerate(children):
                units.append(child)
                positions.append((s, b))
                names.append(f"{label}.{b}" if len(children) > 1 or child is not block else label)
        return units, positions, names

    def extra_repr(self) -> str:
        if self.names is None:
            return f"num_blocks={self.num_blocks}"
        stem, blocks, head = self.names
        return f"stem={stem}, blocks={blocks}, head={head}"


def split_model(
    model: nn.Module,
    blocks: Sequence[Sequence[str] | str] | None = None,
    *,
    stem: Sequence[str] = (),
    head: Sequence[str] | None = None,
    example_input: torch.Tensor | None = None,
) -> BlockSplit:
    """Splits a model into stem, blocks and head.

    Automatic split (``blocks=None``): the rule registered for the model's family
    (:func:`register_split`; :func:`registered_splits` lists them). bwrf_ext registers the CIFAR
    ResNets (``layer1..layer3``), the KD zoo's ResNets and WRNs, the small CNN, and
    torchvision's ResNets (``layer1..layer4``) and MobileNetV2 (4 blocks by output resolution).
    The same rule splits a model and its quantized copy from ``quantize_model``, which keeps the
    module names.

    Named split (``blocks`` given): lists of module names, one list (or one name) per block,
    plus ``stem`` and ``head``. The model's forward must be a plain chain of exactly these
    modules in this order (no skip connection or functional op between them, except the
    ``torch.flatten(x, 1)`` before a classifier: an ``nn.Flatten()`` is inserted before the first
    head module that is or contains an ``nn.Linear``; it is a no-op on 2-D input). Every module
    holding parameters or buffers must be covered. Because a forward cannot be read, the split
    is checked by running both on ``example_input`` (required) in eval mode; a mismatch raises.

    Args:
        model: the model to split (its training flags are restored after the check).
        blocks: None for an automatic split, else the module names of each block.
        stem: module names before block 1 (named split only).
        head: module names after the last block (named split only; required there).
        example_input: an input the model accepts, e.g. ``torch.randn(2, 3, 32, 32)``; required
            for a named split, optional (then checked too) for an automatic one.

    Returns:
        A BlockSplit sharing the model's modules.

    Raises:
        TypeError: no automatic split for this model type.
        ValueError: a name that is not a submodule, a module covered twice or not at all, or a
            split whose output differs from the model's.
    """
    if blocks is None:
        if stem or head is not None:
            raise ValueError(
                "split_model: stem and head are module names of a named split; pass blocks too"
            )
        split = _automatic_split(model)
    else:
        if head is None:
            raise ValueError(
                "split_model: a named split needs head=[module names after the last block]"
            )
        if example_input is None:
            raise ValueError(
                "split_model: a named split needs example_input (a tensor the model accepts) to "
                "check that the model's forward is the plain chain stem -> blocks -> head"
            )
        split = named_split(model, blocks, stem, head)
    if example_input is not None:
        check_split(model, split, example_input)
    return split


@contextmanager
def probing(*modules: nn.Module) -> Iterator[None]:
    """For a forward that only probes shapes or structure: leaves no trace on the modules.

    Eval mode (a train-mode BatchNorm would update its running statistics) and every fake
    quantizer off (a lazily initialised LSQ quantizer would take its step size from the probe
    input instead of the calibration batch); the training flags and quantizer switches are
    restored afterwards. Gradients are not touched: wrap in ``torch.no_grad()`` if none are
    needed.
    """
    every = {m for root in modules for m in root.modules()}
    flags = {m: m.training for m in every}
    # Quantizers by their switch (LSQQuantizer's enabled/set_enabled): the engine stays free
    # of quantization imports.
    quantizers = {m: m.enabled for m in every if callable(getattr(m, "set_enabled", None))}
    try:
        for m in every:
            m.training = False
        for q in quantizers:
            q.set_enabled(False)
        yield
    finally:
        for m, training in flags.items():
            m.training = training
        for q, enabled in quantizers.items():
            q.set_enabled(enabled)


def check_split(model: nn.Module, split: BlockSplit, example_input: torch.Tensor) -> None:
    """Raises ValueError unless ``split(x)`` equals ``model(x)`` on ``example_input``.

    Runs under :func:`probing` (eval mode, quantizers off), so the check changes nothing in
    the model; it compares the structure, which the quantizers do not change (so a standalone
    quantizer module the split leaves out goes unnoticed; ``quantize_model`` creates none).

    Args:
        model: the model.
        split: a split of it.
        example_input: an input the model accepts.
    """
    with probing(model, split):
        with torch.no_grad():
            expected = model(example_input)
            x = example_input
            stages = [("stem", split.stem)]
            stages += [(f"block {j + 1}", b) for j, b in enumerate(split.blocks)]
            stages += [("head", split.head)]
            for label, stage in stages:
                try:
                    x = stage(x)
                except RuntimeError as e:
                    raise ValueError(
                        f"split_model: running the split failed at the {label} "
                        f"({_names_of(split, label)}) on input {tuple(x.shape)}: {e}. Is the "
                        "model's forward the plain chain stem -> blocks -> head?"
                    ) from e
    if not isinstance(expected, torch.Tensor) or x.shape != expected.shape:
        shape = tuple(expected.shape) if isinstance(expected, torch.Tensor) else type(expected)
        raise ValueError(
            f"split_model: the split returns shape {tuple(x.shape)}, the model's forward {shape}"
        )
    scale = expected.abs().max().clamp_min(1e-12)
    error = (x - expected).abs().max()
    if not error <= 1e-5 * scale:
        raise ValueError(
            f"split_model: the split's output differs from the model's forward (max abs "
            f"difference {error.item():.3g}, output max {scale.item():.3g}); the forward is not "
            "the plain chain stem -> blocks -> head (a skip connection or functional op between "
            "the named modules?), or the names are not in forward order"
        )


def _names_of(split: BlockSplit, label: str) -> list[str] | str:
    if split.names is None:
        return "unnamed"
    stem, blocks, head = split.names
    if label == "stem":
        return stem
    if label == "head":
        return head
    return blocks[int(label.split()[1]) - 1]



SplitRule = Callable[[nn.Module], "BlockSplit"]
Family = type | str | Callable[[type], bool]
# Model family (a class, its qualified name "package.module.Class", or a predicate on the
# model's class) -> (rule, description).
_REGISTRY: dict[Family, tuple[SplitRule, str]] = {}


def register_split(
    family: Family, rule: SplitRule | Mapping[str, Sequence], description: str
) -> None:
    """Registers how a model family splits: ``split_model(model)`` then uses ``rule`` for every
    model whose class is ``family`` or derives from it (the most derived registration wins), or,
    for a predicate, whose class it accepts (tried after every class and name).

    Call it where the family is defined (the engine imports no model).

    Args:
        family: the model class; or its qualified name ("torchvision.models.resnet.ResNet"), or
            a predicate on the class (``lambda cls: cls.__module__.startswith("timm.")``), so
            that registering an optional library's models does not import the library.
        rule: model -> BlockSplit sharing its modules, or the module names of a named split
            ({"blocks": [...], "stem": [...], "head": [...]}, see :func:`split_model`); either
            must also split the model's ``quantize_model`` copy (same module names).
        description: the family and its blocks in a few words, for messages (e.g. "CIFAR
            ResNets: layer1..layer3").
    """
    if isinstance(rule, Mapping):
        names = dict(rule)
        rule = lambda model: named_split(model, names["blocks"], names.get("stem", ()),  # noqa: E731
                                          names["head"])  # fmt: skip
    _REGISTRY[family] = (rule, description)


def registered_splits() -> list[str]:
    """The descriptions of every registered model family, in registration order."""
    return [description for _, description in _REGISTRY.values()]


def _automatic_split(model: nn.Module) -> BlockSplit:
    for cls in type(model).__mro__:
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
            if key in _REGISTRY:
                return _REGISTRY[key][0](model)
    for family, (rule, _) in _REGISTRY.items():
        if not isinstance(family, type | str) and family(type(model)):
            return rule(model)
    raise TypeError(
        f"split_model: no automatic split for {type(model).__name__} (registered: "
        f"{'; '.join(registered_splits())}); pass module names, e.g. "
        "split_model(model, blocks=[['conv1', 'layer1'], ['layer2']], head=['fc'], "
        "example_input=torch.randn(2, 3, 32, 32))"
    )


def named_split(
    model: nn.Module,
    blocks: Sequence[Sequence[str] | str],
    stem: Sequence[str],
    head: Sequence[str],
    flatten_before_linear: bool = True,
) -> BlockSplit:
    """The split by module names, unchecked: what :func:`split_model` builds before its check,
    for split rules that compute the names (timm's); see split_model for the arguments.

    Args:
        flatten_before_linear: insert ``nn.Flatten(1)`` before the first head module holding an
            ``nn.Linear`` (False for heads that pool and flatten themselves).
    """

    def listed(group: Sequence[str] | str) -> list[str]:
        return [group] if isinstance(group, str) else list(group)

    block_names = [listed(group) for group in blocks]
    stem_names, head_names = listed(stem), listed(head)
    if not block_names or any(not group for group in block_names):
        raise ValueError(
            f"split_model: every block needs at least one module name, got {block_names}"
        )
    owner: dict[int, str] = {}

    def resolve(names: list[str]) -> list[nn.Module]:
        modules = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError as e:
                raise ValueError(
                    f"split_model: {name!r} is not a submodule of {type(model).__name__}"
                ) from e
            if module is model:
                raise ValueError("split_model: the empty name (the model itself) cannot be a part")
            for sub in module.modules():
                if id(sub) in owner:
                    raise ValueError(
                        f"split_model: {name!r} overlaps {owner[id(sub)]!r}; each module belongs "
                        "to one part"
                    )
                owner[id(sub)] = name
            modules.append(module)
        return modules

    stem_modules = resolve(stem_names)
    block_modules = [resolve(group) for group in block_names]
    head_modules = resolve(head_names)
    missing = [
        name
        for name, module in model.named_modules()
        if module is not model
        and id(module) not in owner
        and (
            next(module.parameters(recurse=False), None) is not None
            or next(module.buffers(recurse=False), None) is not None
        )
    ]
    if missing:
        raise ValueError(
            f"split_model: modules with parameters or buffers are in no part: {missing}"
        )
    # torch.flatten(x, 1) before the classifier is the one functional op a chain may hold
    # (a rule whose head modules flatten themselves, as timm's do, turns this off).
    for k, module in enumerate(head_modules if flatten_before_linear else ()):
        if any(isinstance(m, nn.Linear) for m in module.modules()):
            if not (k > 0 and isinstance(head_modules[k - 1], nn.Flatten)):
                head_modules.insert(k, nn.Flatten(1))
                head_names.insert(k, "flatten")
            break

    def chain(modules: list[nn.Module]) -> nn.Module:
        if not modules:
            return nn.Identity()
        return modules[0] if len(modules) == 1 else nn.Sequential(*modules)

    return BlockSplit(
        chain(stem_modules),
        [chain(group) for group in block_modules],
        chain(head_modules),
        (stem_names, block_names, head_names),
    )

