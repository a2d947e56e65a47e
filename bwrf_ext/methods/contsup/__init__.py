"""ContSup, greedy local learning with context supply: the method, its config and cost report."""

from bwrf_ext.methods.contsup.config import ContSupConfig
from bwrf_ext.methods.contsup.cost import ContSupCost, PartCost
from bwrf_ext.methods.contsup.method import ContSup, ContSupOutput

__all__ = ["ContSup", "ContSupConfig", "ContSupCost", "ContSupOutput", "PartCost"]
