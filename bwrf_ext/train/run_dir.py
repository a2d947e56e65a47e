"""How a ``bwrf-train`` run treats its directory (``--out``): locked, left as found until the
first checkpoint, and logged to.

A run takes the directory's lock first (a second run on it is refused, naming the holder), then
checks everything it can before training: options, data files, weights, the model's fit to the
images. It writes nothing until it is about to write its first checkpoint, at the end of epoch
1: log lines wait in memory, and the files of an old run it replaces (``--overwrite``) are
deleted only then. So a run that fails or is interrupted before that leaves the directory as it
found it (one it created is removed again), and an old run survives a replacement that could
not start.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from bwrf_ext.train import distributed
from bwrf_ext.train.checkpoint import load_checkpoint, remove_stale_temp_files
from bwrf_ext.train.errors import UsageError
from bwrf_ext.train.lock import DirectoryInUse, RunDirectoryLock

# Files a run writes in its directory; --overwrite removes exactly these.
RUN_FILES = ("last.pt", "metrics.jsonl", "metrics.csv", "accuracy.png", "summary.json",
             "log.txt", "config.json", "tensorboard")  # fmt: skip


class RunDirectory:
    """The run's --out, locked on every rank's behalf by rank 0.

    Attributes:
        path: the directory.
        committed: whether it holds this run's files yet (a resumed run's: from the start).
        checkpoint_epoch: the epoch of the last checkpoint written or resumed, or None.
        replaces: the files of an old run this one deletes when it commits (--overwrite).
    """

    def __init__(self, path: Path, dist: distributed.Distributed) -> None:
        self.path = path
        self.dist = dist
        self.committed = False
        self.checkpoint_epoch: int | None = None
        self.replaces: list[str] = []
        self._pending_log: list[str] = []
        self._lock = self._acquire()

    def _acquire(self) -> RunDirectoryLock | None:
        """Rank 0 takes the lock (creating the directory); every rank learns the outcome."""
        error, lock = None, None
        if self.dist.is_main:
            try:
                lock = RunDirectoryLock.acquire(self.path)
            except DirectoryInUse as in_use:
                error = UsageError(f"--out {in_use}")
            except OSError as os_error:
                error = UsageError(
                    f"--out {self.path}: cannot create or lock the run directory: "
                    f"{os_error.strerror or os_error}"
                )
        if self.dist.enabled:  # the other ranks must not train on when rank 0 was refused
            locked = int(self.dist.sum(torch.tensor([0 if error else 1]))[0])
            if error is None and locked < self.dist.world_size:
                error = UsageError(f"rank 0 could not lock --out {self.path} (see its message)")
        if error is not None:
            if lock is not None:
                lock.release(remove_created=True)
            raise error
        return lock

    def prepare(self, resume: bool, overwrite: bool) -> dict | None:
        """Refuses to touch an existing run unless told; returns the checkpoint to resume.

        Deletes nothing of an existing run: with --overwrite its files are listed in
        ``replaces`` and deleted by :meth:`commit`.
        """
        if self.dist.is_main:  # under the lock: no other run can be writing them
            remove_stale_temp_files(self.path / "last.pt")
        existing = [name for name in RUN_FILES if (self.path / name).exists()]
        if resume:
            if not (self.path / "last.pt").is_file():
                raise UsageError(
                    f"--resume: no checkpoint {self.path / 'last.pt'} to continue (a run stopped "
                    "before the end of its first epoch writes none: start it without --resume)"
                )
            ckpt = load_checkpoint(self.path / "last.pt")
            self.committed, self.checkpoint_epoch = True, ckpt["epoch"]
            return ckpt
        if existing and not overwrite:
            raise UsageError(
                f"--out {self.path} already holds a run ({', '.join(existing[:3])}); continue it "
                "with --resume, replace it with --overwrite, or choose another --out"
            )
        self.replaces = existing
        return None

    def commit(self) -> None:
        """Makes the directory this run's, right before its first checkpoint is written.

        Only now, with the data loaded, the model built and an epoch trained, are the old run's
        files deleted (its last.pt is replaced atomically by the new one) and the log lines
        held so far written.
        """
        for name in self.replaces:
            path = self.path / name
            if name == "last.pt":
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.committed = True
        with open(self.path / "log.txt", "a") as f:
            f.writelines(line + "\n" for line in self._pending_log)
        self._pending_log.clear()

    def log(self, message: str) -> None:
        """Prints a line; log.txt gets it too, once the run has committed (held until then)."""
        if not self.dist.is_main:
            return
        tqdm.write(message, file=sys.stdout)
        if not self.committed:
            self._pending_log.append(message)
            return
        with open(self.path / "log.txt", "a") as f:
            f.write(message + "\n")

    def kept(self, interrupted: bool = False) -> str:
        """What a run stopped now leaves, and (interrupted) what to do next."""
        if self.checkpoint_epoch is not None:
            note = f"the checkpoint of epoch {self.checkpoint_epoch} is kept in {self.path}"
            return note + (": continue with --resume" if interrupted else "")
        if self.replaces:
            return f"no epoch finished, so nothing was written: the run in {self.path} is as it was"
        note = "no epoch finished, so nothing was written"
        return note + (": run the same command to start again" if interrupted else "")

    def close(self) -> None:
        """Drops the lock; a run that never committed also removes the directories it made."""
        if self._lock is not None:
            self._lock.release(remove_created=not self.committed)
            self._lock = None
