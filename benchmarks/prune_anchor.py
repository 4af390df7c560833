"""Structured pruning + least-squares anchor (Kwon et al. 2022 style), no fine-tune.

The contender the issue asks every compressor to beat at equal exact cost. Units are
FFN hidden units and attention heads; each unit is scored from calibration statistics
of the Linear that reads it (its *consumer*: BERT's ``output.dense`` / ``attention.output
.dense``, Llama's ``mlp.down_proj``)::

    score_j = E[h_j^2] * ||W2[:, j]||^2               FFN unit j (h: the consumer's input)
    score_h = tr(W_O[:, H] C[H, H] W_O[:, H]^T)       head h, H its columns of W_O

i.e. the output energy each unit alone sends into the residual stream. Units are
removed globally, lowest ``score / cost`` first, until the summed Linear cost is at
most the target (then the most important removed units that still fit are put back),
so one budget number yields an exact cost. The kept units' producers keep their rows
(Q/K/V rows of a head; W1, or gate and up, rows of a unit) and the consumer is refit
in closed form on the kept inputs, with an intercept::

    W2' = W2 S[:, K] S[K, K]^-1          S: covariance of the consumer's input (damped)
    b2' = b2 + W2 mu - W2' mu[K]         mu: its mean (the pruned units' mean folded in)

This is the best affine map from the kept units to the dense layer's output on the
calibration tokens. The result is a dense model with smaller ``nn.Linear`` layers (a
real speed-up, exported like any dense model); statistics come from one pass of the
dense model (not updated after earlier layers are pruned).

Supported layouts: HuggingFace BERT-like encoder layers (``attention.self.{query,key,
value}``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense``: FFN units
and heads) and Llama-like decoder layers (``mlp.{gate,up,down}_proj``: FFN units only;
grouped-query heads are left whole).

Example::

    from benchmarks.prune_anchor import prune_anchor_, linear_cost, compressible_linears
    names = compressible_linears(model)
    target = int(0.8 * linear_cost(model, names))
    result = prune_anchor_(model, batches, target)   # in place; result.cost <= target
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from benchmarks.common import single_thread
from gblr_compress.errors import InputError

__all__ = [
    "Moments",
    "PruneResult",
    "UnitGroup",
    "compressible_linears",
    "consumer_moments",
    "find_unit_groups",
    "linear_cost",
    "prune_anchor_",
    "refit_consumer",
]

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class UnitGroup:
    """Units that can be removed together with their weights, in one layer.

    Attributes:
        name: label, e.g. ``encoder.layer.3.ffn``.
        kind: ``"ffn"`` or ``"heads"``.
        producers: dotted names of the Linears whose output rows are the units.
        consumer: dotted name of the Linear whose input columns are the units.
        unit: rows (columns) per unit: 1 for FFN units, the head size for heads.
        count: number of units.
        layer: dotted name of the transformer layer holding the group.
        attention: for heads, the module whose ``num_attention_heads`` /
            ``all_head_size`` must follow the pruning; else ``None``.
    """

    name: str
    kind: str
    producers: tuple[str, ...]
    consumer: str
    unit: int
    count: int
    layer: str
    attention: str | None = None


def _has(mod: nn.Module, path: str) -> bool:
    try:
        mod.get_submodule(path)
    except AttributeError:
        return False
    return True


def find_unit_groups(model: nn.Module, kinds: Iterable[str] = ("ffn", "heads")) -> list[UnitGroup]:
    """The prunable unit groups of every BERT-like, MPNet or Llama-like layer in ``model``.

    Args:
        model: any module holding HuggingFace BERT, MPNet or Llama layers.
        kinds: which groups to return (``"ffn"``, ``"heads"``); MPNet and Llama give FFN only.
    """
    kinds = set(kinds)
    groups: list[UnitGroup] = []
    for prefix, mod in model.named_modules():
        p = f"{prefix}." if prefix else ""
        if _has(mod, "attention.self.query") and _has(mod, "intermediate.dense") and _has(mod, "output.dense"):
            if "heads" in kinds:
                sa = mod.get_submodule("attention.self")
                groups.append(UnitGroup(
                    f"{p}heads", "heads",
                    tuple(f"{p}attention.self.{k}" for k in ("query", "key", "value")),
                    f"{p}attention.output.dense", int(sa.attention_head_size), int(sa.num_attention_heads),
                    prefix, f"{p}attention.self"))
            if "ffn" in kinds:
                inter = mod.get_submodule("intermediate.dense")
                groups.append(UnitGroup(f"{p}ffn", "ffn", (f"{p}intermediate.dense",), f"{p}output.dense", 1,
                                        inter.out_features, prefix))
        elif _has(mod, "attention.attn.q") and _has(mod, "intermediate.dense") and _has(mod, "output.dense"):
            # MPNet: FFN units only. Its heads share one relative-position bias computed
            # once for the whole encoder, which a pruned head count per layer would have
            # to slice layer by layer.
            if "ffn" in kinds:
                inter = mod.get_submodule("intermediate.dense")
                groups.append(UnitGroup(f"{p}ffn", "ffn", (f"{p}intermediate.dense",), f"{p}output.dense", 1,
                                        inter.out_features, prefix))
        elif _has(mod, "mlp.gate_proj") and _has(mod, "mlp.up_proj") and _has(mod, "mlp.down_proj"):
            if "ffn" in kinds:
                up = mod.get_submodule("mlp.up_proj")
                groups.append(UnitGroup(f"{p}ffn", "ffn", (f"{p}mlp.gate_proj", f"{p}mlp.up_proj"),
                                        f"{p}mlp.down_proj", 1, up.out_features, prefix))
    if not groups:
        raise InputError("no BERT-like or Llama-like layers found to prune")
    return groups


def compressible_linears(model: nn.Module) -> list[str]:
    """Dotted names of the Linears inside the prunable layers (lm_head, pooler and
    classifier heads excluded): the set whose summed cost the budget is a ratio of."""
    layers = {g.layer for g in find_unit_groups(model)}
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and any(name.startswith(f"{q}." if q else "") for q in layers)]


def linear_cost(model: nn.Module, names: Iterable[str]) -> int:
    """Exact summed multiply-adds per token (``in * out``) of the Linears at ``names``."""
    total = 0
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{name}: {type(mod).__name__} is not an nn.Linear")
        total += mod.in_features * mod.out_features
    return total


def _unit_cost(model: nn.Module, g: UnitGroup) -> int:
    """Multiply-adds one unit of ``g`` costs: its producer rows and consumer columns."""
    rows = sum(model.get_submodule(p).in_features for p in g.producers)
    return g.unit * (rows + model.get_submodule(g.consumer).out_features)




@dataclass
class Moments:
    """Streamed first and second moments of one consumer's input (float64)."""

    total: torch.Tensor
    gram: torch.Tensor
    tokens: int = 0

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.total / self.tokens  # (n,)
        return mu, self.gram / self.tokens - torch.outer(mu, mu)  # (n,), (n, n)


@torch.no_grad()
def consumer_moments(
    model: nn.Module,
    batches: Iterable[Batch],
    kinds: Iterable[str] = ("ffn", "heads"),
    forward: Callable[[Batch], object] | None = None,
) -> dict[str, Moments]:
    """Run the calibration batches once and stream the input moments of each unit
    group's consumer over the real (non-padding) tokens.

    The result depends only on the dense model and the data: compute it once and pass
    it to :func:`prune_anchor_` (``moments=``) for several targets.

    Returns:
        consumer name -> its streamed moments.
    """
    consumers = [g.consumer for g in find_unit_groups(model, kinds)]
    moments: dict[str, Moments] = {}
    keep: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def fn(_mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            x = args[0][keep["mask"]]  # (N_real, n)
            if name not in moments:
                n = x.shape[-1]
                moments[name] = Moments(torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64))
            m = moments[name]
            # float32 GEMM per batch (fast), accumulated across batches in float64.
            m.gram += (x.T @ x).double()
            m.total += x.double().sum(0)
            m.tokens += x.shape[0]

        return fn

    handles = [model.get_submodule(c).register_forward_hook(hook(c)) for c in consumers]
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            mask = b.get("attention_mask")
            keep["mask"] = (mask if mask is not None else torch.ones_like(b["input_ids"])).bool()  # (B, T)
            if forward is None:
                model(**b)
            else:
                forward(b)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not moments or min(m.tokens for m in moments.values()) == 0:
        raise InputError("calibration batches contain no tokens")
    return moments


def _unit_scores(w2: torch.Tensor, cov_plus: torch.Tensor, unit: int) -> torch.Tensor:
    """Output energy of each unit alone: ``tr(W2[:, U] C[U, U] W2[:, U]^T)`` with C the
    uncentered second moment; ``(count,)``."""
    n = w2.shape[1]
    count = n // unit
    w = w2.double().view(w2.shape[0], count, unit)  # (m, count, unit)
    c = cov_plus.view(count, unit, count, unit)
    blocks = c[torch.arange(count), :, torch.arange(count), :]  # (count, unit, unit)
    return torch.einsum("mcu,cuv,mcv->c", w, blocks, w)


def refit_consumer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    cov: torch.Tensor,
    keep: torch.Tensor,
    damping: float = 1e-2,
    refit: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Consumer weight and bias on the kept input columns only.

    Args:
        weight: (m, n) dense consumer weight.
        bias: (m,) or None.
        mean: (n,) mean of the consumer's input over calibration tokens.
        cov: (n, n) covariance of that input.
        keep: (k,) sorted int64 indices of the kept columns.
        damping: added to the kept covariance's diagonal as a fraction of its mean.
        refit: ``False``: keep ``W2[:, K]`` as it is (plain pruning, the pruned
            columns' mean folded into the bias); ``True``: the least-squares refit.

    Returns:
        ``(W2' (m, k), b2' (m,))``, float64: the best affine map (for ``refit``) from the
        kept inputs to ``W2 x + b2`` on the calibration statistics.
    """
    w = weight.double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    if refit and len(keep):
        s_kk = cov[keep][:, keep]  # (k, k)
        s_kk = s_kk + damping * s_kk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=s_kk.dtype)
        s_nk = cov[:, keep]  # (n, k)
        # W2' = W2 S[:, K] S[K, K]^-1, solved (S_KK symmetric positive definite).
        with single_thread():
            w_new = torch.linalg.solve(s_kk, (w @ s_nk).T).T  # (m, k)
    else:
        w_new = w[:, keep]
    b_new = b + w @ mean - w_new @ mean[keep]
    return w_new, b_new


@dataclass
class PruneResult:
    """What :func:`prune_anchor_` did.

    Attributes:
        cost: exact summed Linear cost after pruning (over ``names``).
        dense_cost: the same before.
        target: the requested cost.
        kept: group name -> number of kept units.
        names: the Linears the cost is summed over.
    """

    cost: int
    dense_cost: int
    target: int
    kept: dict[str, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> nn.Linear:
    """A new, smaller Linear: ``lin``'s kept output ``rows``, or the given weight/bias."""
    if weight is None:
        weight = lin.weight.detach()[rows]
        bias = None if lin.bias is None else lin.bias.detach()[rows]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    dtype=lin.weight.dtype, device=lin.weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def prune_anchor_(
    model: nn.Module,
    calib: Iterable[Batch],
    target_cost: int,
    *,
    kinds: Iterable[str] = ("ffn", "heads"),
    refit: bool = True,
    damping: float = 1e-2,
    min_units: int = 1,
    forward: Callable[[Batch], object] | None = None,
    moments: dict[str, Moments] | None = None,
    split: str = "global",
) -> PruneResult:
    """Prune FFN units and heads of ``model`` in place to at most ``target_cost``.

    Args:
        model: a HuggingFace BERT-like or Llama-like model (or a wrapper holding one).
        calib: batches ``{"input_ids", "attention_mask"}`` (B, T); padding tokens
            (mask 0) are left out of the statistics.
        target_cost: summed ``in * out`` of :func:`compressible_linears` after pruning.
        kinds: unit kinds to prune (``"ffn"``, ``"heads"``).
        refit: least-squares refit of each consumer (else plain pruning, mean folded).
        damping: relative ridge on the kept units' covariance.
        min_units: units every group keeps (a layer with no head cannot run).
        forward: how to run a batch (default ``model(**batch)``), e.g. a CausalLM's
            body only, skipping its lm_head.
        moments: :func:`consumer_moments` of this (still dense) model, if already
            computed; ``calib`` is then not run.
        split: ``"global"``: remove units lowest ``score / cost`` first across all
            layers; ``"uniform"``: every group gives up the same share of its cost
            (scores of different layers need not be comparable, e.g. in a pre-norm
            model whose residual stream grows with depth).

    Returns:
        A :class:`PruneResult`; ``result.cost <= target_cost``.

    Raises:
        InputError: no prunable layers, no calibration tokens, or a target below what
            ``min_units`` per group allows.
    """
    groups = find_unit_groups(model, kinds)
    names = compressible_linears(model)
    dense_cost = linear_cost(model, names)
    if moments is None:
        moments = consumer_moments(model, calib, kinds, forward)

    # Score every unit; candidates are all but each group's min_units best.
    stats = {}
    per_group: dict[str, list[tuple[float, int, str, int]]] = {}  # (score per MAC, cost, group, unit), ascending
    group_cost: dict[str, int] = {}
    for g in groups:
        mu, cov = moments[g.consumer].mean_cov()
        stats[g.name] = (mu, cov)
        second = cov + torch.outer(mu, mu)
        scores = _unit_scores(model.get_submodule(g.consumer).weight.detach(), second, g.unit)  # (count,)
        c = _unit_cost(model, g)
        group_cost[g.name] = c * g.count
        order = scores.argsort(descending=True)
        per_group[g.name] = sorted((float(scores[u]) / c, c, g.name, u) for u in order[min_units:].tolist())
    candidates = sorted(cand for cands in per_group.values() for cand in cands)
    floor = dense_cost - sum(c for _, c, _, _ in candidates)
    if target_cost < floor:
        raise InputError(f"target cost {target_cost:,} is below {floor:,}, what {min_units} unit(s) per group cost")
    if split not in ("global", "uniform"):
        raise InputError(f"split must be global or uniform, got {split!r}")
    removed: list[tuple[float, int, str, int]] = []
    cost = dense_cost
    if split == "uniform":
        # Every group gives up the same share of its own cost (Linears outside the
        # groups, e.g. Llama's attention, stay whole and are paid for first).
        fixed = dense_cost - sum(group_cost.values())
        frac = (target_cost - fixed) / sum(group_cost.values())
        for name, cands in per_group.items():
            have = group_cost[name]
            for cand in cands:
                if have <= frac * group_cost[name]:
                    break
                removed.append(cand)
                have -= cand[1]
                cost -= cand[1]
    gone = set(removed)
    for cand in candidates:  # global order (for "uniform": only what rounding left over)
        if cost <= target_cost:
            break
        if cand not in gone:
            removed.append(cand)
            cost -= cand[1]
    # Fill the slack: the most important removed units that still fit go back.
    for cand in sorted(removed, reverse=True):
        if cost + cand[1] <= target_cost:
            removed.remove(cand)
            cost += cand[1]
    dropped: dict[str, set[int]] = {g.name: set() for g in groups}
    for _, _, gname, u in removed:
        dropped[gname].add(u)

    kept_counts = {}
    for g in groups:
        keep_units = torch.tensor([u for u in range(g.count) if u not in dropped[g.name]], dtype=torch.long)
        kept_counts[g.name] = len(keep_units)
        if len(keep_units) == g.count:
            continue
        cols = (keep_units[:, None] * g.unit + torch.arange(g.unit)).flatten()  # (k * unit,)
        for p in g.producers:
            _replace(model, p, _slice_linear(model.get_submodule(p), rows=cols))
        cons = model.get_submodule(g.consumer)
        mu, cov = stats[g.name]
        w_new, b_new = refit_consumer(cons.weight.detach(), None if cons.bias is None else cons.bias.detach(),
                                      mu, cov, cols, damping, refit)
        dtype = cons.weight.dtype
        _replace(model, g.consumer, _slice_linear(cons, weight=w_new.to(dtype), bias=b_new.to(dtype)))
        if g.attention is not None:
            attn = model.get_submodule(g.attention)
            attn.num_attention_heads = len(keep_units)
            attn.all_head_size = len(keep_units) * g.unit
    result = PruneResult(cost=linear_cost(model, names), dense_cost=dense_cost, target=target_cost,
                         kept=kept_counts, names=names)
    assert result.cost == cost, (result.cost, cost)  # the greedy's bookkeeping is the real cost
    return result
