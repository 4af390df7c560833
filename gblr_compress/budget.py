"""The global FLOP budget: exact costs across layers and the proximal / projection step.

The budget is global (GBLR.md s.2): summed over all compressed layers, the exact cost of
the rounded structure must be ``<= floor(B * dense cost)``. Widths move toward it by a
shared shift ``tau`` weighted by what a unit of width costs in each layer:

    w <- clamp(w - tau * r * d, 0, 1)        d = m for row widths, n for column widths

which is the Euclidean projection of the fractional widths onto the linear budget set
(before rounding). The exact rounded cost is non-increasing in ``tau``, so a 1-D bisection
finds the smallest shift that meets the budget exactly.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from gblr_compress.errors import InputError
from gblr_compress.gaudi import round_width
from gblr_compress.layer import GBLRLinear

__all__ = [
    "budget_cost",
    "total_cost",
    "width_prices",
    "shrink_widths_",
    "project_widths_",
]


def budget_cost(layers: Sequence[GBLRLinear], budget: float) -> int:
    """``floor(budget * sum of dense costs)``: the exact cost the layers may use."""
    if not 0.0 < budget <= 1.0:
        raise InputError(f"budget must be in (0, 1], got {budget}")
    return math.floor(budget * sum(layer.dense_cost for layer in layers))


def total_cost(layers: Sequence[GBLRLinear]) -> int:
    """Summed exact cost of the layers' rounded structures."""
    return sum(layer.exact_cost() for layer in layers)


def width_prices(layer: GBLRLinear) -> torch.Tensor:
    """``(2, 1)`` cost of a full unit of fractional width: ``r*m`` for rows, ``r*n`` for cols."""
    d = torch.tensor([[layer.out_features], [layer.in_features]], dtype=torch.float64)
    return layer.rank * d


def _shifted(layer: GBLRLinear, tau: float) -> torch.Tensor:
    """Widths after a shift ``tau``, in float64 on CPU."""
    w = layer.widths.detach().double().cpu()
    return (w - tau * width_prices(layer)).clamp(0.0, 1.0)


def _cost_at(layers: Sequence[GBLRLinear], tau: float) -> int:
    """Exact cost the layers would have after a shift ``tau`` (widths rounded as frozen)."""
    cost = 0
    for layer in layers:
        w = _shifted(layer, tau).to(layer.widths.dtype)  # the dtype rounding will see
        rw = round_width(w[0], layer.out_features)
        cw = round_width(w[1], layer.in_features)
        alive = (rw > 0) & (cw > 0)
        cost += int((layer.rank * (rw + cw) * alive).sum())
    return cost


@torch.no_grad()
def shrink_widths_(layers: Sequence[GBLRLinear], tau: float) -> None:
    """Soft-threshold every width by ``tau`` times its price (the L1 proximal operator)."""
    if tau <= 0:
        return
    for layer in layers:
        layer.widths.copy_(_shifted(layer, tau).to(layer.widths))


@torch.no_grad()
def project_widths_(layers: Sequence[GBLRLinear], max_cost: int, iters: int = 60) -> float:
    """Shift all widths by one shared ``tau`` so the exact total cost is ``<= max_cost``.

    The smallest such ``tau`` (up to bisection precision) is applied; layers already
    within budget are left untouched (``tau = 0``).

    Args:
        layers: the GBLR layers that share the budget.
        max_cost: the exact integer cost allowed (see :func:`budget_cost`).
        iters: bisection steps.

    Returns:
        The shift applied.
    """
    if max_cost < 0:
        raise ValueError(f"max_cost must be >= 0, got {max_cost}")
    if _cost_at(layers, 0.0) <= max_cost:
        return 0.0
    lo = 0.0  # infeasible
    hi = max(1.0 / float(width_prices(layer).min()) for layer in layers)  # all widths 0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if _cost_at(layers, mid) <= max_cost:
            hi = mid
        else:
            lo = mid
    shrink_widths_(layers, hi)
    assert total_cost(layers) <= max_cost, "projection must meet the budget"
    return hi
