"""ContSup's options: the config dataclass, its presets and the option grammars."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, replace
from typing import Literal

from bwrf_ext.methods.contsup.splits import LossWeights, Position, published_loss_weights

__all__ = ["ContSupConfig", "parse_aux_head", "parse_context"]

# CIFAR-10 mean and std as the public code restores images for its decoder (pixel / 255).
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
SplitName = Literal["infopro", "infopro_balanced", "even", "balanced"]
PresetName = Literal["published", "uniform"]
DEFAULT_NUM_MODULES = 8
_FLAT = LossWeights(local=(1.0, 1.0), recon=(1.0, 1.0))


_AUX_HEAD = re.compile(r"(\d+)c(\d+)f")


def parse_aux_head(spec: str) -> tuple[int, int]:
    """Parses an auxiliary-head string ``"<n>c<m>f"`` into (n convs, m linear layers).

    Grammar: ``n`` >= 0 conv3x3-BN-ReLU layers, then global average pooling, then ``m`` >= 1
    linear layers with ReLU between them. The public code's "0c1f", "0c2f", "1c1f", "1c2f",
    "1c3f" and "2c2f" are all of this form; "0c1f" is greedy supervised learning's linear probe.
    """
    match = _AUX_HEAD.fullmatch(spec) if isinstance(spec, str) else None
    if match is None or int(match[2]) < 1:
        raise ValueError(
            f"ContSupConfig: aux_head must look like '<n>c<m>f' with n >= 0 conv layers and "
            f"m >= 1 linear layers (e.g. '1c2f', '0c1f', '2c2f'), got {spec!r}"
        )
    return int(match[1]), int(match[2])


_CONTEXT = re.compile(r"R(\d+)(E?)|E")


def parse_context(mode: str) -> tuple[int, bool]:
    """Parses a context mode into (n, image): n recent module inputs, and the image encoder.

    Grammar: ``"R0"`` (no context), ``"E"`` (the image), ``"R<n>"`` (the inputs of the last n
    modules, n >= 1), ``"R<n>E"`` (both; "R1E" is the paper's). With E on, the image itself is
    never also an R source, as in the public code.
    """
    match = _CONTEXT.fullmatch(mode) if isinstance(mode, str) else None
    if match is None or (match[0] != "E" and int(match[1]) == 0 and match[2]):
        raise ValueError(
            f"ContSupConfig: context must be 'R0', 'E', 'R<n>' or 'R<n>E' with n >= 1 "
            f"(e.g. 'R1', 'R2', 'R1E'), got {mode!r}"
        )
    if match[0] == "E":
        return 0, True
    return int(match[1]), bool(match[2])


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
    (:data:`~bwrf_ext.methods.contsup.splits.PUBLISHED_LOSS_WEIGHTS`); without the decoder every
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
            respectively. "even": equal unit counts (:func:`~.splits.even_split`). "balanced":
            the split minimising the largest module's saved-activation bytes, measured on the
            example input (:func:`~.splits.balanced_split`). Or explicit (stage, block)
            positions, see ``splits.Position``: stage 0 is the stem, stage s >= 1 the s-th entry
            of the split's blocks, block b its b-th child (0 when the stage is not an
            nn.Sequential).
        table_arch: the table key ("resnet32", "resnet110"); None infers it for CIFAR ResNets
            (``bwrf_ext.models.cifar_resnet`` and their quantized copies).
        table_dataset: the data set key of the tables: "cifar10" (default), "stl10", "svhn"
            (the public code's names). It selects the loss weights and the memory-balanced split
            (STL-10 has its own resnet110 one; other data sets use CIFAR-10's).
        preset: "published" or "uniform", see above.
        context: "R0" (none), "E" (the image through a small encoder), "R<n>" (the inputs of
            the last n modules through conv1x1-BN-ReLU), "R<n>E" (both). Default "E", the
            public code's. See :func:`parse_context`.
        encoder_width: hidden channels of the image encoder E (public: 12).
        encoder_resolution: "input": E runs on the full image, then is pooled to the boundary's
            size (public); "boundary": the image is pooled first, so E costs (H_b W_b)/(H W) of
            the MACs and activation memory (a deviation from the public code).
        aux_head: auxiliary head "<n>c<m>f" (default "1c2f": conv3x3, BN, ReLU, GAP, FC 128,
            ReLU, FC out; the conv's width as ``aux_channel_cap`` says). See
            :func:`parse_aux_head`.
        aux_feature_dim: hidden width of the heads' linear layers, and the SupCon embedding size.
        aux_widen: width multiplier of the heads.
        aux_channel_cap: the first head conv maps C to 2C channels at stride 2, or, where 2C
            would exceed the cap, to ``cap`` channels at stride 1 (see :class:`~.modules.AuxHead`).
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

    def resolve(
        self, table_arch: str | None, final_channels: int | None
    ) -> tuple[ContSupConfig, str]:
        """(this config with every option it left None set by its preset, the weights' source).

        The source says where the loss weights came from (``ContSup.weights_source``). Warns
        once when the published weights are needed and the tables have no entry.

        Args:
            table_arch: the table key of the model, or None.
            final_channels: channels of the last unit's output (None if it is not 4-D), the
                "final" head cap.
        """
        published = self.preset == "published"
        cap = self.aux_channel_cap
        if cap is None:
            cap = "final" if published else "off"
        if cap == "final":
            cap = final_channels if final_channels is not None else "off"
        local_loss = self.local_loss or ("supcon" if published else "ce")
        local, recon = self.local_weights, self.recon_weights
        if local is not None and recon is not None:
            source = "given"
        else:
            weights, source = self._preset_weights(table_arch)
            local = weights.local if local is None else local
            recon = weights.recon if recon is None else recon
        resolved = replace(self, aux_channel_cap=cap, local_loss=local_loss, local_weights=local,
                           recon_weights=recon)
        return resolved, source

    def _preset_weights(self, arch: str | None) -> tuple[LossWeights, str]:
        """(the preset's loss weights, where they came from), warning where no table has them."""
        k = self.num_modules
        if self.preset == "uniform":
            return _FLAT, "uniform preset: flat (1, 1)"
        if k == 1:
            return _FLAT, "end-to-end: no local modules"
        if not self.reconstruction:
            # The public code multiplies its table weights in only when the decoder is on.
            return _FLAT, "published without the decoder: every local loss weight 1"
        balanced = self.split in ("infopro_balanced", "balanced")
        key = f"({arch or 'this model'}, {self.table_dataset}, K={k})"
        kind = "memory-balanced " if balanced else ""
        if arch is not None:
            weights = published_loss_weights(arch, self.table_dataset, k, balanced)
            if weights is not None:
                return weights, f"published {kind}table {key}"
            weights = published_loss_weights(arch, self.table_dataset, k, False)
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
