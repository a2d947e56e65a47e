"""bwrf_ext: fused low-bit fake quantization and block-wise training for PyTorch."""

from bwrf_ext import models  # noqa: F401 - registers the model families' block splits
from bwrf_ext._backend import build_info
from bwrf_ext.convert import (
    LayerReport,
    calibrate,
    freeze_scales,
    quantization_report,
    quantize_model,
    set_data_parallel_size,
    set_quantization_enabled,
)
from bwrf_ext.engine import BlockSplit, FrozenPartner, register_split, split_model
from bwrf_ext.export import QuantizedLayer, export_onnx, export_quantized, onnx_export_mode
from bwrf_ext.lean import lean_report, make_lean
from bwrf_ext.losses import dkd_loss, kd_loss
from bwrf_ext.methods import (
    BWRF,
    BlockKD,
    BlockKDConfig,
    BlockKDOutput,
    BWRFConfig,
    BWRFOutput,
    ContSup,
    ContSupConfig,
    ContSupCost,
    ContSupOutput,
)
from bwrf_ext.nn import LSQQuantizer, QuantConfig, QuantConv2d, QuantLinear
from bwrf_ext.ops import lsq_fake_quant, lsq_fake_quant_backward, pack_mask, unpack_mask_mul

__all__ = [
    "BWRF",
    "BWRFConfig",
    "BWRFOutput",
    "BlockKD",
    "BlockKDConfig",
    "BlockKDOutput",
    "BlockSplit",
    "ContSup",
    "ContSupConfig",
    "ContSupCost",
    "ContSupOutput",
    "FrozenPartner",
    "LSQQuantizer",
    "LayerReport",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantizedLayer",
    "build_info",
    "calibrate",
    "export_onnx",
    "dkd_loss",
    "export_quantized",
    "freeze_scales",
    "kd_loss",
    "lean_report",
    "lsq_fake_quant",
    "lsq_fake_quant_backward",
    "make_lean",
    "onnx_export_mode",
    "pack_mask",
    "quantization_report",
    "quantize_model",
    "register_split",
    "set_data_parallel_size",
    "set_quantization_enabled",
    "split_model",
    "unpack_mask_mul",
]
__version__ = "0.1.0"
