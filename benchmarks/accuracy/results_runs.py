"""The README's results tables: each suite's methods side by side from one start, same budget.

Usage: ``python -m benchmarks.accuracy.results_runs [--suite cifar10 fashion-mnist] [--seeds 0 1 2]
[--methods lsq bwrf] [--bits 2] [--parallel N] [--epochs-qat N] [--device cuda]``.

Suites (each row a method, from the same start, at each of the suite's bit widths):

- ``cifar10`` and ``fashion-mnist``: the CPU table (ResNet-20, one QAT epoch from the suite's FP
  run): LSQ and BWRF, on CIFAR-10 also LSQ+KD (``--method bwrf --branches none``: the
  distillation without the branches, BWRF's ablation);
- ``cifar10-w<b>a<b>-4ep`` (b = 2, 3, 4): one row each over 4 epochs from the ``cifar10`` FP run;
- ``cifar10-init-{lsq,absmax,mse}``: LSQ with each step-size init;
- ``blockkd-fp`` / ``blockkd-w2a2``: a ResNet-20 student of the akamaster FP ResNet-56, by
  cross-entropy alone, plain KD (``--method blockkd --branches none``), Block-KD and Block-KD
  with the (gated) ensemble term of the paper's loss (``--gamma 1``); the FP
  student from scratch, the W2A2 student from the ``cifar10`` FP run;
- ``contsup``: ResNet-32 from scratch, end-to-end vs ContSup K=8 without context (R0, greedy
  local learning) and with context E;
- ``digits-smoke`` checks this script in seconds; ``cifar10-long`` (ResNet-20, 10 QAT epochs)
  and ``cifar10-resnet18`` (ResNet-18 trained from scratch 15 epochs, then 5 QAT epochs) are
  sized, by estimate, for one 9-minute GPU call (``benchmarks/gpu_session.sh train``).

Runs ``bwrf-train`` once per row (each run in ``runs/results/<suite>/<name>``; a finished run
is skipped, an interrupted one resumed, so the script can be restarted), up to ``--parallel``
at a time after the FP run, then copies each run's raw records (metrics.jsonl, summary.json,
log.txt, accuracy.png) to ``benchmarks/results/accuracy/runs/<suite>/<name>/`` and writes the
table to ``benchmarks/results/accuracy/results_table_<suites>_<device>.md`` and ``.json`` with the
commands (named after the suites asked for; a suite that only lends its FP start is not named).
``--table-only`` starts no run; where ``runs/results`` lacks a run (a fresh clone), it
tabulates the kept records.

Every seed starts from the same FP model (trained once, seed 0) or, in a suite trained from
scratch, from the seed's own initialisation; a seed changes the run's data order, augmentation
and initialisation of what it adds. The table gives the mean and sample standard deviation over
the seeds, each seed's accuracy beside it, and each method minus the suite's first (its
baseline), paired by seed.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.report import ACCURACY_RESULTS, write_results
from bwrf_ext._backend import describe_device
from bwrf_ext.models.pretrained import AKAMASTER_DIR, akamaster_weights_path, default_shared_dir

RUNS = Path("runs/results")
RESULTS_DIR = ACCURACY_RESULTS  # the tables and kept records (tests point it elsewhere)
BITS = ((2, 2), (3, 3), (4, 4))
CIFAR10_LABEL = "CIFAR-10 (lossy JPEG-q75 copy)"


@dataclass(frozen=True)
class Variant:
    """One method of a suite: its name in the tables and the bwrf-train options that make it."""

    label: str
    options: tuple[str, ...]


LSQ = Variant("LSQ", ("--method", "lsq"))
LSQ_KD = Variant("LSQ+KD", ("--method", "bwrf", "--branches", "none"))  # BWRF's ablation
BWRF = Variant("BWRF", ("--method", "bwrf"))


@dataclass
class Suite:
    """One table block: a data set and model, its start, its methods, the shared options.

    Attributes:
        fp_note: how the start was made (the FP run, or what "from scratch" means here).
        data: --dataset, --data-dir, --model.
        fp: the FP run's own options, or None: every method trains from scratch.
        lr, epochs: of every method's run (``--epochs-qat`` overrides the epochs).
        bits: (w, a) per group of rows; None trains in full precision.
        fp_suite: start from another suite's FP run (None: its own).
        options: bwrf-train options of every method's run (e.g. --step-init).
        variants: the methods, run name -> Variant; the first is the paired baseline.
    """

    label: str
    fp_note: str
    data: list[str]
    fp: list[str] | None
    lr: float
    epochs: int
    bits: tuple[tuple[int, int] | None, ...] = BITS
    fp_suite: str | None = None
    options: tuple[str, ...] = ()
    variants: dict[str, Variant] = field(default_factory=lambda: {"lsq": LSQ, "bwrf": BWRF})


@dataclass
class Row:
    """One run of a table: where it lives, what it is, and its summary once trained."""

    suite: str
    name: str  # the run's folder under runs/results/<suite>/
    variant: str  # a key of the suite's variants, or "fp" for the suite's FP run
    label: str
    bits: tuple[int, int] | None
    options: list[str]  # bwrf-train options but --seed
    seed: int = 0
    summary: dict | None = None


def akamaster(depth: int) -> str:
    """The akamaster ResNet-<depth> file under ../shared/weights. The suites are listed on every
    machine; where ../shared lacks the file, a run says so (bwrf-train names the path)."""
    try:
        return str(akamaster_weights_path(depth))
    except FileNotFoundError:
        return str(default_shared_dir() / AKAMASTER_DIR / f"resnet{depth}-<sha8>.th")


def suites() -> dict[str, Suite]:
    cifar10 = ["--dataset", "cifar10", "--data-dir",
               str(default_shared_dir() / "data" / "cifar10_jpeg_q75")]  # fmt: skip
    resnet20 = [*cifar10, "--model", "resnet20"]
    akamaster_fp = ["--init-from", akamaster(20), "--epochs", "1", "--lr", "0.01"]
    fine_tuned = "akamaster ResNet-20 fine-tuned 1 epoch on the JPEG train split"
    teacher = ("--teacher-model", "resnet56", "--teacher-from", akamaster(56))
    distillation = {  # the Block-KD study's methods after its cross-entropy baseline
        "kd": Variant("KD", ("--method", "blockkd", "--branches", "none", *teacher)),
        "blockkd": Variant("Block-KD", ("--method", "blockkd", *teacher)),
        # The paper's ensemble term (gated), off by default since it measured worse (issue 18).
        "blockkd_ens": Variant(
            "Block-KD + ensemble", ("--method", "blockkd", *teacher, "--gamma", "1")
        ),
    }
    return {
        "cifar10": Suite(CIFAR10_LABEL, fine_tuned, resnet20, akamaster_fp, 0.01, 1,
                         variants={"lsq": LSQ, "lsq_kd": LSQ_KD, "bwrf": BWRF}),
        "fashion-mnist": Suite(
            "Fashion-MNIST (exact, Debian package)",
            "ResNet-20 (1-channel stem) from scratch, 2 epochs",
            ["--dataset", "fashion-mnist", "--model", "resnet20"],
            ["--epochs", "2", "--lr", "0.1"], 0.01, 1,
        ),
        "digits-smoke": Suite(  # seconds on a CPU: checks this script, measures nothing
            "digits (scikit-learn, smoke test)", "small CNN from scratch, 2 epochs",
            ["--model", "small_cnn"], ["--epochs", "2", "--lr", "0.1"], 0.01, 1,
            variants={"lsq": LSQ, "lsq_kd": LSQ_KD, "bwrf": BWRF},
        ),
        "digits-scratch-smoke": Suite(  # a suite without an FP run, in seconds
            "digits (scikit-learn, smoke test)", "small CNN from scratch",
            ["--model", "small_cnn"], None, 0.1, 1, bits=(None,),
            variants={"e2e": Variant("E2E", ("--method", "fp")),
                      "k2": Variant("ContSup K=2", ("--method", "contsup", "--contsup-k", "2"))},
        ),
        "cifar10-long": Suite(CIFAR10_LABEL, fine_tuned, resnet20, akamaster_fp, 0.01, 10),
        "cifar10-resnet18": Suite(
            CIFAR10_LABEL, "ResNet-18 (CIFAR stem) from scratch, 15 epochs, lr 0.1",
            [*cifar10, "--model", "cifar_resnet18"], ["--epochs", "15", "--lr", "0.1"], 0.01, 5,
        ),
        **{  # the step-size inits side by side (issue 16): LSQ one epoch from the cifar10 FP run
            f"cifar10-init-{init}": Suite(f"{CIFAR10_LABEL}, step init {init}", fine_tuned,
                                          resnet20, akamaster_fp, 0.01, 1, fp_suite="cifar10",
                                          options=("--step-init", init), variants={"lsq": LSQ})
            for init in ("lsq", "absmax", "mse")
        },
        # The crops' border (issue 16's fidelity study): the cifar10 suite's runs, the same FP
        # start, with --pad-fill mean instead of the default black.
        "cifar10-padmean": Suite(f"{CIFAR10_LABEL}, crops padded with the mean", fine_tuned,
                                 resnet20, akamaster_fp, 0.01, 1, fp_suite="cifar10",
                                 options=("--pad-fill", "mean")),  # fmt: skip
        **{  # one row over 4 epochs from the cifar10 FP run: does the 1-epoch difference last?
            f"cifar10-w{b}a{b}-4ep": Suite(CIFAR10_LABEL, fine_tuned, resnet20, akamaster_fp,
                                           0.01, 4, bits=((b, b),), fp_suite="cifar10")
            for b in (2, 3, 4)
        },
        # Block-KD (issue 18): ResNet-56 -> ResNet-20; teacher and student see ImageNet-normalised
        # inputs (the akamaster weights'), the CE row too, so that only the loss differs.
        "blockkd-fp": Suite(
            CIFAR10_LABEL, "ResNet-20 student from scratch, teacher akamaster ResNet-56",
            resnet20, None, 0.1, 1, bits=(None,), options=("--normalization", "imagenet"),
            variants={"ce": Variant("CE", ("--method", "fp")), **distillation},
        ),
        "blockkd-w2a2": Suite(
            CIFAR10_LABEL, f"W2A2 student from the cifar10 FP run ({fine_tuned}), teacher "
            "akamaster ResNet-56", resnet20, akamaster_fp, 0.01, 1, bits=((2, 2),),
            fp_suite="cifar10", variants={"ce": Variant("CE (LSQ)", LSQ.options), **distillation},
        ),
        # ContSup (issue 18): the public code's optimiser (SGD, Nesterov, weight decay 1e-4; its
        # lr 0.8 at batch 1024 scaled to 128), the published preset (bwrf-train's default).
        "contsup": Suite(
            CIFAR10_LABEL, "ResNet-32 from scratch", [*cifar10, "--model", "resnet32"], None,
            0.1, 2, bits=(None,), options=("--nesterov", "--weight-decay", "1e-4"),
            variants={
                "e2e": Variant("E2E", ("--method", "fp")),
                "k8_r0": Variant("ContSup K=8 R0", ("--method", "contsup", "--contsup-k", "8",
                                                    "--contsup-context", "R0")),
                "k8_e": Variant("ContSup K=8 E", ("--method", "contsup", "--contsup-k", "8",
                                                  "--contsup-context", "E")),
            },
        ),
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
    return re.sub(
        r"\b(\d+) threads?(\(s\))?",
        lambda m: f"{m[1]} thread" + ("" if m[1] == "1" else "s"),
        device,
    )


def command_line(options: list[str]) -> str:
    """A row's bwrf-train command as a reader reruns it, ../shared relative."""
    return " ".join(["bwrf-train", *options]).replace(str(default_shared_dir()), "../shared")


def plan(table: dict[str, Suite], args: argparse.Namespace) -> tuple[list[Row], list[Row]]:
    """(the FP runs, the method runs) of the chosen suites, seeds, methods and bit widths."""
    fps, rows = [], []
    for suite in args.suite:
        spec = table[suite]
        start = []
        if spec.fp is not None:
            fp_suite = spec.fp_suite or suite
            fps.append(Row(fp_suite, "fp", "fp", "FP", None,
                           [*spec.data, "--method", "fp", *spec.fp]))  # fmt: skip
            start = ["--init-from", str(RUNS / fp_suite / "fp")]
        epochs = args.epochs_qat or spec.epochs
        seeds = dict.fromkeys(args.seeds)  # a seed twice would be two runs in one folder
        for seed, bits, (key, variant) in itertools.product(
            seeds, spec.bits, spec.variants.items()
        ):
            name = (
                key + (f"_w{bits[0]}a{bits[1]}" if bits else "") + (f"_seed{seed}" if seed else "")
            )
            precision = ["--w-bits", str(bits[0]), "--a-bits", str(bits[1])] if bits else []
            options = [*spec.data, *variant.options, *precision, *start, "--epochs", str(epochs),
                       "--lr", str(spec.lr), *spec.options]  # fmt: skip
            rows.append(Row(suite, name, key, variant.label, bits, options, seed))
    return fps, rows


def main(argv: list[str] | None = None) -> None:
    table = suites()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", nargs="+", default=["cifar10", "fashion-mnist"],
                        choices=list(table), help="default: the CPU table")  # fmt: skip
    parser.add_argument("--epochs-qat", type=int, default=None,
                        help="epochs of every method's run; default: the suite's")  # fmt: skip
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds of the methods' runs; seed 0's runs are <method>[_w<b>a<b>], others add "
        "_seed<s>",
    )
    methods = sorted({key for spec in table.values() for key in spec.variants})
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=methods,
        help="the methods to train (default: every method of each suite; finished runs of any "
        "are tabulated)",
    )
    parser.add_argument(
        "--bits",
        type=int,
        nargs="+",
        default=None,
        help="the weight bit widths to train (default: the suite's; finished runs of any are "
        "tabulated)",
    )
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
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
    fps, rows = plan(table, args)
    done = []
    for row in dict((r.suite, r) for r in fps).values():  # FP runs first: the others start there
        row.summary = run(row.name, row.suite, row.options, extra, start)
        if row.summary is not None:
            keep_records(row.suite, row.name)
            done.append(row)
    trained = {r.suite for r in done}
    rows = [r for r in rows if table[r.suite].fp is None or
            (table[r.suite].fp_suite or r.suite) in trained]  # fmt: skip
    # Every suite's runs in one queue, so no core waits for the end of a suite.
    jobs = [
        (
            r.name,
            r.suite,
            [*r.options, "--seed", str(r.seed)],
            extra,
            start
            and (args.methods is None or r.variant in args.methods)
            and (args.bits is None or r.bits is None or r.bits[0] in args.bits),
        )
        for r in rows
    ]
    for row, summary in zip(rows, run_all(jobs, args.parallel), strict=True):
        if summary is not None:
            keep_records(row.suite, row.name)
            row.summary = summary
            done.append(row)
    if done:
        write_table(table, done)


def seed_groups(rows: list[Row]) -> dict[tuple, list[Row]]:
    """The runs grouped by (suite, method, bits), each group's rows by seed."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.suite, row.variant, row.bits), []).append(row)
    for group in groups.values():
        group.sort(key=lambda r: r.summary["args"]["seed"])
    return groups


def best_branch(final: dict) -> float | None:
    """The best of BWRF's mixed-precision branches or Block-KD's stones (None: neither)."""
    branches = [v for k, v in final.items() if k.startswith(("acc_mp", "acc_stone"))]
    return max(branches) if branches else None


def mean_sd(values: list[float], sign: str = "") -> str:
    """The mean ± the sample standard deviation (the value alone for one seed)."""
    mean = f"{statistics.mean(values):{sign}.2f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.2f}"


def bits_name(bits: tuple[int, int] | None) -> str:
    return f"W{bits[0]}A{bits[1]}" if bits else "FP"


def plot_suite(spec: Suite, groups: dict[tuple, list[Row]], path: Path) -> None:
    """Test accuracy against bits: each method (and the best branch/stone where it has them),
    FP dashed; the markers are the seeds' mean, the bars their standard deviation, dots each
    seed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for fp in (rows[0] for (_, variant, _), rows in groups.items() if variant == "fp"):
        ax.axhline(fp.summary["final"]["acc"], color="gray", linestyle="--", label="FP")
    markers = itertools.cycle("os^Dv")
    for i, (key, variant) in enumerate(spec.variants.items()):
        points = sorted((b[0], [r.summary["final"] for r in rows])
                        for (_, v, b), rows in groups.items() if v == key and b)  # fmt: skip
        if not points:
            continue
        series = {variant.label: [[f["acc"] for f in finals] for _, finals in points]}
        if all(best_branch(f) is not None for _, finals in points for f in finals):
            series[f"{variant.label} best branch"] = [[best_branch(f) for f in finals]
                                                     for _, finals in points]  # fmt: skip
        offset = 0.04 * (i - (len(spec.variants) - 1) / 2)
        marker = next(markers)
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
    ax.set(xlabel="bits (W = A)", ylabel="test accuracy (%)", title=spec.label)
    ax.set_xticks([2, 3, 4])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(label: str, rows: list[Row], path: Path) -> None:
    """Test accuracy per epoch of a multi-epoch suite: each method and each of its branches or
    stones per bit width, the seeds' mean as a line and ± their standard deviation as a band."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    curves: dict[tuple[str, str, str], list[list[float]]] = {}  # (method, bits, key): per seed
    for row in rows:
        if row.variant == "fp":
            continue
        records = RESULTS_DIR / "runs" / row.suite / row.name / "metrics.jsonl"
        history = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
        for key in (k for k in history[-1] if k == "acc" or k.startswith(("acc_mp", "acc_stone"))):
            curve = curves.setdefault((row.label, bits_name(row.bits), key), [])
            curve.append([record[key] for record in history])
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for fp in (r for r in rows if r.variant == "fp"):
        ax.axhline(fp.summary["final"]["acc"], color="gray", linestyle="--", label="FP")
    for (method, bits, key), per_seed in sorted(curves.items()):
        per_epoch = list(zip(*per_seed, strict=True))
        epochs = range(1, len(per_epoch) + 1)
        mean = [statistics.mean(v) for v in per_epoch]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_epoch]
        name = method + (f" {key[4:]}" if key != "acc" else "")
        line = ax.plot(epochs, mean, marker="o", label=f"{name} {bits}",
                       **({"linestyle": ":"} if key != "acc" else {}))[0]  # fmt: skip
        ax.fill_between(epochs, [m - d for m, d in zip(mean, sd, strict=True)],
                        [m + d for m, d in zip(mean, sd, strict=True)],
                        color=line.get_color(), alpha=0.15)  # fmt: skip
    seeds = len({r.summary["args"]["seed"] for r in rows if r.variant != "fp"})
    ax.set(xlabel="epoch", ylabel="test accuracy (%)",
           title=f"{label}, {seeds} seed" + ("s" if seeds > 1 else ""))  # fmt: skip
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired_lines(table: dict[str, Suite], groups: dict[tuple, list[Row]]) -> list[str]:
    """Each method minus its suite's baseline (first) method at the same bits, seed by seed."""
    lines = []
    for (suite, variant, bits), group in groups.items():
        baseline = next(iter(table[suite].variants))
        if variant in ("fp", baseline):
            continue
        base = {r.seed: r.summary["final"]["acc"] for r in groups.get((suite, baseline, bits), [])}
        pairs = [r.summary["final"]["acc"] - base[r.seed] for r in group if r.seed in base]
        if pairs:
            summary = group[0].summary
            lines.append(
                f"| {table[suite].label} | {summary['model']} | {bits_name(bits)} | "
                f"{group[0].label} − {table[suite].variants[baseline].label} | "
                f"{summary['epochs']} | {len(pairs)} | {mean_sd(pairs, sign='+')} | "
                f"{' / '.join(f'{d:+.2f}' for d in pairs)} |"
            )
    return lines


def write_table(table: dict[str, Suite], rows: list[Row]) -> None:
    device = describe_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))[0]
    groups = seed_groups(rows)
    lines = [
        "# Results: each suite's methods from one start, same budget",
        "",
        "Written by `python -m benchmarks.accuracy.results_runs`; the runs of a suite start from"
        " the same FP model (or from scratch where the suite says so); accuracy is the mean ±"
        " sample standard deviation over the seeds, each seed's value beside it; every run's"
        " records are in `benchmarks/results/accuracy/runs/<suite>/<run>/`.",
        "",
        "| data | model | bits | method | epochs | seeds | test accuracy (%) | per seed |"
        " best branch / stone (%) | wall time (mean) | machine |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for (suite, _, bits), group in groups.items():
        summaries = [r.summary for r in group]
        accs = [s["final"]["acc"] for s in summaries]
        branches = [b for b in (best_branch(s["final"]) for s in summaries) if b is not None]
        lines.append(
            f"| {table[suite].label} | {summaries[0]['model']} | {bits_name(bits)} | "
            f"{group[0].label} | {summaries[0]['epochs']} | {len(group)} | {mean_sd(accs)} | "
            f"{' / '.join(f'{v:.2f}' for v in accs)} | "
            f"{mean_sd(branches) if branches else '-'} | "
            f"{statistics.mean(s['wall_s'] for s in summaries) / 60:.1f} min | "
            f"{machine(summaries[0])} |"
        )
    paired = paired_lines(table, groups)
    if paired:
        lines += ["", "Each method minus its suite's first method, paired by seed (same seed, "
                  "same start):", "",
                  "| data | model | bits | methods | epochs | seeds | difference (points) | "
                  "per seed |", "|---|---|---|---|---:|---:|---:|---|", *paired]  # fmt: skip
    suites_run = sorted({r.suite for r in rows})
    # A suite that starts from another suite's FP run shares its note: say it once.
    notes = "; ".join(dict.fromkeys(f"{table[k].label}: {table[k].fp_note}" for k in suites_run))
    teachers = {r.summary["final"]["acc_teacher"] for r in rows
                if "acc_teacher" in r.summary["final"]}  # fmt: skip
    lines += ["", f"Starts: {notes}."]
    if teachers:
        lines += ["", "Teacher test accuracy: " + ", ".join(f"{t:.2f} %" for t in teachers) + "."]
    lines += ["", "Commands (seed <s> adds `--seed <s>`):", ""]
    lines += dict.fromkeys(f"- `{command_line(r.options)}`" for r in rows)  # seeds share one
    # Named after the suites whose methods it holds, not one that only lends its FP start.
    own = [s for s in suites_run if any(r.suite == s and r.variant != "fp" for r in rows)]
    stem = RESULTS_DIR / f"results_table_{'_'.join(own or suites_run)}_{device}"
    for suite in suites_run:  # accuracy against bits, and per epoch where runs are longer
        plots = []
        suite_rows = [r for r in rows if r.suite == suite]
        if all(r.variant == "fp" for r in suite_rows):  # only the FP start another suite shares:
            continue  # its own suite's plot would be redrawn without its methods
        if len(table[suite].bits) > 1:
            plots.append(f"results_{suite}_{device}.png")
            plot_suite(table[suite], {k: v for k, v in groups.items() if k[0] == suite},
                       RESULTS_DIR / plots[-1])  # fmt: skip
        if max((r.summary["epochs"] for r in suite_rows if r.variant != "fp"), default=0) > 1:
            plots.append(f"results_{suite}_curves_{device}.png")
            plot_curves(table[suite].label, suite_rows, RESULTS_DIR / plots[-1])
        lines += ["", *(f"![{suite}]({plot})" for plot in plots)]
    record = [{"suite": r.suite, "run": r.name, "variant": r.variant,
               "command": command_line(r.options), **r.summary} for r in rows]  # fmt: skip
    write_results(stem, lines, record)


if __name__ == "__main__":
    main()
