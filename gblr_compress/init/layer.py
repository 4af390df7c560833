"""One layer: the per-layer judge :func:`init_layer` and the SVD baselines.

Per layer: greedy window search on the residual for a few (groups, rank) shapes, a short
gradient descent on widths, locations and content (annealed Gaudi masks, widths projected
onto the layer's allocation), a block-coordinate refit of the content, and a judgement on
held-out batches against the whitened SVD at the same cost, which is kept when the windowed
structure does not beat it (:mod:`gblr_compress.init.search` has the pieces).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from gblr_compress.calib import Moment
from gblr_compress.errors import InputError
from gblr_compress.init.config import InitConfig, LayerInit
from gblr_compress.init.linalg import (
    ErrorMeter,
    cholesky,
    gram_spectrum,
    regularized_moment,
    relative_error,
    whitening_moment,
)
from gblr_compress.init.search import (
    LayerFit,
    Residual,
    assemble,
    gd_refine,
    greedy_search,
    lowrank_blocks,
    refit,
    search_shapes,
    to_layer,
)
from gblr_compress.layer import GBLRLinear
from gblr_compress.structure import Block
from gblr_compress.swap import as_linear

__all__ = ["init_layer", "truncated_svd_layer", "whitened_svd_layer"]

_F64 = torch.float64


def init_layer(
    linear: nn.Module,
    cost: int,
    cfg: InitConfig,
    moment: Moment | None = None,
    holdout: Moment | None = None,
    name: str = "",
) -> tuple[nn.Module, LayerInit]:
    """Initialize one layer as a GBLRLinear of exact cost ``<= cost``.

    Args:
        linear: the dense ``nn.Linear`` (or linear-like module).
        cost: allocated exact cost (multiply-adds per input vector).
        cfg: settings; ``cfg.data_free`` or ``moment=None`` uses the weight error.
        moment: input second moment on the fit batches.
        holdout: input second moment on held-out batches, used to judge the windowed
            structure against the whitened SVD.
        name: dotted name, for the record.

    Returns:
        ``(module, record)``: a GBLRLinear, or ``linear`` itself when the allocation
        reaches the dense cost (``status="skipped"``).
    """
    t0 = time.perf_counter()
    lin = as_linear(linear)
    m, n = lin.out_features, lin.in_features
    dense_cost = m * n
    if cost < 0:
        raise InputError(f"allocated cost must be >= 0, got {cost}")
    data_free = cfg.data_free or moment is None
    record = dict(
        name=name, in_features=n, out_features=m, allocated_cost=int(cost), dense_cost=dense_cost
    )
    if cost >= dense_cost:
        rec = LayerInit(
            status="skipped", reason="allocation reaches the dense cost", exact_cost=dense_cost,
            rank=0, groups=0, calib_error=0.0, heldout_error=0.0 if holdout else None,
            baseline_heldout_error=None, seconds=time.perf_counter() - t0, **record,
        )
        return linear, rec

    W = lin.weight.detach().to("cpu", _F64)  # (m, n)
    # A moment that cannot whiten (non-finite, singular beyond damping) makes this
    # layer data-free; the note goes to the report.
    C, note, unusable = whitening_moment(None if data_free else moment, n, cfg.damping)  # (n, n)
    data_free = data_free or unusable
    L = cholesky(C)
    C_fit = None if data_free else moment.mean().to(_F64)  # unregularized, for reporting
    C_hold = None if (data_free or holdout is None) else holdout.mean().to(_F64)
    if C_hold is not None and not bool(torch.isfinite(C_hold).all()):
        C_hold = None  # held-out inputs overflow: no held-out judgement for this layer

    # Baseline: (whitened) truncated SVD at the same cost.
    R = cost // (m + n)
    lay = LayerFit(W, C, L)
    base = lowrank_blocks(W, L, R, lay.WL)
    base_W = assemble(base, m, n)
    base_fit = relative_error(W, base_W, C)
    fit_err, hold_err = ErrorMeter(W, C_fit), ErrorMeter(W, C_hold)

    # Windowed search: best greedy structure over a few (groups, rank) shapes.
    best: tuple[float, list[Block], int] | None = None
    spectrum = torch.cumsum(gram_spectrum(lay.WL), 0)  # captured energy by SVD rank

    def svd_err2(c: int) -> float:
        rank = min(c // (m + n), spectrum.numel())
        return lay.total - (float(spectrum[rank - 1]) if rank > 0 else 0.0)

    for K, r in search_shapes(m, n, cost, cfg):
        res = Residual(lay)
        groups = greedy_search(res, cost, K, r, svd_err2)
        if not groups:
            continue
        err2 = res.error2()
        if best is None or err2 < best[0]:
            best = (err2, groups, r)

    chosen, status, reason, r_out = base, "lowrank", "", R
    if best is not None:
        _, groups, r = best
        res = Residual(lay)
        for g in groups:
            res.add(g, -1.0)
        groups = refit(res, groups, cfg.refit_sweeps)
        err_search = res.error2()
        base_err2 = (base_fit**2) * lay.total
        if cfg.refine_steps > 0 and err_search <= (1.0 + cfg.refine_within) * base_err2:
            refined = gd_refine(lay, [*groups], r, cost, cfg)
            if refined:
                res2 = Residual(lay)
                for g in refined:
                    res2.add(g, -1.0)
                refined = refit(res2, refined, max(cfg.refit_sweeps, 1))
                if res2.error2() < err_search:
                    groups, err_search = refined, res2.error2()
        win_W = assemble(groups, m, n)
        # The residual already holds tr(D C D^T) for these groups.
        win_fit = math.sqrt(err_search / lay.total) if lay.total > 0.0 else 0.0
        if not win_fit < base_fit:
            reason = f"window search did not beat the {'whitened ' if not data_free else ''}SVD on fit data ({win_fit:.4f} vs {base_fit:.4f})"
        elif C_hold is not None and not (
            hold_err("win", win_W) < (1.0 - cfg.min_gain) * hold_err("base", base_W)
        ):
            reason = (
                "windowed gain did not hold out "
                f"({hold_err('win', win_W):.4f} vs "
                f"{hold_err('base', base_W):.4f} on held-out batches)"
            )
        else:
            chosen, status, r_out = groups, "gblr", r
    else:
        reason = "no windowed structure fits the allocation"
    if R == 0 and status == "lowrank":
        reason = "allocation below one full-width component; the layer keeps only its bias"

    module = to_layer(chosen, lin, r_out, num_groups=len(chosen) or 1)
    key, W_hat = ("win", win_W) if status == "gblr" else ("base", base_W)
    rec = LayerInit(
        status=status,
        reason=reason,
        exact_cost=module.exact_cost(),
        rank=r_out if chosen else 0,
        groups=len(chosen),
        calib_error=fit_err(key, W_hat),
        heldout_error=None if C_hold is None else hold_err(key, W_hat),
        baseline_heldout_error=None if C_hold is None else hold_err("base", base_W),
        baseline_calib_error=fit_err("base", base_W),
        seconds=time.perf_counter() - t0,
        note=note,
        **record,
    )
    assert rec.exact_cost <= cost, "init must stay within the layer's allocation"
    return module, rec


def truncated_svd_layer(linear: nn.Module, rank: int) -> GBLRLinear:
    """Plain truncated SVD of the weight as a GBLRLinear with one full-width group.

    Args:
        linear: an ``nn.Linear`` (or linear-like module).
        rank: kept rank; cost ``rank * (m + n)``.
    """
    if rank < 1:
        raise InputError(f"rank must be >= 1, got {rank}")
    lin = as_linear(linear)
    W = lin.weight.detach().to("cpu", _F64)
    return to_layer(lowrank_blocks(W, torch.eye(W.shape[1], dtype=_F64), rank), lin, rank)


def whitened_svd_layer(
    linear: nn.Module, rank: int, moment: Moment | None, damping: float = 0.1
) -> GBLRLinear:
    """Activation-aware truncated SVD (``trunc_R(W L) L^{-1}``, ``C = L L^T``) as a
    GBLRLinear with one full-width group. ``moment=None`` is the plain truncated SVD.

    Args:
        linear: an ``nn.Linear`` (or linear-like module).
        rank: kept rank; cost ``rank * (m + n)``.
        moment: the input second moment of the layer (see :func:`collect_moments`).
        damping: diagonal regularization as a fraction of the moment's mean diagonal.
    """
    if rank < 1:
        raise InputError(f"rank must be >= 1, got {rank}")
    lin = as_linear(linear)
    W = lin.weight.detach().to("cpu", _F64)
    L = cholesky(regularized_moment(moment, W.shape[1], damping))
    return to_layer(lowrank_blocks(W, L, rank), lin, rank)
