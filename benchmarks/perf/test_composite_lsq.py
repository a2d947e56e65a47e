"""The eager composite baseline of the benchmarks is the op it is compared with: same values and
gradients as the fused op with the paper's clip test, in a whole model too."""

from __future__ import annotations

import pytest
import torch

import bwrf_ext
from benchmarks.perf.composite_lsq import CompositeLSQQuantizer, use_composite
from bwrf_ext.models import resnet20
from bwrf_ext.nn import LSQQuantizer


def _step(quantizer: LSQQuantizer, x: torch.Tensor):
    xi = x.clone().requires_grad_()
    y = quantizer(xi)
    y.backward(torch.ones_like(y))
    return y.detach(), xi.grad, quantizer.scale.grad


def test_composite_quantizer_matches_the_fused_one():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6, 6)
    fused = LSQQuantizer(3, True, axis=1, num_channels=4)
    composite = LSQQuantizer(3, True, axis=1, num_channels=4)
    composite.__class__ = CompositeLSQQuantizer
    (y_f, gx_f, gs_f), (y_c, gx_c, gs_c) = _step(fused, x), _step(composite, x)
    # x/s (composite) vs x*(1/s) (fused) can round a tie apart; random normals hit none here.
    assert torch.equal(y_f, y_c)
    assert torch.equal(gx_f, gx_c)
    torch.testing.assert_close(gs_f, gs_c, rtol=1e-4, atol=1e-6)


def test_use_composite_switches_every_quantizer_and_keeps_the_outputs():
    torch.manual_seed(0)
    model = bwrf_ext.quantize_model(resnet20(), 4, 4).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)  # initialises the step sizes
        quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
        use_composite(model)
        assert quantizers and all(type(q) is CompositeLSQQuantizer for q in quantizers)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_use_composite_refuses_atens_clip_test():
    config = bwrf_ext.QuantConfig(clip_test="after_round")
    model = bwrf_ext.quantize_model(resnet20(), 4, 4, config=config)
    with pytest.raises(ValueError, match=r"conv1.*clip_test='after_round'.*needs "
                       r"clip_test='before_round'"):  # fmt: skip
        use_composite(model)
