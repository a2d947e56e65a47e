"""The exclusive lock a bwrf-train run holds on its directory, so two runs never share one."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".bwrf-train.lock"


class DirectoryInUse(RuntimeError):
    """Another live process holds the lock of the directory."""


class RunDirectoryLock:
    """An flock on ``<directory>/.bwrf-train.lock``, which records the holder's pid.

    The kernel drops an flock when its process dies, however it dies (SIGKILL included), so a
    lock file left by a dead run is stale by construction and is simply taken over; no pid
    guessing is needed to tell. The file is deleted on release. Directories created to hold the
    lock are remembered, so a run that never wrote anything can remove them again.

    Use :meth:`acquire`; :meth:`release` once (also on failure).

    Attributes:
        directory: the locked directory.
        created: directories this lock created (outermost first), for :meth:`release`.
    """

    def __init__(self, directory: Path, fd: int | None, created: list[Path]) -> None:
        self.directory = directory
        self.created = created
        self._fd = fd

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> RunDirectoryLock:
        """Creates the directory if needed and takes its lock without waiting.

        Raises:
            DirectoryInUse: another live process holds the lock; the message names it.
            OSError: the directory cannot be created or the lock file opened.
        """
        directory = Path(directory)
        created = _make_directories(directory)
        try:
            fd = _lock_file(directory / LOCK_NAME)
        except BaseException:
            _remove_empty(created)
            raise
        return cls(directory, fd, created)

    def release(self, remove_created: bool = False) -> None:
        """Deletes the lock file and drops the lock; optionally removes the directories the
        lock created, where they are empty (a run that never wrote anything)."""
        if self._fd is None:
            return
        # Unlinked while still held: a process that opened the old file meanwhile finds it
        # gone after its flock succeeds, and retries on a fresh file (see _lock_file).
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if remove_created:
            _remove_empty(self.created)


def _make_directories(directory: Path) -> list[Path]:
    """mkdir -p that returns the directories it created, outermost first."""
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    created = []
    for candidate in reversed(missing):
        try:
            candidate.mkdir()
        except FileExistsError:  # made by someone else meanwhile: not ours to remove
            continue
        except BaseException:
            _remove_empty(created)
            raise
        created.append(candidate)
    return created


def _remove_empty(created: list[Path]) -> None:
    for candidate in reversed(created):
        try:
            candidate.rmdir()
        except OSError:  # not empty (something else was put there) or already gone
            return


def _lock_file(path: Path) -> int:
    """Opens, flocks and stamps the lock file; returns its descriptor."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _describe_holder(fd)
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DirectoryInUse(
                    f"{path.parent} is in use by another bwrf-train run ({holder}); wait for it "
                    "to end or choose another --out"
                ) from None
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)  # the previous holder unlinked this file on release: lock the new one
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode())
    return fd


def _describe_holder(fd: int) -> str:
    """The holder as its lock file records it, and whether that pid still runs."""
    try:
        record = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        record = ""
    if not record.startswith("pid "):
        return "holder unknown"
    try:
        pid = int(record.split()[1])
        os.kill(pid, 0)
    except (ValueError, IndexError):
        return record
    except ProcessLookupError:
        # Its forked DataLoader workers inherited the lock and have not noticed yet.
        return f"{record}; that process has exited, its worker processes still hold the lock"
    except PermissionError:  # alive, owned by another user
        pass
    return record
