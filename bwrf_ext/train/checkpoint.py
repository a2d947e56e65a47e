"""Training checkpoints: written atomically, read with ``weights_only=True``, checked on load."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bwrf_ext.models.pretrained import load_state_dict_allowing_bn_counters

FORMAT = "bwrf_ext.train/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, of another format, or for another model."""


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Saves with torch.save to a temporary file beside ``path``, then renames it over ``path``.

    A crash mid-write leaves the previous file intact: the rename is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A file as given, or ``last.pt`` inside a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` on CPU, turning any failure into one CheckpointError."""
    path = resolve_checkpoint_path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unpickler errors all mean "not usable"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(error).__name__}: {first_line[:200]} "
            "(corrupt, truncated, or not a torch.save file)"
        ) from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by bwrf-train (any other file raises CheckpointError)."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{resolve_checkpoint_path(path)} is not a bwrf-train checkpoint (format {FORMAT})"
        )
    return ckpt


def fp_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full-precision weights to start from, in any of the accepted formats.

    Accepted: a bwrf-train checkpoint (or its run directory) of an unquantized model, the
    ../shared akamaster files (``{'state_dict', 'best_prec1'}``, ``module.`` prefixes), or a
    plain state_dict.

    Returns:
        (state_dict, info): info has "model" (the model name or None), "normalization"
        ("imagenet", "dataset" or None when the file does not say) and "source".
    """
    obj = load_file(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj["quantized"]:
            raise CheckpointError(
                f"{path} holds a quantized model (method {obj['args']['method']}); "
                "--init-from needs full-precision weights (a --method fp run)"
            )
        info = {"model": obj["args"]["model"], "normalization": obj["normalization"]}
        return obj["model"], {**info, "source": "bwrf-train"}
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        # akamaster's layout (saved from nn.DataParallel), trained on ImageNet statistics.
        state = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
        return state, {"model": None, "normalization": "imagenet", "source": "akamaster"}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {"model": None, "normalization": None, "source": "state_dict"}
    raise CheckpointError(
        f"{path}: expected a bwrf-train checkpoint, an akamaster file or a state_dict"
    )


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Loads strictly (missing BatchNorm counters excepted), naming what does not fit."""
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(
        k for k in set(own) - set(state_dict) if not k.endswith("num_batches_tracked")
    )
    mismatched = [
        f"{k}: {tuple(v.shape)} vs the model's {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if unexpected or missing or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if mismatched:
            parts.append(f"shape {mismatched[:2]}")
        raise CheckpointError(f"{what} does not fit the model: " + "; ".join(parts))
    load_state_dict_allowing_bn_counters(model, state_dict)
