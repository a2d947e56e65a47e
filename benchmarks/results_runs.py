"""The README's results table: FP, then LSQ and BWRF at W4A4/W3A3/W2A2 from it, same budget.

Usage: ``python benchmarks/results_runs.py [--suite cifar10 fashion-mnist] [--seeds 0 1 2]
[--parallel N] [--epochs-qat N] [--device cuda]``.

Suites: ``cifar10`` and ``fashion-mnist`` are the CPU table (ResNet-20, one QAT epoch);
``cifar10-w<b>a<b>-4ep`` (b = 2, 3, 4) are one row each over 4 epochs from
the ``cifar10`` FP run; ``digits-smoke`` checks this script in seconds; ``cifar10-long``
(ResNet-20, 10 QAT epochs) and ``cifar10-resnet18`` (ResNet-18 trained from scratch 15
epochs, then 5 QAT epochs) are sized, by estimate, for one 9-minute GPU call
(``benchmarks/gpu_session.sh train``).

Runs ``bwrf-train`` once per row (each run in ``runs/results/<suite>/<name>``; a finished run
is skipped, an interrupted one resumed, so the script can be restarted), up to ``--parallel``
at a time after the FP run, then copies each run's raw records (metrics.jsonl, summary.json,
log.txt, accuracy.png) to ``benchmarks/results/runs/<suite>/<name>/`` and writes the table to
``benchmarks/results/results_table_<suites>_<device>.md`` and ``.json`` with the commands.
``--table-only`` starts no run; where ``runs/results`` lacks a run (a fresh clone), it
tabulates the kept records.

Every seed starts from the same FP model (trained once, seed 0); a seed changes the QAT run's
data order, augmentation and initialisation of what it adds. The table gives the mean and
sample standard deviation over the seeds, each seed's accuracy beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.report import RESULTS_DIR  # noqa: E402
from bwrf_ext._backend import describe_device  # noqa: E402
from bwrf_ext.models.pretrained import akamaster_weights_path, default_shared_dir  # noqa: E402

RUNS = Path("runs/results")
BITS = ((2, 2), (3, 3), (4, 4))
CIFAR10_LABEL = "CIFAR-10 (lossy JPEG-q75 copy)"


@dataclass
class Suite:
    """One table block: a data set and model, the FP run, and the QAT runs' shared options."""

    label: str
    fp_note: str
    data: list[str]  # --dataset, --data-dir, --model
    fp: Callable[[], list[str]]  # the FP run's own options (looked up only when chosen)
    qat_lr: float
    qat_epochs: int  # default; --epochs-qat overrides
    bits: tuple[tuple[int, int], ...] = BITS
    fp_suite: str | None = None  # start from another suite's FP run (None: its own)
    qat_options: tuple[str, ...] = ()  # bwrf-train options of every QAT run (e.g. --step-init)


def suites() -> dict[str, Suite]:
    shared = default_shared_dir()
    cifar10 = ["--dataset", "cifar10", "--data-dir", str(shared / "data" / "cifar10_jpeg_q75")]

    def akamaster_fp() -> list[str]:  # needs ../shared/weights: only the CIFAR-10 suites call it
        return ["--init-from", str(akamaster_weights_path(20)), "--epochs", "1", "--lr", "0.01"]

    fine_tuned = "akamaster ResNet-20 fine-tuned 1 epoch on the JPEG train split"
    return {
        "cifar10": Suite(CIFAR10_LABEL, fine_tuned, [*cifar10, "--model", "resnet20"],
                         akamaster_fp, 0.01, 1),
        "fashion-mnist": Suite(
            "Fashion-MNIST (exact, Debian package)",
            "ResNet-20 (1-channel stem) from scratch, 2 epochs",
            ["--dataset", "fashion-mnist", "--model", "resnet20"],
            lambda: ["--epochs", "2", "--lr", "0.1"], 0.01, 1,
        ),
        "digits-smoke": Suite(  # seconds on a CPU: checks this script, measures nothing
            "digits (scikit-learn, smoke test)", "small CNN from scratch, 2 epochs",
            ["--model", "small_cnn"], lambda: ["--epochs", "2", "--lr", "0.1"], 0.01, 1,
        ),
        "cifar10-long": Suite(CIFAR10_LABEL, fine_tuned, [*cifar10, "--model", "resnet20"],
                              akamaster_fp, 0.01, 10),
        "cifar10-resnet18": Suite(
            CIFAR10_LABEL, "ResNet-18 (CIFAR stem) from scratch, 15 epochs, lr 0.1",
            [*cifar10, "--model", "cifar_resnet18"], lambda: ["--epochs", "15", "--lr", "0.1"],
            0.01, 5,
        ),
        **{  # the step-size inits side by side (issue 16): LSQ one epoch from the cifar10 FP run
            f"cifar10-init-{init}": Suite(f"{CIFAR10_LABEL}, step init {init}", fine_tuned,
                                          [*cifar10, "--model", "resnet20"], akamaster_fp, 0.01,
                                          1, fp_suite="cifar10",
                                          qat_options=("--step-init", init))
            for init in ("lsq", "absmax", "mse")
        },
        **{  # one row over 4 epochs from the cifar10 FP run: does the 1-epoch difference last?
            f"cifar10-w{b}a{b}-4ep": Suite(CIFAR10_LABEL, fine_tuned,
                                           [*cifar10, "--model", "resnet20"], akamaster_fp, 0.01,
                                           4, bits=((b, b),), fp_suite="cifar10")
            for b in (2, 3, 4)
        },
    }  # fmt: skip


def run(name: str, suite: str, options: list[str], extra: list[str], start: bool) -> dict | None:
    """The run's summary: kept from an earlier call, else trained now (None: not started).

    Args:
        extra: bwrf-train options that do not change the result (--threads, --device,
            --workers); the console output goes to the run's console.txt.
    """
    out = RUNS / suite / name
    if (out / "summary.json").is_file():
        print(f"[{suite}/{name}] done before, kept", flush=True)
        return json.loads((out / "summary.json").read_text())
    if not start:  # tabulating only: a fresh clone has the kept records, not the runs
        kept = RESULTS_DIR / "runs" / suite / name / "summary.json"
        return json.loads(kept.read_text()) if kept.is_file() else None
    resume = ["--resume"] if (out / "last.pt").is_file() else []
    command = [sys.executable, "-m", "bwrf_ext.train", *options, "--out", str(out),
               "--no-progress", *resume, *extra]  # fmt: skip
    print("$ " + " ".join(command[1:]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "console.txt", "a") as console:
        result = subprocess.run(command, stdout=console, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"[{suite}/{name}] bwrf-train failed ({result.returncode}): see "
                           f"{out / 'console.txt'}")  # fmt: skip
    print(f"[{suite}/{name}] done", flush=True)
    return json.loads((out / "summary.json").read_text())


def run_all(jobs: list[tuple], parallel: int) -> list[dict | None]:
    """``run(*job)`` for every job, ``parallel`` at a time. A failure or Ctrl-C starts no
    queued run; those already training finish (or stop with their own Ctrl-C), then it raises."""
    pool = ThreadPoolExecutor(parallel)
    futures = [pool.submit(run, *job) for job in jobs]
    try:
        return [future.result() for future in futures]
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def keep_records(suite: str, name: str) -> None:
    source, target = RUNS / suite / name, RESULTS_DIR / "runs" / suite / name
    if not source.is_dir():  # tabulated from the kept records themselves
        return
    target.mkdir(parents=True, exist_ok=True)
    for file in ("metrics.jsonl", "summary.json", "log.txt", "accuracy.png"):
        shutil.copy2(source / file, target / file)


def machine(summary: dict) -> str:
    """The summary's device, "N thread(s)" spelt out ("1 thread", "2 threads"). Runs made
    before bwrf-train named the CPU model said only "cpu (<arch>, N threads)": they ran here,
    so this machine's description stands in."""
    device = summary["device"]
    if device.startswith("cpu ("):
        tag, description = describe_device(torch.device("cpu"))
        device = f"{description} ({tag}, {device.split(', ')[-1].rstrip(')')})"
    return re.sub(r"\b(\d+) threads?(\(s\))?",
                  lambda m: f"{m[1]} thread" + ("" if m[1] == "1" else "s"), device)


def command_line(summary: dict) -> str:
    """The run's options as a bwrf-train command (what a reader reruns), ../shared relative."""
    args = summary["args"]
    parts = ["bwrf-train", "--method", args["method"], "--model", args["model"],
             "--dataset", args["dataset"]]  # fmt: skip
    if args.get("data_dir"):
        parts += ["--data-dir", args["data_dir"]]
    if args["method"] != "fp":
        parts += ["--w-bits", str(args["w_bits"]), "--a-bits", str(args["a_bits"])]
    if args.get("init_from"):
        parts += ["--init-from", args["init_from"]]
    parts += ["--epochs", str(args["epochs"]), "--lr", str(args["lr"])]
    for option in ("step_init", "clip_test"):  # quantizer options, where a run set them
        if args.get(option) is not None and args["method"] != "fp":
            parts += [f"--{option.replace('_', '-')}", str(args[option])]
    return " ".join(parts).replace(str(default_shared_dir()), "../shared")


def main(argv: list[str] | None = None) -> None:
    table = suites()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", nargs="+", default=["cifar10", "fashion-mnist"],
                        choices=list(table), help="default: the CPU table")  # fmt: skip
    parser.add_argument("--epochs-qat", type=int, default=None, help="default: the suite's")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="QAT seeds; seed 0's runs are <method>_w<b>a<b>, others add _seed<s>",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["lsq", "bwrf"],
        choices=("lsq", "bwrf"),
        help="the QAT methods to train (finished runs of any are tabulated)",
    )
    parser.add_argument("--parallel", type=int, default=1, help="QAT runs at a time")
    parser.add_argument("--threads", type=int, default=None, help="passed to bwrf-train")
    parser.add_argument("--device", default=None, help="passed to bwrf-train")
    parser.add_argument("--workers", type=int, default=None, help="passed to bwrf-train")
    parser.add_argument(
        "--table-only", action="store_true", help="tabulate the finished runs, start no new one"
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    extra = [f"--{k}={v}" for k, v in (("threads", args.threads), ("device", args.device),
                                       ("workers", args.workers)) if v is not None]  # fmt: skip
    start = not args.table_only
    rows, jobs = [], []
    for suite in args.suite:
        spec = table[suite]
        fp_suite = spec.fp_suite or suite
        fp = run("fp", fp_suite, [*spec.data, "--method", "fp", *spec.fp()], extra, start)
        if fp is None:
            continue
        keep_records(fp_suite, "fp")
        rows.append((suite, "fp", fp))
        epochs = args.epochs_qat or spec.qat_epochs
        seeds = dict.fromkeys(args.seeds)  # a seed twice would be two runs in one folder
        for seed, (w, a), method in itertools.product(seeds, spec.bits, ("lsq", "bwrf")):
            name = f"{method}_w{w}a{a}" + (f"_seed{seed}" if seed else "")
            options = [*spec.data, "--method", method, "--w-bits", str(w), "--a-bits", str(a),
                       "--init-from", str(RUNS / fp_suite / "fp"), "--epochs", str(epochs),
                       "--lr", str(spec.qat_lr), "--seed", str(seed),
                       *spec.qat_options]  # fmt: skip
            jobs.append((name, suite, options, extra, start and method in args.methods))
    # Every suite's runs in one queue, so no core waits for the end of a suite.
    summaries = run_all(jobs, args.parallel)
    for (name, suite, *_), summary in zip(jobs, summaries, strict=True):
        if summary is not None:
            keep_records(suite, name)
            rows.append((suite, name, summary))
    if rows:
        write_table(table, rows)


def seed_groups(rows: list[tuple[str, str, dict]]) -> dict[tuple, list[dict]]:
    """The runs grouped by (suite, method, w_bits, a_bits), each group's summaries by seed."""
    groups: dict[tuple, list[dict]] = {}
    for suite, _, s in rows:
        key = (suite, s["method"], s.get("w_bits"), s.get("a_bits"))
        groups.setdefault(key, []).append(s)
    for summaries in groups.values():
        summaries.sort(key=lambda s: s["args"]["seed"])
    return groups


def best_branch(final: dict) -> float | None:
    branches = [v for k, v in final.items() if k.startswith("acc_mp")]
    return max(branches) if branches else None


def mean_sd(values: list[float], sign: str = "") -> str:
    """The mean ± the sample standard deviation (the value alone for one seed)."""
    mean = f"{statistics.mean(values):{sign}.2f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.2f}"


def plot_suite(label: str, groups: dict[tuple, list[dict]], path: Path) -> None:
    """Test accuracy against bits: LSQ and BWRF (and BWRF's best branch), FP dashed; the
    markers are the seeds' mean, the bars their standard deviation, dots each seed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for fp in (ss[0] for (_, method, _, _), ss in groups.items() if method == "fp"):
        ax.axhline(fp["final"]["acc"], color="gray", linestyle="--", label="FP")
    for method, marker, offset in (("lsq", "o", -0.04), ("bwrf", "s", 0.04)):
        points = sorted((w, [s["final"] for s in ss]) for (_, m, w, _), ss in groups.items()
                        if m == method)  # fmt: skip
        if not points:
            continue
        series = {method.upper(): [[f["acc"] for f in finals] for _, finals in points]}
        if method == "bwrf":
            series["BWRF best MP branch"] = [[best_branch(f) for f in finals]
                                             for _, finals in points]  # fmt: skip
        for name, values in series.items():
            bits = [w + offset for w, _ in points]
            sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(
                bits,
                [statistics.mean(v) for v in values],
                yerr=sds,
                marker=marker,
                capsize=3,
                label=name,
                **({"linestyle": ":", "alpha": 0.7} if "branch" in name else {}),
            )
            for b, v in zip(bits, values, strict=True):
                ax.scatter([b] * len(v), v, s=8, color="black", alpha=0.35, zorder=3)
    ax.set(xlabel="bits (W = A)", ylabel="test accuracy (%)", title=label)
    ax.set_xticks([2, 3, 4])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(label: str, runs: list[tuple[str, dict]], suite: str, path: Path) -> None:
    """Test accuracy per epoch of a multi-epoch suite: LSQ, BWRF and each BWRF MP branch per
    bit width, the seeds' mean as a line and ± their standard deviation as a band."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    curves: dict[tuple[str, int, str], list[list[float]]] = {}  # (method, bits, key): per seed
    for name, summary in runs:
        if summary["method"] == "fp":
            continue
        history = [json.loads(line) for line in
                   (RESULTS_DIR / "runs" / suite / name / "metrics.jsonl").read_text().splitlines()
                   if line.strip()]  # fmt: skip
        for key in (k for k in history[-1] if k == "acc" or k.startswith("acc_mp")):
            curve = curves.setdefault((summary["method"], summary["w_bits"], key), [])
            curve.append([row[key] for row in history])
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for fp in (s for _, s in runs if s["method"] == "fp"):
        ax.axhline(fp["final"]["acc"], color="gray", linestyle="--", label="FP")
    for (method, bits, key), per_seed in sorted(curves.items()):
        per_epoch = list(zip(*per_seed, strict=True))
        epochs = range(1, len(per_epoch) + 1)
        mean = [statistics.mean(v) for v in per_epoch]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_epoch]
        name = method.upper() + (f" branch M{key[6:]}" if key != "acc" else "")
        line = ax.plot(epochs, mean, marker="o", label=f"{name} W{bits}A{bits}",
                       **({"linestyle": ":"} if key != "acc" else {}))[0]  # fmt: skip
        ax.fill_between(epochs, [m - d for m, d in zip(mean, sd, strict=True)],
                        [m + d for m, d in zip(mean, sd, strict=True)],
                        color=line.get_color(), alpha=0.15)  # fmt: skip
    seeds = len({s["args"]["seed"] for _, s in runs if s["method"] != "fp"})
    ax.set(xlabel="epoch", ylabel="test accuracy (%)",
           title=f"{label}, {seeds} seed" + ("s" if seeds > 1 else ""))  # fmt: skip
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(table: dict, rows: list[tuple[str, str, dict]]) -> None:
    device = describe_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))[0]
    groups = seed_groups(rows)
    lines = [
        "# Results: FP, then LSQ and BWRF from the same FP model, same budget",
        "",
        "Written by `python benchmarks/results_runs.py`; every QAT run starts from the same FP"
        " model; accuracy is the mean ± sample standard deviation over the seeds, each seed's"
        " value beside it; every run's records are in `benchmarks/results/runs/<suite>/<run>/`.",
        "",
        "| data | model | bits | method | epochs | seeds | test accuracy (%) | per seed |"
        " best MP branch (%) | wall time (mean) | machine |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for (suite, method, w, a), ss in groups.items():
        accs = [s["final"]["acc"] for s in ss]
        branches = [b for b in (best_branch(s["final"]) for s in ss) if b is not None]
        bits = "FP" if method == "fp" else f"W{w}A{a}"
        lines.append(
            f"| {table[suite].label} | {ss[0]['model']} | {bits} | {method.upper()} | "
            f"{ss[0]['epochs']} | {len(ss)} | {mean_sd(accs)} | "
            f"{' / '.join(f'{v:.2f}' for v in accs)} | "
            f"{mean_sd(branches) if branches else '-'} | "
            f"{statistics.mean(s['wall_s'] for s in ss) / 60:.1f} min | {machine(ss[0])} |"
        )
    paired = []
    for (suite, method, w, a), bwrf in groups.items():
        lsq = {s["args"]["seed"]: s["final"]["acc"] for s in groups.get((suite, "lsq", w, a), [])}
        pairs = [s["final"]["acc"] - lsq[s["args"]["seed"]] for s in bwrf
                 if method == "bwrf" and s["args"]["seed"] in lsq]  # fmt: skip
        if pairs:
            paired.append(
                f"| {table[suite].label} | {bwrf[0]['model']} | W{w}A{a} | {bwrf[0]['epochs']} | "
                f"{len(pairs)} | "
                f"{mean_sd(pairs, sign='+')} | {' / '.join(f'{d:+.2f}' for d in pairs)} |"
            )
    if paired:
        lines += ["", "BWRF − LSQ, paired by seed (same seed, same FP start):", "",
                  "| data | model | bits | epochs | seeds | BWRF − LSQ (points) | per seed |",
                  "|---|---|---|---:|---:|---:|---|", *paired]  # fmt: skip
    suites_run = sorted({suite for suite, _, _ in rows})
    notes = "; ".join(f"{table[k].label}: {table[k].fp_note}" for k in suites_run)
    lines += ["", f"FP rows: {notes}.", "", "Commands (seed <s> adds `--seed <s>`):", ""]
    lines += dict.fromkeys(f"- `{command_line(s)}`" for _, _, s in rows)  # seeds share one
    stem = RESULTS_DIR / f"results_table_{'_'.join(suites_run)}_{device}"
    for suite in suites_run:  # accuracy against bits, and per epoch where runs are longer
        plots = []
        if len(table[suite].bits) > 1:
            plots.append(f"results_{suite}_{device}.png")
            plot_suite(table[suite].label, {k: v for k, v in groups.items() if k[0] == suite},
                       RESULTS_DIR / plots[-1])  # fmt: skip
        runs = [(name, s) for k, name, s in rows if k == suite]
        if max((s["epochs"] for _, s in runs if s["method"] != "fp"), default=0) > 1:
            plots.append(f"results_{suite}_curves_{device}.png")
            plot_curves(table[suite].label, runs, suite, RESULTS_DIR / plots[-1])
        lines += ["", *(f"![{suite}]({plot})" for plot in plots)]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        [{"suite": suite, "run": name, "command": command_line(s), **s} for suite, name, s in rows],
        indent=1,
    ) + "\n")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
