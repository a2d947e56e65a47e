"""The block engine: split a model into stem, blocks and head; run a frozen partner's branches."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from bwrf_ext.models.cifar_resnet import CifarResNet

__all__ = ["BlockSplit", "FrozenPartner", "probing", "split_model"]

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

    Automatic splits (``blocks=None``); the same rule applies to a model and to its quantized
    copy from ``quantize_model``, which keeps the module names:

    - CIFAR ResNets (``bwrf_ext.models.CifarResNet``): 3 blocks ``layer1..layer3``; stem
      ``conv1, bn1, ReLU`` (joins block 1); head ``avgpool, flatten, linear``.
    - torchvision ResNets: 4 blocks ``layer1..layer4``; stem ``conv1, bn1, relu, maxpool``;
      head ``avgpool, flatten, fc``.
    - the KD literature's resnet8x4/32x4 and WRN-16-2/40-2 (``bwrf_ext.models.kd_zoo``):
      3 blocks, see :func:`~bwrf_ext.models.kd_zoo.kd_zoo_split`.
    - torchvision MobileNetV2, 4 blocks by output resolution (stride 4/8/16/32):
      stem ``features.0``; blocks ``features.1-3`` (24 ch), ``features.4-6`` (32 ch),
      ``features.7-13`` (64 and 96 ch), ``features.14-18`` (160, 320 and the 1280-ch conv);
      head ``avgpool, flatten, classifier``.

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
        split = _named_split(model, blocks, stem, head)
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


def normalize_branch_choice(
    selected: Sequence[int] | None,
    weights: str | Sequence[float],
    who: str,
    noun: tuple[str, str],
) -> tuple[tuple[int, ...] | None, str | tuple[float, ...]]:
    """A config's (branch indices, weights) checked and as tuples; the rule BWRF's branches and
    Block-KD's stones share (the indices are checked against a split by
    :func:`resolve_branch_weights`).

    Args:
        selected: the branch indices, or None (all).
        weights: "uniform", "geometric" or one float per selected branch.
        who: the config's name for messages; noun: (singular, plural), e.g. ("stone", "stones").
    """
    one, many = noun
    if isinstance(weights, str):
        if weights not in ("uniform", "geometric"):
            raise ValueError(
                f"{who}: {one}_weights must be 'uniform', 'geometric' or a tuple of floats, got "
                f"{weights!r}"
            )
    else:
        weights = tuple(float(w) for w in weights)
    if selected is not None:
        selected = tuple(int(i) for i in selected)
        if len(set(selected)) != len(selected):
            raise ValueError(f"{who}: {many} has duplicates: {selected}")
    return selected, weights


def resolve_branch_weights(
    selected: Sequence[int] | None,
    weights: str | Sequence[float],
    num_blocks: int,
    last: int,
    who: str,
    noun: tuple[str, str],
) -> dict[int, float]:
    """Branch index i -> its loss weight, for BWRF's branches and Block-KD's stepping stones.

    Args:
        selected: the branch indices to build (None: 1..N-1).
        weights: "uniform" (1 each), "geometric" (2^-(N-i): the branch with the most trained
            blocks weighs most) or one float per selected branch, in increasing index.
        num_blocks: N.
        last: the highest valid index (N-1 for BWRF, N for Block-KD's head stone).
        who: the config's name for messages; noun: (singular, plural), e.g. ("stone", "stones").

    Returns:
        {i: w_i} in increasing i.
    """
    one, many = noun
    chosen = selected if selected is not None else tuple(range(1, num_blocks))
    for i in chosen:
        if not 1 <= i <= last:
            raise ValueError(
                f"{who}: {one} {i} does not exist; with {num_blocks} blocks the {many} are "
                f"1..{last}"
            )
    chosen = tuple(sorted(chosen))
    if weights == "uniform":
        values: Sequence[float] = [1.0] * len(chosen)
    elif weights == "geometric":
        values = [2.0 ** -(num_blocks - i) for i in chosen]
    else:
        values = weights
        if len(values) != len(chosen):
            raise ValueError(
                f"{who}: {len(values)} {one}_weights for {len(chosen)} {many} {chosen}"
            )
    return dict(zip(chosen, values, strict=True))


def check_separate(
    trained: nn.Module, frozen: nn.Module, who: str, names: tuple[str, str], hint: str
) -> None:
    """Raises ValueError if the trained model is, or shares parameters with, the frozen one.

    Freezing the partner in place would otherwise freeze (or train) the other model too.

    Args:
        who: the caller for the message, e.g. "BWRF".
        names: the two arguments' names, trained first.
        hint: how to fix it, appended to the message.
    """
    trained_name, frozen_name = names
    if trained is frozen:
        raise ValueError(
            f"{who}: {trained_name} and {frozen_name} must be two models, got the same one"
        )
    frozen_params = {id(p) for p in frozen.parameters()}
    shared = [n for n, p in trained.named_parameters() if id(p) in frozen_params]
    if shared:
        raise ValueError(
            f"{who}: {trained_name} shares parameters with {frozen_name} ({shared[:3]}...); {hint}"
        )


def check_split_of(split: BlockSplit, model: nn.Module, who: str, what: str) -> None:
    """Raises ValueError unless every parameter of ``split`` belongs to ``model``.

    A split built from another model (or a copy) would train or freeze the wrong weights.

    Args:
        who: the caller for the message, e.g. "BWRF".
        what: the split's argument name, e.g. "lp_split".
    """
    own = {id(p) for p in model.parameters()}
    foreign = [n for n, p in split.named_parameters() if id(p) not in own]
    if foreign:
        raise ValueError(f"{who}: {what} holds parameters not in its model: {foreign[:3]}")


def check_same_classes(
    trained: BlockSplit, frozen: BlockSplit, who: str, names: tuple[str, str]
) -> None:
    """Raises ValueError if the two heads end in nn.Linear layers of different widths.

    The methods compare the two models' logits (KD), which fails only at the first forward
    otherwise; heads without a final nn.Linear are not checked.

    Args:
        who: the caller for the message, e.g. "BWRF".
        names: how the message names the two models, trained first.
    """
    widths = []
    for split in (trained, frozen):
        linears = [m for m in split.head.modules() if isinstance(m, nn.Linear)]
        widths.append(linears[-1].out_features if linears else None)
    if None not in widths and widths[0] != widths[1]:
        raise ValueError(
            f"{who}: {names[0]} outputs {widths[0]} classes, {names[1]} {widths[1]}; their "
            "logits are compared, so they must classify the same classes"
        )


def _automatic_split(model: nn.Module) -> BlockSplit:
    from bwrf_ext.models.kd_zoo import KDResNet, WideResNet, kd_zoo_split

    if isinstance(model, (KDResNet, WideResNet)):
        return kd_zoo_split(model)
    if isinstance(model, CifarResNet):
        # CifarResNet's forward applies ReLU functionally after bn1.
        return BlockSplit(
            nn.Sequential(model.conv1, model.bn1, nn.ReLU()),
            [model.layer1, model.layer2, model.layer3],
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.linear),
            (["conv1", "bn1", "relu"], [["layer1"], ["layer2"], ["layer3"]],
             ["avgpool", "flatten", "linear"]),
        )
    try:
        from torchvision.models import MobileNetV2, ResNet
    except ImportError:  # torchvision is optional; without it only CIFAR ResNets split by type
        MobileNetV2 = ResNet = None  # noqa: N806
    if ResNet is not None and isinstance(model, ResNet):
        return BlockSplit(
            nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool),
            [model.layer1, model.layer2, model.layer3, model.layer4],
            nn.Sequential(model.avgpool, nn.Flatten(1), model.fc),
            (["conv1", "bn1", "relu", "maxpool"], [[f"layer{i}"] for i in range(1, 5)],
             ["avgpool", "flatten", "fc"]),
        )
    if MobileNetV2 is not None and isinstance(model, MobileNetV2):
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
        )
    raise TypeError(
        f"split_model: no automatic split for {type(model).__name__} (supported: CIFAR ResNets, "
        "the KD zoo's ResNets and WRNs, torchvision ResNets and MobileNetV2); pass module "
        "names, e.g. "
        "split_model(model, blocks=[['conv1', 'layer1'], ['layer2']], head=['fc'], "
        "example_input=torch.randn(2, 3, 32, 32))"
    )


def _named_split(
    model: nn.Module,
    blocks: Sequence[Sequence[str] | str],
    stem: Sequence[str],
    head: Sequence[str],
) -> BlockSplit:
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
    # torch.flatten(x, 1) before the classifier is the one functional op a chain may hold.
    for k, module in enumerate(head_modules):
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


class FrozenPartner:
    """A frozen reference network seen through its split: BWRF's FP twin, Block-KD's teacher.

    Works on its own deep copy of the model (and of its split), frozen: ``requires_grad_(False)``
    and eval mode, kept in eval mode at every use (a ``.train()`` from outside is undone), so its
    BatchNorm is an affine map and its running statistics never change. The caller's model is
    left exactly as it was, trainable: quantizing or training it afterwards works (freezing it
    in place once left ``quantize_model(fp)`` after ``BWRF(..., fp)`` with frozen weights and
    only its step sizes to train). The copy costs one more set of the model's weights; drop
    the caller's reference if memory is tight. Not an ``nn.Module``, so a wrapper holding one
    does not hand its parameters to an optimizer nor put them in its ``state_dict``.

    Gradients still flow *through* it: a branch input that requires grad gets its gradient, the
    partner's parameters get none.

    With ``lean`` (the default) the branches run through a memory-lean copy of the blocks and
    head (:func:`bwrf_ext.lean.make_lean`, sharing the partner's weights): backward computes the
    same input gradients while saving a 1-bit mask per ReLU output instead of every conv and
    BatchNorm input. Layers the lean copy does not know run on plain autograd;
    ``lean_report()`` names them. The no-grad full forward always runs the original modules.

    Args:
        model: the reference network (copied; the copy is frozen).
        split: its BlockSplit (copied with it, so it runs the copy's modules).
        lean: run the branches through the lean copy (False: plain autograd).
    """

    def __init__(self, model: nn.Module, split: BlockSplit, lean: bool = True) -> None:
        # One deepcopy of both keeps the split's modules those of the copied model.
        self.model, self.split = copy.deepcopy((model, split))
        self.model.requires_grad_(False)
        self.model.eval()
        self.split.requires_grad_(False)  # glue modules the split may own
        self.split.eval()
        self.lean_split: BlockSplit | None = None
        if lean:
            from bwrf_ext.lean import make_lean  # bwrf_ext.lean imports the ops, not the engine

            self.lean_split = BlockSplit(
                make_lean(split.stem), [make_lean(b) for b in split.blocks], make_lean(split.head)
            )

    def lean_report(self) -> list[str]:
        """Modules of the lean copy left on plain autograd ("stem.", "blocks.j.", "head." names)."""
        if self.lean_split is None:
            return []
        from bwrf_ext.lean import lean_report

        return lean_report(self.lean_split)

    def _apply(self, fn) -> None:
        """Applies a module conversion (``.to()``, ``.half()``) to the model and both splits."""
        self.model._apply(fn)
        self.split._apply(fn)
        if self.lean_split is not None:
            self.lean_split._apply(fn)

    def ensure_frozen(self) -> None:
        """Puts every module back in eval mode if anything switched one to train mode."""
        if any(m.training for m in self.model.modules()) or self.split.training:
            self.model.eval()
            self.split.eval()
        if self.lean_split is not None and self.lean_split.training:
            self.lean_split.eval()

    @torch.no_grad()
    def block_outputs_and_logits(
        self, x: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The partner's full forward without grad: (its block outputs h_1..h_N, its output)."""
        self.ensure_frozen()
        outputs = self.split.block_outputs(x)
        return outputs, self.split.head(outputs[-1])

    def run_block(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Runs partner block j (0-based) on x, with autograd to x.

        Every branch goes through here: the hook point for a memory-lean execution of frozen
        blocks (saving only what input gradients need), which can replace this method.
        """
        return (self.lean_split or self.split).run_block(j, x)

    def run_head(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the partner's head on x, with autograd to x."""
        return (self.lean_split or self.split).head(x)

    def branches(
        self, entries: Mapping[int, torch.Tensor], batched: bool = True
    ) -> dict[int, torch.Tensor]:
        """Runs branches through the partner's blocks and head.

        Branch k enters the partner at block k (0-based), i.e. ``entries[k]`` is the input of
        block k and has the shape of partner block k-1's output; it then runs blocks k..N-1 and
        the head (k == N enters at the head). With ``batched``, at each block every branch
        passing through it is concatenated along dim 0 and the block runs once (exact since
        the partner is in eval mode: no batch statistics); the naive loop runs each branch on
        its own.

        Args:
            entries: block index (1..N; 0 means the whole network, N the head only) ->
                (B_k, ...) input.
            batched: one call per block (True) or one call per branch and block (False).

        Returns:
            block index -> the partner's output for that branch, (B_k, ...), same keys.
        """
        self.ensure_frozen()
        num_blocks = self.split.num_blocks
        for k in entries:
            if not 0 <= k <= num_blocks:
                raise ValueError(
                    f"FrozenPartner.branches: entry block must be in [0, {num_blocks}], got {k}"
                )
        order = sorted(entries)
        if not batched:
            outputs = {}
            for k in order:
                x = entries[k]
                for j in range(k, num_blocks):
                    x = self.run_block(j, x)
                outputs[k] = self.run_head(x)
            return outputs
        if not order:
            return {}
        running: list[int] = []  # branches in the stack, in stacking order
        sizes: list[int] = []
        stacked: torch.Tensor | None = None
        for j in range(order[0], num_blocks + 1):
            if j in entries:
                parts = [stacked] if stacked is not None else []
                stacked = torch.cat([*parts, entries[j]]) if parts else entries[j]
                running.append(j)
                sizes.append(entries[j].shape[0])
            if j < num_blocks:
                stacked = self.run_block(j, stacked)
        logits = self.run_head(stacked)
        return dict(zip(running, logits.split(sizes), strict=True))


def forward_with_branches(
    split: BlockSplit,
    x: torch.Tensor,
    partner: FrozenPartner,
    entries_from: Callable[[list[torch.Tensor]], dict[int, torch.Tensor]],
    last_entry: int,
    batched: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor, dict[int, torch.Tensor]]:
    """Runs a trained split on x and the partner's branches grafted onto its block outputs.

    The branches are recorded right after block ``last_entry`` and before the blocks above it:
    the autograd engine runs later-recorded nodes first, so backward frees the saved
    activations of those upper blocks before the branches' backward runs, and the gradients
    the branches leave pending on h_i never stack on every saved activation of the split. (With
    the branches recorded last, a BWRF step on ResNet-20 peaked at 1.10x LSQ's memory; this way
    1.005x.) BWRF's MP branches and Block-KD's stepping stones both run through here.

    Args:
        split: the trained model's split.
        x: its input batch.
        partner: the frozen network the branches run through.
        entries_from: h_1..h_last -> {k: input of partner block k} (k = N: its head), e.g.
            the block outputs themselves (BWRF) or connectors applied to them (Block-KD).
        last_entry: the highest k the branches enter after (0: no branch).
        batched: see :meth:`FrozenPartner.branches`.

    Returns:
        (h_1..h_N, the split's output, {k: partner output of branch k}).
    """
    outputs: list[torch.Tensor] = []
    h = x
    for j in range(last_entry):
        h = split.run_block(j, h)
        outputs.append(h)
    branch_outputs = partner.branches(entries_from(outputs), batched) if last_entry else {}
    for j in range(last_entry, split.num_blocks):
        h = split.run_block(j, h)
        outputs.append(h)
    return outputs, split.head(h), branch_outputs


class PartneredModule(nn.Module):
    """Base of the wrappers that train one split beside a FrozenPartner (BWRF, Block-KD).

    Both hold the trained split and the partner outside the module tree (so neither
    duplicates state_dict keys nor reaches the optimizer); this keeps the partner in eval mode
    through ``.train()`` and lets ``.to()``/``.cuda()``/``.half()`` reach both. Subclasses
    name their split's attribute in ``trained_split_attr``.
    """

    trained_split_attr: str

    def train(self, mode: bool = True):
        """Sets the trained model's mode; the frozen partner stays in eval mode."""
        super().train(mode)
        getattr(self, self.trained_split_attr).train(mode)
        self.partner.ensure_frozen()
        return self

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() reach the unregistered partner and the split's own glue modules.
        super()._apply(fn, recurse)
        self.partner._apply(fn)
        getattr(self, self.trained_split_attr)._apply(fn, recurse)
        return self
