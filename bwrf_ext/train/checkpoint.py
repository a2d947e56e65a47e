"""Training checkpoints: written atomically, read with ``weights_only=True``, checked on load."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bwrf_ext.models.pretrained import load_state_dict_allowing_bn_counters

FORMAT = "bwrf_ext.train/1"
# The key of a checkpoint's checksum; checkpoints written before it existed have none.
CHECKSUM_KEY = "sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, of another format, or for another model."""


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process's umask."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Saves with torch.save to a temporary file beside ``path``, then renames it over ``path``.

    A crash mid-write leaves the previous file intact: the rename is atomic on POSIX. A kill
    mid-write leaves the temporary file (``.<name>.*.tmp``): see :func:`remove_stale_temp_files`.
    The file gets the mode of any other new file (0644 under the usual umask), not mkstemp's
    private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Deletes what a killed :func:`save_atomic` of ``path`` left: ``.<name>.*.tmp`` beside it.

    Only safe while no other process writes ``path`` (bwrf-train holds the run's lock).

    Returns:
        The files removed.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[^/]+\.tmp")
    removed = []
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            if pattern.fullmatch(candidate.name) and candidate.is_file():
                candidate.unlink(missing_ok=True)
                removed.append(candidate)
    return removed


def payload_sha256(ckpt: dict[str, Any]) -> str:
    """sha256 of a checkpoint's contents, its checksum entry left out.

    Computed over the loaded values, not the file's bytes, so it reads the same however the file
    is serialised: tensors by dtype, shape and raw bytes; dict entries in sorted key order;
    lists, tuples and plain values (str, int, float, bool, None) by type and repr.
    """
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            keys = [k for k in value if not (value is ckpt and k == CHECKSUM_KEY)]
            digest.update(f"D{len(keys)}".encode())
            for key in sorted(keys, key=lambda k: (type(k).__name__, repr(k))):
                feed(key)
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__}{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed(ckpt)
    return digest.hexdigest()


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """:func:`save_atomic` of a bwrf-train checkpoint with its sha256 (checked on load)."""
    save_atomic({**ckpt, CHECKSUM_KEY: payload_sha256(ckpt)}, path)


def verify_checksum(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Raises CheckpointError if a checkpoint's contents differ from its stored sha256.

    A flipped byte inside a tensor still unpickles fine; this is what catches it. Checkpoints
    written before the checksum existed have none and pass.
    """
    stored = ckpt.get(CHECKSUM_KEY)
    if stored is None:
        return
    actual = payload_sha256(ckpt)
    if actual != stored:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the sha256 stored when it "
            f"was written (stored {str(stored)[:12]}..., now {actual[:12]}...); the file was "
            "damaged or changed after it was written"
        )


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
        raise CheckpointError(
            f"cannot read checkpoint {path}: {_load_failure(error, path)}"
        ) from None


def _load_failure(error: Exception, path: Path) -> str:
    """Why torch.load failed, as one complete sentence (torch's own messages run for lines)."""
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..); files of torch < 1.6 start with a pickle (0x80).
    if not head:
        return "the file is empty"
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return "not a torch.save file (it has neither a zip nor a pickle header)"
    text = str(error).strip()
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return (
            f"it holds a Python object ({unsafe[1]}) that weights_only=True refuses to load; "
            "only tensors and plain values are read"
        )
    if "PytorchStreamReader" in text or isinstance(error, EOFError):
        return "not a complete torch.save file (truncated or corrupt)"
    first = re.split(r"(?<=\.)\s|\n", text, maxsplit=1)[0] if text else ""
    return (
        f"{type(error).__name__}{': ' + first if first else ''} (not a torch.save file, or "
        "a corrupt one)"
    )


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by bwrf-train (any other file raises CheckpointError)."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{resolve_checkpoint_path(path)} is not a bwrf-train checkpoint (format {FORMAT})"
        )
    verify_checksum(ckpt, resolve_checkpoint_path(path))
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
        verify_checksum(obj, resolve_checkpoint_path(path))
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
