"""The CMake build of csrc/ (libbwrf_ext_ops.so, for C++ users) registers working ops (all of them).

`make test` builds it and passes its path in BWRF_EXT_CMAKE_LIB. It is loaded in a fresh process
with the Python extension switched off, since both register the same op library.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

LIBRARY = os.environ.get("BWRF_EXT_CMAKE_LIB", "")

CHECK = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
from bwrf_ext import reference
x = torch.randn(6, 5, 4, 3).contiguous(memory_format=torch.channels_last)
grad_y = torch.randn(x.shape)
for axis, scale in ((None, torch.tensor([0.3])), (1, torch.rand(5) + 0.1)):
    y = torch.ops.bwrf_ext.lsq_fake_quant(x, scale, -4, 3, 0.5, axis, False)
    gx, gs = torch.ops.bwrf_ext.lsq_fake_quant_backward(grad_y, x, scale, -4, 3, 0.5, axis, False)
    rgx, rgs = reference.lsq_fake_quant_backward(grad_y, x, scale, -4, 3, 0.5, axis)
    assert torch.equal(y, reference.lsq_fake_quant(x, scale, -4, 3, axis))
    assert torch.equal(gx, rgx)
    torch.testing.assert_close(gs, rgs, rtol=1e-5, atol=1e-5)
# Autograd is the library's own (C++), with the Python package imported on the reference.
xg, sg = x.clone().requires_grad_(), torch.tensor([0.3], requires_grad=True)
torch.ops.bwrf_ext.lsq_fake_quant(xg, sg, -4, 3, 0.5, None, False).backward(grad_y)
gx, gs = torch.ops.bwrf_ext.lsq_fake_quant_backward(grad_y, x, sg.detach(), -4, 3, 0.5, None, False)
assert torch.equal(xg.grad, gx) and torch.equal(sg.grad, gs)
packed = torch.ops.bwrf_ext.pack_mask(x, 0.0, None)
assert torch.equal(packed, reference.pack_mask(x))
grad = torch.ops.bwrf_ext.unpack_mask_mul(packed, grad_y)
assert torch.equal(grad, reference.unpack_mask_mul(packed, grad_y))
print("ok")
"""


@pytest.mark.skipif(not LIBRARY, reason="BWRF_EXT_CMAKE_LIB not set (`make test` sets it)")
def test_cmake_library_ops_match_reference():
    assert Path(LIBRARY).is_file(), f"BWRF_EXT_CMAKE_LIB={LIBRARY} does not exist"
    env = dict(os.environ, BWRF_EXT_FORCE_REFERENCE="1")
    result = subprocess.run(
        [sys.executable, "-c", CHECK, LIBRARY],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
