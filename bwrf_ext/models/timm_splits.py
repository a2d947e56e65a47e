"""The automatic split of timm CNNs, from each model's own stage information (``feature_info``),
with no per-architecture code; registered for every class defined in timm (imported lazily)."""

from __future__ import annotations

from torch import nn

from bwrf_ext.engine.split import BlockSplit, named_split, register_split

# Stage outputs at a reduction below this are the stem's (timm lists the stem's activation or
# the first stride-2 block as a feature too); the blocks start after it, as in torchvision's split.
MIN_REDUCTION = 4


def split_timm_model(model: nn.Module) -> BlockSplit:
    """Blocks end at the modules ``model.feature_info`` lists (reduction >= 4: one block per
    stage, 4 for the usual CNNs); the stem is everything before the first block's own modules,
    the head everything after the last block.

    The model is read as the chain of its top-level children in registration order, a child
    that holds a stage boundary being expanded into its own children (``blocks`` of
    EfficientNet, ``stages`` of ConvNeXt). ``split_model`` checks the chain against the model's
    forward when given an example input (bwrf-train always gives one).

    Raises:
        TypeError: a model without ``feature_info``, or whose stages are not modules of that
            chain.
    """
    info = getattr(model, "feature_info", None)
    if not info:
        raise TypeError(f"split_model: {type(model).__name__} has no timm feature_info")
    ends = [f["module"] for f in info if f["reduction"] >= MIN_REDUCTION]
    chain: list[str] = []
    for name, child in model.named_children():
        nested = any(end.startswith(name + ".") for end in ends)
        chain += [f"{name}.{sub}" for sub, _ in child.named_children()] if nested else [name]
    missing = [end for end in ends if end not in chain]
    if missing:
        raise TypeError(
            f"split_model: the timm stages {missing} of {type(model).__name__} are not in the "
            f"chain of its modules {chain}; pass module names"
        )
    positions = [chain.index(end) for end in ends]
    starts = [0, *(p + 1 for p in positions[:-1])]
    blocks = [chain[a:b + 1] for a, b in zip(starts, positions, strict=True)]
    # The first stage's own modules carry its name prefix ("layer1", "stages.0"); what comes
    # before them in block 1 is the stem.
    first, parent = blocks[0], ends[0].rpartition(".")[0]  # "blocks" of "blocks.1", "" of "layer1"
    stem_size = next(i for i, name in enumerate(first)
                     if name == ends[0] or parent and name.startswith(parent + "."))  # fmt: skip
    stem, blocks[0] = first[:stem_size], first[stem_size:]
    # timm's heads pool and flatten themselves (global_pool, ClassifierHead): no nn.Flatten.
    head = chain[positions[-1] + 1:]
    return named_split(model, blocks, stem, head, flatten_before_linear=False)


register_split(lambda cls: cls.__module__.startswith("timm."), split_timm_model,
               "timm CNNs (stages from feature_info)")  # fmt: skip
