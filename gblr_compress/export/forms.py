"""Exact ONNX forms of one frozen GBLR layer, a cost model to pick one, and emission.

Every form computes ``y = sum_k rows_k <- U_k @ (V_k @ x[cols_k]) + bias`` exactly. A
form is a V-side (producing ``T (..., R)``, all blocks' V-projections side by side) and
a U-side (producing ``y`` from ``T``). Measured in onnxruntime (CPU), writing and
combining per-block outputs costs more than the multiplies, so no form writes an output
element twice, and no form uses Gather on activations (it is ~10x slower than Slice):

V-sides:
    * ``windows``: per column window one Slice of ``x`` and one MatMul (blocks sharing
      the window share it; a wrapping window is two slices whose products are added),
      then one Concat.
    * ``inseg``: the input axis is cut into segments where the set of reading blocks
      is constant; each segment is sliced once and multiplied by the stacked V columns
      of its readers (one MatMul per run of readers contiguous in ``T``), padded to
      ``R`` and summed. Each input element is copied once and the MatMuls are wider.
    * ``pad``: one MatMul with V zero-padded to the full input width.
U-sides:
    * ``outseg``: output rows cut into segments with a constant set of covering
      blocks; each segment is ONE MatMul of those blocks' ``T`` columns with their
      stacked U rows; segments are concatenated; the bias is added once.
    * ``pad``: one MatMul with U zero-padded to all rows.

A fifth form, ``dense``, multiplies each block as one dense ``(cols, rows)`` MatMul
(``U @ V`` materialized) and concatenates the row segments; it is offered when no two
blocks share an output row. For a pruned window (a full-rank block, stored dense at
cost ``rows x cols``, GBLR.md s.7) it is exact and is a smaller dense MatMul: the
pruned FFN's producer is ``x @ W1[S]^T`` into ``k`` rows, its consumer
``x[..., :k] @ W2'^T``.

Forms: ``segments`` = windows+outseg and ``grid`` = inseg+outseg store exactly the
frozen cost in weights (``sliced`` is an alias of ``segments``); ``vpad`` = pad+outseg
and ``lowrank`` = pad+pad store zero padding (for a full-width structure, i.e. a
truncated SVD, ``lowrank`` is exact). ScatterND is never emitted (with reduction=add it
is wrong for duplicate indices with >1 thread).
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
FORMS = ("segments", "grid", "vpad", "lowrank", "dense")
_ALIASES = {"sliced": "segments"}
_SIDES = {"segments": ("windows", "outseg"), "grid": ("inseg", "outseg"),
          "vpad": ("pad", "outseg"), "lowrank": ("pad", "pad")}

# Cost model, per token, in multiply-adds of a wide GEMM. Measured with ORT CPU on 1024
# tokens, 2 threads: copying one float (Slice/Concat/Pad) ~ 17 MACs; a node ~ 200 MACs
# per token of fixed overhead; a GEMM with N output columns runs at ~N/(N+30) of the
# wide-GEMM rate (N=46 is ~1.6x slower per MAC than N=384).
_COPY = 17.0
_NODE = 200.0
_NARROW = 30.0


@dataclass
class LayerPlan:
    """How one layer is emitted.

    Attributes:
        form: one of :data:`FORMS`.
        order: block indices in the order their columns appear in ``T``.
        params: real weight parameters of the form (bias excluded).
        exact: True when ``params`` equals the frozen exact cost.
        cost: the cost model's estimate per token (MAC units).
    """

    form: str
    order: tuple[int, ...]
    params: int
    exact: bool
    cost: float


# ----------------------------------------------------------------------- geometry
def _cover_segments(pieces: dict[int, list[tuple[int, int]]], length: int, order) -> list[tuple[int, int, tuple]]:
    """Cut ``[0, length)`` into maximal runs with a constant covering set (in ``order``)."""
    cuts = sorted({0, length} | {p for ps in pieces.values() for lo, hi in ps for p in (lo, hi)})
    segs: list[list] = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        cover = tuple(k for k in order if any(lo <= a < hi for lo, hi in pieces[k]))
        if segs and segs[-1][2] == cover:
            segs[-1][1] = b
        else:
            segs.append([a, b, cover])
    return [tuple(sg) for sg in segs]


def _row_segments(s: LayerStructure, order) -> list[tuple[int, int, tuple]]:
    m = s.out_features
    return _cover_segments({k: window_slices(b.row_start, b.row_width, m) for k, b in enumerate(s.blocks)}, m, order)


def _col_segments(s: LayerStructure, order) -> list[tuple[int, int, tuple]]:
    n = s.in_features
    return _cover_segments({k: window_slices(b.col_start, b.col_width, n) for k, b in enumerate(s.blocks)}, n, order)


def _t_offsets(s: LayerStructure, order) -> dict[int, int]:
    off, out = 0, {}
    for k in order:
        out[k] = off
        off += s.blocks[k].rank
    return out


def _runs(s: LayerStructure, order, cover: tuple) -> list[tuple[int, int, list[int]]]:
    """Covering blocks grouped into runs contiguous in ``T``: ``(t_lo, t_hi, blocks)``."""
    offs = _t_offsets(s, order)
    runs: list[list] = []
    for k in cover:  # cover is in T order
        lo, hi = offs[k], offs[k] + s.blocks[k].rank
        if runs and runs[-1][1] == lo:
            runs[-1][1] = hi
            runs[-1][2].append(k)
        else:
            runs.append([lo, hi, [k]])
    return [tuple(r) for r in runs]


def _col_groups(s: LayerStructure, order) -> list[list[int]]:
    """Runs of consecutive blocks (in T order) sharing one column window: one MatMul each."""
    groups: list[list[int]] = []
    for k in order:
        if groups and s.blocks[groups[-1][0]].window_key()[2:] == s.blocks[k].window_key()[2:]:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


# -------------------------------------------------------------------- cost model
def dense_allowed(s: LayerStructure) -> bool:
    """Whether the ``dense`` form can emit ``s``: no output row is in two blocks."""
    seen = [0] * s.out_features
    for b in s.blocks:
        for i in b.row_indices(s.out_features).tolist():
            if seen[i]:
                return False
            seen[i] = 1
    return True


def form_params(s: LayerStructure, form: str) -> int:
    """Real weight parameters (bias excluded) that ``form`` stores for ``s``."""
    form = _ALIASES.get(form, form)
    if form == "dense":
        return sum(b.row_width * b.col_width for b in s.blocks)
    if form not in _SIDES:
        raise ValueError(f"unknown form {form!r}")
    vside, uside = _SIDES[form]
    R = s.rank
    v = R * s.in_features if vside == "pad" else sum(b.rank * b.col_width for b in s.blocks)
    u = R * s.out_features if uside == "pad" else sum(b.rank * b.row_width for b in s.blocks)
    return v + u


def _gemm(k: int, n_out: int) -> float:
    return k * (n_out + _NARROW) + _NODE


def form_cost(s: LayerStructure, form: str, order: tuple[int, ...]) -> float:
    """Estimated per-token cost of ``form`` with blocks in ``order`` (MAC units)."""
    form = _ALIASES.get(form, form)
    m, n, R = s.out_features, s.in_features, s.rank
    if not s.blocks:
        return _NODE + m * _COPY
    cost = 0.0 if s.bias is None else m * _COPY + _NODE  # bias Add
    if form == "dense":
        segs = _row_segments(s, order)
        for b in s.blocks:
            for lo, hi in window_slices(b.col_start, b.col_width, n):
                cost += _gemm(hi - lo, b.row_width) + (0 if hi - lo == n else (hi - lo) * _COPY + _NODE)
        cost += sum((b - a) * _COPY + 3 * _NODE for a, b, cover in segs if not cover)
        return cost + (m * _COPY + _NODE if len(segs) > 1 else 0.0)
    vside, uside = _SIDES[form]
    if vside == "pad":
        cost += _gemm(n, R)
    elif vside == "windows":
        groups = _col_groups(s, order)
        for g in groups:
            b = s.blocks[g[0]]
            r = sum(s.blocks[k].rank for k in g)
            pieces = window_slices(b.col_start, b.col_width, n)
            for lo, hi in pieces:
                cost += _gemm(hi - lo, r) + (0 if hi - lo == n else (hi - lo) * _COPY + _NODE)
            if len(pieces) > 1:
                cost += r * _COPY + _NODE
        if len(groups) > 1:
            cost += R * _COPY + _NODE
    else:  # inseg
        segs = [sg for sg in _col_segments(s, order) if sg[2]]
        parts = 0
        for a, b, cover in segs:
            cost += 0 if b - a == n else (b - a) * _COPY + _NODE
            for lo, hi, _ in _runs(s, order, cover):
                cost += _gemm(b - a, hi - lo) + (0 if hi - lo == R else R * _COPY + _NODE)
                parts += 1
        cost += 0 if parts == 1 else parts * R * _COPY + _NODE
    if uside == "pad":
        return cost + _gemm(R, m)
    segs = _row_segments(s, order)
    for a, b, cover in segs:
        if not cover:
            cost += (b - a) * _COPY + 3 * _NODE
            continue
        runs = _runs(s, order, cover)
        if not (len(runs) == 1 and runs[0][1] - runs[0][0] == R):
            r = sum(hi - lo for lo, hi, _ in runs)
            cost += len(runs) * (r * _COPY + _NODE) + (r * _COPY + _NODE if len(runs) > 1 else 0)
        cost += _gemm(sum(hi - lo for lo, hi, _ in runs), b - a)
    if len(segs) > 1:
        cost += m * _COPY + _NODE
    return cost


def _best_order(s: LayerStructure, form: str) -> tuple[int, ...]:
    K = len(s.blocks)
    base = tuple(sorted(range(K), key=lambda k: (s.blocks[k].col_start, s.blocks[k].row_start)))
    if K <= 1 or form == "lowrank" or K > 5:  # beyond 120 orders the sorted one is kept
        return base
    return min(itertools.permutations(range(K)), key=lambda o: (form_cost(s, form, o), o != base))


def plan_layer(s: LayerStructure, form: str = "auto") -> LayerPlan:
    """Choose the form (and block order) for one layer.

    Args:
        s: the frozen layer record.
        form: ``"auto"`` (cheapest by the cost model; ties go to the exact forms) or
            one of :data:`FORMS` (``"sliced"`` is accepted for ``"segments"``).

    Returns:
        The plan, with the form's real parameter count.
    """
    form = _ALIASES.get(form, form)
    if form != "auto" and form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected auto, sliced or one of {FORMS}")
    if form == "dense" and not dense_allowed(s):
        raise ValueError("form 'dense' needs blocks with disjoint output rows")
    plans = []
    for f in FORMS if form == "auto" else (form,):
        # auto offers dense only where it is exact (every block full rank, e.g. pruned
        # windows): elsewhere it would store more than the frozen cost.
        if f == "dense" and form == "auto" and not (dense_allowed(s) and form_params(s, f) == s.cost):
            continue
        order = _best_order(s, f)
        p = form_params(s, f)
        plans.append(LayerPlan(f, order, p, p == s.cost, form_cost(s, f, order)))
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

    def slice_last(self, x: str, lo: int, hi: int, length: int) -> str:
        if lo == 0 and hi == length:
            return x
        return self.op(
            "Slice",
            [x, self.const_i64("starts", [lo]), self.const_i64("ends", [hi]), self.const_i64("axes", [-1])],
        )

    def pad_last(self, x: str, lo: int, hi: int) -> str:
        if lo == 0 and hi == 0:
            return x
        return self.op("Pad", [x, self.const_i64("pads", [lo, hi]), "", self.const_i64("axes", [-1])])

    def zeros_like_rows(self, x: str, width: int) -> str:
        """Zeros of shape ``(*x.shape[:-1], width)`` (for rows no block covers)."""
        lead = self.op("Shape", [x], end=-1)
        shape = self.op("Concat", [lead, self.const_i64("w", [width])], axis=0)
        zero = helper.make_tensor("zero", helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype)), [1], [0])
        return self.op("ConstantOfShape", [shape], value=zero)


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _v_side(s: LayerStructure, B: _Builder, x: str, vside: str, order) -> str:
    """``T (..., R)``: the V-projections of all blocks, in ``order``."""
    n, R, blocks = s.in_features, s.rank, s.blocks
    if vside == "pad":
        vpad = np.zeros((n, R), dtype=B.dtype)  # (n, R)
        for k, off in _t_offsets(s, order).items():
            b = blocks[k]
            vpad[[(b.col_start + j) % n for j in range(b.col_width)], off : off + b.rank] = _np(b.V).T
        return B.op("MatMul", [x, B.weight("Vpad", vpad)])
    if vside == "windows":
        parts = []
        for g in _col_groups(s, order):
            b0 = blocks[g[0]]
            vt = np.concatenate([_np(blocks[k].V).T for k in g], axis=1)  # (cw, r_g)
            prods, off = [], 0
            for lo, hi in window_slices(b0.col_start, b0.col_width, n):  # 2 pieces if wrapping
                xs = B.slice_last(x, lo, hi, n)  # (..., hi-lo)
                prods.append(B.op("MatMul", [xs, B.weight("Vt", vt[off : off + hi - lo])]))
                off += hi - lo
            parts.append(prods[0] if len(prods) == 1 else B.op("Add", prods))
        return parts[0] if len(parts) == 1 else B.op("Concat", parts, axis=-1)
    # inseg: each input segment sliced once, one MatMul per run of readers, Pad, Sum
    parts = []
    for a, b, cover in _col_segments(s, order):
        if not cover:
            continue
        xs = B.slice_last(x, a, b, n)  # (..., b-a)
        for lo, hi, ks in _runs(s, order, cover):
            vt = np.concatenate(
                [_np(blocks[k].V).T[(a - blocks[k].col_start) % n :][: b - a] for k in ks], axis=1
            )  # (b-a, hi-lo): rows of each reader's V for this segment
            p = B.op("MatMul", [xs, B.weight("Vt", vt)])
            parts.append(B.pad_last(p, lo, R - hi))  # (..., R)
    return parts[0] if len(parts) == 1 else B.op("Sum", parts)


def _u_side(s: LayerStructure, B: _Builder, x: str, T: str, uside: str, order) -> str:
    m, R, blocks = s.out_features, s.rank, s.blocks
    if uside == "pad":
        upad = np.zeros((R, m), dtype=B.dtype)  # (R, m)
        for k, off in _t_offsets(s, order).items():
            b = blocks[k]
            upad[off : off + b.rank, [(b.row_start + j) % m for j in range(b.row_width)]] = _np(b.U).T
        return B.op("MatMul", [T, B.weight("Upad", upad)])
    outs = []
    for a, b, cover in _row_segments(s, order):
        if not cover:
            outs.append(B.zeros_like_rows(x, b - a))
            continue
        runs = _runs(s, order, cover)
        sel = [B.slice_last(T, lo, hi, R) for lo, hi, _ in runs]
        ts = sel[0] if len(sel) == 1 else B.op("Concat", sel, axis=-1)  # (..., r_cover)
        # rows of the stacked U follow the selected T columns; each block's rows for
        # this segment start at the segment's offset inside the block's window
        ut = np.concatenate(
            [_np(blocks[k].U)[(a - blocks[k].row_start) % m :][: b - a].T for _, _, ks in runs for k in ks], axis=0
        )  # (r_cover, b-a)
        outs.append(B.op("MatMul", [ts, B.weight("Ut", ut)]))
    return outs[0] if len(outs) == 1 else B.op("Concat", outs, axis=-1)  # (..., m)


def _dense_side(s: LayerStructure, B: _Builder, x: str, order) -> str:
    """``y (..., m)`` without bias: per row segment, the one block covering it as a dense
    MatMul of its column window (zeros where no block writes)."""
    m, n, blocks = s.out_features, s.in_features, s.blocks
    outs = []
    for a, b, cover in _row_segments(s, order):
        if not cover:
            outs.append(B.zeros_like_rows(x, b - a))
            continue
        blk = blocks[cover[0]]
        off = (a - blk.row_start) % m
        D = (_np(blk.U)[off : off + b - a] @ _np(blk.V)).T  # (cw, b-a): dense block rows
        prods, c = [], 0
        for lo, hi in window_slices(blk.col_start, blk.col_width, n):  # 2 pieces if wrapping
            prods.append(B.op("MatMul", [B.slice_last(x, lo, hi, n), B.weight("Wt", D[c : c + hi - lo])]))
            c += hi - lo
        outs.append(prods[0] if len(prods) == 1 else B.op("Add", prods))
    return outs[0] if len(outs) == 1 else B.op("Concat", outs, axis=-1)


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
    m = s.out_features
    B = _Builder(prefix, init_prefix or prefix, np_dtype)
    if not s.blocks:  # all components dead: the output is the bias (or zeros)
        if s.bias is None:
            B.op("Identity", [B.zeros_like_rows(x, m)], out=y)
        else:
            shape = B.op("Concat", [B.op("Shape", [x], end=-1), B.const_i64("m", [m])], axis=0)
            B.op("Expand", [B.weight("bias", _np(s.bias)), shape], out=y)
        return B.nodes, B.inits, B.weight_params - (0 if s.bias is None else m)
    if plan.form == "dense":
        out = _dense_side(s, B, x, plan.order)  # (..., m)
    else:
        vside, uside = _SIDES[plan.form]
        T = _v_side(s, B, x, vside, plan.order)  # (..., R)
        out = _u_side(s, B, x, T, uside, plan.order)  # (..., m)
    if s.bias is None:
        B.op("Identity", [out], out=y)
        return B.nodes, B.inits, B.weight_params
    B.op("Add", [out, B.weight("bias", _np(s.bias))], out=y)  # bias once, after the combine
    return B.nodes, B.inits, B.weight_params - m
