"""ONNX export of models with FrozenGBLR layers, and the ORT-vs-PyTorch parity check.

Importing this package loads onnx (not :mod:`gblr_compress` itself, which stays lean).
The steps, each its own module: ``forms`` (plan and emit one layer's subgraph),
``trace`` (torch's exporter with placeholders), ``onnx_export`` (build, verify, save),
``verify`` (onnxruntime against PyTorch), ``metadata`` (read a file's metadata).

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
    OnnxGraph,
    Parity,
    build_onnx,
    export_onnx,
    save_onnx,
    verify_graph,
)
from gblr_compress.export.verify import VerificationError, verify_onnx

__all__ = [
    "FORMS",
    "ExportResult",
    "LayerExport",
    "LayerPlan",
    "OnnxGraph",
    "Parity",
    "VerificationError",
    "build_onnx",
    "export_onnx",
    "plan_layer",
    "read_metadata",
    "save_onnx",
    "verify_graph",
    "verify_onnx",
]
