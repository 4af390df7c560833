"""Coupling groups: the layers whose hidden units move together (GBLR.md section 7).

A transformer FFN ``y = W2 act(W1 x + b1) + b2`` (gated: ``act(Wg x) * (Wu x)``) keeps its
function under any permutation of its hidden units applied to the rows of the producing
layers and the columns of the consuming one; attention does the same for whole heads
across the Q/K/V rows and the output projection's columns. After sorting units by
importance, keeping the top ``k`` is one full-rank GBLR window per layer (a pruned
window). This module is the one place that knows which layers are coupled
(:func:`find_groups`, by module structure, so a wrapper holding a HuggingFace model
works: names are the dotted paths inside the wrapper) and how to apply a coupled
permutation (:func:`permute_`). It imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CouplingGroup", "find_groups", "permute_", "unit_rows"]


@dataclass(frozen=True)
class CouplingGroup:
    """Layers sharing one axis of ``units`` units of ``unit_size`` rows each.

    Attributes:
        kind: ``"ffn"`` (hidden units, ``unit_size`` 1) or ``"attention"`` (heads).
        producers: dotted names of the layers whose output rows are the units (FFN:
            the up layer, or gate and up; attention: the query projection).
        consumer: dotted name of the layer whose input columns are the units.
        units: number of units (FFN hidden units; attention query heads).
        unit_size: rows per unit (1; attention: the head dimension).
        kv_producers: attention only: key and value projections, whose rows are
            ``units // kv_group`` heads shared by ``kv_group`` query heads each.
        kv_group: query heads per key/value head (1 without grouped-query attention).
    """

    kind: str
    producers: tuple[str, ...]
    consumer: str
    units: int
    unit_size: int = 1
    kv_producers: tuple[str, ...] = ()
    kv_group: int = 1

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer of the group (producers, key/value producers, consumer)."""
        return (*self.producers, *self.kv_producers, self.consumer)


def _linear(parent: nn.Module, name: str) -> nn.Module | None:
    """The child ``name`` when it is linear-like: an ``nn.Linear``, or a module with
    integer ``in_features`` / ``out_features`` (a GBLR layer: a frozen model's groups are
    found the same way as the dense model's)."""
    mod = getattr(parent, name, None)
    if isinstance(mod, nn.Linear):
        return mod
    if isinstance(mod, nn.Module) and isinstance(getattr(mod, "in_features", None), int) \
            and isinstance(getattr(mod, "out_features", None), int):
        return mod
    return None


def _heads(attn: nn.Module, q: nn.Module) -> tuple[int, int, int] | None:
    """``(query heads, key/value heads, head dim)`` of an attention module, or None."""
    cfg = getattr(attn, "config", None)
    heads = None
    for key in ("num_attention_heads", "num_heads", "n_heads"):
        heads = heads or getattr(attn, key, None) or getattr(cfg, key, None)
    if not isinstance(heads, int) or heads < 1 or q.out_features % heads:
        return None
    kv = getattr(attn, "num_key_value_heads", None) or getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None) or q.out_features // heads
    if not isinstance(kv, int) or heads % kv or heads * dim != q.out_features:
        return None
    return heads, kv, dim


# (query, key, value, output) child names of the attention layouts known here; the output
# projection is either a sibling Linear or ``output.dense`` of the parent (BERT).
_ATTN_NAMES = (("q_proj", "k_proj", "v_proj", "o_proj"), ("q", "k", "v", "o"),
               ("q_proj", "k_proj", "v_proj", "out_proj"), ("query", "key", "value", None))


def find_groups(model: nn.Module) -> list[CouplingGroup]:
    """The FFN and attention coupling groups of ``model``, found by module structure.

    Layouts: BERT/MPNet FFNs (``intermediate.dense`` -> act -> ``output.dense``), Llama
    style gated FFNs (``gate_proj`` + ``up_proj`` -> ``down_proj``), torch's transformer
    layers (``linear1`` -> act -> ``linear2`` beside ``self_attn``), BERT attention
    (``self.query/key/value`` -> ``output.dense``), MPNet (``attn.q/k/v/o``), Llama
    (``self_attn.q_proj/k_proj/v_proj/o_proj``, grouped-query heads from the module or
    its config) and :class:`~gblr_compress.attention.CalledAttention`
    (``q_proj/k_proj/v_proj/out_proj``). Shapes are checked; a layout that does not match is not a group.

    Returns:
        Groups in module order; names are dotted paths in ``model``.
    """
    groups: list[CouplingGroup] = []
    for path, mod in model.named_modules():
        pre = f"{path}." if path else ""
        inter, out = getattr(mod, "intermediate", None), getattr(mod, "output", None)
        up = _linear(inter, "dense") if inter is not None else None
        down = _linear(out, "dense") if out is not None else None
        if up is not None and down is not None and up.out_features == down.in_features:
            groups.append(CouplingGroup("ffn", (f"{pre}intermediate.dense",), f"{pre}output.dense", up.out_features))
        # torch's nn.TransformerEncoderLayer / DecoderLayer: linear2(act(linear1(x)))
        lin1, lin2 = _linear(mod, "linear1"), _linear(mod, "linear2")
        if lin1 is not None and lin2 is not None and hasattr(mod, "self_attn") \
                and lin1.out_features == lin2.in_features:
            groups.append(CouplingGroup("ffn", (f"{pre}linear1",), f"{pre}linear2", lin1.out_features))
        gate, upp, downp = _linear(mod, "gate_proj"), _linear(mod, "up_proj"), _linear(mod, "down_proj")
        if gate is not None and upp is not None and downp is not None \
                and gate.out_features == upp.out_features == downp.in_features:
            groups.append(CouplingGroup("ffn", (f"{pre}gate_proj", f"{pre}up_proj"), f"{pre}down_proj",
                                        upp.out_features))
        for qn, kn, vn, on in _ATTN_NAMES:
            q, k, v = _linear(mod, qn), _linear(mod, kn), _linear(mod, vn)
            if q is None or k is None or v is None:
                continue
            if on is not None:
                o, oname = _linear(mod, on), f"{pre}{on}"
            else:  # BERT: BertAttention.self holds q/k/v, BertAttention.output.dense is o
                parent_path, _, child = path.rpartition(".")
                parent = model.get_submodule(parent_path) if path else None
                sib = getattr(parent, "output", None) if parent is not None and child == "self" else None
                o = _linear(sib, "dense") if sib is not None else None
                oname = f"{parent_path + '.' if parent_path else ''}output.dense"
            shape = _heads(mod, q)
            if o is None or shape is None or o.in_features != q.out_features:
                continue
            heads, kv, dim = shape
            if k.out_features != kv * dim or v.out_features != kv * dim:
                continue
            groups.append(CouplingGroup("attention", (f"{pre}{qn}",), oname, heads, dim,
                                        (f"{pre}{kn}", f"{pre}{vn}"), heads // kv))
    return groups


def unit_rows(perm: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Row indices of units ``perm`` (each ``unit_size`` consecutive rows), in order."""
    base = perm.long()[:, None] * unit_size + torch.arange(unit_size)[None, :]  # (units, size)
    return base.reshape(-1)


def _kv_perm(group: CouplingGroup, perm: torch.Tensor) -> torch.Tensor:
    """The key/value head order implied by a query head order (grouped-query check)."""
    G = group.kv_group
    blocks = perm.reshape(-1, G) // G  # (kv heads, G): old kv head of each query head
    if not bool((blocks == blocks[:, :1]).all()):
        raise ValueError("a query-head permutation must keep each key/value group together")
    kv = blocks[:, 0]
    if sorted(kv.tolist()) != list(range(group.units // G)):
        raise ValueError("not a permutation of the key/value heads")
    return kv


@torch.no_grad()
def permute_(model: nn.Module, group: CouplingGroup, perm: torch.Tensor) -> None:
    """Reorder the units of ``group`` in place: new unit ``i`` is old unit ``perm[i]``.

    Producers' rows (and biases) and the consumer's columns move together, so the model
    computes the same function (up to float rounding of reordered sums).

    Raises:
        ValueError: ``perm`` is not a permutation of the units, or (grouped-query
            attention) it splits a key/value group.
    """
    perm = torch.as_tensor(perm).long().cpu()
    if sorted(perm.tolist()) != list(range(group.units)):
        raise ValueError(f"perm must be a permutation of {group.units} units")
    rows = unit_rows(perm, group.unit_size)
    moves = [(name, rows) for name in group.producers]
    if group.kv_producers:
        kv_rows = unit_rows(_kv_perm(group, perm), group.unit_size)
        moves += [(name, kv_rows) for name in group.kv_producers]
    for name, idx in moves:
        lin = model.get_submodule(name)
        lin.weight.copy_(lin.weight[idx.to(lin.weight.device)])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[idx.to(lin.bias.device)])
    out = model.get_submodule(group.consumer)
    out.weight.copy_(out.weight[:, rows.to(out.weight.device)])
