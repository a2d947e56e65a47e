"""ContSup: greedy local learning of K gradient-isolated modules, with context supply."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bwrf_ext.engine import BlockSplit, probing, split_model
from bwrf_ext.losses import LossTerms, supervised_contrastive_loss, upcast
from bwrf_ext.methods.contsup.config import ContSupConfig, parse_context
from bwrf_ext.methods.contsup.cost import ContSupCost, probe_units
from bwrf_ext.methods.contsup.modules import AuxHead, ContextProjector, ReconstructionDecoder
from bwrf_ext.methods.contsup.splits import Position, _table_arch, resolve_split

__all__ = ["ContSup", "ContSupOutput"]


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
        units, positions, names = split.units()
        # Through __dict__: as registered children the split and units would duplicate the
        # model's state_dict keys.
        self.__dict__["split"] = split
        self.__dict__["units"] = units
        self.unit_names = names
        device, dtype = _placement(model)
        if example_input is None:
            example_input = torch.zeros(2, 3, 32, 32, device=device, dtype=dtype)
        shapes, costs, num_classes = probe_units(model, split, units, example_input)
        self.image_channels = example_input.shape[1]
        self.num_classes = num_classes

        self.table_arch = config.table_arch or _table_arch(model, split)
        ends, self.split_source = resolve_split(config, positions, costs, self.table_arch)
        final_channels = shapes[-1][1] if len(shapes[-1]) == 4 else None
        config, self.weights_source = config.resolve(self.table_arch, final_channels)
        self.config = config
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
        for m, h in self._walk(x):
            if m == self.num_modules:
                return self.split.head(h)
            del h  # see _walk

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"model": logits} of :meth:`forward` without grad, as every method's evaluate (BWRF
        and Block-KD add their branches); call ``.eval()`` first for test accuracy."""
        return {"model": self(x)}

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
        for m, h in self._walk(x):
            if m == self.num_modules:
                logits = self.split.head(h)
                ce = F.cross_entropy(upcast(logits), y)
                ce.backward()
                out.logits = logits.detach()
                final = LossTerms(keep_zero_weights=True)
                final.add("final_ce", ce, 1.0)
                self._record(out, final)
                break
            terms, local = self._local_terms(m, h, x, y)
            del h  # see _walk
            terms.total.backward()
            out.local_outputs[m] = local.detach()
            self._record(out, terms)
        if optimizer is not None:
            optimizer.step()
        out.loss = torch.stack(out.module_losses).sum()
        return out

    @staticmethod
    def _record(out: ContSupOutput, terms: LossTerms) -> None:
        out.losses.update({name: value.detach() for name, value in terms.values.items()})
        out.loss_weights.update(terms.weights)
        out.module_losses.append(terms.total.detach())

    def _local_terms(
        self, m: int, h: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[LossTerms, torch.Tensor]:
        """Module m's loss terms and its head output."""
        config = self.config
        local_weight, recon_weight = config.module_weights(m)
        local = self.heads[m - 1](h)
        terms = LossTerms(keep_zero_weights=True)
        if config.local_loss == "ce":
            terms.add(f"module{m}_ce", F.cross_entropy(upcast(local), y), local_weight)
        else:
            value = supervised_contrastive_loss(
                local, y, config.supcon_temperature, config.supcon_base_temperature
            )
            terms.add(f"module{m}_supcon", value, local_weight)
        if config.reconstruction:
            recon = self.decoders[m - 1](h, x.shape[-2:])
            target = self._image_target(x)
            terms.add(f"module{m}_recon", F.binary_cross_entropy_with_logits(upcast(recon), target),
                      recon_weight)  # fmt: skip
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

    def _walk(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Runs the K modules on x in order, yielding (m, module m's output) for m = 1..K.

        Module K's output is the head's input. When the caller resumes after a local module m,
        module m+1's input is ``h_m.detach() + context_m`` (its :class:`ContextProjector`), so
        the caller's work on h_m (local losses, their backward) runs before it. ``recent`` holds
        the detached inputs of the latest modules, oldest first (the image is module 1's input),
        trimmed to what the context mode needs. The caller should drop its h_m before resuming:
        its loop variable would otherwise keep h_m alive through module m+1's forward.
        """
        h, recent = x, [x]
        for m, (start, stop) in enumerate(self.module_ranges, 1):
            for unit in self.units[start:stop]:
                h = unit(h)
            yield m, h
            if m < self.num_modules:
                projector = self.context[m - 1]
                h = projector(h, x, recent[::-1][: projector.num_recent])
                if self._num_recent:
                    recent.append(h.detach())
                    del recent[: -self._num_recent]

    @torch.no_grad()
    def cost_report(self, input_shape: Sequence[int] = (1, 3, 32, 32)) -> ContSupCost:
        """Parameters and per-sample MACs of the main net, context projectors, heads, decoders.

        MACs count conv and linear layers (quantized ones included), measured by running every
        part once on a zero input of ``input_shape`` in eval mode, fake quantizers disabled
        (so none initialises on it); training flags are restored.

        Args:
            input_shape: (B, C, H, W); MACs are divided by B.
        """
        device, dtype = _placement(self)
        x = torch.zeros(tuple(input_shape), device=device, dtype=dtype)

        def run() -> None:
            with probing(self):
                for m, h in self._walk(x):
                    if m == self.num_modules:
                        self.split.head(h)
                        break
                    self.heads[m - 1](h)
                    if self.config.reconstruction:
                        self.decoders[m - 1](h, x.shape[-2:])

        parts = {"main": self.model, "context": self.context, "aux_heads": self.heads,
                 "decoders": self.decoders}
        return ContSupCost.measure(parts, run, input_shape)

    def extra_repr(self) -> str:
        return (f"num_modules={self.num_modules}, boundaries={list(self.boundaries)}, "
                f"split_source={self.split_source!r}, context={self.config.context!r}, "
                f"preset={self.config.preset!r}, local_loss={self.config.local_loss!r}")


def _placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of the module's first floating-point parameter; (cpu, fp32) if none."""
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
