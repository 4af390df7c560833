"""float16 on top of the exported graph, for ``--export-dtype float16`` / ``checkpoint``.

The compression itself always runs in float32 (see :mod:`gblr_compress.numerics`); a
user whose checkpoint is float16 may still want the shipped file in float16 (half the
size). :func:`to_float16` converts the verified float32 graph with onnxruntime's own
converter (``onnxruntime.transformers.float16``: weights, activations and float
inputs / outputs become float16; the ops it knows to lose precision or to lack float16
kernels stay float32 behind Cast nodes). No home-made pass: it is the converter
onnxruntime users already run.

A float16 graph does not match the float32 one to ``1e-4``, so the job measures the
converted file's held-out fidelity against the dense model instead, with a tolerance of
its own (:data:`HALF_TOLERANCE`), as it does for int8.

bfloat16 is not offered: onnxruntime's CPU provider has no bfloat16 kernels for MatMul,
LayerNormalization or Softmax, so a bfloat16 graph would not run where the product
verifies it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx

__all__ = ["EXPORT_DTYPES", "HALF_TOLERANCE", "HalfResult", "export_dtype_for", "to_float16"]

# What --export-dtype takes: float32 (the default), float16, or the checkpoint's own
# floating dtype (float32 or float16; a bfloat16 checkpoint is refused, see the module).
EXPORT_DTYPES = ("float32", "float16", "checkpoint")

# The most held-out mean cosine the float16 file may lose against the float32 graph.
# float16 keeps 11 significant bits: a transformer loses ~1e-5 of cosine; a loss of
# 0.005 means values overflowed or underflowed somewhere, not rounding.
HALF_TOLERANCE = 0.005


def export_dtype_for(requested: str, checkpoint_dtype: str) -> str:
    """The dtype the file is written in: ``"float32"`` or ``"float16"``.

    Args:
        requested: ``--export-dtype`` (one of :data:`EXPORT_DTYPES`).
        checkpoint_dtype: the checkpoint's floating dtype (``"float32"``, ``"float16"``,
            ``"bfloat16"``).

    Raises:
        ValueError: a bfloat16 checkpoint asked to be exported in its own dtype, or an
            unknown request (the message is one line for the user).
    """
    if requested not in EXPORT_DTYPES:
        raise ValueError(f"--export-dtype must be one of {', '.join(EXPORT_DTYPES)}, got {requested!r}")
    if requested != "checkpoint":
        return requested
    if checkpoint_dtype == "bfloat16":
        raise ValueError(
            "--export-dtype checkpoint: the checkpoint is bfloat16, which onnxruntime's CPU provider cannot "
            "run (no bfloat16 MatMul / LayerNormalization kernels); export float32 (the default) or float16"
        )
    return "float16" if checkpoint_dtype == "float16" else "float32"


@dataclass
class HalfResult:
    """What :func:`to_float16` made of a graph.

    Attributes:
        proto: the float16 graph.
        kept_float32: op type -> count of the nodes the converter left in float32.
        initializers: how many float initializers became float16.
    """

    proto: onnx.ModelProto
    kept_float32: dict[str, int] = field(default_factory=dict)
    initializers: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON the report stores under ``deploy.export_dtype``."""
        return {
            "dtype": "float16",
            "method": "onnxruntime.transformers.float16.convert_float_to_float16 (float inputs and outputs "
                      "float16 too)",
            "float16_initializers": self.initializers,
            "kept_float32": dict(self.kept_float32),
        }


def _float16_ops(proto: onnx.ModelProto) -> tuple[dict[str, int], int]:
    """Op types computing in float32 in a converted graph (a node between Casts to and
    from float32 is one the converter blocked), and the float16 initializer count."""
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    produced_f32 = {n.output[0] for n in proto.graph.node
                    if n.op_type == "Cast" and any(a.name == "to" and a.i == f32 for a in n.attribute)}
    kept = Counter(n.op_type for n in proto.graph.node
                   if n.op_type != "Cast" and any(i in produced_f32 for i in n.input))
    halves = sum(t.data_type == f16 for t in proto.graph.initializer)
    return dict(kept), halves


def to_float16(proto: onnx.ModelProto) -> HalfResult:
    """The float16 version of the float32 graph ``proto`` (``proto`` is not changed).

    Float initializers, activations, and float graph inputs / outputs become float16;
    integer inputs (token ids, masks) stay as they are. Values beyond float16's range
    are clamped by the converter (the held-out fidelity check catches what that costs).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its per-value clamping warnings are not the user's to read
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        # Shape inference is skipped: the exporter's graphs carry their value_info, and
        # inference on a >2 GB proto would fail.
        half = convert_float_to_float16(copy, keep_io_types=False, disable_shape_infer=True)
    finally:
        logging.getLogger().setLevel(quiet)
    kept, halves = _float16_ops(half)
    return HalfResult(half, kept, halves)
