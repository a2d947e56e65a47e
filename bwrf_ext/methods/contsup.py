"""ContSup: greedy local learning of K gradient-isolated modules, with context supply."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext.engine import BlockSplit, probing, split_model
from bwrf_ext.methods.contsup_parts import (
    AuxHead,
    ContextProjector,
    LossWeights,
    Position,
    ReconstructionDecoder,
    balanced_split,
    even_split,
    parse_aux_head,
    parse_context,
    published_loss_weights,
    published_split,
    supervised_contrastive_loss,
)
from bwrf_ext.models.cifar_resnet import CifarResNet

__all__ = ["ContSup", "ContSupConfig", "ContSupCost", "ContSupOutput", "PartCost"]

# CIFAR-10 mean and std as the public code restores images for its decoder (pixel / 255).
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
SplitName = Literal["infopro", "infopro_balanced", "even", "balanced"]
PresetName = Literal["published", "uniform"]
DEFAULT_NUM_MODULES = 8
_FLAT = LossWeights(local=(1.0, 1.0), recon=(1.0, 1.0))


@dataclass(frozen=True)
class ContSupConfig:
    """Options of :class:`ContSup`; every option left None is filled in by ``preset``.

    The network is cut into K modules. Module m < K ends at a boundary: its output h_m feeds an
    auxiliary head (and optionally a decoder) whose loss trains module m alone; the next module
    takes ``h_m.detach() + context``. Module K ends with the network's own head and CE.

    **Presets.** ``"published"`` (the default) is what the public ContSup code runs
    (github.com/Tab-ct/ContSup, commit 0717be60): auxiliary heads whose first conv doubles the
    width at stride 2 up to the network's final width and keeps it at stride 1 there (on CIFAR
    ResNets 16->32 and 32->64 at stride 2, 64->64 at stride 1); the supervised contrastive local
    loss (its ``--local_loss_mode`` default, "contrast"); and, with the decoder on, the loss
    weights of its per-(architecture, data set, K) tables
    (:data:`~bwrf_ext.methods.contsup_parts.PUBLISHED_LOSS_WEIGHTS`); without the decoder every
    local loss has weight 1, as there. ``"uniform"`` is this package's earlier default, one rule
    for every model: each head's first conv C->2C at stride 2, cross-entropy local losses (so the
    heads give local logits and local accuracies), flat (1, 1) weights. The published preset is
    the default because ContSup should mean the method whose numbers the paper reports, without
    a user having to find and copy four settings; "uniform" serves ablations, comparisons with
    runs made before it (issue 18), and models far from the tables. An option set explicitly
    wins over the preset; after construction, ``ContSup.config`` holds the resolved values and
    ``ContSup.weights_source`` says where the weights came from.

    Where the tables have no entry for (architecture, ``table_dataset``, K) with the decoder on,
    the memory-balanced splits use the equal-layer entry of the same key (resnet32 K = 16: the
    same split), and everything else flat (1, 1) weights; both with one warning.

    **Where this differs from the public code, and why.** (1) Configurations outside its tables
    run: K = 1, any K, any model the engine splits, any data set (computed splits, flat weights,
    a warning) where it raises KeyError or NotImplementedError; its head rule, written out for
    16/32/64 input channels only, is generalised as above. (2) Explicit ``local_weights`` apply
    with or without the decoder (it ignores its weights without the decoder), so the local loss
    can be scaled alone. (3) The decoder's loss is BCE on logits, not Sigmoid + BCELoss (which
    clamps log 0 at -100): the same value wherever that is finite. (4) The context encoders'
    and decoder's convs before BatchNorm have no bias, which BN cancels: the same functions.
    (5) Any context "R<n>" and "R<n>E" (it has R0, R1, R2, R4, R8, R16, E, R1E). (6) Options it
    lacks: computed and explicit splits, ``encoder_resolution="boundary"`` (off by default).

    Attributes:
        num_modules: K >= 1 (1 is end-to-end training). None: ``len(split) + 1`` for an
            explicit split, else 8.
        split: where modules end. "infopro": InfoPro's equal-layer table (resnet32 and
            resnet110, K in {2, 3, 4, 8, 16}); "infopro_balanced": the memory-balanced table
            (resnet32 K in {2, 4, 8, 16}, resnet110 K in {2, 3, 4}); for an architecture or K
            without a published entry both fall back, with a warning, to "even" and "balanced"
            respectively. "even": equal unit counts (:func:`even_split`). "balanced": the split
            minimising the largest module's saved-activation bytes, measured on the example
            input (:func:`balanced_split`). Or explicit (stage, block) positions, see
            ``contsup_parts.Position``: stage 0 is the stem, stage s >= 1 the s-th entry of the
            split's blocks, block b its b-th child (0 when the stage is not an nn.Sequential).
        table_arch: the table key ("resnet32", "resnet110"); None infers it for CIFAR ResNets
            (``bwrf_ext.models.cifar_resnet`` and their quantized copies).
        table_dataset: the data set key of the tables: "cifar10" (default), "stl10", "svhn"
            (the public code's names). It selects the loss weights and the memory-balanced split
            (STL-10 has its own resnet110 one; other data sets use CIFAR-10's).
        preset: "published" or "uniform", see above.
        context: "R0" (none), "E" (the image through a small encoder), "R<n>" (the inputs of
            the last n modules through conv1x1-BN-ReLU), "R<n>E" (both). Default "E", the
            public code's. See :func:`~bwrf_ext.methods.contsup_parts.parse_context`.
        encoder_width: hidden channels of the image encoder E (public: 12).
        encoder_resolution: "input": E runs on the full image, then is pooled to the boundary's
            size (public); "boundary": the image is pooled first, so E costs (H_b W_b)/(H W) of
            the MACs and activation memory (a deviation from the public code).
        aux_head: auxiliary head "<n>c<m>f" (default "1c2f": conv3x3, BN, ReLU, GAP, FC 128,
            ReLU, FC out; the conv's width as ``aux_channel_cap`` says). See
            :func:`~bwrf_ext.methods.contsup_parts.parse_aux_head`.
        aux_feature_dim: hidden width of the heads' linear layers, and the SupCon embedding size.
        aux_widen: width multiplier of the heads.
        aux_channel_cap: the first head conv maps C to 2C channels at stride 2, or, where 2C
            would exceed the cap, to ``cap`` channels at stride 1 (see :class:`AuxHead`).
            "final": the cap is the channels of the network's last unit output, the features its
            own head pools (64 on CIFAR ResNets: the public heads); "off": no cap (always C->2C,
            stride 2); an int: that cap. None: "final" (published) or "off" (uniform).
        local_loss: "ce" (the heads give local logits) or "supcon" (supervised contrastive on
            the L2-normalised head output, the public "contrast"). None: "supcon" (published) or
            "ce" (uniform).
        supcon_temperature: SupCon temperature T (public: 0.07).
        supcon_base_temperature: SupCon base temperature (public: 0.07; loss scaled by T/T_base).
        local_weights: (first, last) weight of the local loss, linear in the module index over
            modules 1..K-1 (module m gets first + (last - first) * (m - 1) / (K - 2); K = 2:
            first); applied with or without the decoder. The public code's ``ixy``. None: the
            published table's pair with the decoder on, else (1, 1) (published), or (1, 1)
            (uniform).
        reconstruction: add InfoPro's reconstruction decoder at every boundary.
        recon_weights: (first, last) weight of the reconstruction loss, interpolated as
            local_weights (the public ``ixx``). None: the published table's pair (published) or
            (1, 1) (uniform); resnet32 K = 16 on CIFAR-10, for example, has recon (5, 0.2) with
            local (0.05, 0.5).
        decoder_width: hidden channels of the decoder (public: 12).
        decoder_interpolation: "bilinear" (public) or "nearest".
        image_mean, image_std: the input normalisation, undone to give the decoder's [0, 1]
            target (public: CIFAR-10's, as here).
    """

    num_modules: int | None = None
    split: SplitName | tuple[Position, ...] = "infopro"
    table_arch: str | None = None
    table_dataset: str = "cifar10"
    preset: PresetName = "published"
    context: str = "E"
    encoder_width: int = 12
    encoder_resolution: Literal["input", "boundary"] = "input"
    aux_head: str = "1c2f"
    aux_feature_dim: int = 128
    aux_widen: float = 1.0
    aux_channel_cap: int | Literal["final", "off"] | None = None
    local_loss: Literal["ce", "supcon"] | None = None
    supcon_temperature: float = 0.07
    supcon_base_temperature: float = 0.07
    local_weights: tuple[float, float] | None = None
    reconstruction: bool = False
    recon_weights: tuple[float, float] | None = None
    decoder_width: int = 12
    decoder_interpolation: Literal["bilinear", "nearest"] = "bilinear"
    image_mean: tuple[float, ...] = CIFAR10_MEAN
    image_std: tuple[float, ...] = CIFAR10_STD

    def __post_init__(self) -> None:
        if isinstance(self.split, str):
            if self.split not in ("infopro", "infopro_balanced", "even", "balanced"):
                raise ValueError(
                    "ContSupConfig: split must be 'infopro', 'infopro_balanced', 'even', "
                    f"'balanced' or a tuple of (stage, block) positions, got {self.split!r}"
                )
            k = DEFAULT_NUM_MODULES if self.num_modules is None else self.num_modules
        else:
            try:
                positions = tuple((int(s), int(b)) for s, b in self.split)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"ContSupConfig: split positions must be (stage, block) int pairs, got "
                    f"{self.split!r}"
                ) from e
            object.__setattr__(self, "split", positions)
            k = len(positions) + 1
            if self.num_modules is not None and self.num_modules != k:
                raise ValueError(
                    f"ContSupConfig: num_modules={self.num_modules} but split has "
                    f"{len(positions)} positions ({k} modules); leave num_modules None"
                )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ContSupConfig: num_modules must be an int >= 1, got {k!r}")
        object.__setattr__(self, "num_modules", k)
        if self.preset not in ("published", "uniform"):
            raise ValueError(
                f"ContSupConfig: preset must be 'published' or 'uniform', got {self.preset!r}"
            )
        if not isinstance(self.table_dataset, str) or not self.table_dataset:
            raise ValueError(
                "ContSupConfig: table_dataset must be a data set name such as 'cifar10', "
                f"'stl10' or 'svhn', got {self.table_dataset!r}"
            )
        parse_context(self.context)
        parse_aux_head(self.aux_head)
        if self.local_loss not in (None, "ce", "supcon"):
            raise ValueError(
                "ContSupConfig: local_loss must be 'ce', 'supcon' or None (the preset's), got "
                f"{self.local_loss!r}"
            )
        if self.encoder_resolution not in ("input", "boundary"):
            raise ValueError(
                "ContSupConfig: encoder_resolution must be 'input' or 'boundary', got "
                f"{self.encoder_resolution!r}"
            )
        if self.decoder_interpolation not in ("bilinear", "nearest"):
            raise ValueError(
                "ContSupConfig: decoder_interpolation must be 'bilinear' or 'nearest', got "
                f"{self.decoder_interpolation!r}"
            )
        for name in ("encoder_width", "aux_feature_dim", "decoder_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ContSupConfig: {name} must be an int >= 1, got {value!r}")
        cap = self.aux_channel_cap
        if cap not in (None, "final", "off") and (
            isinstance(cap, bool) or not isinstance(cap, int) or cap < 1
        ):
            raise ValueError(
                "ContSupConfig: aux_channel_cap must be 'final', 'off', an int >= 1 or None (the "
                f"preset's), got {cap!r}"
            )
        if not self.aux_widen > 0:
            raise ValueError(f"ContSupConfig: aux_widen must be > 0, got {self.aux_widen}")
        for name in ("supcon_temperature", "supcon_base_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ContSupConfig: {name} must be > 0, got {getattr(self, name)}")
        for name in ("local_weights", "recon_weights"):
            if getattr(self, name) is None:
                continue
            try:
                pair = tuple(float(w) for w in getattr(self, name))
            except (TypeError, ValueError):
                pair = ()
            if len(pair) != 2 or not all(w >= 0 for w in pair):
                raise ValueError(
                    f"ContSupConfig: {name} must be (first, last) with both >= 0, or None (the "
                    f"preset's), got {getattr(self, name)!r}"
                )
            object.__setattr__(self, name, pair)
        mean, std = tuple(map(float, self.image_mean)), tuple(map(float, self.image_std))
        if len(mean) != len(std) or not all(s > 0 for s in std):
            raise ValueError(
                f"ContSupConfig: image_mean and image_std need one value per channel and std > 0, "
                f"got {self.image_mean} and {self.image_std}"
            )
        object.__setattr__(self, "image_mean", mean)
        object.__setattr__(self, "image_std", std)

    def module_weights(self, module: int) -> tuple[float, float]:
        """(local weight, reconstruction weight) of local module ``module`` (1..K-1).

        Needs both weight pairs set; :class:`ContSup` fills in those left to the preset (use
        ``ContSup.module_weights`` or ``ContSup.config``).
        """
        k = self.num_modules
        if not 1 <= module <= k - 1:
            raise ValueError(f"ContSupConfig: local modules are 1..{k - 1}, got {module}")
        if self.local_weights is None or self.recon_weights is None:
            raise ValueError(
                "ContSupConfig.module_weights: local_weights or recon_weights is None (left to "
                "the preset, which needs the model); use ContSup.module_weights"
            )
        ratio = (module - 1) / (k - 2) if k > 2 else 0.0

        def lerp(pair: tuple[float, float]) -> float:
            return pair[0] + (pair[1] - pair[0]) * ratio

        return lerp(self.local_weights), lerp(self.recon_weights)


@dataclass
class ContSupOutput:
    """What one :meth:`ContSup.train_step` returns; every tensor is detached.

    Attributes:
        logits: (B, classes) logits of the network's head (module K).
        local_outputs: module m (1..K-1) -> (B, classes) local logits ("ce") or (B, D)
            head embeddings ("supcon").
        losses: every term, unweighted, 0-dim: "module{m}_ce" or "module{m}_supcon",
            "module{m}_recon" (with the decoder), and "final_ce" (module K).
        loss_weights: the coefficient of each term; module m backpropagated
            ``sum(loss_weights[k] * losses[k])`` over its own terms.
        module_losses: the K weighted per-module losses, in module order.
        loss: their sum, 0-dim, for logging (already backpropagated).
    """

    logits: torch.Tensor
    local_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)
    module_losses: list[torch.Tensor] = field(default_factory=list)
    loss: torch.Tensor | None = None


@dataclass(frozen=True)
class PartCost:
    """Parameters and multiply-accumulates (conv and linear layers, per sample) of a part."""

    params: int
    macs: int


@dataclass(frozen=True)
class ContSupCost:
    """Cost report of a ContSup model: inference keeps the main net and the context projectors.

    Attributes:
        input_shape: the (B, C, H, W) input the MACs were counted on (then divided by B).
        main: the network itself.
        context: the context projectors (kept at inference).
        aux_heads: the auxiliary heads (training only).
        decoders: the reconstruction decoders (training only).
    """

    input_shape: tuple[int, ...]
    main: PartCost
    context: PartCost
    aux_heads: PartCost
    decoders: PartCost

    @property
    def inference(self) -> PartCost:
        """What deployment runs: main net + context projectors."""
        return PartCost(self.main.params + self.context.params, self.main.macs + self.context.macs)

    @property
    def context_overhead(self) -> tuple[float, float]:
        """(params, MACs) of the context projectors relative to the main net."""
        return (self.context.params / max(self.main.params, 1),
                self.context.macs / max(self.main.macs, 1))

    def table(self) -> str:
        """A Markdown table of every part."""
        rows = [("main net", self.main), ("context projectors", self.context),
                ("inference total", self.inference), ("aux heads (training)", self.aux_heads),
                ("decoders (training)", self.decoders)]
        lines = [f"input {self.input_shape}; MACs of conv/linear layers per sample", "",
                 "| part | params | MMACs |", "|---|---:|---:|"]
        lines += [f"| {name} | {c.params:,} | {c.macs / 1e6:.2f} |" for name, c in rows]
        return "\n".join(lines) + "\n"


class ContSup(nn.Module):
    """Greedy local learning with context supply (ContSup) on any model the engine can split.

    The model is seen as a chain of units: the stem of its :class:`~bwrf_ext.engine.BlockSplit`,
    then every child of each block (every residual block of a ResNet stage), then the head. The
    K modules are contiguous runs of units (``config.split``). In :meth:`train_step`, module m
    runs on its input, its local loss (auxiliary head m: CE or SupCon, plus the weighted
    reconstruction loss) is backpropagated at once, which frees its graph, and the next module
    takes ``h_m.detach() + context_m`` (:class:`ContextProjector`): no gradient crosses a
    boundary, and context projector m learns from module m+1's loss only. Module K ends with
    the model's head and CE. At most one module's activations are alive at a time.

    The context projectors are part of the trained model: :meth:`forward` (inference) runs the
    main net and adds the context at every boundary. ``parameters()`` covers the model, heads,
    decoders and projectors, so one optimizer trains everything; ``state_dict()`` holds them
    all (``model.``, ``heads.``, ``decoders.``, ``context.``).

    Works with quantized models (``bwrf_ext.quantize_model`` before wrapping): the wrapper only
    runs units. Construction probes the model once on ``example_input`` for shapes (eval mode,
    fake quantizers disabled so that none initialises its step size on the probe).

    Example::

        net = quantize_model(resnet32(), w_bits=4, a_bits=4)    # or a float net
        contsup = ContSup(net, ContSupConfig(num_modules=8, context="E")).train()
        optimizer = torch.optim.SGD(contsup.parameters(), lr=0.1, momentum=0.9)
        for x, y in loader:
            out = contsup.train_step(x, y, optimizer)   # zero_grad, K backwards, one step
            log(out.loss.item(), out.losses)
        contsup.eval()
        logits = contsup(x_test)

    Args:
        model: the network to train (trained in place).
        config: options (default ContSupConfig()).
        split: an explicit BlockSplit of the model (:func:`bwrf_ext.engine.split_model` with
            module names) for models without an automatic one.
        example_input: an input the model accepts, for the shape probe; default
            ``zeros(2, 3, 32, 32)``. Its batch size does not matter.

    Attributes:
        config: the config as resolved for this model: every option its preset left None is
            filled in (head cap, local loss, loss weights), so it records what runs.
        boundaries: the (stage, block) positions where modules 1..K-1 end.
        split_source: where the split came from ("infopro table (resnet32, K=8)", "even", ...).
        weights_source: where the loss weights came from ("given", "published table
            (resnet32, cifar10, K=16)", "published without the decoder: ...", ...).
        table_arch: the architecture key used for the tables, or None.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ContSupConfig | None = None,
        *,
        split: BlockSplit | None = None,
        example_input: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or ContSupConfig()
        self.model = model
        split = split or split_model(model)
        own = {id(p) for p in model.parameters()}
        foreign = [n for n, p in split.named_parameters() if id(p) not in own]
        if foreign:
            raise ValueError(f"ContSup: split holds parameters not in the model: {foreign[:3]}")
        units, positions, names = _units_of(split)
        # Through __dict__: as registered children the split and units would duplicate the
        # model's state_dict keys.
        self.__dict__["split"] = split
        self.__dict__["units"] = units
        self.unit_names = names
        reference = next((p for p in model.parameters() if p.is_floating_point()), None)
        device = reference.device if reference is not None else torch.device("cpu")
        dtype = reference.dtype if reference is not None else torch.float32
        if example_input is None:
            example_input = torch.zeros(2, 3, 32, 32, device=device, dtype=dtype)
        shapes, costs, num_classes = self._probe(example_input)
        self.image_channels = example_input.shape[1]
        self.num_classes = num_classes

        self.table_arch = config.table_arch or _table_arch(model, split)
        ends, self.split_source = self._resolve_split(positions, costs)
        final_channels = shapes[-1][1] if len(shapes[-1]) == 4 else None
        self.config = config = self._resolve_preset(final_channels)
        self.boundaries: tuple[Position, ...] = tuple(positions[u] for u in ends)
        starts = [0] + [u + 1 for u in ends]
        stops = [u + 1 for u in ends] + [len(units)]
        self.module_ranges: tuple[tuple[int, int], ...] = tuple(zip(starts, stops, strict=True))

        num_recent, use_image = parse_context(config.context)
        self._num_recent = num_recent
        boundary_channels = []
        for m, u in enumerate(ends, 1):
            if len(shapes[u]) != 4:
                raise ValueError(
                    f"ContSup: module {m} ends after {names[u]!r}, whose output has shape "
                    f"{tuple(shapes[u])}; boundaries need (B, C, H, W) outputs"
                )
            boundary_channels.append(shapes[u][1])
        # Channels of module m's input (1-based m): the image for m = 1, else boundary m-1.
        input_channels = [self.image_channels] + boundary_channels
        out_features = num_classes if config.local_loss == "ce" else config.aux_feature_dim
        cap = None if config.aux_channel_cap == "off" else config.aux_channel_cap
        heads, decoders, context = [], [], []
        for i, channels in enumerate(boundary_channels):  # boundary i ends module i + 1
            heads.append(AuxHead(channels, config.aux_head, out_features, config.aux_feature_dim,
                                 config.aux_widen, cap))
            if config.reconstruction:
                decoders.append(ReconstructionDecoder(
                    channels, self.image_channels, config.decoder_width,
                    config.decoder_interpolation,
                ))
            # Recent inputs, most recent first: module i+1's own (index i), then i-1, ...;
            # with E on, the image (index 0) is E's alone.
            lowest = 1 if use_image else 0
            recent = [input_channels[j] for j in range(i, max(i - num_recent, lowest - 1), -1)]
            context.append(ContextProjector(
                channels, self.image_channels if use_image else None, recent, config.encoder_width,
                image_at_boundary=config.encoder_resolution == "boundary",
            ))
        self.heads = nn.ModuleList(heads).to(device=device, dtype=dtype)
        self.decoders = nn.ModuleList(decoders).to(device=device, dtype=dtype)
        self.context = nn.ModuleList(context).to(device=device, dtype=dtype)

    @property
    def num_modules(self) -> int:
        """K."""
        return len(self.module_ranges)

    def module_weights(self, module: int) -> tuple[float, float]:
        """(local weight, reconstruction weight) of local module ``module`` (1..K-1)."""
        return self.config.module_weights(module)

    def module_parameters(self, module: int) -> Iterator[nn.Parameter]:
        """The main net's parameters in module ``module`` (1..K; module K includes the head)."""
        if not 1 <= module <= self.num_modules:
            raise ValueError(f"ContSup: modules are 1..{self.num_modules}, got {module}")
        start, stop = self.module_ranges[module - 1]
        parts = list(self.units[start:stop])
        if module == self.num_modules:
            parts.append(self.split.head)
        seen: set[int] = set()
        for part in parts:
            for p in part.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def train(self, mode: bool = True) -> ContSup:
        super().train(mode)
        self.split.train(mode)  # the split's own parameter-free glue modules
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.split._apply(fn, recurse)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the main net with the context added at every boundary.

        Under autograd, gradients reach only module K and the last projector (every boundary
        detaches); train with :meth:`train_step`.

        Args:
            x: (B, C, H, W) input batch.

        Returns:
            (B, classes) logits.
        """
        h, recent = x, [x]
        for m, (start, stop) in enumerate(self.module_ranges, 1):
            for u in range(start, stop):
                h = self.units[u](h)
            if m < self.num_modules:
                h = self._supply_context(m, h, x, recent)
        return self.split.head(h)

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        zero_grad: bool = True,
    ) -> ContSupOutput:
        """One ContSup training step: K forwards and K backwards, then one optimizer step.

        With an optimizer: ``optimizer.zero_grad(set_to_none=True)`` (unless ``zero_grad`` is
        False), then module by module forward and ``backward()`` of its loss (freeing its
        graph), then ``optimizer.step()``. Without one, gradients are only accumulated into
        ``.grad`` (for gradient accumulation or a custom step). Call ``.train()`` first for
        batch-statistics BatchNorm. fp32 or whatever dtype the model has; no AMP scaling.

        Args:
            x: (B, C, H, W) input batch (normalised as ``config.image_mean/std`` say, if the
                decoder is on).
            y: (B,) int64 labels.
            optimizer: one optimizer over ``self.parameters()``, or None.
            zero_grad: clear gradients before the step.

        Returns:
            A ContSupOutput (all tensors detached).
        """
        if y.shape != x.shape[:1]:
            raise ValueError(
                f"ContSup.train_step: y must be (B,) labels for x of shape {tuple(x.shape)}, "
                f"got {tuple(y.shape)}"
            )
        if optimizer is not None and zero_grad:
            optimizer.zero_grad(set_to_none=True)
        out = ContSupOutput(logits=torch.empty(0))  # logits filled in by module K
        h, recent = x, [x]
        for m, (start, stop) in enumerate(self.module_ranges, 1):
            for u in range(start, stop):
                h = self.units[u](h)
            if m == self.num_modules:
                logits = self.split.head(h)
                ce = F.cross_entropy(logits.float(), y)
                ce.backward()
                out.logits = logits.detach()
                self._record(out, {"final_ce": (ce, 1.0)})
                break
            terms, local = self._local_terms(m, h, x, y)
            total = sum(w * value for value, w in terms.values())
            total.backward()
            out.local_outputs[m] = local.detach()
            self._record(out, terms)
            h = self._supply_context(m, h, x, recent)
        if optimizer is not None:
            optimizer.step()
        out.loss = torch.stack(out.module_losses).sum()
        return out

    @staticmethod
    def _record(out: ContSupOutput, terms: dict[str, tuple[torch.Tensor, float]]) -> None:
        total = None
        for name, (value, weight) in terms.items():
            value = value.detach()
            out.losses[name] = value
            out.loss_weights[name] = weight
            total = weight * value if total is None else total + weight * value
        out.module_losses.append(total)

    def _local_terms(
        self, m: int, h: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[dict[str, tuple[torch.Tensor, float]], torch.Tensor]:
        """Module m's loss terms {name: (value, weight)} and its head output."""
        config = self.config
        local_weight, recon_weight = config.module_weights(m)
        local = self.heads[m - 1](h)
        if config.local_loss == "ce":
            terms = {f"module{m}_ce": (F.cross_entropy(local.float(), y), local_weight)}
        else:
            value = supervised_contrastive_loss(
                local, y, config.supcon_temperature, config.supcon_base_temperature
            )
            terms = {f"module{m}_supcon": (value, local_weight)}
        if config.reconstruction:
            recon = self.decoders[m - 1](h, x.shape[-2:])
            terms[f"module{m}_recon"] = (
                F.binary_cross_entropy_with_logits(recon.float(), self._image_target(x)),
                recon_weight,
            )
        return terms, local

    def _image_target(self, x: torch.Tensor) -> torch.Tensor:
        """x with the normalisation undone, clamped to [0, 1]: the decoder's BCE target."""
        mean, std = self.config.image_mean, self.config.image_std
        if len(mean) != x.shape[1]:
            raise ValueError(
                f"ContSup: image_mean/std have {len(mean)} channels, the input {x.shape[1]}"
            )
        shape = (1, -1, 1, 1)
        mean_t = torch.tensor(mean, device=x.device, dtype=torch.float32).view(shape)
        std_t = torch.tensor(std, device=x.device, dtype=torch.float32).view(shape)
        return (x.detach().float() * std_t + mean_t).clamp(0, 1)

    def _supply_context(
        self, m: int, h: torch.Tensor, x: torch.Tensor, recent: list[torch.Tensor]
    ) -> torch.Tensor:
        """Module m+1's input: ``h.detach() + context``; records it among the recent inputs.

        ``recent`` holds the detached inputs of the latest modules, oldest first (the image is
        module 1's input); it is trimmed to what the context mode needs.
        """
        projector = self.context[m - 1]
        sources = recent[::-1][: projector.num_recent]
        nxt = projector(h, x, sources)
        if self._num_recent:
            recent.append(nxt.detach())
            del recent[: -self._num_recent]
        return nxt

    @torch.no_grad()
    def cost_report(self, input_shape: Sequence[int] = (1, 3, 32, 32)) -> ContSupCost:
        """Parameters and per-sample MACs of the main net, context projectors, heads, decoders.

        MACs count conv and linear layers (quantized ones included), measured by running every
        part once on a zero input of ``input_shape`` in eval mode, fake quantizers disabled
        (so none initialises on it); training flags are restored.

        Args:
            input_shape: (B, C, H, W); MACs are divided by B.
        """
        parts = {"main": self.model, "context": self.context, "aux_heads": self.heads,
                 "decoders": self.decoders}
        owner = {id(mod): name for name, part in parts.items() for mod in part.modules()}
        macs = dict.fromkeys(parts, 0)

        def count(module: nn.Module, inputs, output: torch.Tensor) -> None:
            per_output = (
                module.in_channels // module.groups * math.prod(module.kernel_size)
                if isinstance(module, nn.Conv2d) else module.in_features
            )
            macs[owner[id(module)]] += output.numel() * per_output

        layers = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        handles = [m.register_forward_hook(count) for m in layers]
        x = torch.zeros(tuple(input_shape), device=self._device(), dtype=self._dtype())
        try:
            with probing(self):
                h, recent = x, [x]
                for m, (start, stop) in enumerate(self.module_ranges, 1):
                    for u in range(start, stop):
                        h = self.units[u](h)
                    if m < self.num_modules:
                        self.heads[m - 1](h)
                        if self.config.reconstruction:
                            self.decoders[m - 1](h, x.shape[-2:])
                        h = self._supply_context(m, h, x, recent)
                self.split.head(h)
        finally:
            for handle in handles:
                handle.remove()
        batch = input_shape[0]
        return ContSupCost(
            tuple(input_shape),
            *(PartCost(sum(p.numel() for p in part.parameters()), macs[name] // batch)
              for name, part in parts.items()),
        )

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _dtype(self) -> torch.dtype:
        p = next((p for p in self.parameters() if p.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    def _probe(self, example_input: torch.Tensor) -> tuple[list[torch.Size], list[int], int]:
        """(output shape of each unit, saved-activation bytes of each unit, classes)."""
        parameters = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        costs: list[dict[int, int]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in parameters:
                costs[-1][storage.data_ptr()] = storage.nbytes()
            return t

        shapes = []
        # The input requires grad so that every unit saves its activations even when the
        # model's parameters are frozen; only shapes and byte counts are kept.
        h = example_input.detach().clone().requires_grad_(example_input.is_floating_point())
        with probing(self.model, self.split), torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                for unit in self.units:
                    costs.append({})
                    h = unit(h)
                    shapes.append(h.shape)
            logits = self.split.head(h.detach())
        if logits.dim() != 2:
            raise ValueError(
                f"ContSup: the model's head returns shape {tuple(logits.shape)}; expected "
                "(B, classes) logits"
            )
        return shapes, [sum(c.values()) for c in costs], logits.shape[1]

    def _resolve_split(
        self, positions: list[Position], costs: list[int]
    ) -> tuple[list[int], str]:
        """(unit indices after which modules 1..K-1 end, a description of where they came from)."""
        config = self.config
        k, num_units = config.num_modules, len(positions)
        if not isinstance(config.split, str):
            index = {p: u for u, p in enumerate(positions)}
            unknown = [p for p in config.split if p not in index]
            if unknown:
                raise ValueError(
                    f"ContSup: split positions {unknown} do not exist; this model's units are "
                    f"(0, 0) (stem) and (stage, block) for stage sizes "
                    f"{_stage_sizes(positions)}"
                )
            ends = [index[p] for p in config.split]
            if any(b <= a for a, b in zip(ends, ends[1:], strict=False)):
                raise ValueError(
                    f"ContSup: split positions must be strictly increasing, got {config.split}"
                )
            return ends, "user"
        if k == 1:
            return [], "end-to-end"
        if k > num_units:
            raise ValueError(
                f"ContSup: num_modules must be in [1, {num_units}] for this model ({num_units} "
                f"units: the stem and {num_units - 1} blocks), got {k}"
            )
        if config.split == "even":
            return even_split(num_units, k), "even"
        if config.split == "balanced":
            return balanced_split(costs, k), "balanced"
        balanced = config.split == "infopro_balanced"
        arch = self.table_arch
        table = (
            published_split(arch, k, balanced, config.table_dataset) if arch is not None else None
        )
        fallback = "balanced" if balanced else "even"
        if table is None:
            warnings.warn(
                f"ContSup: no published {config.split!r} split for {arch or 'this model'} with "
                f"K={k}; using the computed {fallback!r} split",
                stacklevel=3,
            )
            return (balanced_split(costs, k) if balanced else even_split(num_units, k)), fallback
        index = {p: u for u, p in enumerate(positions)}
        if any(p not in index for p in table):
            raise ValueError(
                f"ContSup: the {config.split!r} table for {arch} K={k} does not fit this model "
                f"(stage sizes {_stage_sizes(positions)}); is table_arch right?"
            )
        return [index[p] for p in table], f"{config.split} table ({arch}, K={k})"

    def _resolve_preset(self, final_channels: int | None) -> ContSupConfig:
        """The config with every option left None filled in by its preset.

        Sets ``self.weights_source``. Warns once when the published weights are needed and the
        tables have no entry.

        Args:
            final_channels: channels of the last unit's output (None if it is not 4-D), the
                "final" head cap.
        """
        config = self.config
        published = config.preset == "published"
        cap = config.aux_channel_cap
        if cap is None:
            cap = "final" if published else "off"
        if cap == "final":
            cap = final_channels if final_channels is not None else "off"
        local_loss = config.local_loss or ("supcon" if published else "ce")
        local, recon = config.local_weights, config.recon_weights
        if local is not None and recon is not None:
            self.weights_source = "given"
        else:
            weights, self.weights_source = self._preset_weights()
            local = weights.local if local is None else local
            recon = weights.recon if recon is None else recon
        return replace(config, aux_channel_cap=cap, local_loss=local_loss, local_weights=local,
                       recon_weights=recon)

    def _preset_weights(self) -> tuple[LossWeights, str]:
        """(the preset's loss weights, where they came from), warning where no table has them."""
        config, arch = self.config, self.table_arch
        k = config.num_modules
        if config.preset == "uniform":
            return _FLAT, "uniform preset: flat (1, 1)"
        if k == 1:
            return _FLAT, "end-to-end: no local modules"
        if not config.reconstruction:
            # The public code multiplies its table weights in only when the decoder is on.
            return _FLAT, "published without the decoder: every local loss weight 1"
        balanced = config.split in ("infopro_balanced", "balanced")
        key = f"({arch or 'this model'}, {config.table_dataset}, K={k})"
        kind = "memory-balanced " if balanced else ""
        if arch is not None:
            weights = published_loss_weights(arch, config.table_dataset, k, balanced)
            if weights is not None:
                return weights, f"published {kind}table {key}"
            weights = published_loss_weights(arch, config.table_dataset, k, False)
            if weights is not None:  # only reached for the memory-balanced splits
                warnings.warn(
                    f"ContSup: no published memory-balanced loss weights for {key}; using the "
                    "equal-layer table's",
                    stacklevel=4,
                )
                return weights, f"published table {key} (no memory-balanced entry)"
        warnings.warn(
            f"ContSup: no published {kind}loss weights for {key} with the decoder on; using "
            "flat (1, 1) local and reconstruction weights",
            stacklevel=4,
        )
        return _FLAT, f"flat (1, 1): no published {kind}entry for {key}"

    def extra_repr(self) -> str:
        return (f"num_modules={self.num_modules}, boundaries={list(self.boundaries)}, "
                f"split_source={self.split_source!r}, context={self.config.context!r}, "
                f"preset={self.config.preset!r}, local_loss={self.config.local_loss!r}")


def _units_of(split: BlockSplit) -> tuple[list[nn.Module], list[Position], list[str]]:
    """The split as a chain of units: the stem, then each block's children (or the block)."""
    units: list[nn.Module] = [split.stem]
    positions: list[Position] = [(0, 0)]
    block_names = split.names[1] if split.names is not None else None
    names = ["stem"]
    for s, block in enumerate(split.blocks, 1):
        label = ",".join(block_names[s - 1]) if block_names else f"blocks.{s - 1}"
        children = list(block) if isinstance(block, nn.Sequential) and len(block) else [block]
        for b, child in enumerate(children):
            units.append(child)
            positions.append((s, b))
            names.append(f"{label}.{b}" if len(children) > 1 or child is not block else label)
    return units, positions, names


def _stage_sizes(positions: list[Position]) -> list[int]:
    sizes: dict[int, int] = {}
    for s, _ in positions[1:]:
        sizes[s] = sizes.get(s, 0) + 1
    return list(sizes.values())


def _table_arch(model: nn.Module, split: BlockSplit) -> str | None:
    """"resnet{6n+2}" for a CIFAR ResNet (or its quantized copy), else None."""
    if not isinstance(model, CifarResNet):
        return None
    sizes = [len(b) for b in split.blocks]
    if len(sizes) != 3 or len(set(sizes)) != 1:
        return None
    return f"resnet{6 * sizes[0] + 2}"

