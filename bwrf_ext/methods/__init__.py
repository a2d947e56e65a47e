"""Training methods built on the block engine (bwrf_ext.engine)."""

from bwrf_ext.methods.blockkd import BlockKD, BlockKDConfig, BlockKDOutput, ConvBNConnector
from bwrf_ext.methods.bwrf import BWRF, BWRFConfig, BWRFOutput
from bwrf_ext.methods.contsup import ContSup, ContSupConfig, ContSupCost, ContSupOutput

__all__ = [
    "BWRF",
    "BWRFConfig",
    "BWRFOutput",
    "BlockKD",
    "BlockKDConfig",
    "BlockKDOutput",
    "ConvBNConnector",
    "ContSup",
    "ContSupConfig",
    "ContSupCost",
    "ContSupOutput",
]
