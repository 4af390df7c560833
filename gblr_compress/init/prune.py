"""Pruned windows: structured pruning of coupled FFN units as a GBLR form (GBLR.md s.7).

For a coupling group (producers ``W1`` rows = units, consumer ``W2`` columns = units) and
the consumer's input second moment ``C = E[h h^T]`` (the units' own moment, collected by
the statistics stage like any layer's input moment):

- importance of unit ``j``: ``C_jj * ||W2[:, j]||^2``, the output energy it carries
  (Kwon et al. 2022);
- kept set ``S``: the ``k`` most important units, in importance order, so after the
  coupled permutation they are rows / columns ``[0, k)``: one full-rank window per layer;
- least-squares refit of the consumer on the kept units: ``W2' = W2 C[:, S] C[S, S]^-1``
  (a ridge toward plain pruning ``W2[:, S]``), the best ``W2'`` for
  ``E||W2 h - W2' h_S||^2`` under the moment;
- error of the consumer: ``tr(D C D^T) / tr(W2 C W2^T)`` with ``D = W2 - W2' P_S``,
  relative, like every other init error.

A pruned producer costs ``k * n`` and the consumer ``m * k`` (full-rank blocks are
stored dense, :func:`~gblr_compress.gaudi.component_cost`). Everything here is torch
math on float64 tensors, apart from :func:`pruned_structures` building the records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gblr_compress.coupling import unit_rows
from gblr_compress.init.linalg import solve_each
from gblr_compress.structure import Block, LayerStructure

__all__ = [
    "unit_importance",
    "keep_order",
    "obs_order",
    "ls_refit",
    "pruned_error",
    "units_for_cost",
    "PrunedGroup",
    "prune_group",
    "pruned_structures",
]

_F64 = torch.float64


def unit_importance(W2: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``(h,)`` output energy of each unit: ``E[h_j^2] * ||W2[:, j]||^2``.

    Args:
        W2: ``(m, h)`` consumer weight.
        C: ``(h, h)`` second moment of the consumer's input (the units).
    """
    return torch.diagonal(C).clamp_min(0.0) * (W2 * W2).sum(0)


def keep_order(importance: torch.Tensor) -> torch.Tensor:
    """``(h,)`` unit order, most important first (stable, so ties keep index order)."""
    return torch.sort(-importance, stable=True).indices


def obs_order(W2: torch.Tensor, C: torch.Tensor, k: int, unit_size: int = 1, damping: float = 0.01,
              rounds: int = 32) -> torch.Tensor:
    """Units in the order to keep them, chosen by optimal brain surgeon elimination:
    the ``units - k`` units whose removal (with the rest refit by least squares) adds
    the least output error go last, one at a time.

    With ``H = C + d I`` (damped like :func:`ls_refit`) and ``W`` the current refit
    weight, removing unit ``u`` (columns ``B``) adds ``tr(W_B [H^-1]_BB^-1 W_B^T)``; the
    rest is refit by ``W -= W_B [H^-1]_BB^-1 [H^-1]_B.`` and ``H^-1`` is downdated the same
    way (ZipLM / OBS for structured units). Unlike :func:`unit_importance` this sees
    redundancy: of two units that carry the same signal it drops one and keeps the other.

    Args:
        W2: ``(m, h)`` consumer weight.  C: ``(h, h)`` moment of its input.
        k: units to keep.  unit_size: columns per unit.
        rounds: units are eliminated in at most this many batches, the cheapest of
            each round together (the exact greedy is ``rounds >= units - k``).

    Returns:
        ``(units,)`` unit indices: the ``k`` kept units first (by importance, most first),
        then the eliminated ones, last eliminated first.
    """
    h = C.shape[0]
    units = h // unit_size
    scale = float(torch.diagonal(C).mean()) if h else 0.0
    Hinv = torch.linalg.inv(C + (max(damping, 0.0) * scale + 1e-12 * max(scale, 1.0)) * torch.eye(h, dtype=C.dtype))
    W = W2.clone()
    alive = torch.ones(units, dtype=torch.bool)
    removed: list[int] = []
    cols = torch.arange(h).reshape(units, unit_size)  # (units, size)
    # Units go in up to `rounds` batches (the cheapest ones of each round together):
    # one at a time is the exact greedy but costs an (h, h) rank-1 update per unit, a
    # minute per 1536-unit FFN on 2 cores; batches turn it into a few GEMMs.
    left = units - k
    per_round = max(1, -(-left // rounds))
    while left > 0:
        if unit_size == 1:
            d = torch.diagonal(Hinv).clamp_min(1e-30)
            cost = (W * W).sum(0) / d  # (h,)
        else:
            blocks = Hinv[cols[:, :, None], cols[:, None, :]]  # (units, size, size)
            Wb = W[:, cols].permute(1, 0, 2)  # (units, m, size)
            sol = solve_each(blocks, Wb.transpose(1, 2))  # (units, size, m); batched LU can hang
            cost = (Wb.transpose(1, 2) * sol).sum((1, 2))  # (units,)
        cost = torch.where(alive, cost, torch.full_like(cost, float("inf")))
        q = min(per_round, left)
        us = torch.topk(cost, q, largest=False).indices  # (q,) cheapest first
        B = cols[us].reshape(-1)  # (q * size,)
        HBB = Hinv[B][:, B]  # (qs, qs)
        G = torch.linalg.solve(HBB, Hinv[B])  # (qs, h): [H^-1]_BB^-1 [H^-1]_B.
        W -= W[:, B] @ G
        Hinv -= Hinv[:, B] @ G
        W[:, B] = 0.0
        Hinv[B, :] = 0.0
        Hinv[:, B] = 0.0
        Hinv[B, B] = 1.0  # keeps the block solvable; the unit is dead and never chosen again
        alive[us] = False
        removed.extend(us.tolist()[::-1])  # most costly of the round last removed
        left -= q
    kept = torch.nonzero(alive).reshape(-1)
    imp = unit_importance(W2, C).reshape(units, unit_size).sum(1)[kept]
    kept = kept[keep_order(imp)]
    return torch.cat([kept, torch.tensor(removed[::-1], dtype=torch.long)])


def ls_refit(W2: torch.Tensor, C: torch.Tensor, keep: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """``(m, k)`` consumer weight on the kept units: ``(W2 C[:, S] + d W2[:, S]) (C[S, S] + d I)^-1``.

    The minimizer of ``E||W2 h - W2' h_S||^2 + d ||W2' - W2[:, S]||^2``: a ridge toward
    plain pruning, ``W2[:, S]``, which the refit equals when the kept units are
    uncorrelated with the rest and tends to as ``d`` grows. It is the refit
    :func:`obs_order` eliminates under (``H = C + d I``), so units are chosen for the
    weights they then get. ``d`` is ``damping`` times the mean of ``diag C[S, S]`` (a
    small moment estimated from few tokens is near singular). A ridge toward zero
    instead shrank every kept weight: on
    all-MiniLM-L6-v2 at budget 0.8 (256 hand-written sentences, init only) it kept
    Wikipedia / news cosine 0.948 / 0.942, this one 0.953 / 0.948
    (``benchmarks/README.md``).

    Args:
        W2: ``(m, h)`` consumer weight.  C: ``(h, h)`` moment of its input.
        keep: ``(k,)`` kept unit indices.
    """
    S = keep.long()
    if S.numel() == 0:
        return W2.new_zeros(W2.shape[0], 0)
    CSS = C[S][:, S]  # (k, k)
    scale = float(torch.diagonal(CSS).mean()) if S.numel() else 0.0
    d = max(damping, 0.0) * scale + 1e-12 * max(scale, 1.0)
    A = CSS + d * torch.eye(S.numel(), dtype=C.dtype)
    rhs = W2 @ C[:, S] + d * W2[:, S]  # (m, k)
    L = torch.linalg.cholesky(A)
    return torch.cholesky_solve(rhs.T, L).T  # (m, k): rhs A^-1 (A symmetric)


def pruned_error(W2: torch.Tensor, W2S: torch.Tensor, keep: torch.Tensor, C: torch.Tensor | None,
                 mu_fold: torch.Tensor | None = None, mu: torch.Tensor | None = None) -> float:
    """Relative output error ``sqrt(E||r||^2 / tr(W2 C W2^T))`` of the consumer after
    pruning to ``keep`` with weight ``W2S`` (``C=None``: the weight error).

    Without ``mu_fold`` the residual is ``r = D h`` with ``D = W2 - W2S P_S``:
    ``E||r||^2 = tr(D C D^T)``. With ``mu_fold`` (the mean the bias was corrected at,
    ``D mu_fold`` added to the bias) it is ``r = D (h - mu_fold)``, whose energy under a
    moment ``C`` with mean ``mu`` (default ``mu_fold``) is
    ``tr(D C D^T) - 2 (D mu_fold).(D mu) + ||D mu_fold||^2``.
    """
    D = W2.clone()
    D[:, keep.long()] -= W2S
    if C is None:
        num, den = float((D * D).sum()), float((W2 * W2).sum())
    else:
        num, den = float(((D @ C) * D).sum()), float(((W2 @ C) * W2).sum())
        if mu_fold is not None:
            shift = D @ mu_fold
            num += float(shift @ shift) - 2.0 * float(shift @ (D @ (mu_fold if mu is None else mu)))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def units_for_cost(cost: int, per_unit: int, units: int) -> int:
    """Most units ``k <= units`` whose pruned group costs ``k * per_unit <= cost``."""
    return max(0, min(units, cost // max(per_unit, 1)))


@dataclass
class PrunedGroup:
    """One coupling group pruned to its ``k`` most important units.

    Attributes:
        keep: ``(k,)`` kept units in window order (most important first).
        order: ``(h,)`` the full coupled permutation (``keep`` then the pruned units).
        consumer_weight: ``(m, k)`` the refit consumer weight on the kept units.
        fit_error: the consumer's relative error on the fit moment.
        heldout_error: the same on the held-out moment (None without one).
        cost: exact cost of the group's pruned layers.
        bias_shift: ``(m,)`` added to the consumer's bias: the dropped units' mean
            output and what the refit moved (None: the bias stays).
    """

    keep: torch.Tensor
    order: torch.Tensor
    consumer_weight: torch.Tensor
    fit_error: float
    heldout_error: float | None
    cost: int
    bias_shift: torch.Tensor | None = None


def prune_group(
    W2: torch.Tensor,
    C_fit: torch.Tensor,
    k: int,
    per_unit: int,
    C_hold: torch.Tensor | None = None,
    damping: float = 0.01,
    refit: bool = True,
    unit_size: int = 1,
    select: str = "obs",
    order: torch.Tensor | None = None,
    mu_fit: torch.Tensor | None = None,
    mu_hold: torch.Tensor | None = None,
) -> PrunedGroup:
    """Choose ``k`` units by importance on the fit moment, refit the consumer, and
    measure its error on the fit and held-out moments.

    Args:
        W2: ``(m, h)`` consumer weight (float64).
        C_fit: ``(h, h)`` consumer input moment on the fit batches (unregularized).
        k: units to keep.  per_unit: exact cost of one kept unit over the group's layers.
        C_hold: the same moment on held-out batches.
        damping: of the refit (:func:`ls_refit`).
        refit: least-squares refit (False: plain pruning, ``W2[:, S]``).
        unit_size: consumer columns per unit (attention: columns of a head, or of a
            key/value group's query heads); a unit's importance is its columns' sum.
        select: ``"obs"`` (:func:`obs_order`, elimination that accounts for the
            refit) or ``"importance"`` (:func:`unit_importance`, Kwon et al.).
        order: a unit order an earlier call returned (``PrunedGroup.order``), reused
            instead of selecting again: the OBS order keeps the units in the reverse
            of their elimination, so its first ``k + 1`` are the greedy path's state
            one unit earlier.
        mu_fit: ``(h,)`` mean of the consumer's input on the fit batches. Given, the
            refit is on the centered moment and the consumer's bias takes the rest:
            ``b' = b + W2 mu - W2' mu_S``, so the dropped units' mean output is kept
            (a GELU or SiLU unit's mean is far from zero; without it, all-MiniLM-L6-v2
            pruned at budget 0.3 by the global unit rule kept news cosine 0.51).
        mu_hold: the same on the held-out batches (the held-out error's mean).
    """
    if select not in ("obs", "importance"):
        raise ValueError(f"select must be obs or importance, got {select!r}")
    units = W2.shape[1] // unit_size
    # With the mean folded into the bias, what a unit carries is its variation: the
    # selection and the refit both work on the centered moment.
    C_ref = C_fit if mu_fit is None else C_fit - torch.outer(mu_fit, mu_fit)
    if order is not None:
        if order.numel() != units:
            raise ValueError(f"order has {order.numel()} units, the group {units}")
    elif select == "obs":
        order = obs_order(W2, C_ref, k, unit_size, damping)
    else:
        order = keep_order(unit_importance(W2, C_ref).reshape(units, unit_size).sum(1))
    keep = order[:k]
    cols = unit_rows(keep, unit_size)
    W2S = ls_refit(W2, C_ref, cols, damping) if refit else W2[:, cols].clone()
    shift = None
    if mu_fit is not None:
        shift = W2 @ mu_fit - W2S @ mu_fit[cols.long()]
    fit = pruned_error(W2, W2S, cols, C_fit, mu_fit)
    hold = None if C_hold is None else pruned_error(W2, W2S, cols, C_hold, mu_fit,
                                                   mu_hold if mu_fit is not None else None)
    return PrunedGroup(keep, order, W2S, fit, hold, k * per_unit, shift)


def pruned_structures(
    producers: Sequence[tuple[str, torch.Tensor, torch.Tensor | None, int]],
    consumer: tuple[str, torch.Tensor, torch.Tensor | None],
    pruned: PrunedGroup,
) -> dict[str, LayerStructure]:
    """The frozen records of a pruned group: each producer keeps rows ``[0, k)`` (its
    kept units' rows, all inputs), the consumer columns ``[0, k)`` (the refit weight),
    each as one full-rank block stored dense (an identity on its short side).

    Args:
        producers: ``(name, weight (h, n), bias (h,) or None, rows per unit)`` per
            producer (FFN: 1; attention: the head dimension, times the query heads of
            a key/value group for the query projection).
        consumer: ``(name, weight (m, h), bias (m,) or None)``.
        pruned: :func:`prune_group`'s result.

    The producers' biases are permuted whole: rows past the window are never read (the
    consumer's window ends where the kept units do), so their values do not matter.
    """
    keep, order = pruned.keep, pruned.order
    k = int(keep.numel())
    out: dict[str, LayerStructure] = {}
    for name, W, b, size in producers:
        h, n = W.shape
        rows = unit_rows(keep, size)
        r = int(rows.numel())
        blocks = [Block(0, r, 0, n, torch.eye(r, dtype=W.dtype), W[rows].clone())] if r else []
        bias = None if b is None else b[unit_rows(order, size)].clone()
        out[name] = LayerStructure(n, h, blocks, bias, name=name, info={"form": "pruned", "units": k})
    name, W2, b2 = consumer
    m, h = W2.shape
    W2S = pruned.consumer_weight.to(W2.dtype)
    c = int(W2S.shape[1])
    blocks = [Block(0, m, 0, c, W2S.clone(), torch.eye(c, dtype=W2.dtype))] if c else []
    bias = None if b2 is None else b2.clone()
    if pruned.bias_shift is not None:
        shift = pruned.bias_shift.to(W2.dtype)
        bias = shift.clone() if bias is None else bias + shift
    out[name] = LayerStructure(h, m, blocks, bias, name=name, info={"form": "pruned", "units": k})
    return out
