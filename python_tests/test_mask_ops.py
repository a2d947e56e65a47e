"""The bit-packed mask ops (ReLU masks of the lean partner) against the reference and autograd."""

import pytest
import torch

import bwrf_ext.ops as ops
from bwrf_ext import reference
from bwrf_ext._backend import compiled

requires_compiled = pytest.mark.skipif(
    compiled is None, reason="the compiled op library is not loaded (reference fallback)"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Odd sizes: partial last byte, less than one byte, exactly one, several CPU tasks.
SHAPES = [(0,), (1,), (7,), (8,), (9,), (3, 5, 7), (2, 3, 33, 17), (40000, 3)]
BOUNDS = [(0.0, None), (0.0, 6.0), (-1.0, 1.0)]


def sample(shape, dtype, generator, device="cpu"):
    """Values around the bounds, with exact zeros, sixes, +-inf and NaN."""
    x = torch.randn(shape, generator=generator) * 4
    n = x.numel()
    if n:
        specials = torch.tensor([0.0, 6.0, -1.0, 1.0, float("inf"), -float("inf"), float("nan")])
        pick = torch.randint(0, len(specials), (n,), generator=generator)
        where = torch.rand(n, generator=generator) < 0.2
        x = torch.where(where.reshape(shape), specials[pick].reshape(shape), x)
    return x.to(dtype=dtype, device=device)


def brute_mask(x, lower, upper):
    """Bits as autograd's ReLU / hardtanh backward decides them: a gradient passes unless x <=
    lower or x >= upper."""
    v = x.double()
    outside = v <= lower
    if upper is not None:
        outside |= v >= upper
    return ~outside.reshape(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bounds", BOUNDS)
def test_pack_matches_reference_and_bits(dtype, shape, bounds):
    gen = torch.Generator().manual_seed(len(shape) * 31 + shape[0])
    x = sample(shape, dtype, gen)
    packed = ops.pack_mask(x, *bounds)
    assert packed.dtype == torch.uint8 and packed.shape == ((x.numel() + 7) // 8,)
    assert torch.equal(packed, reference.pack_mask(x, *bounds))
    assert torch.equal(reference.unpack_mask(packed, x.numel()), brute_mask(x, *bounds))
    if x.numel() % 8:  # unused high bits of the last byte are zero
        assert int(packed[-1]) >> (x.numel() % 8) == 0


def assert_same(got, expected):
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_unpack_mul_is_relu_backward(dtype, shape):
    """pack_mask + unpack_mask_mul give autograd's own ReLU input gradient, bit for bit."""
    gen = torch.Generator().manual_seed(shape[-1])
    x = sample(shape, dtype, gen).requires_grad_()
    grad = sample(shape, dtype, gen)
    (expected,) = torch.autograd.grad(torch.relu(x), x, grad)
    got = ops.unpack_mask_mul(ops.pack_mask(x.detach()), grad)
    assert got.is_contiguous() and got.dtype == dtype and got.shape == x.shape
    assert_same(got, expected)
    assert_same(got, reference.unpack_mask_mul(reference.pack_mask(x.detach()), grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu6_backward(dtype):
    gen = torch.Generator().manual_seed(6)
    # Without NaN: autograd's own hardtanh backward passes a NaN's gradient in its scalar loop
    # and blocks it in its vectorised one.
    x = sample((4, 5, 6, 7), dtype, gen).nan_to_num(nan=0.5).requires_grad_()
    grad = sample(x.shape, dtype, gen)
    (expected,) = torch.autograd.grad(torch.nn.functional.relu6(x), x, grad)
    assert_same(ops.unpack_mask_mul(ops.pack_mask(x.detach(), 0.0, 6.0), grad), expected)


def test_channels_last_and_strided_read_in_logical_order():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 6, 7, generator=gen)
    grad = torch.randn(3, 5, 6, 7, generator=gen)
    expected = ops.pack_mask(x)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(ops.pack_mask(x_cl), expected)
    assert torch.equal(ops.pack_mask(x.transpose(1, 3)), reference.pack_mask(x.transpose(1, 3)))
    got = ops.unpack_mask_mul(expected, grad.contiguous(memory_format=torch.channels_last))
    assert torch.equal(got, torch.where(x > 0, grad, 0.0))


def test_errors_name_the_argument():
    x = torch.randn(10)
    with pytest.raises(TypeError, match="pack_mask: x"):
        ops.pack_mask(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"unpack_mask_mul: packed must have shape \(2,\)"):
        ops.unpack_mask_mul(torch.zeros(3, dtype=torch.uint8), x)
    with pytest.raises(TypeError, match="unpack_mask_mul: packed must be uint8"):
        ops.unpack_mask_mul(torch.zeros(2), x)


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(dtype):
    gen = torch.Generator().manual_seed(0)
    for shape in [(5,), (2, 3, 9, 5)]:
        # opcheck compares outputs with NaN != NaN: no NaN in grad.
        x = sample(shape, dtype, gen)
        grad = sample(shape, dtype, gen).nan_to_num(nan=1.5)
        packed = torch.ops.bwrf_ext.pack_mask(x, 0.0, None)
        torch.library.opcheck(torch.ops.bwrf_ext.pack_mask.default, (x, 0.0, None))
        torch.library.opcheck(torch.ops.bwrf_ext.pack_mask.default, (x, 0.0, 6.0))
        torch.library.opcheck(torch.ops.bwrf_ext.unpack_mask_mul.default, (packed, grad))


@requires_compiled
def test_compiles_fullgraph():
    def relu_grad(x, grad):
        return torch.ops.bwrf_ext.unpack_mask_mul(torch.ops.bwrf_ext.pack_mask(x, 0.0, None), grad)

    x, grad = torch.randn(3, 17), torch.randn(3, 17)
    compiled_fn = torch.compile(relu_grad, fullgraph=True, backend="eager")
    assert torch.equal(compiled_fn(x, grad), relu_grad(x, grad))


@requires_compiled
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(3, 1000003)])
def test_cuda_matches_cpu(dtype, shape):
    gen = torch.Generator().manual_seed(5)
    x = sample(shape, dtype, gen)
    grad = sample(shape, dtype, gen)
    for bounds in BOUNDS:
        packed = ops.pack_mask(x, *bounds)
        packed_cuda = ops.pack_mask(x.cuda(), *bounds)
        assert torch.equal(packed_cuda.cpu(), packed)
        got = ops.unpack_mask_mul(packed_cuda, grad.cuda()).cpu()
        assert_same(got, ops.unpack_mask_mul(packed, grad))
