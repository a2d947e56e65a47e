"""same_stream on real data, two steps: the diagnostic runs, and its premise holds (the first
step of bwrf-train's plain KD, and of its LSQ, is the independent loop's step)."""

from __future__ import annotations

import math

import pytest

from benchmarks.accuracy import same_stream


@pytest.mark.parametrize("method", ["kd", "lsq"])
def test_first_step_is_the_independent_step(method):
    shared = same_stream.default_shared_dir()
    if not (shared / "data" / "cifar10_jpeg_q75").is_dir():
        pytest.skip(f"no CIFAR-10 JPEG copy under {shared} (a user's machine)")
    (first, second), _ = same_stream.trajectories(method, steps=2)
    assert first["loss_ours"] == pytest.approx(first["loss_independent"], rel=1e-6)
    # One update apart: only float rounding separates the two loops' weights.
    assert first["ours_vs_independent"] < 1e-6
    assert second["loss_ours"] == pytest.approx(second["loss_independent"], rel=1e-4)
    # bwrf-train's rate follows the independent loop's cosine over one epoch of 390 steps (a
    # run left at the default 10 epochs would decay ten times slower and not compare).
    lr = 0.1 if method == "kd" else 0.01
    assert second["lr_ours"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 390)), rel=1e-9)
