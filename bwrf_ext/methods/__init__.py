"""Training methods built on the block engine (bwrf_ext.blocks)."""

from bwrf_ext.methods.bwrf import BWRF, BWRFConfig, BWRFOutput

__all__ = ["BWRF", "BWRFConfig", "BWRFOutput"]
