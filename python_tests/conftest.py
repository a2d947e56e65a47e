"""Fixtures shared by the test files."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from bwrf_ext.train import runner


@contextlib.contextmanager
def _ctrl_c_at_epoch(epoch: int) -> Iterator[None]:
    """bwrf-train runs as if Ctrl-C were pressed as epoch ``epoch`` (0-based) begins."""
    original = runner._Run._train_epoch

    def interrupted(self, *args):
        if args[-1] == epoch:
            raise KeyboardInterrupt
        return original(self, *args)

    runner._Run._train_epoch = interrupted
    try:
        yield
    finally:
        runner._Run._train_epoch = original


@pytest.fixture
def ctrl_c_at_epoch() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """``with ctrl_c_at_epoch(e): ...``: a bwrf-train call inside stops at epoch e's start."""
    return _ctrl_c_at_epoch
