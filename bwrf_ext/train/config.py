"""The options of a ``bwrf-train`` run: declared for the command line, parsed into a typed
:class:`RunConfig`, checked in one place, and merged with a resumed run's checkpoint.

Every bad option is refused here, before any file is read: one line on stderr, exit status 2.
What needs files (data, weights, the model's fit to the images) is checked by the builder.
(Over 400 lines because the option declarations, their typed fields and their checks belong
together: one place to read what an option does and what it refuses.)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bwrf_ext.data import AUGMENTS, DATASETS, GRAYSCALE_DATASETS, PAD_FILLS
from bwrf_ext.nn.quantizer import CLIP_TESTS, DEFAULT_INIT, INIT_METHODS
from bwrf_ext.train import distributed
from bwrf_ext.train.errors import UsageError
from bwrf_ext.train.methods import METHODS, option_groups
from bwrf_ext.train.methods.base import check_non_negative

PROG = "bwrf-train"
BITS_RANGE = (2, 8)
DEFAULT_BITS = 4
DEFAULT_MODEL = {
    "digits": "small_cnn",
    "fashion-mnist": "resnet20",
    "cifar10": "resnet20",
    "cifar100": "resnet20",
    "imagefolder": "resnet18",
}
# Options a resumed run may change: they do not alter what is computed. (--compile changes
# the float rounding of a step, not its math: a compiled run may go on eagerly and back.)
RESUME_MAY_CHANGE = {
    "resume", "out", "device", "threads", "progress", "tensorboard", "workers", "overwrite",
    "compile",
}  # fmt: skip
# What a checkpoint written before an option existed ran with, where that differs from the
# option's default today (the default changed when the option came).
LEGACY_DEFAULTS = {"clip_test": "after_round", "step_init": "lsq", "contsup_preset": "uniform"}


@dataclass
class RunConfig:
    """Everything a run is told: the command line's options after :meth:`check` (defaults that
    depend on other options filled in), or a resumed run's (:meth:`resumed`).

    The fields are the options every method shares, by their argparse names; ``method_options``
    holds those the methods declare (``bwrf_ext.train.methods``), by name too. :meth:`args`
    gives both as the flat dict checkpoints and summary.json store.
    """

    method: str
    model: str | None  # None: the data set's default (DEFAULT_MODEL)
    w_bits: int | None  # None after check(): a full-precision run
    a_bits: int | None
    first_last_bits: int
    step_init: str
    clip_test: str
    init_from: str | None
    dataset: str
    data_dir: str | None
    download: bool
    augment: str
    pad_fill: str
    normalization: str
    train_subset: int | None
    test_subset: int | None
    image_size: int
    workers: int
    epochs: int
    batch_size: int
    optimizer: str
    lr: float | None  # None: the optimizer's default
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    warmup_epochs: int
    seed: int
    amp: bool
    sync_bn: bool
    compile: bool  # torch.compile of the training forward (the checkpoints stay the plain model's)
    teacher_model: str  # the frozen teacher a method may build (MethodSpec.teacher)
    teacher_from: str | None
    device: str
    threads: int | None
    out: str | None  # None: runs/<method>-<model>-<dataset>...
    resume: bool
    overwrite: bool
    tensorboard: bool
    progress: bool
    method_options: dict[str, Any] = field(default_factory=dict)
    given: frozenset[str] = frozenset()  # the options on the command line

    @classmethod
    def from_args(cls, values: dict[str, Any], given: frozenset[str] = frozenset()) -> RunConfig:
        """From a flat option dict (parsed, or a checkpoint's ``args``)."""
        shared = {f.name for f in dataclasses.fields(cls)} - {"method_options", "given"}
        return cls(
            **{k: v for k, v in values.items() if k in shared},
            method_options={k: v for k, v in values.items() if k not in shared},
            given=given,
        )

    def args(self) -> dict[str, Any]:
        """The options as one flat dict of plain values (what ``torch.load(weights_only=True)``
        reads back): the ``args`` of checkpoints and summary.json."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("method_options", "given")}  # fmt: skip
        return {**shared, **self.method_options}

    def option(self, name: str) -> Any:
        """One option's value by its argparse name, shared or a method's."""
        return self.method_options[name] if name in self.method_options else getattr(self, name)

    @property
    def quantized(self) -> bool:
        """Whether the model is low-bit: decided by :meth:`check`, which sets the bits."""
        return self.w_bits is not None

    def check(self) -> None:
        """Checks the options that need no file; fills the defaults that depend on others.

        Raises:
            UsageError: one message naming the option, what is allowed and what was given.
        """
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.dataset not in DATASETS:
            raise UsageError(f"--dataset must be one of {', '.join(DATASETS)}, got "
                             f"{self.dataset!r}")  # fmt: skip
        if self.augment != "auto" and self.augment not in AUGMENTS:
            raise UsageError(f"--augment must be auto or one of {', '.join(AUGMENTS)}, got "
                             f"{self.augment!r}")  # fmt: skip
        if self.model is None:
            self.model = DEFAULT_MODEL[self.dataset]
        from bwrf_ext.models.registry import model_name_problem, needs_rgb

        for option in ("model", "teacher_model"):
            problem = model_name_problem(getattr(self, option))
            if problem is not None:
                raise UsageError(
                    f"--{option.replace('_', '-')} {getattr(self, option)!r} {problem}"
                )
        self._check_bits()
        spec = METHODS[self.method]
        for options in option_groups():
            options.check(self, options in spec.options)
        spec.check(self)
        if self.dataset == "digits" and (self.data_dir is not None or self.download):
            raise UsageError("--dataset digits comes with scikit-learn: drop --data-dir/--download")
        if self.dataset == "imagefolder" and self.data_dir is None:
            raise UsageError("--dataset imagefolder needs --data-dir (holding train/ and val/)")
        if self.data_dir is not None and not self.download and not Path(self.data_dir).is_dir():
            raise UsageError(f"--data-dir {self.data_dir} is not a directory")
        if (self.normalization == "imagenet" and self.dataset in GRAYSCALE_DATASETS
                and not needs_rgb(self.model)):  # fmt: skip
            raise UsageError(
                f"--normalization imagenet is for RGB images; {self.dataset} is grayscale and "
                f"{self.model} takes it as is: use auto or dataset"
            )
        self._check_optimisation()
        self._check_counts()
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the run in --out, --overwrite replaces it: pick "
                             "one")  # fmt: skip
        _check_device(self.device)
        if self.amp and self.device == "cpu":
            raise UsageError("--amp is bf16 autocast on CUDA; it does nothing useful with --device "
                             "cpu")  # fmt: skip
        if self.out is None:
            bits = f"-w{self.w_bits}a{self.a_bits}" if self.quantized else ""
            tag = spec.out_tag(self)
            self.out = str(Path("runs") / f"{self.method}-{self.model}-{self.dataset}{tag}{bits}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UsageError(f"--out {self.out} is a file; a run needs a directory")

    def _check_bits(self) -> None:
        """Decides whether the model is quantized (the one place that does) and checks the bits."""
        always = METHODS[self.method].quantized
        given_bits = self.w_bits is not None or self.a_bits is not None
        if always is False and given_bits:
            lowbit = " or ".join(name for name, spec in METHODS.items() if spec.quantized)
            raise UsageError(f"--w-bits/--a-bits quantize the model: use --method {lowbit}, not "
                             f"{self.method}")  # fmt: skip
        if always or given_bits:
            self.w_bits = DEFAULT_BITS if self.w_bits is None else self.w_bits
            self.a_bits = DEFAULT_BITS if self.a_bits is None else self.a_bits
            lo, hi = BITS_RANGE
            for name in ("w_bits", "a_bits"):
                if not lo <= getattr(self, name) <= hi:
                    raise UsageError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got "
                                     f"{getattr(self, name)}")  # fmt: skip
            if self.first_last_bits != 0 and not lo <= self.first_last_bits <= hi:
                raise UsageError(
                    f"--first-last-bits must be 0 (full precision) or in [{lo}, {hi}], got "
                    f"{self.first_last_bits}"
                )
        for name in ("step_init", "clip_test"):
            if name in self.given and not self.quantized and not self.resume:
                raise UsageError(f"--{name.replace('_', '-')} sets the quantizers: it needs a "
                                 f"quantized model (--method lsq/bwrf, or --w-bits), not --method "
                                 f"{self.method} in full precision")  # fmt: skip

    def _check_optimisation(self) -> None:
        """The optimiser's numbers: finite and in range; fills the default --lr."""
        check_non_negative("weight-decay", self.weight_decay)
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise UsageError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise UsageError(
                f"--nesterov needs --optimizer sgd with --momentum > 0, got --optimizer "
                f"{self.optimizer}, --momentum {self.momentum}"
            )
        if self.lr is None:
            self.lr = 1e-3 if self.optimizer == "adamw" else (0.01 if self.init_from else 0.1)

    def _check_counts(self) -> None:
        """The integer options: in range."""
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")  # fmt: skip
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise UsageError(f"--warmup-epochs must be in [0, --epochs), got {self.warmup_epochs}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        if self.workers < 0:
            raise UsageError(f"--workers must be >= 0 (0: load in the main process), got "
                             f"{self.workers}")  # fmt: skip
        if self.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {self.seed}")
        if self.image_size < 1:
            raise UsageError(f"--image-size must be >= 1, got {self.image_size}")

    def check_processes(self, dist_state: distributed.Distributed) -> None:
        """The options that depend on the process group (torchrun)."""
        if self.batch_size % dist_state.world_size:
            raise UsageError(f"--batch-size {self.batch_size} must be divisible by the "
                             f"{dist_state.world_size} processes")  # fmt: skip
        if self.sync_bn and not (dist_state.enabled and dist_state.device.type == "cuda"):
            raise UsageError("--sync-bn needs multi-process CUDA training (torchrun on GPUs)")

    def resumed(self, saved_args: dict[str, Any]) -> RunConfig:
        """The config of the run continued from a checkpoint holding ``saved_args``.

        Everything is the checkpoint's (options newer than it: what it ran with, see
        :func:`option_defaults`) except RESUME_MAY_CHANGE, which are this config's. Any other
        option given on the command line must equal the checkpoint's. The resumed method's own
        checks run again, on what this config changed (e.g. --compile, which contsup refuses).
        """
        saved = {**option_defaults(), **saved_args}
        for name in sorted(self.given - RESUME_MAY_CHANGE):
            if self.option(name) != saved.get(name):
                raise UsageError(
                    f"--{name.replace('_', '-')} {self.option(name)} differs from the resumed "
                    f"run's {saved.get(name)}; drop it or start a new --out"
                )
        saved.update({name: self.option(name) for name in RESUME_MAY_CHANGE})
        config = RunConfig.from_args(saved)
        METHODS[config.method].check(config)
        return config


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
    """The command line: the shared options, then each method's groups, then the run's."""
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
        help="resnet20/32/44/56/110 (CIFAR), cifar_resnet18, small_cnn, mlp, a torchvision "
        "classification model, or timm:<name> (timm installed); default: small_cnn for "
        "digits, resnet20 for CIFAR and Fashion-MNIST, resnet18 for imagefolder",
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
        "--pad-fill", default="black", choices=PAD_FILLS,
        help="the random crops' border: black pixels (torchvision's RandomCrop) or the "
        "normalisation's mean pixel (about 0 once normalised)",
    )  # fmt: skip
    data.add_argument(
        "--normalization", default="auto", choices=("auto", "dataset", "imagenet"),
        help="auto: as the --init-from weights were trained (akamaster: imagenet), else dataset",
    )  # fmt: skip
    data.add_argument("--train-subset", type=int, default=None, help="stratified N train images")
    data.add_argument("--test-subset", type=int, default=None, help="stratified N test images")
    data.add_argument("--image-size", type=int, default=224, help="imagefolder crop size")
    data.add_argument(
        "--workers", type=int, default=0,
        help="DataLoader worker processes of file-backed (imagefolder) sets; in-memory "
        "sets are batched on the run's device without workers",
    )
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
    opt.add_argument(
        "--compile", action="store_true",
        help="torch.compile the training forward (fp, lsq, bwrf: one graph; blockkd: split "
        "where its warm-up and ensemble gate read tensors; not contsup); evaluation stays eager",
    )  # fmt: skip
    groups: dict[str, argparse._ArgumentGroup] = {}
    for options in option_groups():
        if options.title not in groups:
            groups[options.title] = p.add_argument_group(options.title)
        options.add(groups[options.title])
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


def parse_args(argv: list[str] | None) -> RunConfig:
    """The command line as a checked RunConfig (see :meth:`RunConfig.check`).

    Raises:
        UsageError: one message naming the option, what is allowed and what was given.
    """
    values = vars(build_parser().parse_args(argv))
    # Which options were given (a resumed run refuses those that differ from its own).
    given = build_parser()
    for action in given._actions:
        action.default = argparse.SUPPRESS
    config = RunConfig.from_args(values, frozenset(vars(given.parse_args(argv))))
    config.check()
    return config


def option_defaults() -> dict[str, Any]:
    """What a checkpoint written before an option existed ran with: the option's default, or
    the old behaviour where the default changed when the option came (LEGACY_DEFAULTS)."""
    defaults = {a.dest: a.default for a in build_parser()._actions if a.dest != "help"}
    return {**defaults, **LEGACY_DEFAULTS}


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
