"""Block-KD: block-wise logit distillation through stepping-stone models (student -> teacher).

Over 400 lines: the config (whose docstring is the method's loss), the connectors between
student and teacher blocks, and the method; the shared skeleton lives in the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext.engine.branches import normalize_branch_choice, resolve_branch_weights
from bwrf_ext.engine.partner import PartneredModule, PartnerRoles, forward_with_branches
from bwrf_ext.engine.split import BlockSplit, probing
from bwrf_ext.losses import LossTerms, dkd_loss, kd_loss, upcast

__all__ = [
    "BlockKD",
    "BlockKDConfig",
    "BlockKDOutput",
    "ConnectorFactory",
    "ConvBNConnector",
    "KDFunction",
    "conv_bn_connector",
]

KDFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""A pluggable distillation loss: (student (B, C), target (B, C), labels (B,), T) -> 0-dim."""

ConnectorFactory = Callable[[int, torch.Size, torch.Size], nn.Module]
"""Builds connector C_i from (i, student block i's output shape, teacher block i's output shape);
the shapes are those of the example input, batch dimension included."""


@dataclass(frozen=True)
class BlockKDConfig:
    """Options of :class:`BlockKD`; the defaults are those of DESIGN.md §1.2 but gamma (below).

    With n blocks, z_S the student's logits, z_T the teacher's, z_i those of stepping stone N_i
    (student blocks 1..i -> connector C_i -> teacher blocks i+1..n -> teacher head) and
    z_E = mean_i z_i (the stones' ensemble, detached by default), every model m (the student
    and each stone) has the loss

        L_m = CE(z_m, y) + alpha * KD(z_m || z_T) + gamma * KD(z_m || z_E)

    and the total is ``L_S + beta * sum_i w_i * L_i`` with ``w_i = 1 / 2^(n-i)`` by default: the
    stone with the most student blocks weighs most (N_n, the student's whole body with the
    teacher's head, weighs 1). The ensemble term is off by default (``gamma = 0``; its terms
    are still reported, with weight 0): measured on CIFAR-10 (ResNet-56 -> ResNet-20, one
    epoch, 3 seeds, README "Block-KD") it cost a student trained from scratch 6.8 points even
    gated, and added 0.6 to a W2A2 student distilled from its FP weights; an independent
    Block-KD without it matches ours. With ``gamma > 0`` it is gated (``ensemble_gate``): it
    counts in a step only while the ensemble classifies that batch better than the student
    does (freshly built connectors make the stones near chance at first), and is reported
    with weight 0 otherwise. KD is
    ``T^2 * KL(softmax(target/T) || softmax(z/T))`` by default
    (:func:`bwrf_ext.losses.kd_loss`), or DKD (:func:`bwrf_ext.losses.dkd_loss`), or any
    :data:`KDFunction`.

    Attributes:
        alpha: weight of KD toward the teacher, for the student and every stone.
        beta: weight of the stones' losses (times w_i).
        gamma: weight of KD toward the stones' ensemble, for the student and every stone (no
            ensemble term without stones); 0 by default (off), 1 is the paper's loss.
        temperature: T, of every KD term (the CIFAR KD literature's 4).
        stone_weights: "geometric" (w_i = 2^-(n-i)), "uniform" (w_i = 1) or one float per
            selected stone, in stone order.
        stones: which N_i to build, i in 1..n (N_n: the student's blocks, C_n, the teacher's
            head); None for all of 1..n, () for none (then Block-KD is plain KD: CE + alpha *
            KD).
        ensemble_gate: "accuracy" (default): the ensemble term counts in a training step only
            when the stones' ensemble is more accurate on the batch than the student (a
            student distilled from a good start is not pulled toward near-chance stones);
            "always": gamma from the first step (the paper's loss as written).
        connector_warmup_steps: the first training steps (forward calls in train mode with
            grad enabled) train only the connectors: the stones take detached student block
            outputs, the student's own terms and the ensemble term are reported with weight 0.
            The student's BatchNorm still updates its running statistics. Counted in the
            ``steps_done`` buffer, so a resumed run continues the count.
        kd: "kl" (Hinton's KD), "dkd" (decoupled KD, Zhao et al. 2022; usually ramped up over
            the first epochs, which the caller does by scaling ``alpha``/``gamma`` in new
            wrappers or by its own KDFunction) or a KDFunction.
        dkd_tckd_weight: DKD's target-class weight (its alpha; 1 on CIFAR-100 in the paper).
        dkd_nckd_weight: DKD's non-target-class weight (its beta; 8 on CIFAR-100).
        detach_ensemble: the ensemble target z_E carries no gradient (False: the ensemble
            term also moves the stones toward the models pulled to it).
        batched: run the teacher suffixes of all stones through each teacher block as one call
            (exact: the teacher's BatchNorm is in eval mode); False is the per-stone loop.
        lean_teacher: run the stones' teacher suffixes through the memory-lean copy of the
            teacher (:mod:`bwrf_ext.lean`: same gradients, a 1-bit mask per ReLU saved instead of
            every conv and BatchNorm input); False for plain autograd.
    """

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.0
    temperature: float = 4.0
    stone_weights: Literal["geometric", "uniform"] | tuple[float, ...] = "geometric"
    stones: tuple[int, ...] | None = None
    kd: Literal["kl", "dkd"] | KDFunction = "kl"
    dkd_tckd_weight: float = 1.0
    dkd_nckd_weight: float = 8.0
    detach_ensemble: bool = True
    batched: bool = True
    lean_teacher: bool = True
    ensemble_gate: Literal["accuracy", "always"] = "accuracy"
    connector_warmup_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "dkd_tckd_weight", "dkd_nckd_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"BlockKDConfig: {name} must be >= 0, got {value}")
        if not self.temperature > 0:
            raise ValueError(f"BlockKDConfig: temperature must be > 0, got {self.temperature}")
        if self.ensemble_gate not in ("accuracy", "always"):
            raise ValueError(
                f"BlockKDConfig: ensemble_gate must be 'accuracy' or 'always', got "
                f"{self.ensemble_gate!r}"
            )
        warmup = self.connector_warmup_steps
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(
                f"BlockKDConfig: connector_warmup_steps must be an int >= 0, got {warmup!r}"
            )
        if isinstance(self.kd, str):
            if self.kd not in ("kl", "dkd"):
                raise ValueError(
                    f"BlockKDConfig: kd must be 'kl', 'dkd' or a callable (student, target, "
                    f"labels, T) -> loss, got {self.kd!r}"
                )
        elif not callable(self.kd):
            raise ValueError(
                f"BlockKDConfig: kd must be 'kl', 'dkd' or a callable, got {self.kd!r}"
            )
        stones, weights = normalize_branch_choice(
            self.stones, self.stone_weights, "BlockKDConfig", ("stone", "stones")
        )
        object.__setattr__(self, "stones", stones)
        object.__setattr__(self, "stone_weights", weights)

    def resolve(self, num_blocks: int) -> dict[int, float]:
        """Stone index i -> w_i (before beta), in increasing i, for a split into num_blocks."""
        stones = self.stones if self.stones is not None else tuple(range(1, num_blocks + 1))
        return resolve_branch_weights(
            stones, self.stone_weights, num_blocks, num_blocks, "BlockKDConfig",
            ("stone", "stones"),
        )  # fmt: skip

    def kd_term(
        self, logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The configured KD loss of (B, C) logits toward (B, C) target logits, 0-dim."""
        if self.kd == "kl":
            return kd_loss(logits, target_logits, self.temperature)
        if self.kd == "dkd":
            return dkd_loss(logits, target_logits, labels, self.temperature,
                            self.dkd_tckd_weight, self.dkd_nckd_weight)
        return self.kd(logits, target_logits, labels, self.temperature)


@dataclass
class BlockKDOutput:
    """What one BlockKD forward returns.

    Attributes:
        student_logits: (B, C) logits of the student, z_S.
        teacher_logits: (B, C) logits of the teacher, z_T (no grad); None in eval mode.
        stone_logits: stone i -> (B, C) logits of N_i; empty in eval mode.
        ensemble_logits: (B, C) z_E, the mean of the stones' logits (detached when the config
            says so); None without stones and in eval mode.
        losses: every term, unweighted: "student_ce", "student_kd", "student_ens", "stone{i}_ce",
            "stone{i}_kd", "stone{i}_ens" ("*_ens" only with stones; eval mode: "student_ce" when
            labels are given). Terms outside the total (weight 0) are detached.
        loss_weights: the coefficient of each term in ``loss``;
            ``loss == sum(loss_weights[k] * losses[k])``.
        loss: the total, 0-dim; None in eval mode without labels.
        ensemble_active: whether the ensemble term counted in ``loss`` this step (see
            ``BlockKDConfig.ensemble_gate``); False in eval mode, without stones, with
            ``gamma == 0`` and during the connector warm-up.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    stone_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    ensemble_logits: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    ensemble_active: bool = False


class ConvBNConnector(nn.Module):
    """The default connector: spatial resize (when needed), 1x1 conv, BatchNorm.

    The resize keeps the size ratio seen at construction, so one connector serves any input
    resolution at which the two networks keep that ratio: shrinking is adaptive average pooling
    (anti-aliased, exact for integer factors), growing is bilinear interpolation. The resize
    comes first because a 1x1 conv commutes with it and then runs on the smaller map when
    shrinking.

    Args:
        in_channels: channels of the student's block output.
        out_channels: channels of the teacher's block output.
        size_ratio: (teacher H / student H, teacher W / student W); (1, 1) for no resize.

    Shape:
        (N, in_channels, H, W) -> (N, out_channels, round(H * ry), round(W * rx)).
    """

    def __init__(self, in_channels: int, out_channels: int,
                 size_ratio: tuple[float, float] = (1.0, 1.0)) -> None:
        super().__init__()
        self.size_ratio = (float(size_ratio[0]), float(size_ratio[1]))
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        height, width = h.shape[-2:]
        size = (round(height * self.size_ratio[0]), round(width * self.size_ratio[1]))
        if size != (height, width):
            if size[0] <= height and size[1] <= width:
                h = F.adaptive_avg_pool2d(h, size)
            else:
                h = F.interpolate(h, size=size, mode="bilinear", align_corners=False)
        return self.bn(self.conv(h))

    def extra_repr(self) -> str:
        return f"size_ratio={self.size_ratio}"


def conv_bn_connector(
    index: int, student_shape: torch.Size, teacher_shape: torch.Size
) -> ConvBNConnector:
    """The default :data:`ConnectorFactory`: a :class:`ConvBNConnector` between two 4-D maps.

    Raises:
        ValueError: a block output that is not (N, C, H, W); pass your own connectors then.
    """
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        raise ValueError(
            f"BlockKD: the default connector C_{index} maps (N, C, H, W) maps; student block "
            f"{index} outputs {tuple(student_shape)}, teacher block {index} "
            f"{tuple(teacher_shape)}; pass connectors={{{index}: module}} or a factory"
        )
    ratio = (teacher_shape[2] / student_shape[2], teacher_shape[3] / student_shape[3])
    return ConvBNConnector(student_shape[1], teacher_shape[1], ratio)


class BlockKD(PartneredModule):
    """Block-wise logit distillation: a student trained through stepping stones into a teacher.

    Student and teacher may differ in architecture; both split into the same number n of
    blocks (automatic splits for CIFAR ResNets, torchvision ResNets and MobileNetV2, the KD
    zoo's models (:mod:`bwrf_ext.models.kd_zoo`), or explicit splits). Stepping stone N_i is
    student blocks 1..i, connector C_i (student block i's output -> teacher block i's output
    shape), teacher blocks i+1..n and the teacher's head: its logits are a logit-level
    alignment of the student's intermediate features. In train mode one call runs the teacher
    under no_grad (z_T and its block shapes), the student once keeping h_1..h_n, the connectors,
    and the stones' teacher suffixes, batched through each teacher block and memory-lean by
    default. Stone gradients reach student blocks 1..i and C_i through the frozen teacher.
    In eval mode only the student runs. The loss is documented in :class:`BlockKDConfig`.

    The student may be quantized (``bwrf_ext.quantize_model``) or not: the wrapper only runs
    blocks. The teacher is a frozen copy of the model given (the caller's is left as it was) and
    is held outside the module tree: ``parameters()``
    and ``state_dict()`` are the student's and the connectors', so
    ``torch.optim.SGD(blockkd.parameters(), ...)`` trains both. For inference keep
    ``blockkd.student``.

    Example::

        teacher = pretrained_cifar_resnet(56)
        student = resnet20()
        blockkd = BlockKD(student, teacher, BlockKDConfig())
        optimizer = torch.optim.SGD(blockkd.parameters(), lr=0.05, momentum=0.9)
        out = blockkd(images, labels)
        out.loss.backward()

    Args:
        student: the model to train.
        teacher: the teacher; copied and the copy frozen, the caller's model never modified.
        config: loss and stone options (default BlockKDConfig()).
        connectors: None for :func:`conv_bn_connector`; a :data:`ConnectorFactory`; or
            stone index -> module for every stone (modules must be new: they are trained).
        student_split, teacher_split: explicit splits (``split_model`` with module names) for
            models without an automatic one.
        example_input: an input both models take, to learn the block output shapes the
            connectors map between (default: (2, 3, 32, 32) normal noise on the student's
            device, in its dtype; factory-built connectors go there too). The probe runs in
            eval mode with the quantizers off (``bwrf_ext.engine.probing``), so lazily initialised
            quantizers and BatchNorm statistics stay untouched.

    Raises:
        ValueError: the same model twice, shared parameters, different block or class counts,
            a connector whose output does not match the teacher's block output (naming the
            block and both shapes).
    """

    roles = PartnerRoles("BlockKD", "student", "teacher", "student", "teacher", "train a copy",
                         "student")  # fmt: skip

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        config: BlockKDConfig | None = None,
        *,
        connectors: ConnectorFactory | Mapping[int, nn.Module] | None = None,
        student_split: BlockSplit | None = None,
        teacher_split: BlockSplit | None = None,
        example_input: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config or BlockKDConfig()
        self.student = student
        self._attach(student, teacher, student_split, teacher_split, self.config.lean_teacher)
        self.stone_weights = self.config.resolve(self.num_blocks)
        if example_input is None:
            reference = next(student.parameters(), torch.empty(0))
            example_input = torch.randn(
                2, 3, 32, 32, generator=torch.Generator().manual_seed(0)
            ).to(reference.device, reference.dtype)
        self.connectors = self._build_connectors(connectors, example_input)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (a copy of the model given)."""
        return self.partner.model

    @property
    def student_split(self) -> BlockSplit:
        """The student's split (sharing its modules)."""
        return self.trained_split

    def connector(self, i: int) -> nn.Module:
        """C_i, the connector of stone i."""
        return self.connectors[str(i)]

    def student_parameters(self) -> Iterator[nn.Parameter]:
        """The student's parameters (``parameters()`` adds the connectors')."""
        return self.student.parameters()

    def _build_connectors(
        self,
        connectors: ConnectorFactory | Mapping[int, nn.Module] | None,
        example_input: torch.Tensor,
    ) -> nn.ModuleDict:
        """Builds (or takes) C_i for every stone and checks its output shape on the example."""
        teacher_outputs, teacher_logits = self.partner.block_outputs_and_logits(example_input)
        with probing(self.student_split), torch.no_grad():
            student_outputs = self.student_split.block_outputs(example_input)
            student_logits = self.student_split.head(student_outputs[-1])
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"BlockKD: the student outputs {tuple(student_logits.shape)}, the teacher "
                f"{tuple(teacher_logits.shape)} on the example input; distillation needs one "
                "logit shape"
            )
        if isinstance(connectors, Mapping):
            given = {int(i): m for i, m in connectors.items()}
            if sorted(given) != sorted(self.stone_weights):
                raise ValueError(
                    f"BlockKD: connectors are given for stones {sorted(given)}, the config "
                    f"builds stones {sorted(self.stone_weights)}"
                )
        else:
            factory = connectors or conv_bn_connector
            # Built where the student lives, in its dtype: the factory only sees shapes.
            given = {
                i: factory(i, student_outputs[i - 1].shape, teacher_outputs[i - 1].shape).to(
                    example_input.device, example_input.dtype
                )
                for i in self.stone_weights
            }
        for i, module in given.items():
            with probing(module), torch.no_grad():
                mapped = module(student_outputs[i - 1])
            _check_stone_input(i, self.num_blocks, student_outputs[i - 1].shape, mapped.shape,
                               teacher_outputs[i - 1].shape)
        return nn.ModuleDict({str(i): given[i] for i in sorted(given)})

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> BlockKDOutput:
        """One Block-KD forward.

        Args:
            x: a batch both models take, e.g. (B, 3, H, W) float.
            y: (B,) int64 labels; required in train mode.

        Returns:
            A BlockKDOutput; in eval mode only ``student_logits`` (and "student_ce"/``loss``
            when y is given).
        """
        if not self.training:
            logits, terms = self._eval_terms(x, y)
            return BlockKDOutput(logits, losses=terms.values, loss_weights=terms.weights,
                                 loss=terms.total)  # fmt: skip
        teacher_logits, teacher_shapes = self._partner_logits_and_shapes(x, y)
        config = self.config
        warming_up = bool(self.steps_done < config.connector_warmup_steps)
        if torch.is_grad_enabled():
            self.steps_done += 1
        _, student_logits, stone_logits = forward_with_branches(
            self.student_split, x, self.partner,
            lambda outputs: self._stone_entries(
                [h.detach() for h in outputs] if warming_up else outputs, teacher_shapes
            ),
            max(self.stone_weights, default=0), config.batched,
        )  # fmt: skip

        ensemble, ensemble_active = None, False
        if stone_logits:
            ensemble = torch.stack([upcast(z) for z in stone_logits.values()]).mean(0)
            if config.detach_ensemble:
                ensemble = ensemble.detach()
            ensemble_active = config.gamma > 0 and not warming_up and (
                config.ensemble_gate == "always"
                or bool(_accuracy(ensemble, y) > _accuracy(student_logits, y))
            )
        terms = LossTerms()
        scored = [("student", student_logits, 0.0 if warming_up else 1.0)]
        scored += [(f"stone{i}", stone_logits[i], config.beta * w)
                   for i, w in self.stone_weights.items()]
        for name, logits, weight in scored:
            targets = [("ce", None, weight), ("kd", teacher_logits, weight * config.alpha)]
            if ensemble is not None:
                targets.append(("ens", ensemble, weight * config.gamma * ensemble_active))
            for suffix, target, w in targets:
                # A weight-0 term is reported only: computed on detached logits, out of the graph.
                z = logits if w else logits.detach()
                if target is None:
                    value = F.cross_entropy(upcast(z), y)
                else:
                    value = config.kd_term(z, target, y)
                terms.add(f"{name}_{suffix}", value, w)
        if terms.total is None:
            raise ValueError("BlockKD.forward: every loss term has weight 0")
        return BlockKDOutput(student_logits, teacher_logits, stone_logits, ensemble,
                             terms.values, terms.weights, terms.total, ensemble_active)

    def _stone_entries(
        self, student_outputs: list[torch.Tensor], teacher_shapes: list[torch.Size]
    ) -> dict[int, torch.Tensor]:
        """C_i(h_i) for every stone i: the input of teacher block i+1 (i = n: of its head)."""
        entries = {}
        for i in self.stone_weights:
            mapped = self.connectors[str(i)](student_outputs[i - 1])
            _check_stone_input(i, self.num_blocks, student_outputs[i - 1].shape, mapped.shape,
                               teacher_shapes[i - 1])  # fmt: skip
            entries[i] = mapped
        return entries

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of the student, the teacher and every stone, without grad.

        For tracking the stones during training; call ``.eval()`` first for test accuracy.

        Returns:
            "model": the student (first, as every method's evaluate), "teacher", "stone{i}":
            (B, C) each.
        """
        teacher_outputs, teacher_logits = self.partner.block_outputs_and_logits(x)
        shapes = [o.shape for o in teacher_outputs]
        del teacher_outputs
        _, student_logits, stone_logits = forward_with_branches(
            self.student_split, x, self.partner, lambda h: self._stone_entries(h, shapes),
            max(self.stone_weights, default=0), self.config.batched,
        )  # fmt: skip
        logits = {"model": student_logits, "teacher": teacher_logits}
        logits.update({f"stone{i}": stone_logits[i] for i in sorted(stone_logits)})
        return logits


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The share of a batch classified right, 0-dim."""
    return (logits.argmax(dim=1) == y).float().mean()


def _check_stone_input(i: int, n: int, student_shape: torch.Size, mapped_shape: torch.Size,
                       teacher_shape: torch.Size) -> None:
    """Raises ValueError unless C_i's output has the shape of teacher block i's output."""
    if mapped_shape != teacher_shape:
        consumer = f"teacher block {i + 1}" if i < n else "the teacher's head"
        raise ValueError(
            f"BlockKD: stone {i}: connector C_{i} maps student block {i}'s output "
            f"{tuple(student_shape)} to {tuple(mapped_shape)}, but {consumer} takes teacher "
            f"block {i}'s output shape {tuple(teacher_shape)}"
        )
