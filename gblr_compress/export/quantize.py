"""int8 on top of the exported graph: onnxruntime's dynamic quantization, checked.

:func:`quantize_int8` runs ``onnxruntime.quantization.quantize_dynamic`` (int8 weights,
per output channel by default, in 7 bits of range; activations quantized per call, so no
calibration data) on a verified float file and reads the result back: which MatMuls became integer
kernels (``MatMulInteger`` / ``DynamicQuantizeMatMul``) and which stayed float, with
the reason. The quantized file's quality is not checked here: an int8 graph does not
match the float one to a tolerance, so the job measures its held-out fidelity against
the dense model instead (:func:`gblr_compress.export.measure.onnx_fidelity`).

Why 7 bits (``reduce_range``): on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI)
onnxruntime multiplies uint8 activations by int8 weights with an instruction that adds
pairs of products into int16 and saturates. Full-range weights overflow it wherever
activations are large: all-mpnet-base-v2 quantized that way kept 0.028 mean token cosine
to its float file on an AMD EPYC with AVX2 (one FFN layer alone: 0.58), and 0.837 with
7-bit weights; all-MiniLM-L6-v2 kept 0.989 either way, at the same speed within the
timing noise (benchmarks/int8_range.py; benchmarks/README.md "int8 in 7 bits"). The machine that deploys the file is not the
one that made it, so the file must be safe on both.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from gblr_compress.errors import InputError
from gblr_compress.files import atomic_path

__all__ = ["INTEGER_OPS", "QuantizeResult", "copy_with_metadata", "quantize_int8"]

# The integer GEMM kernels onnxruntime's dynamic quantization emits for a MatMul.
INTEGER_OPS = ("MatMulInteger", "DynamicQuantizeMatMul")
_FLOAT_GEMMS = ("MatMul", "Gemm")


@dataclass
class QuantizeResult:
    """What :func:`quantize_int8` wrote and what the graph holds now.

    Attributes:
        path: the quantized file.
        integer: the weights (initializer names) now multiplied by integer kernels.
        compressed_integer: how many of those belong to compressed layers' sliced
            GEMMs (their weights live under ``gblr/<layer>/``).
        left_float: ``{"node", "op", "reason", "compressed_layer"}`` of every MatMul /
            Gemm still in float (``compressed_layer``: one of a compressed layer's GEMMs).
        ops: op-type counts of the quantized graph.
        per_channel: whether weights have one scale per output channel.
        reduce_range: whether weights use 7 bits of range (see the module docstring).
    """

    path: Path
    integer: list[str] = field(default_factory=list)
    compressed_integer: int = 0
    left_float: list[dict[str, Any]] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    per_channel: bool = True
    reduce_range: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The JSON the report stores under ``deploy.quantization``."""
        return {
            "method": "onnxruntime dynamic (quantize_dynamic), int8 weights "
                      + ("per channel" if self.per_channel else "per tensor")
                      + (" in 7 bits (reduce_range)" if self.reduce_range else "") + ", activations per call",
            "integer_kernels": sum(self.ops.get(op, 0) for op in INTEGER_OPS),
            "integer_weights": len(self.integer),
            "compressed_integer": self.compressed_integer,
            "compressed_float": sum(bool(f.get("compressed_layer")) for f in self.left_float),
            "left_float": list(self.left_float),
            "ops": dict(self.ops),
        }


def _why_float(node: onnx.NodeProto, constants: set[str]) -> str:
    if node.op_type == "Gemm":
        return "Gemm: onnxruntime's dynamic quantization only converts MatMul (2-D Linear calls export as Gemm)"
    if not any(i in constants for i in node.input):
        return "both inputs are activations (e.g. attention scores): there is no constant weight to quantize"
    return "left in float by onnxruntime's quantizer"


def _read_back(proto: onnx.ModelProto) -> tuple[list[str], int, list[dict[str, Any]], dict[str, int]]:
    constants = {t.name for t in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    integer, compressed = [], 0
    left = []
    for node in proto.graph.node:
        if node.op_type in INTEGER_OPS:
            w = node.input[1]
            integer.append(w)
            compressed += w.startswith("gblr/")
        elif node.op_type in _FLOAT_GEMMS:
            compressed_layer = any(i.startswith("gblr/") for i in node.input)
            left.append({"node": node.name or node.output[0], "op": node.op_type,
                         "reason": _why_float(node, constants), "compressed_layer": compressed_layer})
    return integer, compressed, left, dict(Counter(n.op_type for n in proto.graph.node))


def quantize_int8(src: str | Path, dst: str | Path, per_channel: bool = True,
                  reduce_range: bool = True) -> QuantizeResult:
    """Quantize the float ONNX file ``src`` to int8 and write it to ``dst`` atomically.

    Weights of every MatMul with a constant weight (the sliced GEMMs of the compressed
    layers and the dense layers alike) become int8, per output channel by default, in
    the range [-64, 64] unless ``reduce_range`` is off (the module docstring says
    why); activations are quantized per call (dynamic), so no data is needed. The
    metadata of ``src`` is kept.

    Raises:
        InputError: ``src`` does not exist, or no MatMul became an integer kernel.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputError(f"ONNX file not found: {src}")
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice is not ours to print
    try:
        with atomic_path(dst) as tmp:
            quantize_dynamic(src, tmp, per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8)
            proto = onnx.load(str(tmp))
    finally:
        logging.getLogger().setLevel(quiet)
    integer, compressed, left, ops = _read_back(proto)
    if not integer:
        dst.unlink(missing_ok=True)
        raise InputError("int8 quantization found no MatMul with a constant weight to quantize")
    return QuantizeResult(dst, integer, compressed, left, ops, per_channel, reduce_range)


def copy_with_metadata(src: str | Path, dst: str | Path, metadata: dict[str, str]) -> Path:
    """Copy the ONNX file ``src`` to ``dst`` atomically, with ``metadata_props`` entries
    set (the report travels inside the file that ships)."""
    src, dst = Path(src), Path(dst)
    proto = onnx.load(str(src))
    for k, v in metadata.items():
        for prop in proto.metadata_props:
            if prop.key == k:
                prop.value = v
                break
        else:
            proto.metadata_props.add(key=k, value=v)
    with atomic_path(dst) as tmp:
        onnx.save_model(proto, str(tmp))
    return dst
