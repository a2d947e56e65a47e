"""The rules BWRF's branches and Block-KD's stones share: which exist, their weights, and the
checks that the trained and the frozen model fit together."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from bwrf_ext.engine.split import BlockSplit


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
