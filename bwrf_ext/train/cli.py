"""``bwrf-train``: the command line, its checks, and the exit codes.

Every bad input is refused before anything is written: one line on stderr, exit status 2.
Options are checked here, before any file is read; data files, weights and the model's fit to
the images are checked by the runner before training starts, and a run writes nothing until its
first checkpoint. An interrupted run (Ctrl-C) exits with 130 and says what was kept.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from bwrf_ext.data import AUGMENTS, DATASETS, GRAYSCALE_DATASETS, DataError
from bwrf_ext.methods.contsup.config import parse_aux_head, parse_context
from bwrf_ext.nn.quantizer import CLIP_TESTS, DEFAULT_INIT, INIT_METHODS
from bwrf_ext.train.checkpoint import CheckpointError
from bwrf_ext.train.methods import METHODS

PROG = "bwrf-train"
BITS_RANGE = (2, 8)
DEFAULT_MODEL = {
    "digits": "small_cnn",
    "fashion-mnist": "resnet20",
    "cifar10": "resnet20",
    "cifar100": "resnet20",
    "imagefolder": "resnet18",
}
# Options a resumed run may change: they do not alter what is computed.
RESUME_MAY_CHANGE = {
    "resume", "out", "device", "threads", "progress", "tensorboard", "workers", "overwrite"
}
# What a checkpoint written before an option existed ran with, where that differs from the
# option's default today (the default changed when the option came).
LEGACY_DEFAULTS = {"clip_test": "after_round", "step_init": "lsq", "contsup_preset": "uniform"}
CONTSUP_SPLITS = ("infopro", "infopro_balanced", "even", "balanced")


class UsageError(ValueError):
    """Bad or incompatible options: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage dump
        raise UsageError(message)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except a flag's ("--no-progress ... (default: True)" reads backwards)
    and None (those options' help says what they default to)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:  # flags: their presence is the value
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train a full-precision or low-bit network: FP, LSQ or BWRF (and the other "
        "block-wise methods). With no data options it trains on scikit-learn's bundled digits.",
        formatter_class=_HelpFormatter,
    )
    what = p.add_argument_group("what to train")
    what.add_argument("--method", default="fp", help=f"one of {', '.join(METHODS)}")
    what.add_argument(
        "--model", default=None,
        help="resnet20/32/44/56/110 (CIFAR), cifar_resnet18, small_cnn, mlp, or a torchvision "
        "classification model; default: small_cnn for digits, resnet20 for CIFAR and "
        "Fashion-MNIST, resnet18 for imagefolder",
    )  # fmt: skip
    what.add_argument("--w-bits", type=int, default=None, help="weight bits (lsq/bwrf; default 4)")
    what.add_argument("--a-bits", type=int, default=None, help="activation bits (default 4)")
    what.add_argument(
        "--first-last-bits", type=int, default=8,
        help="bits of the first and last layer; 0 keeps them in full precision",
    )  # fmt: skip
    what.add_argument(
        "--step-init", default=DEFAULT_INIT, choices=INIT_METHODS,
        help="step-size initialisation on the calibration batch: mse (least quantization error), "
        "lsq (2*mean|v|/sqrt(qmax), the LSQ paper's) or absmax (max|v|/qmax)",
    )  # fmt: skip
    what.add_argument(
        "--clip-test", default="before_round", choices=CLIP_TESTS,
        help="where LSQ's backward tests the clip range: before_round (on x/s, the LSQ paper's) "
        "or after_round (ATen's fake-quant, for parity with PyTorch)",
    )  # fmt: skip
    what.add_argument(
        "--init-from", default=None,
        help="FP weights to start from: a bwrf-train checkpoint or run directory, an akamaster "
        "file from ../shared/weights, or a state_dict (required for bwrf: the FP partner)",
    )  # fmt: skip
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)}")
    data.add_argument("--data-dir", default=None, help="where the data set lies")
    data.add_argument("--download", action="store_true", help="fetch CIFAR / Fashion-MNIST")
    data.add_argument("--augment", default="auto", help=f"auto or one of {', '.join(AUGMENTS)}")
    data.add_argument(
        "--normalization", default="auto", choices=("auto", "dataset", "imagenet"),
        help="auto: as the --init-from weights were trained (akamaster: imagenet), else dataset",
    )  # fmt: skip
    data.add_argument("--train-subset", type=int, default=None, help="stratified N train images")
    data.add_argument("--test-subset", type=int, default=None, help="stratified N test images")
    data.add_argument("--image-size", type=int, default=224, help="imagefolder crop size")
    data.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument("--batch-size", type=int, default=128, help="global batch (all processes)")
    opt.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    opt.add_argument(
        "--lr", type=float, default=None,
        help="peak learning rate; default 0.1 from scratch, 0.01 with --init-from (SGD), "
        "1e-3 (AdamW)",
    )  # fmt: skip
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--schedule", default="cosine", choices=("cosine", "step", "constant"))
    opt.add_argument("--warmup-epochs", type=int, default=0)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    opt.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm (multi-GPU only)")
    bw = p.add_argument_group("BWRF and Block-KD")
    bw.add_argument("--alpha", type=float, default=1.0, help="KD weight")
    bw.add_argument(
        "--temperature", type=float, default=None, help="KD temperature (BWRF 2, Block-KD 4)"
    )
    bw.add_argument(
        "--branch-weights", default=None, choices=("uniform", "geometric"),
        help="weights of BWRF's branches / Block-KD's stones (BWRF uniform, Block-KD geometric)",
    )  # fmt: skip
    bw.add_argument(
        "--branches", default=None,
        help="BWRF's branch entries / Block-KD's stones as comma-separated block indices, e.g. "
        "1,2, or none: plain KD from the partner (the ablation); default: all",
    )  # fmt: skip
    bw.add_argument("--teacher-model", default="resnet56", help="Block-KD's teacher architecture")
    bw.add_argument(
        "--teacher-from", default=None,
        help="Block-KD's teacher weights (formats as --init-from); required for blockkd",
    )  # fmt: skip
    bw.add_argument("--beta", type=float, default=1.0, help="Block-KD: weight of the stones")
    bw.add_argument("--gamma", type=float, default=1.0, help="Block-KD: ensemble term weight")
    bw.add_argument("--kd", default="kl", choices=("kl", "dkd"), help="Block-KD's KD loss")
    cs = p.add_argument_group("ContSup")
    cs.add_argument("--contsup-k", type=int, default=8, help="K gradient-isolated modules")
    cs.add_argument(
        "--contsup-split", default="infopro",
        help="infopro, infopro_balanced, even or balanced (see bwrf_ext.ContSupConfig)",
    )  # fmt: skip
    cs.add_argument("--contsup-context", default="E", help="R0, E, R<n> or R<n>E")
    cs.add_argument("--contsup-aux-head", default="1c2f", help="auxiliary head, <n>c<m>f")
    cs.add_argument(
        "--contsup-preset", default="published", choices=("published", "uniform"),
        help="published: the public ContSup code's heads, loss and loss-weight tables; uniform: "
        "C->2C heads, CE, flat weights (see bwrf_ext.ContSupConfig)",
    )  # fmt: skip
    cs.add_argument(
        "--contsup-loss", default=None, choices=("ce", "supcon"),
        help="local loss; default: the preset's (published: supcon, uniform: ce)",
    )  # fmt: skip
    cs.add_argument("--contsup-reconstruction", action="store_true", help="add the decoder")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads of each process (default: torch's; 1 when sharing cores with others)",
    )  # fmt: skip
    run.add_argument("--out", default=None, help="run directory (default runs/<method>-...)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    run.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    run.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard")
    run.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parses and checks the options that need no file; fills the defaults that depend on others.

    Raises:
        UsageError: one message naming the option, what is allowed and what was given.
    """
    args = build_parser().parse_args(argv)
    # Which options were given (a resumed run refuses those that differ from its own).
    given = build_parser()
    for action in given._actions:
        action.default = argparse.SUPPRESS
    args.explicit = set(vars(given.parse_args(argv)))
    if args.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    if args.dataset not in DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(DATASETS)}, got {args.dataset!r}")
    if args.augment != "auto" and args.augment not in AUGMENTS:
        raise UsageError(f"--augment must be auto or one of {', '.join(AUGMENTS)}, got "
                         f"{args.augment!r}")  # fmt: skip
    if args.model is None:
        args.model = DEFAULT_MODEL[args.dataset]
    from bwrf_ext.models.registry import model_names, needs_rgb

    for option in ("model", "teacher_model"):
        if getattr(args, option) not in model_names():
            raise UsageError(
                f"--{option.replace('_', '-')} {getattr(args, option)!r} is unknown; ours: "
                "resnet20/32/44/56/110, cifar_resnet18, resnet8x4/32x4, wrn_16_2/40_2, "
                "small_cnn, mlp; or a torchvision classification model name"
            )
    if args.branches is not None:
        if args.method not in ("bwrf", "blockkd"):
            raise UsageError(f"--branches is for --method bwrf or blockkd, not {args.method}")
        args.branches = parse_branches(args.branches)
    given_bits = args.w_bits is not None or args.a_bits is not None
    if args.method == "fp" and given_bits:
        raise UsageError("--w-bits/--a-bits quantize the model: use --method lsq or bwrf, not fp")
    # lsq and bwrf always quantize; the block-wise methods train a low-bit net when given bits.
    quantized = args.method in ("lsq", "bwrf") or given_bits
    if quantized:
        args.w_bits = 4 if args.w_bits is None else args.w_bits
        args.a_bits = 4 if args.a_bits is None else args.a_bits
        lo, hi = BITS_RANGE
        for name in ("w_bits", "a_bits"):
            if not lo <= getattr(args, name) <= hi:
                raise UsageError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got "
                                 f"{getattr(args, name)}")  # fmt: skip
        if args.first_last_bits != 0 and not lo <= args.first_last_bits <= hi:
            raise UsageError(
                f"--first-last-bits must be 0 (full precision) or in [{lo}, {hi}], got "
                f"{args.first_last_bits}"
            )
    for name in ("step_init", "clip_test"):
        if name in args.explicit and not quantized and not args.resume:
            raise UsageError(f"--{name.replace('_', '-')} sets the quantizers: it needs a "
                             f"quantized model (--method lsq/bwrf, or --w-bits), not --method "
                             f"{args.method} in full precision")  # fmt: skip
    if args.method == "blockkd" and args.teacher_from is None and not args.resume:
        raise UsageError("--method blockkd needs --teacher-from: the weights of the teacher")
    if args.method != "blockkd" and args.teacher_from is not None:
        raise UsageError("--teacher-from is Block-KD's teacher: use it with --method blockkd")
    if args.method == "bwrf" and args.init_from is None and not args.resume:
        raise UsageError("--method bwrf needs --init-from: the FP weights of the frozen partner")
    if args.dataset == "digits" and (args.data_dir is not None or args.download):
        raise UsageError("--dataset digits comes with scikit-learn: drop --data-dir/--download")
    if args.dataset == "imagefolder" and args.data_dir is None:
        raise UsageError("--dataset imagefolder needs --data-dir (holding train/ and val/)")
    if args.data_dir is not None and not args.download and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir} is not a directory")
    if (args.normalization == "imagenet" and args.dataset in GRAYSCALE_DATASETS
            and not needs_rgb(args.model)):  # fmt: skip
        raise UsageError(
            f"--normalization imagenet is for RGB images; {args.dataset} is grayscale and "
            f"{args.model} takes it as is: use auto or dataset"
        )
    _check_numbers(args)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("train_subset", "test_subset"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.warmup_epochs < args.epochs:
        raise UsageError(f"--warmup-epochs must be in [0, --epochs), got {args.warmup_epochs}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0 (0: load in the main process), got "
                         f"{args.workers}")  # fmt: skip
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.image_size < 1:
        raise UsageError(f"--image-size must be >= 1, got {args.image_size}")
    if args.nesterov and (args.optimizer != "sgd" or args.momentum <= 0):
        raise UsageError(f"--nesterov needs --optimizer sgd with --momentum > 0, got --optimizer "
                         f"{args.optimizer}, --momentum {args.momentum}")  # fmt: skip
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adamw" else (0.01 if args.init_from else 0.1)
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite replaces it: pick one")
    _check_device(args.device)
    if args.method == "contsup" and args.amp:
        raise UsageError("--amp does not apply to --method contsup (backward per module)")
    _check_contsup(args)
    if args.amp and args.device == "cpu":
        raise UsageError("--amp is bf16 autocast on CUDA; it does nothing useful with --device cpu")
    if args.out is None:
        bits = f"-w{args.w_bits}a{args.a_bits}" if quantized else ""
        if args.method == "contsup":
            bits = f"-k{args.contsup_k}{args.contsup_context}{bits}"
        args.out = str(Path("runs") / f"{args.method}-{args.model}-{args.dataset}{bits}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; a run needs a directory")
    return args


def _check_numbers(args: argparse.Namespace) -> None:
    """The float options: finite and in range (NaN fails every comparison, so `not` tests)."""
    for name in ("alpha", "beta", "gamma", "weight_decay"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got "
                             f"{value}")  # fmt: skip
    if args.temperature is not None and not (
        math.isfinite(args.temperature) and args.temperature > 0
    ):
        raise UsageError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if not (math.isfinite(args.momentum) and 0 <= args.momentum < 1):
        raise UsageError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch sees no CUDA device (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device "
                         "cpu or auto")  # fmt: skip
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise UsageError(f"--device {device}: torch sees CUDA devices 0.."
                         f"{torch.cuda.device_count() - 1}")  # fmt: skip


def _check_contsup(args: argparse.Namespace) -> None:
    """ContSup's options, checked whatever the method (their defaults are valid)."""
    if args.contsup_k < 1:
        raise UsageError(f"--contsup-k must be >= 1, got {args.contsup_k}")
    if args.contsup_split not in CONTSUP_SPLITS:
        raise UsageError(f"--contsup-split must be one of {', '.join(CONTSUP_SPLITS)}, got "
                         f"{args.contsup_split!r}")  # fmt: skip
    try:
        parse_context(args.contsup_context)
    except ValueError:
        raise UsageError(f"--contsup-context must be R0, E, R<n> or R<n>E with n >= 1 (e.g. R1, "
                         f"R1E), got {args.contsup_context!r}") from None  # fmt: skip
    try:
        parse_aux_head(args.contsup_aux_head)
    except ValueError:
        raise UsageError(
            f"--contsup-aux-head must look like <n>c<m>f with n >= 0 conv and m >= 1 linear "
            f"layers (e.g. 1c2f), got {args.contsup_aux_head!r}"
        ) from None


def parse_branches(text: str) -> tuple[int, ...]:
    """The --branches text as block indices: "1,2" -> (1, 2); "none" -> () (plain KD)."""
    if text.strip().lower() == "none":
        return ()
    try:
        chosen = tuple(int(part) for part in text.split(","))
    except ValueError:
        chosen = ()
    if not chosen or min(chosen) < 1 or len(set(chosen)) != len(chosen):
        raise UsageError(
            f"--branches must be distinct block indices >= 1 like 1,2, or none; got {text!r}"
        )
    return chosen


def option_defaults() -> dict[str, Any]:
    """What a checkpoint written before an option existed ran with: the option's default, or
    the old behaviour where the default changed when the option came (LEGACY_DEFAULTS)."""
    defaults = {a.dest: a.default for a in build_parser()._actions if a.dest != "help"}
    return {**defaults, **LEGACY_DEFAULTS}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bwrf-train`` and ``python -m bwrf_ext.train``; returns the exit status."""
    from bwrf_ext.train.runner import RunError, RunInterrupted, train

    try:
        args = parse_args(argv)
        train(args)
    except (UsageError, CheckpointError, DataError, RunError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        kept = interrupt.kept if isinstance(interrupt, RunInterrupted) else "nothing was written"
        print(f"{PROG}: interrupted; {kept}", file=sys.stderr)
        return 130
    return 0
