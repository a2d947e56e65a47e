"""Tests of bwrf_ext.memory against the tensors autograd's formulas are known to save."""

from __future__ import annotations

import torch
from torch import nn

from bwrf_ext.memory import saved_activation_bytes

ACTIVATION = 4 * 8 * 4  # bytes of x and h below: (4, 8) fp32


def test_each_storage_counts_once_until_backward_frees_it():
    weight = nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    with saved_activation_bytes() as saved:
        h = x @ weight  # saves x and the parameter itself (not counted)
        y = h.sin() * h.cos()  # h saved twice, counted once; mul saves sin(h) and cos(h)
        assert saved.total == saved.current == saved.peak == 4 * ACTIVATION
        y.sum().backward()
        assert saved.current == 0 and not saved.live
    assert saved.total == saved.peak == 4 * ACTIVATION


def test_views_of_parameters_count_unless_their_storage_is_excluded():
    weight = nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    for parameters, expected in (((), ACTIVATION + 8 * 8 * 4), ([weight], ACTIVATION)):
        with saved_activation_bytes(parameters) as saved:
            x @ weight.t()  # saves x and weight.t(), a view that is no nn.Parameter
        assert saved.total == expected
