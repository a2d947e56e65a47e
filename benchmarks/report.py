"""What every benchmark script shares: command line, device, run metadata, busy check, results."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils import benchmark as torch_benchmark

import bwrf_ext
from bwrf_ext._backend import describe_device

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PERF_RESULTS = RESULTS_DIR / "perf"  # speed and memory ratio tables (benchmarks/perf)
ACCURACY_RESULTS = RESULTS_DIR / "accuracy"  # training results, records (benchmarks/accuracy)
ALLOCATOR_ENV = ("GLIBC_TUNABLES", "LD_PRELOAD")  # plus MALLOC_* (glibc's older switches)
BUSY_SHARE = 0.05  # other processes' CPU share above which a table flags its timings


device_description = describe_device  # one description of a device, in the package


def cpu_clocks() -> tuple[float, float, float | None]:
    """(wall, this process's CPU seconds, all processes' CPU seconds from /proc/stat or None)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _, _, irq, softirq, steal = map(int, f.readline().split()[1:9])
        machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        machine = None
    return time.perf_counter(), time.process_time(), machine


def others_share(start: tuple, end: tuple) -> float | None:
    """Share of the machine's CPU time other processes used between two ``cpu_clocks()``.

    Another process on these cores stalls every OpenMP barrier (a 16K op then takes ms), so a
    share above a few percent makes CPU timings unreliable.
    """
    if start[2] is None or end[2] is None:
        return None
    others = (end[2] - start[2]) - (end[1] - start[1])
    return max(0.0, others / ((end[0] - start[0]) * (os.cpu_count() or 1)))


def busy_lines(share: float | None) -> list[str]:
    """The table header's warning when other processes took more than BUSY_SHARE of the CPU."""
    if share is None or share <= BUSY_SHARE:
        return []
    return [f"- **other processes used {100 * share:.0f} % of the CPU during the timings: "
            "absolute times are inflated and ratios less reliable**"]  # fmt: skip


def add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """--device, --threads, --quick and --out, the options every ratio script takes."""
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda when available, else cpu",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch's CPU threads (default: torch's, one per core); the output "
        "name then says it, e.g. _cpu-2core-1thread",
    )
    parser.add_argument("--quick", action="store_true", help="short timings (a smoke run)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output path without extension; default "
        f"benchmarks/results/perf/{name}_<device>[-quick]",
    )


@dataclasses.dataclass
class Run:
    """One benchmark run: its name, options, device, timing budget and the metadata it records."""

    name: str
    args: argparse.Namespace
    device: torch.device
    min_run_time: float
    rounds: int
    meta: dict

    @classmethod
    def begin(
        cls,
        name: str,
        args: argparse.Namespace,
        quick: tuple[float, int],
        full: tuple[float, int],
        **settings,
    ) -> Run:
        """Resolves the device, records what is measured on what, and prints a header line.

        Args:
            quick, full: (min_run_time seconds, rounds) for --quick and for a real run.
            settings: the benchmark's own parameters, recorded in the metadata.
        """
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tag, device_name = device_description(device)
        threads = getattr(args, "threads", None)
        if threads is not None:
            if threads < 1:
                raise SystemExit(f"{name}: --threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
            tag += f"-{threads}thread" + ("s" if threads > 1 else "")
        min_run_time, rounds = quick if args.quick else full
        info = bwrf_ext.build_info()
        meta = {
            "backend": info["backend"],
            "build_info": info,
            "torch": torch.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": tag,
            "device_name": device_name,
            "threads": torch.get_num_threads(),
            "quick": args.quick,
            "min_run_time_s": min_run_time,
            # The CPU allocator's settings change large-tensor timings several-fold (page faults).
            "allocator_env": {k: v for k, v in os.environ.items() if k in ALLOCATOR_ENV
                              or k.startswith("MALLOC_")},  # fmt: skip
            "rounds": rounds,
            **settings,
        }
        print(
            f"bwrf_ext backend: {info['backend']} | {device_name} | {meta['threads']} threads",
            flush=True,
        )
        return cls(name, args, device, min_run_time, rounds, meta)

    def write(self, record: dict, table: str) -> None:
        """Prints the table and writes it (.md) and the record with the metadata (.json)."""
        print(table)
        quick = "-quick" if self.args.quick else ""
        stem = self.args.out or PERF_RESULTS / f"{self.name}_{self.meta['device']}{quick}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(
            json.dumps({"meta": self.meta, **record}, indent=2) + "\n"
        )
        stem.with_suffix(".md").write_text(table)
        print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


def write_results(stem: Path, lines: list[str], record: object) -> None:
    """Writes a results table: ``stem.md`` (the markdown lines) and ``stem.json`` (the record),
    and prints the table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))


def synchronized(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], object]:
    """fn, made to wait for its CUDA kernels so that a wall clock times them (as is on CPU)."""
    if device.type != "cuda":
        return fn

    def call() -> torch.Tensor:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def time_interleaved(
    steps: dict[str, Callable[[], object]],
    device: torch.device,
    min_run_time: float,
    rounds: int,
    label: str,
) -> dict[str, float]:
    """Median seconds per call of every step, timed in interleaved rounds so drift hits all alike.

    Each step is called once first (caching allocator, optimizer state, lazy initialisation).
    """
    runs = time_rounds(steps, device, min_run_time, rounds, label)
    return {name: torch_benchmark.Measurement.merge(runs[name])[0].median for name in steps}


def time_rounds(steps: dict[str, Callable[[], object]], device: torch.device,
                min_run_time: float, rounds: int,
                label: str) -> dict[str, list[torch_benchmark.Measurement]]:
    """As :func:`time_interleaved`, but every round's Measurement of every step (for spreads:
    ``Measurement.merge`` of a step's list gives its overall median and IQR)."""
    timers = {}
    for name, step in steps.items():
        synchronized(step, device)()
        timers[name] = torch_benchmark.Timer(
            "step()",
            globals={"step": step},
            label=label,
            description=name,
            num_threads=torch.get_num_threads(),  # Timer's default would time on 1 thread
        )
    runs: dict[str, list] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, timer in timers.items():
            runs[name].append(timer.blocked_autorange(min_run_time=min_run_time))
    return runs
