"""The fused LSQ fake-quant op against PyTorch's own learnable fake-quant and the reference.

Run twice by `make test`: with the compiled kernels, and with BWRF_EXT_FORCE_REFERENCE=1 (the
fallback a user without a compiler gets). CUDA tests run whenever a GPU is present.
"""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import bwrf_ext
from bwrf_ext import reference
from bwrf_ext._backend import compiled

requires_compiled = pytest.mark.skipif(
    compiled is None, reason="the compiled op library is not loaded (reference fallback)"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")

BITS = [2, 3, 4, 8]


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def make_codes(shape, qmin, qmax, generator):
    """Values of x/s: random, plus exact rounding ties and clip boundaries (k + 0.5, qmin - 0.5)."""
    n = math.prod(shape)
    codes = torch.randint(qmin - 3, qmax + 4, (n,), generator=generator).float()
    frac = torch.tensor([0.0, 0.5, -0.5, 0.25, 0.49, 0.51])
    ties = codes + frac[torch.randint(0, len(frac), (n,), generator=generator)]
    noise = torch.randn(n, generator=generator) * (qmax - qmin) / 2
    return torch.where(torch.rand(n, generator=generator) < 0.5, ties, noise).reshape(shape)


def random_case(generator, per_channel, bits, signed, dtype=torch.float32, min_ndim=1):
    """A random shape, an axis, power-of-two scales (so x/s is exact) and x = codes * s."""
    ndim = int(torch.randint(min_ndim, 5, (1,), generator=generator))
    shape = tuple(int(d) for d in torch.randint(1, 9, (ndim,), generator=generator))
    qmin, qmax = qrange(bits, signed)
    axis = int(torch.randint(-ndim, ndim, (1,), generator=generator)) if per_channel else None
    channels = shape[axis] if per_channel else 1
    exponents = torch.randint(-6, 2, (channels,), generator=generator).float()
    scale = torch.pow(2.0, exponents)
    v = make_codes(shape, qmin, qmax, generator)
    view = [1] * ndim
    if per_channel:
        view[axis] = -1
    x = (v * scale.reshape(view)).to(dtype)
    if not per_channel:
        scale = scale.reshape(1)
    return x, scale, qmin, qmax, axis


def torch_learnable(x, scale, qmin, qmax, grad_factor, axis):
    """PyTorch's own learnable fake-quant op with zero_point 0: the independent oracle."""
    if axis is None:
        zero_point = torch.zeros(1, device=x.device)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale, zero_point, qmin, qmax, grad_factor
        )
    zero_point = torch.zeros_like(scale)
    return torch._fake_quantize_learnable_per_channel_affine(
        x, scale, zero_point, axis % x.dim(), qmin, qmax, grad_factor
    )


def forward_backward(fn, x, scale, grad_y, *args):
    """(y, grad_x, grad_scale) of fn(x, scale, *args) through autograd."""
    x = x.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    y = fn(x, scale, *args)
    y.backward(grad_y)
    return y.detach(), x.grad, scale.grad


def assert_sum_close(actual, expected, magnitude, rel=2e-5):
    """Sums in another order differ by rounding: bound the error by the sum of |terms|."""
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=0, atol=float(rel * magnitude.max() + 1e-7)
    )


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", BITS)
def test_matches_torch_learnable_fake_quant(per_channel, signed, bits):
    gen = torch.Generator().manual_seed(bits * 10 + signed + 100 * per_channel)
    for _ in range(8):
        # PyTorch's per-channel backward returns a wrongly shaped grad_scale for 1-D x.
        x, scale, qmin, qmax, axis = random_case(gen, per_channel, bits, signed, min_ndim=2)
        grad_factor = 1.0 / math.sqrt(x.numel() / scale.numel() * max(qmax, 1))
        grad_y = torch.randn(x.shape, generator=gen)
        ours = forward_backward(
            bwrf_ext.lsq_fake_quant, x, scale, grad_y, qmin, qmax, grad_factor, axis
        )
        theirs = forward_backward(torch_learnable, x, scale, grad_y, qmin, qmax, grad_factor, axis)
        assert torch.equal(ours[0], theirs[0]), "forward must equal PyTorch's bit for bit"
        assert torch.equal(ours[1], theirs[1]), "grad_x must equal PyTorch's bit for bit"
        magnitude = (grad_y.abs() * (qmax - qmin)).sum() * grad_factor
        assert_sum_close(ours[2], theirs[2], magnitude)


@pytest.mark.parametrize("clip_before_round", [False, True])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", BITS)
def test_matches_reference(per_channel, bits, clip_before_round):
    gen = torch.Generator().manual_seed(bits + 7 * per_channel)
    for signed in (True, False):
        x, scale, qmin, qmax, axis = random_case(gen, per_channel, bits, signed)
        grad_y = torch.randn(x.shape, generator=gen)
        y = bwrf_ext.lsq_fake_quant(
            x, scale, qmin, qmax, 0.5, axis, clip_before_round=clip_before_round
        )
        grad_x, grad_scale = bwrf_ext.lsq_fake_quant_backward(
            grad_y, x, scale, qmin, qmax, 0.5, axis, clip_before_round=clip_before_round
        )
        ref_gx, ref_gs = reference.lsq_fake_quant_backward(
            grad_y, x, scale, qmin, qmax, 0.5, axis, clip_before_round
        )
        assert torch.equal(y, reference.lsq_fake_quant(x, scale, qmin, qmax, axis))
        assert torch.equal(grad_x, ref_gx)
        assert_sum_close(grad_scale, ref_gs, (grad_y.abs() * (qmax - qmin)).sum() * 0.5)


def test_clip_before_round_is_the_lsq_paper_variant():
    """x/s = qmax + 0.3 rounds to qmax: in range after rounding, clipped before it."""
    scale = torch.tensor([0.5])
    x = torch.tensor([(7 + 0.25) * 0.5, (-8 - 0.25) * 0.5, 3 * 0.5])
    grad_y = torch.ones(3)
    gx_after, gs_after = bwrf_ext.lsq_fake_quant_backward(grad_y, x, scale, -8, 7, 1.0)
    gx_before, gs_before = bwrf_ext.lsq_fake_quant_backward(
        grad_y, x, scale, -8, 7, 1.0, clip_before_round=True
    )
    assert gx_after.tolist() == [1.0, 1.0, 1.0]
    assert gx_before.tolist() == [0.0, 0.0, 1.0]
    # After rounding: (7 - 7.25) + (-8 + 8.25) + 0; before: qmax + qmin + 0.
    assert gs_after.item() == pytest.approx(0.0, abs=1e-6)
    assert gs_before.item() == pytest.approx(7 - 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_half_precision(dtype, per_channel):
    """fp16/bf16: fp32 math, the result rounded once to the input dtype.

    Forward and grad_x equal the reference bit for bit; grad_scale (an fp32 sum returned in the
    scale's dtype) is within 2 units in the last place of that dtype of the fp64 sum.
    """
    gen = torch.Generator().manual_seed(3)
    x, scale, qmin, qmax, axis = random_case(gen, per_channel, 4, True, dtype=dtype)
    scale = scale.to(dtype)
    grad_y = torch.randn(x.shape, generator=gen).to(dtype)
    y = bwrf_ext.lsq_fake_quant(x, scale, qmin, qmax, 1.0, axis)
    assert y.dtype == dtype
    assert torch.equal(y, reference.lsq_fake_quant(x, scale, qmin, qmax, axis))
    grad_x, grad_scale = bwrf_ext.lsq_fake_quant_backward(grad_y, x, scale, qmin, qmax, 1.0, axis)
    ref_gx, _ = reference.lsq_fake_quant_backward(grad_y, x, scale, qmin, qmax, 1.0, axis)
    assert torch.equal(grad_x, ref_gx)
    exact = reference.lsq_fake_quant_backward(
        grad_y.double(), x.double(), scale.double(), qmin, qmax, 1.0, axis
    )[1]
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(1e-3)
    assert grad_scale.dtype == dtype
    assert ((grad_scale.double() - exact).abs() <= 2 * ulp + 1e-6).all()


@pytest.mark.parametrize(
    "make,dense",
    [
        (lambda x: x.contiguous(memory_format=torch.channels_last), True),
        (lambda x: x.transpose(1, 3), True),
        (lambda x: x[:, ::2, 1:, :], False),
        (lambda x: x.unsqueeze(0).expand(2, -1, -1, -1, -1)[1], True),
        (lambda x: x.unsqueeze(0).expand(2, -1, -1, -1, -1).transpose(0, 2)[:, 1], False),
    ],
    ids=["channels_last", "transposed", "sliced", "expanded", "overlapping"],
)
@pytest.mark.parametrize("axis", [None, 1, -1])
def test_strided_inputs(make, dense, axis):
    gen = torch.Generator().manual_seed(5)
    x = make(torch.randn(3, 6, 5, 4, generator=gen))
    scale = torch.rand(1 if axis is None else x.shape[axis], generator=gen) + 0.1
    grad_y = torch.randn(x.shape, generator=gen)
    y = bwrf_ext.lsq_fake_quant(x, scale, -4, 3, 0.1, axis)
    assert torch.equal(y, reference.lsq_fake_quant(x, scale, -4, 3, axis))
    if dense:
        assert y.stride() == x.stride(), "dense layouts (channels_last included) are kept"
    else:
        assert y.is_contiguous()
    grad_x, grad_scale = bwrf_ext.lsq_fake_quant_backward(grad_y, x, scale, -4, 3, 0.1, axis)
    ref = reference.lsq_fake_quant_backward(grad_y.contiguous(), x, scale, -4, 3, 0.1, axis)
    assert torch.equal(grad_x, ref[0])
    assert_sum_close(grad_scale, ref[1], grad_y.abs().sum() * 8 * 0.1)


@pytest.mark.parametrize("axis", [None, 0])
def test_empty_tensor(axis):
    x = torch.empty(0, 3, requires_grad=True)
    scale = torch.ones(1 if axis is None else 0, requires_grad=True)
    y = bwrf_ext.lsq_fake_quant(x, scale, -2, 1, 1.0, axis)
    y.sum().backward()
    assert y.shape == (0, 3)
    assert torch.equal(scale.grad, torch.zeros_like(scale))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_long_rows_and_many_tasks(layout):
    """Sizes that span many 16K-element tasks, per-tensor and per-channel, both row plans."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 40, 37, 29, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(x.shape, generator=gen)
    for axis in (None, 1, 0):
        scale = torch.rand(1 if axis is None else x.shape[axis], generator=gen) * 0.3 + 0.05
        grad_x, grad_scale = bwrf_ext.lsq_fake_quant_backward(grad_y, x, scale, 0, 15, 0.01, axis)
        ref_gx, ref_gs = reference.lsq_fake_quant_backward(grad_y, x, scale, 0, 15, 0.01, axis)
        assert torch.equal(grad_x, ref_gx)
        assert_sum_close(grad_scale, ref_gs, grad_y.abs().sum() * 15 * 0.01)


def test_backward_is_deterministic_across_runs_and_thread_counts():
    """Same bits on every run; the compiled CPU kernels also for any thread count (the reference
    fallback reduces with torch.sum, whose order depends on the thread count)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1 << 18, generator=gen)
    grad_y = torch.randn(x.shape, generator=gen)
    scale = torch.tensor([0.07])
    threads = torch.get_num_threads()
    thread_counts = (1, max(2, threads), 1) if compiled is not None else (threads, threads)
    try:
        results = []
        for n in thread_counts:
            torch.set_num_threads(n)
            results.append(bwrf_ext.lsq_fake_quant_backward(grad_y, x, scale, 0, 7, 0.3))
    finally:
        torch.set_num_threads(threads)
    for grad_x, grad_scale in results[1:]:
        assert torch.equal(grad_x, results[0][0])
        assert torch.equal(grad_scale, results[0][1]), "grad_scale must be the same bits"


def test_nonpositive_scale_and_nan_input():
    """s <= 0 (or NaN) acts as the smallest normal float: finite output. NaN in x stays NaN."""
    x = torch.tensor([-3.0, -1e-39, 0.0, 1e-39, 2.5, 1e30])
    for bad in (0.0, -0.5, float("nan")):
        scale = torch.tensor([bad], requires_grad=True)
        y = bwrf_ext.lsq_fake_quant(x, scale, -8, 7, 1.0)
        y.backward(torch.ones_like(y))
        assert torch.isfinite(y).all() and torch.isfinite(scale.grad).all()
        tiny = torch.finfo(torch.float32).tiny
        assert y[0].item() == -8 * tiny and y[-1].item() == 7 * tiny
    scale = torch.tensor([0.5], requires_grad=True)
    y = bwrf_ext.lsq_fake_quant(torch.tensor([1.0, float("nan")]), scale, -8, 7, 1.0)
    y.sum().backward()
    assert y[0].item() == 1.0 and math.isnan(y[1].item())
    assert math.isnan(scale.grad.item())


BAD_INPUTS = [
    (dict(x=torch.ones(3, dtype=torch.int32)), TypeError, "x must be float32"),
    (dict(x=torch.ones(3, dtype=torch.float64)), TypeError, "got torch.float64"),
    (dict(scale=torch.ones(1, dtype=torch.int64)), TypeError, "scale must be float32"),
    (dict(scale=torch.ones(2)), ValueError, r"shape \(\) or \(1,\), got \(2,\)"),
    (dict(scale=torch.ones(4), axis=0), ValueError, r"shape \(3,\).*got \(4,\)"),
    (dict(scale=torch.ones(3, 1), axis=0), ValueError, r"got \(3, 1\)"),
    (dict(qmin=3, qmax=3), ValueError, "qmin must be < qmax, got qmin=3, qmax=3"),
    (dict(qmin=5, qmax=-5), ValueError, "qmin=5, qmax=-5"),
    (dict(qmin=-(2**31) - 1), ValueError, "fit in int32"),
    (dict(axis=2), IndexError, r"axis must be in \[-2, 1\].*got 2"),
    (dict(axis=-3), IndexError, "got -3"),
    (dict(grad_factor=-1.0), ValueError, "grad_factor must be a finite number >= 0, got -1"),
    (dict(grad_factor=float("nan")), ValueError, "grad_factor"),
]


def _call_with(overrides, fn):
    args = dict(
        x=torch.ones(3, 4), scale=torch.ones(1), qmin=-2, qmax=1, grad_factor=1.0, axis=None
    )
    args.update(overrides)
    return fn(
        args["x"], args["scale"], args["qmin"], args["qmax"], args["grad_factor"], args["axis"]
    )


@pytest.mark.parametrize("overrides,error,message", BAD_INPUTS)
def test_bad_input_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        _call_with(overrides, bwrf_ext.lsq_fake_quant)
    backward = lambda x, *rest: bwrf_ext.lsq_fake_quant_backward(torch.ones(3, 4), x, *rest)  # noqa: E731
    with pytest.raises(error, match=message):
        _call_with(overrides, backward)


@requires_compiled
@pytest.mark.parametrize("overrides,error,message", BAD_INPUTS)
def test_bad_input_errors_from_cpp(overrides, error, message):
    """The C++ checks (what C++ users and torch.ops callers get) say the same."""
    with pytest.raises(error, match=message):
        _call_with(overrides, torch.ops.bwrf_ext.lsq_fake_quant)


def _fwd(**overrides):
    args = dict(x=torch.ones(3, 4), scale=torch.ones(1), qmin=-2, qmax=1, grad_factor=1.0,
                axis=None, clip_before_round=False)  # fmt: skip
    args.update(overrides)
    clip = args.pop("clip_before_round")
    return bwrf_ext.lsq_fake_quant(*args.values(), clip_before_round=clip)


def _bwd(grad_y=None, **overrides):
    args = dict(x=torch.ones(3, 4), scale=torch.ones(1), qmin=-2, qmax=1, grad_factor=1.0,
                axis=None, clip_before_round=False)  # fmt: skip
    args.update(overrides)
    clip = args.pop("clip_before_round")
    grad_y = torch.ones(3, 4) if grad_y is None else grad_y
    return bwrf_ext.lsq_fake_quant_backward(grad_y, *args.values(), clip_before_round=clip)


_OP = "lsq_fake_quant: "
_FLOATS = "must be float32, float16 or bfloat16, got "
# (case, call, error type, message): every argument the ops refuse, each with the one error
# both backends must give. The types the C++ schema would refuse with a bare RuntimeError (or
# accept by conversion: a bool qmin, a float qmin on the fallback) are among them.
BAD_ARGUMENTS = [
    ("x int32", lambda: _fwd(x=torch.ones(3, dtype=torch.int32)), TypeError,
     _OP + "x " + _FLOATS + "torch.int32"),
    ("x float64", lambda: _fwd(x=torch.ones(3, dtype=torch.float64)), TypeError,
     _OP + "x " + _FLOATS + "torch.float64"),
    ("x numpy", lambda: _fwd(x=np.ones(3, np.float32)), TypeError,
     _OP + "x " + _FLOATS + "ndarray"),
    ("scale float", lambda: _fwd(scale=0.5), TypeError, _OP + "scale " + _FLOATS + "float"),
    ("scale None", lambda: _fwd(scale=None), TypeError, _OP + "scale " + _FLOATS + "NoneType"),
    ("scale numpy", lambda: _fwd(scale=np.ones(1, np.float32)), TypeError,
     _OP + "scale " + _FLOATS + "ndarray"),
    ("scale int64", lambda: _fwd(scale=torch.ones(1, dtype=torch.int64)), TypeError,
     _OP + "scale " + _FLOATS + "torch.int64"),
    ("scale shape", lambda: _fwd(scale=torch.ones(2)), ValueError,
     _OP + "per-tensor scale (axis=None) must have shape () or (1,), got (2,)"),
    ("scale per-channel shape", lambda: _fwd(scale=torch.ones(4), axis=0), ValueError,
     _OP + "per-channel scale must have shape (3,) = (x.shape[0],), got (4,)"),
    ("qmin float", lambda: _fwd(qmin=0.5, qmax=7), TypeError,
     _OP + "qmin must be an int, got float 0.5"),
    ("qmin bool", lambda: _fwd(qmin=False, qmax=7), TypeError,
     _OP + "qmin must be an int, got bool False"),
    ("qmax str", lambda: _fwd(qmax="7"), TypeError, _OP + "qmax must be an int, got str '7'"),
    ("qmax tensor", lambda: _fwd(qmax=torch.tensor(7)), TypeError,
     _OP + "qmax must be an int, got a torch.int64 tensor"),
    ("qmin == qmax", lambda: _fwd(qmin=3, qmax=3), ValueError,
     _OP + "qmin must be < qmax, got qmin=3, qmax=3"),
    ("qmin beyond int32", lambda: _fwd(qmin=-(2**31) - 1), ValueError,
     _OP + "qmin and qmax must fit in int32, got qmin=-2147483649, qmax=1"),
    ("grad_factor str", lambda: _fwd(grad_factor="1"), TypeError,
     _OP + "grad_factor must be a real number, got str '1'"),
    ("grad_factor tensor", lambda: _fwd(grad_factor=torch.tensor(1.0)), TypeError,
     _OP + "grad_factor must be a real number, got a torch.float32 tensor"),
    ("grad_factor bool", lambda: _fwd(grad_factor=True), TypeError,
     _OP + "grad_factor must be a real number, got bool True"),
    ("grad_factor -1", lambda: _fwd(grad_factor=-1.0), ValueError,
     _OP + "grad_factor must be a finite number >= 0, got -1.0"),
    ("grad_factor inf", lambda: _fwd(grad_factor=float("inf")), ValueError,
     _OP + "grad_factor must be a finite number >= 0, got inf"),
    ("axis float", lambda: _fwd(scale=torch.ones(3), axis=0.0), TypeError,
     _OP + "axis must be an int or None, got float 0.0"),
    ("axis bool", lambda: _fwd(scale=torch.ones(3), axis=False), TypeError,
     _OP + "axis must be an int or None, got bool False"),
    ("axis out of range", lambda: _fwd(scale=torch.ones(3), axis=2), IndexError,
     _OP + "axis must be in [-2, 1] for x of shape (3, 4), got 2"),
    ("clip_before_round int", lambda: _fwd(clip_before_round=1), TypeError,
     _OP + "clip_before_round must be a bool, got int 1"),
    ("backward qmin float", lambda: _bwd(qmin=0.5, qmax=7), TypeError,
     "lsq_fake_quant_backward: qmin must be an int, got float 0.5"),
    ("backward grad_y shape", lambda: _bwd(torch.ones(4)), ValueError,
     "lsq_fake_quant_backward: grad_y must have x's shape (3, 4), got (4,)"),
    ("backward grad_y dtype", lambda: _bwd(torch.ones(3, 4, dtype=torch.float16)), TypeError,
     "lsq_fake_quant_backward: grad_y must have x's dtype torch.float32, got torch.float16"),
    ("backward grad_y numpy", lambda: _bwd(np.ones((3, 4), np.float32)), TypeError,
     "lsq_fake_quant_backward: grad_y must be a tensor of x's dtype torch.float32, got ndarray"),
    ("pack_mask x int", lambda: bwrf_ext.pack_mask(torch.ones(3, dtype=torch.int32)), TypeError,
     "pack_mask: x must be a floating-point tensor, got torch.int32"),
    ("pack_mask lower str", lambda: bwrf_ext.pack_mask(torch.ones(3), "0"), TypeError,
     "pack_mask: lower must be a real number, got str '0'"),
    ("pack_mask upper tensor", lambda: bwrf_ext.pack_mask(torch.ones(3), 0.0, torch.tensor(6.0)),
     TypeError, "pack_mask: upper must be a real number or None, got a torch.float32 tensor"),
    ("unpack packed numpy", lambda: bwrf_ext.unpack_mask_mul(np.zeros(1, np.uint8), torch.ones(3)),
     TypeError, "unpack_mask_mul: packed must be uint8, got ndarray"),
    ("unpack packed float", lambda: bwrf_ext.unpack_mask_mul(torch.zeros(1), torch.ones(3)),
     TypeError, "unpack_mask_mul: packed must be uint8, got torch.float32"),
    ("unpack grad int", lambda: bwrf_ext.unpack_mask_mul(
        torch.zeros(1, dtype=torch.uint8), torch.ones(3, dtype=torch.int32)), TypeError,
     "unpack_mask_mul: grad must be a floating-point tensor, got torch.int32"),
    ("unpack packed length", lambda: bwrf_ext.unpack_mask_mul(
        torch.zeros(3, dtype=torch.uint8), torch.ones(3)), ValueError,
     "unpack_mask_mul: packed must have shape (1,) = (ceil(grad.numel() / 8),), got (3,)"),
]  # fmt: skip


def bad_argument_outcomes() -> dict[str, list[str]]:
    """Every BAD_ARGUMENTS case on the backend loaded here: case -> [error type, message]."""
    outcomes = {}
    for case, call, _, _ in BAD_ARGUMENTS:
        try:
            call()
            outcomes[case] = ["no error", ""]
        except Exception as error:  # the type is what is compared
            outcomes[case] = [type(error).__name__, str(error)]
    return outcomes


@pytest.mark.parametrize(("case", "call", "error", "message"), BAD_ARGUMENTS,
                         ids=[case[0] for case in BAD_ARGUMENTS])  # fmt: skip
def test_bad_argument_error(case, call, error, message):
    """On the backend loaded here (make test runs this module on both)."""
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        call()


# Imports this module in a fresh process on the backend BWRF_EXT_FORCE_REFERENCE selects and
# prints its outcomes.
_OUTCOMES_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("ops_cases", sys.argv[1])
cases = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)
print(json.dumps({"backend": cases.bwrf_ext.build_info()["backend"],
                  "outcomes": cases.bad_argument_outcomes()}))
"""


def test_bad_arguments_give_the_same_error_on_both_backends():
    """The compiled ops and the pure-PyTorch fallback, each in its own process: same type,
    same message, for every case."""
    results = {}
    for force in ("0", "1"):
        done = subprocess.run(
            [sys.executable, "-c", _OUTCOMES_PROBE, __file__], capture_output=True, text=True,
            env={**os.environ, "BWRF_EXT_FORCE_REFERENCE": force}, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results[force] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["1"]["backend"] == "reference"
    if results["0"]["backend"] != "compiled":
        pytest.skip("the compiled ops are not built: there is one backend only")
    compiled_outcomes, reference_outcomes = results["0"]["outcomes"], results["1"]["outcomes"]
    for case, _, error, message in BAD_ARGUMENTS:
        assert compiled_outcomes[case] == [error.__name__, message], case
        assert reference_outcomes[case] == compiled_outcomes[case], case


def test_numpy_scalars_are_python_numbers():
    """NumPy integers and floats are accepted as the ints and floats they hold."""
    x, scale = torch.linspace(-3, 3, 13), torch.tensor([0.5])
    expected = reference.lsq_fake_quant(x, scale, -4, 3)
    got = bwrf_ext.lsq_fake_quant(x, scale, np.int64(-4), np.int32(3), np.float32(0.25))
    assert torch.equal(got, expected)


def test_infinite_scale_gives_nan_as_documented():
    """s = +inf is not repaired (the docstring says so): x/s = 0 and 0 * inf is NaN; a huge
    finite s gives finite values."""
    x = torch.tensor([-3.0, 0.0, 2.5, 3e38])
    scale = torch.tensor([float("inf")], requires_grad=True)
    y = bwrf_ext.lsq_fake_quant(x, scale, -8, 7, 1.0)
    y.sum().backward()
    assert torch.isnan(y).all() and scale.grad.item() == 0.0
    y = bwrf_ext.lsq_fake_quant(x, torch.tensor([3e38]), -8, 7, 1.0)
    assert y.tolist() == [0.0, 0.0, 0.0, torch.tensor(3e38).item()]


def test_grad_y_shape_error():
    with pytest.raises(ValueError, match=r"grad_y must have x's shape \(3, 4\), got \(4,\)"):
        bwrf_ext.lsq_fake_quant_backward(torch.ones(4), torch.ones(3, 4), torch.ones(1), 0, 3, 1.0)


@requires_cuda
def test_scale_on_another_device():
    with pytest.raises(ValueError, match="scale must be on x's device"):
        bwrf_ext.lsq_fake_quant(torch.ones(3, device="cuda"), torch.ones(1), 0, 3, 1.0)


@pytest.mark.parametrize("axis", [None, 0, -1])
def test_opcheck(axis):
    """The registered op on either backend: schema, fake kernel, autograd and dispatch agree."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, generator=gen, requires_grad=True)
    scale = torch.rand(1 if axis is None else x.shape[axis], generator=gen) + 0.1
    scale.requires_grad_()
    torch.library.opcheck(
        torch.ops.bwrf_ext.lsq_fake_quant.default, (x, scale, -4, 3, 0.2, axis, False)
    )
    grad_y = torch.randn(x.shape, generator=gen)
    torch.library.opcheck(
        torch.ops.bwrf_ext.lsq_fake_quant_backward.default,
        (grad_y, x.detach(), scale.detach(), -4, 3, 0.2, axis, True),
    )


@requires_compiled
def test_python_schemas_match_the_compiled_library():
    """The fallback defines the ops from OP_SCHEMAS: they must be csrc/bwrf_ext.cpp's schemas."""
    for name, schema in bwrf_ext.ops.OP_SCHEMAS.items():
        expected = torch._C.parse_schema(f"bwrf_ext::{name}{schema}")
        assert str(getattr(torch.ops.bwrf_ext, name).default._schema) == str(expected), name


def test_reference_is_every_ops_default_kernel():
    """One dispatch path: the pure-PyTorch reference is registered as each op's default kernel
    (devices without a compiled kernel use it); the compiled library adds CPU and CUDA kernels
    and lsq_fake_quant's autograd in C++ (a Python autograd kernel costs ~70 us per call)."""
    for name in bwrf_ext.ops.OP_SCHEMAS:
        qualname = f"bwrf_ext::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")
        table = torch._C._dispatch_dump_table(qualname)
        cpu_kernel = next(line for line in table.splitlines() if line.startswith("CPU:"))
        own_cpu_kernel = cpu_kernel.endswith("[kernel]")  # else "[default backend kernel]"
        assert own_cpu_kernel == (compiled is not None), cpu_kernel
    dump = torch._C._dispatch_dump("bwrf_ext::lsq_fake_quant")
    autograd = next(line for line in dump.splitlines() if line.startswith("Autograd[alias]"))
    assert ("unboxed" in autograd) == (compiled is not None), autograd  # unboxed: a C++ kernel


def test_torch_compile_fullgraph():
    def quantize(x, scale):
        return bwrf_ext.lsq_fake_quant(x * 2.0, scale, 0, 15, 0.05).relu()

    compiled_fn = torch.compile(quantize, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, generator=gen)
    scale = torch.tensor([0.1])
    grad_y = torch.randn(8, 16, generator=gen)
    eager = forward_backward(quantize, x, scale, grad_y)
    traced = forward_backward(compiled_fn, x, scale, grad_y)
    for a, b in zip(eager, traced, strict=True):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_cuda_matches_cpu(dtype, per_channel):
    gen = torch.Generator().manual_seed(21)
    for bits in BITS:
        x, scale, qmin, qmax, axis = random_case(gen, per_channel, bits, True, dtype=dtype)
        grad_y = torch.randn(x.shape, generator=gen).to(dtype)
        for clip in (False, True):
            cpu = bwrf_ext.lsq_fake_quant_backward(
                grad_y, x, scale, qmin, qmax, 0.3, axis, clip_before_round=clip
            )
            gpu = bwrf_ext.lsq_fake_quant_backward(
                grad_y.cuda(), x.cuda(), scale.cuda(), qmin, qmax, 0.3, axis, clip_before_round=clip
            )
            assert torch.equal(
                bwrf_ext.lsq_fake_quant(x, scale, qmin, qmax, 0.3, axis),
                bwrf_ext.lsq_fake_quant(x.cuda(), scale.cuda(), qmin, qmax, 0.3, axis).cpu(),
            )
            assert torch.equal(cpu[0], gpu[0].cpu())
            assert_sum_close(gpu[1].cpu(), cpu[1], grad_y.float().abs().sum() * 0.3 * qmax * 2)


@requires_cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_large_layouts_and_determinism(layout):
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(64, 96, 33, 31, device="cuda", generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(x.shape, device="cuda", generator=gen)
    for axis in (None, 1, 0, -1):
        scale = torch.rand(1 if axis is None else x.shape[axis], device="cuda") * 0.3 + 0.05
        first = bwrf_ext.lsq_fake_quant_backward(grad_y, x, scale, -8, 7, 0.01, axis)
        second = bwrf_ext.lsq_fake_quant_backward(grad_y, x, scale, -8, 7, 0.01, axis)
        assert torch.equal(first[1], second[1]), "CUDA grad_scale must be deterministic"
        cpu = bwrf_ext.lsq_fake_quant_backward(
            grad_y.cpu(), x.cpu(), scale.cpu(), -8, 7, 0.01, axis
        )
        assert torch.equal(first[0].cpu(), cpu[0])
        assert_sum_close(first[1].cpu(), cpu[1], grad_y.abs().sum().cpu() * 8 * 0.01)


@pytest.mark.parametrize(
    "device",
    [
        pytest.param(
            "cpu",
            marks=pytest.mark.skipif(
                os.environ.get("BWRF_EXT_BIG_TESTS") != "1",
                reason="needs ~13 GB of RAM and a minute: set BWRF_EXT_BIG_TESTS=1",
            ),
        ),
        pytest.param("cuda", marks=requires_cuda),
    ],
)
def test_64bit_indexing(device):
    """More than 2**31 elements: offsets past int32 reach the right elements and scales."""
    if device == "cuda" and torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with >= 24 GiB")
    n = 2**31 + 4099
    x = torch.full((n,), 0.3, dtype=torch.float16, device=device)
    x[-5:] = torch.tensor([1.0, -1.0, 0.75, 0.25, 5.0], dtype=torch.float16)
    scale = torch.tensor([0.5], device=device)
    y = bwrf_ext.lsq_fake_quant(x, scale, -2, 1, 1.0)
    assert y[-5:].tolist() == [0.5, -1.0, 0.5, 0.0, 0.5]
    assert y[0].item() == 0.5
    del y
    grad_x, grad_scale = bwrf_ext.lsq_fake_quant_backward(torch.ones_like(x), x, scale, -2, 1, 1.0)
    assert grad_x[-1].item() == 0.0 and grad_x[0].item() == 1.0 and grad_x[-2].item() == 1.0
    del grad_x
    # 0.3 is 0.2998 in fp16: v = 0.5996, q = 1, slope q - v for all but the tail, whose slopes
    # are 1, 0, 1, -0.5, 1. The fp32 sum of 2**31 equal terms is only good to ~1e-4.
    v = torch.tensor(0.3, dtype=torch.float16).float() * 2.0
    expected = (n - 5) * (torch.round(v) - v).double().item() + 2.5
    assert grad_scale.item() == pytest.approx(expected, rel=1e-3)
