"""Model conversion: swap nn.Conv2d/nn.Linear for quantized layers, report and switch them."""

from __future__ import annotations

import copy
import fnmatch
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bwrf_ext.nn.layers import QuantConv2d, QuantLinear
from bwrf_ext.nn.quantizer import LSQQuantizer, QuantConfig, check_bits

logger = logging.getLogger(__name__)

# Exact float types and their quantized twins; subclasses (e.g. the Linear inside
# nn.MultiheadAttention, whose weight is used without calling forward) are left alone.
_QUANT_TYPE_OF: dict[type[nn.Module], type[QuantConv2d] | type[QuantLinear]] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}

# A layer's bits: one int for weights and input, or (w_bits, a_bits) with None for full
# precision; None alone leaves the layer in full precision.
LayerBits = int | tuple[int | None, int | None] | None


@dataclass(frozen=True)
class LayerReport:
    """One conv/linear layer of a model after conversion.

    Attributes:
        name: qualified module name.
        layer_type: class name ("QuantConv2d", or "Conv2d" for a layer left in full precision).
        w_bits, a_bits: code widths, None where full precision.
    """

    name: str
    layer_type: str
    w_bits: int | None
    a_bits: int | None

    @property
    def quantized(self) -> bool:
        return self.w_bits is not None or self.a_bits is not None


def quantize_model(
    model: nn.Module,
    w_bits: int | None = 4,
    a_bits: int | None = 4,
    first_last_bits: int | Literal["same"] | None = 8,
    skip: Iterable[str] = (),
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    bits_overrides: Mapping[str, LayerBits] | None = None,
    config: QuantConfig | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Replaces every nn.Conv2d and nn.Linear by QuantConv2d / QuantLinear.

    Modules are swapped on their parents (no global patching); a module registered under several
    names is swapped everywhere for one shared quantized module. Per layer, the first rule that
    applies decides its bits:

    1. ``skip`` (fnmatch patterns on the qualified name) or ``filter_fn(name, module)`` False:
       left as is.
    2. ``bits_overrides``: the first pattern (in mapping order) matching the name.
    3. The first layer (the first nn.Conv2d or nn.Linear in registration order) and the last one
       (the last nn.Linear, else the last nn.Conv2d) take ``first_last_bits``: an int for weights
       and input, "same" for (w_bits, a_bits), None to leave them in full precision.
    4. (w_bits, a_bits).

    A layer whose rule gives no bits at all stays a float module. What happened is logged and
    :func:`quantization_report` lists it.

    Args:
        model: any nn.Module (torchvision ResNets and MobileNets, bwrf_ext.models, ...).
        w_bits, a_bits: default code widths, None for full precision.
        first_last_bits: see rule 3.
        skip: fnmatch patterns of layer names to leave alone, e.g. ``"layer4.*"``.
        filter_fn: called as ``filter_fn(name, module)``; False leaves the layer alone.
        bits_overrides: pattern -> LayerBits, e.g. ``{"*.downsample.*": 8, "layer1.*": (2, 4)}``.
        config: quantizer options for every layer (default QuantConfig()).
        inplace: swap in ``model`` itself; by default a deep copy is converted and ``model`` is
            left untouched.

    Returns:
        The converted model (``model`` itself when inplace).

    Raises:
        TypeError: model is not an nn.Module.
        ValueError: bits out of range.

    Warns:
        UserWarning: the model has nothing to quantize (no nn.Conv2d / nn.Linear, or every one
            left in full precision), or a ``skip`` / ``bits_overrides`` pattern matches no layer
            (a typo there would otherwise go unnoticed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"quantize_model: model must be an nn.Module, got {type(model).__name__}"
        )
    if first_last_bits != "same" and first_last_bits is not None:
        check_bits(first_last_bits, "quantize_model: first_last_bits")
    if not inplace:
        model = copy.deepcopy(model)
    config = config or QuantConfig()
    skip = tuple(skip)
    overrides = dict(bits_overrides or {})
    candidates = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if type(module) in _QUANT_TYPE_OF and name
    ]
    _warn_unmatched(candidates, skip, overrides)
    first_last = _first_and_last(candidates)
    replacements: dict[int, nn.Module] = {}
    for name, module in candidates:
        if id(module) not in replacements:
            bits = _layer_bits(
                name,
                module,
                w_bits,
                a_bits,
                first_last_bits,
                skip,
                filter_fn,
                overrides,
                is_first_or_last=name in first_last,
            )
            if bits is None:
                replacements[id(module)] = module
                logger.info("quantize_model: %s left in full precision", name)
                continue
            quant_type = _QUANT_TYPE_OF[type(module)]
            replacements[id(module)] = quant_type.from_float(module, *bits, config=config)
            logger.info("quantize_model: %s -> %s w%s a%s", name, quant_type.__name__, *bits)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacements[id(module)])
    if all(replacements[id(module)] is module for _, module in candidates):
        _warn_nothing_quantized(model, len(candidates))
    return model


def _warn_unmatched(
    candidates: list[tuple[str, nn.Module]], skip: tuple[str, ...], overrides: dict
) -> None:
    """Warns about each skip / bits_overrides pattern that names no convertible layer."""
    names = [name for name, _ in candidates]
    for option, patterns in (("skip", skip), ("bits_overrides", tuple(overrides))):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                examples = ", ".join(repr(n) for n in names[:3]) or "none"
                warnings.warn(
                    f"quantize_model: {option} pattern {pattern!r} matches no nn.Conv2d / "
                    f"nn.Linear layer (names look like {examples})",
                    UserWarning,
                    stacklevel=3,
                )


def _warn_nothing_quantized(model: nn.Module, candidates: int) -> None:
    already = sum(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules())
    if candidates:
        why = (
            f"all {candidates} nn.Conv2d / nn.Linear layers stay in full precision (skip, "
            "filter_fn, bits_overrides or bits None)"
        )
    elif already:
        why = f"it holds no nn.Conv2d or nn.Linear ({already} layers are already quantized)"
    else:
        why = "it holds no nn.Conv2d or nn.Linear"
    warnings.warn(
        f"quantize_model: nothing was quantized in {type(model).__name__}: {why}",
        UserWarning,
        stacklevel=3,
    )


def _first_and_last(candidates: list[tuple[str, nn.Module]]) -> set[str]:
    """Names of the first layer and the last nn.Linear (else the last nn.Conv2d)."""
    if not candidates:
        return set()
    linears = [name for name, module in candidates if type(module) is nn.Linear]
    last = linears[-1] if linears else candidates[-1][0]
    return {candidates[0][0], last}


def _layer_bits(
    name: str,
    module: nn.Module,
    w_bits: int | None,
    a_bits: int | None,
    first_last_bits: int | Literal["same"] | None,
    skip: tuple[str, ...],
    filter_fn: Callable[[str, nn.Module], bool] | None,
    overrides: dict[str, LayerBits],
    is_first_or_last: bool,
) -> tuple[int | None, int | None] | None:
    """(w_bits, a_bits) for one layer, or None to leave it in full precision (see the rules)."""
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
        return None
    if filter_fn is not None and not filter_fn(name, module):
        return None
    chosen: LayerBits = (w_bits, a_bits)
    for pattern, bits in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            chosen = bits
            break
    else:
        if is_first_or_last and first_last_bits != "same":
            chosen = first_last_bits
    if chosen is None:
        return None
    if isinstance(chosen, int):
        chosen = (chosen, chosen)
    for what, bits in zip(("w_bits", "a_bits"), chosen, strict=True):
        if bits is not None:
            check_bits(bits, f"quantize_model: {what} of {name}")
    return None if chosen == (None, None) else tuple(chosen)


def quantization_report(model: nn.Module) -> list[LayerReport]:
    """Every conv/linear layer of a model with its bits, in registration order.

    Args:
        model: a model after (or before) :func:`quantize_model`.

    Returns:
        One LayerReport per QuantConv2d/QuantLinear and per plain nn.Conv2d/nn.Linear.
    """
    report = []
    for name, module in model.named_modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):
            report.append(LayerReport(name, type(module).__name__, module.w_bits, module.a_bits))
        elif type(module) in _QUANT_TYPE_OF:
            report.append(LayerReport(name, type(module).__name__, None, None))
    return report


@torch.no_grad()
def calibrate(model: nn.Module, *inputs: torch.Tensor, **kwargs) -> list[str]:
    """Initialises every quantizer's step size from one training-mode forward of a batch.

    Training runs BatchNorm on batch statistics, so the step sizes are set for the activations
    training will see: the forward runs in train mode (calibrating in eval mode would push the
    quantized layers' outputs through the FP model's running statistics, which no longer fit
    them). Afterwards every buffer other than the quantizers' own (BatchNorm running statistics
    and ``num_batches_tracked`` included), every parameter other than the step sizes, each
    module's train/eval mode and the random number generators are exactly as they were.

    Quantizers initialised before are initialised again from this batch; disabled ones (see
    :func:`set_quantization_enabled`) and ones the forward does not reach are left as they are.

    Args:
        model: a model holding LSQQuantizers (after :func:`quantize_model`, or a wrapper such
            as BWRF's, whose forward then takes its own arguments).
        *inputs, **kwargs: what ``model(...)`` takes, typically one batch of training images.

    Returns:
        The qualified names of the quantizers this forward initialised, in call order.

    Raises:
        ValueError: the model holds no LSQQuantizer, or a quantizer's input in this batch
            holds a NaN or an infinity (the message names the quantizer); the step sizes are
            then left as they were.
    """
    quantizers = {m: name for name, m in model.named_modules() if isinstance(m, LSQQuantizer)}
    if not quantizers:
        raise ValueError(
            f"calibrate: {type(model).__name__} holds no LSQQuantizer; quantize it first "
            "(bwrf_ext.quantize_model)"
        )
    own_buffers = {id(b) for q in quantizers for b in q.buffers()}
    saved = [(b, b.clone()) for b in model.buffers() if id(b) not in own_buffers]
    modes = [(m, m.training) for m in model.modules()]
    initialised: list[str] = []

    def check_and_reset(quantizer: LSQQuantizer, args: tuple) -> None:
        if not quantizer.enabled:
            return
        name = quantizers[quantizer] or "the model itself"
        if not bool(torch.isfinite(args[0]).all()):
            raise ValueError(
                f"calibrate: the input of quantizer {name} holds non-finite values (NaN or "
                "inf); a step size set from it would disable the layer. Calibrate on finite data"
            )
        if name not in initialised:  # a module called twice keeps its first batch's step
            quantizer.reset_initialization()
            initialised.append(name)

    hooks = [q.register_forward_pre_hook(check_and_reset) for q in quantizers]
    before = {q: {k: v.clone() for k, v in q.state_dict().items()} for q in quantizers}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            model(*inputs, **kwargs)
    except BaseException:  # a failed calibration leaves every step size as it was
        for quantizer, state in before.items():
            quantizer.load_state_dict(state)
        raise
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes:
            module.training = training
        for buffer, value in saved:
            buffer.copy_(value)
    return initialised


def set_quantization_enabled(model: nn.Module, enabled: bool = True) -> None:
    """Turns every LSQQuantizer of a model on, or off (pass-through)."""
    for module in model.modules():
        if isinstance(module, LSQQuantizer):
            module.set_enabled(enabled)


def freeze_scales(model: nn.Module, frozen: bool = True) -> None:
    """Freezes (or unfreezes) the step sizes of every LSQQuantizer of a model."""
    for module in model.modules():
        if isinstance(module, LSQQuantizer):
            module.freeze_scale(frozen)


def set_data_parallel_size(model: nn.Module, size: int) -> None:
    """Tells the input quantizers of a model's quantized layers that ``size`` processes share
    each batch (a standalone activation ``LSQQuantizer`` is set directly: its
    ``data_parallel_size``).

    LSQ's step-size gradient factor then counts the elements of the global batch, so gradients
    averaged over ``size`` processes (DistributedDataParallel) equal one process's gradient on
    the whole batch. Weight quantizers see the same weights on every process: unchanged.

    Args:
        model: a model after :func:`quantize_model` (layers without an input quantizer are
            skipped).
        size: the number of data-parallel processes, >= 1 (1 restores the default).
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"set_data_parallel_size: size must be an int >= 1, got {size!r}")
    for module in model.modules():
        if isinstance(module, (QuantConv2d, QuantLinear)) and module.input_quantizer is not None:
            module.input_quantizer.data_parallel_size = size
