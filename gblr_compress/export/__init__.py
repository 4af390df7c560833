"""ONNX export of models with FrozenGBLR layers, and the ORT-vs-PyTorch parity check.

Importing this package loads onnx (not :mod:`gblr_compress` itself, which stays lean).

Example:
    >>> from gblr_compress.export import export_onnx
    >>> result = export_onnx(model.eval(), {"input_ids": ids, "attention_mask": mask}, "m.onnx")
    >>> [(l.name, l.form, l.params) for l in result.layers]
"""

from gblr_compress.export.forms import FORMS, LayerPlan, plan_layer
from gblr_compress.export.metadata import read_metadata
from gblr_compress.export.onnx_export import (
    ExportResult,
    LayerExport,
    VerificationError,
    export_onnx,
    verify_onnx,
)

__all__ = [
    "FORMS",
    "ExportResult",
    "LayerExport",
    "LayerPlan",
    "VerificationError",
    "export_onnx",
    "plan_layer",
    "read_metadata",
    "verify_onnx",
]
