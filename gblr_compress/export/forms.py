"""Exact ONNX forms of one frozen GBLR layer, a cost model to pick one, and emission.

Every form computes ``y = sum_k rows_k <- U_k @ (V_k @ x[cols_k]) + bias`` exactly; they
differ in how the inputs are sliced and how the block outputs are combined. Measured in
onnxruntime, writing and combining per-block outputs is what costs time, not the
multiplies, so no form writes an output element twice:

* ``segments`` (exact cost; alias ``sliced``): each block's V-projection
  ``t_k = x[..., cols_k] @ V_k^T`` (blocks sharing a column window share one MatMul),
  all concatenated once into ``T (..., R)``; the output rows are split into segments
  where the set of covering blocks is constant, and each segment is ONE MatMul of the
  covering blocks' columns of ``T`` with their stacked U rows; segments are concatenated.
  Weight parameters = the frozen exact cost.
* ``vpad``: as ``segments`` but ``T = x @ Vpad`` with V zero-padded to the full input
  width (one MatMul, no input slices); U stays exact.
* ``lowrank``: the zero-padded pair ``(x @ Vpad) @ Upad``: two MatMuls, no slices, no
  concatenation. For a full-width structure (truncated SVD) this IS the exact form.

This module imports onnx (helper/numpy_helper) and torch only; it never emits a
ScatterND (with ``reduction=add`` it is wrong for duplicate indices with >1 thread).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gblr_compress.gaudi import window_slices
from gblr_compress.structure import LayerStructure

__all__ = ["FORMS", "LayerPlan", "plan_layer", "emit_layer", "form_params", "form_cost"]

#: Forms accepted by :func:`plan_layer` besides ``"auto"``.
FORMS = ("segments", "vpad", "lowrank")
_ALIASES = {"sliced": "segments"}

# Cost model (per token, in units of one multiply-add inside a large GEMM). Measured on
# ORT CPU: copying one float through Slice/Concat/Gather costs roughly as much as a few
# dozen multiply-adds, and each extra node a fixed overhead. Only the ratios matter.
_COPY = 24.0
_GATHER = 32.0
_NODE = 400.0


@dataclass
class _Segment:
    start: int  # first output row
    stop: int  # one past the last output row
    blocks: tuple[int, ...]  # covering block indices, in T order


@dataclass
class LayerPlan:
    """How one layer is emitted.

    Attributes:
        form: one of :data:`FORMS`.
        order: block indices in the order their columns appear in ``T``.
        params: real weight parameters of the form (bias excluded).
        exact: True when ``params`` equals the frozen exact cost.
        cost: the cost model's estimate per token (arbitrary units).
    """

    form: str
    order: tuple[int, ...]
    params: int
    exact: bool
    cost: float


# ----------------------------------------------------------------------- geometry
def _segments(s: LayerStructure, order: tuple[int, ...]) -> list[_Segment]:
    """Split output rows into maximal runs with a constant set of covering blocks."""
    m = s.out_features
    pieces = {k: window_slices(b.row_start, b.row_width, m) for k, b in enumerate(s.blocks)}
    cuts = sorted({0, m} | {p for ps in pieces.values() for lo, hi in ps for p in (lo, hi)})
    segs: list[_Segment] = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        cover = tuple(k for k in order if any(lo <= a < hi for lo, hi in pieces[k]))
        if segs and segs[-1].blocks == cover:
            segs[-1].stop = b
        else:
            segs.append(_Segment(a, b, cover))
    return segs


def _t_offsets(s: LayerStructure, order: tuple[int, ...]) -> dict[int, int]:
    off, out = 0, {}
    for k in order:
        out[k] = off
        off += s.blocks[k].rank
    return out


def _selection(s: LayerStructure, order: tuple[int, ...], cover: tuple[int, ...]):
    """Columns of T a segment reads: ``("all",)``, ``("slice", lo, hi)`` or ``("gather", idx)``."""
    offs = _t_offsets(s, order)
    R = s.rank
    idx = [offs[k] + j for k in cover for j in range(s.blocks[k].rank)]
    if len(idx) == R:
        return ("all",)
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return ("slice", idx[0], idx[0] + len(idx))
    return ("gather", idx)


def _col_groups(s: LayerStructure, order: tuple[int, ...]) -> list[list[int]]:
    """Runs of consecutive blocks (in T order) sharing one column window: one MatMul each."""
    groups: list[list[int]] = []
    for k in order:
        b = s.blocks[k]
        if groups and s.blocks[groups[-1][0]].window_key()[2:] == b.window_key()[2:]:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


# -------------------------------------------------------------------- cost model
def form_params(s: LayerStructure, form: str) -> int:
    """Real weight parameters (bias excluded) that ``form`` stores for ``s``."""
    form = _ALIASES.get(form, form)
    R, m, n = s.rank, s.out_features, s.in_features
    if form == "segments":
        return s.cost
    if form == "vpad":
        return R * n + sum(b.rank * b.row_width for b in s.blocks)
    if form == "lowrank":
        return R * (m + n)
    raise ValueError(f"unknown form {form!r}")


def form_cost(s: LayerStructure, form: str, order: tuple[int, ...]) -> float:
    """Estimated per-token cost of ``form`` with blocks in ``order`` (model units)."""
    form = _ALIASES.get(form, form)
    m, n, R = s.out_features, s.in_features, s.rank
    if not s.blocks:
        return _NODE + m
    cost = float(form_params(s, form)) + _NODE * 2 + (m if s.bias is not None else 0)
    if form == "lowrank":
        return cost
    if form == "segments":
        for g in _col_groups(s, order):
            b = s.blocks[g[0]]
            pieces = window_slices(b.col_start, b.col_width, n)
            if b.col_width < n:  # a Slice (or Gather when wrapping) copies the window
                cost += b.col_width * (_GATHER if len(pieces) > 1 else _COPY) + _NODE
            cost += _NODE
        if len(_col_groups(s, order)) > 1:
            cost += R * _COPY + _NODE  # Concat of the V-projections
    segs = _segments(s, order)
    for seg in segs:
        sel = _selection(s, order, seg.blocks) if seg.blocks else ("none",)
        r = sum(s.blocks[k].rank for k in seg.blocks)
        if sel[0] == "slice":
            cost += r * _COPY + _NODE
        elif sel[0] == "gather":
            cost += r * _GATHER + _NODE
        cost += _NODE
    if len(segs) > 1:
        cost += m * _COPY + _NODE  # Concat of the segments
    return cost


def _best_order(s: LayerStructure, form: str) -> tuple[int, ...]:
    K = len(s.blocks)
    base = tuple(sorted(range(K), key=lambda k: (s.blocks[k].window_key()[2:], s.blocks[k].row_start)))
    if K <= 1 or form == "lowrank":
        return base
    if K > 6:  # 720 orders at most; beyond that the sorted order is good enough
        return base
    return min(itertools.permutations(range(K)), key=lambda o: (form_cost(s, form, o), o != base))


def plan_layer(s: LayerStructure, form: str = "auto") -> LayerPlan:
    """Choose the form (and block order) for one layer.

    Args:
        s: the frozen layer record.
        form: ``"auto"`` (cheapest by the cost model) or one of :data:`FORMS`
            (``"sliced"`` is accepted for ``"segments"``).

    Returns:
        The plan, with the form's real parameter count.
    """
    form = _ALIASES.get(form, form)
    if form != "auto" and form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected auto, sliced or one of {FORMS}")
    candidates = FORMS if form == "auto" else (form,)
    plans = []
    for f in candidates:
        order = _best_order(s, f)
        p = form_params(s, f)
        plans.append(LayerPlan(f, order, p, p == s.cost, form_cost(s, f, order)))
    # Ties go to the exact form (listed first): same speed, fewer parameters.
    return min(plans, key=lambda p: (p.cost, p.params))


# ---------------------------------------------------------------------- emission
class _Builder:
    def __init__(self, prefix: str, init_prefix: str, np_dtype: np.dtype) -> None:
        self.prefix = prefix
        self.init_prefix = init_prefix
        self.dtype = np_dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.weight_params = 0
        self._n = 0
        self._w = 0

    def name(self, tag: str) -> str:
        self._n += 1
        return f"{self.prefix}/{tag}_{self._n}"

    def init_name(self, tag: str) -> str:
        # Emission is deterministic, so a layer called twice yields the same names and
        # the caller can share its initializers.
        self._w += 1
        return f"{self.init_prefix}/{tag}_{self._w}"

    def weight(self, tag: str, arr: np.ndarray) -> str:
        name = self.init_name(tag)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=self.dtype), name))
        self.weight_params += int(arr.size)
        return name

    def const_i64(self, tag: str, values: list[int]) -> str:
        name = self.init_name(tag)
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.name(op_type) + ":0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out

    def slice_last(self, x: str, lo: int, hi: int) -> str:
        return self.op(
            "Slice",
            [x, self.const_i64("starts", [lo]), self.const_i64("ends", [hi]), self.const_i64("axes", [-1])],
        )

    def window(self, x: str, start: int, width: int, n: int) -> str:
        """``x[..., window]``: nothing for full width, a Slice, or a Gather when wrapping."""
        if width == n and start == 0:
            return x
        pieces = window_slices(start, width, n)
        if len(pieces) == 1:
            return self.slice_last(x, *pieces[0])
        idx = [i for lo, hi in pieces for i in range(lo, hi)]
        return self.op("Gather", [x, self.const_i64("cols", idx)], axis=-1)


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def emit_layer(
    s: LayerStructure,
    plan: LayerPlan,
    x: str,
    y: str,
    prefix: str,
    np_dtype: np.dtype,
    init_prefix: str | None = None,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], int]:
    """ONNX nodes computing ``y = layer(x)`` for ``x (..., n)`` with ``plan``'s form.

    Args:
        s: the layer record.  plan: from :func:`plan_layer`.
        x, y: graph value names of the input ``(..., n)`` and output ``(..., m)``.
        prefix: node and intermediate names start with it (the module path).
        np_dtype: dtype of the weights (that of the layer's input).
        init_prefix: initializer names start with it (default ``prefix``); equal
            across calls of a shared layer so its weights are stored once.

    Returns:
        ``(nodes, initializers, weight_params)``; ``weight_params`` counts the U/V
        entries stored (bias excluded) and equals ``plan.params``.
    """
    m, n = s.out_features, s.in_features
    B = _Builder(prefix, init_prefix or prefix, np_dtype)
    bias = None if s.bias is None else _np(s.bias)

    if not s.blocks:  # all components dead: the output is the bias (or zeros)
        lead = B.op("Shape", [x], end=-1)  # (..., ) of x
        shape = B.op("Concat", [lead, B.const_i64("m", [m])], axis=0)
        if bias is None:
            B.op("ConstantOfShape", [shape], out=y, value=helper.make_tensor("zero", _onnx_dtype(np_dtype), [1], [0]))
        else:
            B.op("Expand", [B.weight("bias", bias), shape], out=y)
        return B.nodes, B.inits, B.weight_params - (0 if bias is None else m)

    order = plan.order
    blocks = s.blocks
    if plan.form in ("vpad", "lowrank"):
        vpad = np.zeros((n, s.rank), dtype=np_dtype)  # (n, R): x @ vpad = T
        off = 0
        for k in order:
            b = blocks[k]
            cols = [(b.col_start + j) % n for j in range(b.col_width)]
            vpad[cols, off : off + b.rank] = _np(b.V).T
            off += b.rank
        T = B.op("MatMul", [x, B.weight("Vpad", vpad)])  # (..., R)
    else:
        parts = []
        for g in _col_groups(s, order):
            b0 = blocks[g[0]]
            xs = B.window(x, b0.col_start, b0.col_width, n)  # (..., cw)
            vt = np.concatenate([_np(blocks[k].V).T for k in g], axis=1)  # (cw, r_g)
            parts.append(B.op("MatMul", [xs, B.weight("Vt", vt)]))
        T = parts[0] if len(parts) == 1 else B.op("Concat", parts, axis=-1)  # (..., R)

    if plan.form == "lowrank":
        upad = np.zeros((s.rank, m), dtype=np_dtype)  # (R, m)
        off = 0
        for k in order:
            b = blocks[k]
            rows = [(b.row_start + j) % m for j in range(b.row_width)]
            upad[off : off + b.rank, rows] = _np(b.U).T
            off += b.rank
        out = B.op("MatMul", [T, B.weight("Upad", upad)])  # (..., m)
    else:
        outs = []
        for seg in _segments(s, order):
            width = seg.stop - seg.start
            if not seg.blocks:
                lead = B.op("Shape", [x], end=-1)
                shape = B.op("Concat", [lead, B.const_i64("w", [width])], axis=0)
                zero = helper.make_tensor("zero", _onnx_dtype(np_dtype), [1], [0])
                outs.append(B.op("ConstantOfShape", [shape], value=zero))
                continue
            sel = _selection(s, order, seg.blocks)
            if sel[0] == "all":
                ts = T
            elif sel[0] == "slice":
                ts = B.slice_last(T, sel[1], sel[2])
            else:
                ts = B.op("Gather", [T, B.const_i64("tcols", sel[1])], axis=-1)
            ut = []
            for k in seg.blocks:  # rows of the stacked U follow the selected T columns
                b = blocks[k]
                first = (seg.start - b.row_start) % m  # segment's offset inside the window
                ut.append(_np(b.U)[first : first + width].T)  # (r_k, width)
            outs.append(B.op("MatMul", [ts, B.weight("Ut", np.concatenate(ut, axis=0))]))
        out = outs[0] if len(outs) == 1 else B.op("Concat", outs, axis=-1)  # (..., m)

    if bias is None:
        B.op("Identity", [out], out=y)
        return B.nodes, B.inits, B.weight_params
    B.op("Add", [out, B.weight("bias", bias)], out=y)  # bias once, after the combine
    return B.nodes, B.inits, B.weight_params - m


def _onnx_dtype(np_dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(np_dtype))

