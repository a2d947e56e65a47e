"""Shared pytest setup for benchmarks/: the device option, the backend header, ratio tables.

A benchmark takes part in the ratio table by setting ``benchmark.group`` and
``benchmark.extra_info["impl"]``; in each group that has an ``"ours"`` entry the summary prints
ours' median and median(ours) / median(other) for every other entry (< 1: ours is faster).
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    """Adds ``--bench-device``."""
    parser.addoption(
        "--bench-device",
        choices=("cpu", "cuda"),
        default=None,
        help="device for benchmarks/ (default: cuda when available, else cpu)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    """Says which bwrf_ext backend the timings measure."""
    try:
        import bwrf_ext  # here, not at the top: a missing package should fail tests, not pytest
    except ImportError as e:
        return f"bwrf_ext: not importable ({e})"
    info = bwrf_ext.build_info()
    return f"bwrf_ext backend: {info['backend']} (torch {info['torch']})"


@pytest.fixture(scope="session")
def bench_device(request: pytest.FixtureRequest) -> torch.device:
    """The device benchmarks run on: ``--bench-device``, else cuda when available, else cpu."""
    name = request.config.getoption("--bench-device", default=None)
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Prints, per benchmark group with an "ours" entry, ours' median over each other median."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    groups: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        impl = bench.extra_info.get("impl") if bench else None  # a falsy bench has no timings
        if impl is not None:
            groups.setdefault(bench.group or "", {})[impl] = bench.stats.median
    groups = {g: m for g, m in groups.items() if "ours" in m and len(m) > 1}
    if not groups:
        return
    terminalreporter.section("ratios of medians: ours / other (< 1: ours is faster)")
    width = max(len(g) for g in groups)
    for group, medians in groups.items():
        ours = medians["ours"]
        ratios = "  ".join(f"/{n} {ours / m:.2g}" for n, m in medians.items() if n != "ours")
        terminalreporter.write_line(f"{group:<{width}}  ours {_fmt(ours):>10}  {ratios}")
