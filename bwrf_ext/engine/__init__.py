"""The block engine: models split into stem -> blocks -> head, and a frozen partner's branches
grafted onto a trained model's blocks (what BWRF, Block-KD and ContSup are built on). It
imports no model: model families register their splits (:func:`register_split`)."""

from bwrf_ext.engine.partner import FrozenPartner, PartneredModule, forward_with_branches
from bwrf_ext.engine.split import (
    BlockSplit,
    check_split,
    probing,
    register_split,
    registered_splits,
    split_model,
)

__all__ = [
    "BlockSplit",
    "FrozenPartner",
    "PartneredModule",
    "check_split",
    "forward_with_branches",
    "probing",
    "register_split",
    "registered_splits",
    "split_model",
]
