"""``--method lsq``: the quantized network (LSQ step sizes), trained alone with cross-entropy."""

from bwrf_ext.train.methods.base import MethodSpec, plain_method

SPEC = MethodSpec("lsq", build=plain_method, quantized=True)
