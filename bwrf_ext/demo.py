"""`make demo`: bwrf-train on scikit-learn's digits: FP, then 2-bit LSQ and 2-bit BWRF from it.

Needs no download (the digits ship inside scikit-learn) and takes about a minute on 2 CPU
cores. It runs the training CLI three times (each run a directory under runs/demo/ with its
checkpoint, metrics and plot), then prints a comparison table and writes
runs/demo/comparison.png: the LP accuracy of LSQ and BWRF and BWRF's mixed-precision branches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bwrf_ext
from bwrf_ext.train import main as bwrf_train


def run(out: Path, args: list[str]) -> dict:
    """One bwrf-train run into ``out`` (replacing an earlier demo run); returns its summary."""
    status = bwrf_train([*args, "--out", str(out), "--overwrite"])
    if status != 0:
        raise SystemExit(f"demo: bwrf-train {' '.join(args)} failed with status {status}")
    return json.loads((out / "summary.json").read_text())


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def plot_comparison(
    runs: dict[str, Path], path: Path, title: str = "digits: 2-bit from the FP model"
) -> None:
    """LSQ's and BWRF's LP accuracy per epoch, BWRF's MP branches thin, the FP model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fp_acc = records(runs["FP"])[-1]["acc"]
    ax.axhline(fp_acc, color="gray", linestyle="--", label=f"FP ({fp_acc:.1f} %)")
    for label in ("LSQ W2A2", "BWRF W2A2"):
        rows = records(runs[label])
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["acc"] for r in rows], marker="o", ms=3, lw=2.2, label=label)
        if label.startswith("BWRF"):
            for key in sorted(k for k in rows[-1] if k.startswith("acc_mp")):
                ax.plot(epochs, [r[key] for r in rows], lw=1, alpha=0.8,
                        label=f"BWRF branch M{key.removeprefix('acc_mp')}")  # fmt: skip
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp-epochs", type=int, default=15)
    parser.add_argument("--qat-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)

    info = bwrf_ext.build_info()
    print(f"bwrf_ext {bwrf_ext.__version__}: backend={info['backend']}, "
          f"cuda_kernels={info['cuda_kernels']}, torch {info['torch']}")  # fmt: skip
    # One thread: these nets are too small to gain from two, and two-thread OpenMP stalls
    # (an epoch of 1.2 s took 27 s) whenever another process holds one of the cores.
    common = ["--dataset", "digits", "--model", "small_cnn", "--batch-size", "64",
              "--seed", str(args.seed), "--no-progress", "--threads", "1"]  # fmt: skip
    runs = {"FP": args.out / "fp", "LSQ W2A2": args.out / "lsq_w2a2",
            "BWRF W2A2": args.out / "bwrf_w2a2"}  # fmt: skip
    summaries = {
        "FP": run(runs["FP"], [*common, "--method", "fp", "--epochs", str(args.fp_epochs),
                               "--lr", "0.05"]),  # fmt: skip
    }
    for label, method in (("LSQ W2A2", "lsq"), ("BWRF W2A2", "bwrf")):
        summaries[label] = run(runs[label], [
            *common, "--method", method, "--w-bits", "2", "--a-bits", "2",
            "--init-from", str(runs["FP"]), "--epochs", str(args.qat_epochs),
        ])  # fmt: skip

    print("\n| model | epochs | test accuracy | best MP branch | time |")
    print("|---|---:|---:|---:|---:|")
    for label, summary in summaries.items():
        final = summary["final"]
        branches = [v for k, v in final.items() if k.startswith("acc_mp")]
        best = f"{max(branches):.2f} %" if branches else "-"
        print(f"| {label} | {summary['epochs']} | {final['acc']:.2f} % | {best} | "
              f"{summary['wall_s']:.1f} s |")  # fmt: skip
    plot_comparison(runs, args.out / "comparison.png")
    print(f"\nwrote {args.out / 'comparison.png'}; each run's checkpoint, metrics.jsonl/csv and "
          f"accuracy.png are in {', '.join(str(p) for p in runs.values())}")  # fmt: skip


if __name__ == "__main__":
    main()
