"""gblr-compress: post-training GBLR (generalized block low-rank) compression.

Importing the package is lean: it loads torch and the core math only. ONNX, onnxruntime,
rich and click are imported by the stages that need them (export, report, CLI).
"""

from gblr_compress.gaudi import boxcar_mask, component_cost, gaudi_mask
from gblr_compress.layer import FrozenGBLR, GBLRLayerConfig, GBLRLinear
from gblr_compress.structure import Block, LayerStructure, merge_blocks

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Block",
    "FrozenGBLR",
    "GBLRLayerConfig",
    "GBLRLinear",
    "LayerStructure",
    "boxcar_mask",
    "component_cost",
    "gaudi_mask",
    "merge_blocks",
]
