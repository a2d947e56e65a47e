"""``--method fp``: the network in full precision, trained alone with cross-entropy."""

from bwrf_ext.train.methods.base import MethodSpec, plain_method

SPEC = MethodSpec("fp", build=plain_method, quantized=False)
