"""Low-rank baselines at an exact cost: plain SVD, ASVD-style and SVD-LLM-style whitened SVD.

Everything here is one small module so it can be swapped for gblr_compress's own
``truncated_svd_layer`` / ``whitened_svd_layer`` once those exist.

Cost model (the same as GBLR.md section 2): a rank-r factorization of an (m, n) Linear
costs ``r * (m + n)`` multiply-adds per token, the dense layer ``m * n``. Each layer gets
the same cost ratio, ``r = floor(B * m * n / (m + n))``, so the summed cost is at most
``B * sum(m * n)`` (rounding down makes it slightly less; the exact integer is reported).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from benchmarks.common import single_thread
from gblr_compress.errors import InputError

__all__ = [
    "ActivationStats",
    "LowRankLinear",
    "asvd_layer",
    "collect_activation_stats",
    "compress_linears",
    "low_rank_cost",
    "rank_for_budget",
    "truncated_svd_layer",
    "whitened_svd_layer",
]


class LowRankLinear(nn.Module):
    """``y = B (A x) + bias``: two Linears, n -> r without bias, r -> m with the bias.

    Args:
        first: (r, n) weight of the n -> r map (A).
        second: (m, r) weight of the r -> m map (B).
        bias: (m,) bias of the original layer, or None.
    """

    def __init__(self, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        r, n = first.shape
        m = second.shape[0]
        if second.shape[1] != r:
            raise ValueError(f"factor shapes do not chain: {tuple(first.shape)} then {tuple(second.shape)}")
        self.first = nn.Linear(n, r, bias=False)
        self.second = nn.Linear(r, m, bias=bias is not None)
        with torch.no_grad():
            self.first.weight.copy_(first)
            self.second.weight.copy_(second)
            if bias is not None:
                self.second.bias.copy_(bias)

    @property
    def rank(self) -> int:
        return self.first.out_features

    def exact_cost(self) -> int:
        """Multiply-adds per token: ``r * (m + n)``."""
        return self.rank * (self.first.in_features + self.second.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., n)
        return self.second(self.first(x))  # (..., m)


def rank_for_budget(m: int, n: int, budget: float) -> int:
    """Largest rank whose cost ``r*(m+n)`` is within ``budget * m * n`` (at least 1)."""
    if not 0.0 < budget <= 1.0:
        raise InputError(f"budget must be in (0, 1], got {budget}")
    return max(1, int(budget * m * n // (m + n)))


def low_rank_cost(model: nn.Module) -> int:
    """Exact summed cost of all :class:`LowRankLinear` layers in ``model``."""
    return sum(mod.exact_cost() for mod in model.modules() if isinstance(mod, LowRankLinear))




def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with single_thread():
        return torch.linalg.svd(a, full_matrices=False)


def _factor(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the rank-r truncation ``U S Vh`` into balanced factors (sqrt(S) on each side)."""
    root = s[:rank].sqrt()  # (r,)
    second = u[:, :rank] * root  # (m, r)
    first = root[:, None] * vh[:rank]  # (r, n)
    return first, second


def truncated_svd_layer(linear: nn.Linear, rank: int) -> LowRankLinear:
    """Best rank-r approximation of the weight in Frobenius norm (Eckart-Young)."""
    w = linear.weight.detach().double()  # (m, n)
    u, s, vh = _svd(w)
    first, second = _factor(u, s, vh, rank)
    return LowRankLinear(first.float(), second.float(), _bias(linear))


def asvd_layer(linear: nn.Linear, rank: int, mean_abs: torch.Tensor, alpha: float = 0.5) -> LowRankLinear:
    """ASVD-style: SVD of ``W diag(s)`` with ``s = mean|x|^alpha``, then undo the scaling.

    Columns fed by large activations are approximated more carefully.

    Args:
        linear: the dense layer, weight (m, n).
        rank: kept rank.
        mean_abs: (n,) mean absolute input activation per column (calibration).
        alpha: scaling exponent (0.5 in the ASVD paper).
    """
    w = linear.weight.detach().double()  # (m, n)
    scale = mean_abs.double().clamp_min(1e-6) ** alpha  # (n,)
    u, s, vh = _svd(w * scale)
    first, second = _factor(u, s, vh, rank)
    first = first / scale  # (r, n): map back to the original input coordinates
    return LowRankLinear(first.float(), second.float(), _bias(linear))


def whitened_svd_layer(linear: nn.Linear, rank: int, gram: torch.Tensor, damping: float = 1e-2) -> LowRankLinear:
    """SVD-LLM-style: minimize ``||X (W - W_r)^T||_F`` via the Cholesky factor of ``X^T X``.

    With ``X^T X + lambda I = L L^T``, ``||X E^T|| = ||E L||``, so the optimum is the
    truncated SVD of ``W L`` mapped back with ``L^{-1}``.

    Args:
        linear: the dense layer, weight (m, n).
        rank: kept rank.
        gram: (n, n) ``X^T X / N`` of the layer input over calibration tokens.
        damping: added to the diagonal as a fraction of its mean, so a rank-deficient or
            noisy Gram matrix still factors (and rare directions are not ignored).
    """
    w = linear.weight.detach().double()  # (m, n)
    g = gram.double()
    n = g.shape[0]
    g = g + damping * g.diagonal().mean() * torch.eye(n, dtype=g.dtype)
    with single_thread():
        chol = torch.linalg.cholesky(g)  # (n, n) lower triangular, g = L L^T
    u, s, vh = _svd(w @ chol)
    first, second = _factor(u, s, vh, rank)
    # first @ L^{-1}: solve Z L = first (triangular) instead of inverting L.
    first = torch.linalg.solve_triangular(chol, first, upper=False, left=False)  # (r, n)
    return LowRankLinear(first.float(), second.float(), _bias(linear))


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().clone()


class ActivationStats:
    """Per-layer input statistics over the non-padding calibration tokens.

    Attributes:
        gram: name -> (n, n) float64 ``X^T X / N``.
        mean_abs: name -> (n,) float64 mean ``|x|``.
        tokens: N, the number of tokens seen.
    """

    def __init__(self) -> None:
        self.gram: dict[str, torch.Tensor] = {}
        self.mean_abs: dict[str, torch.Tensor] = {}
        self.tokens = 0


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    batches: Iterable[dict[str, torch.Tensor]],
) -> ActivationStats:
    """Run the calibration batches and accumulate input moments of each listed Linear.

    Padding positions are dropped (they are not real inputs of the deployed model), so
    the statistics do not depend on how sentences were grouped into batches.

    Args:
        model: called as ``model(input_ids, attention_mask)``.
        linears: dotted name -> Linear inside ``model``.
        batches: dicts with ``input_ids`` and ``attention_mask`` (B, T).
    """
    stats = ActivationStats()
    sums: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def fn(_mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            x = args[0][current["keep"]].double()  # (N_real, n)
            if name not in stats.gram:
                stats.gram[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                sums[name] = torch.zeros(x.shape[1], dtype=torch.float64)
            stats.gram[name] += x.T @ x
            sums[name] += x.abs().sum(0)

        return fn

    handles = [mod.register_forward_hook(hook(name)) for name, mod in linears.items()]
    try:
        model.eval()
        # One thread: the float64 Gram updates thrash with 2 threads on a busy 2-core
        # box (measured 41 s vs 14 s for the 256 calibration sentences).
        with single_thread():
            for b in batches:
                current["keep"] = b["attention_mask"].bool()  # (B, T)
                model(b["input_ids"], b["attention_mask"])
                stats.tokens += int(current["keep"].sum())
    finally:
        for h in handles:
            h.remove()
    if stats.tokens == 0:
        raise InputError("calibration batches contain no tokens")
    for name in stats.gram:
        stats.gram[name] /= stats.tokens
        stats.mean_abs[name] = sums[name] / stats.tokens
    return stats


def compress_linears(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    budget: float,
    make_layer: Callable[[str, nn.Linear, int], nn.Module],
) -> nn.Module:
    """Replace each listed Linear (in place) by ``make_layer(name, linear, rank)``.

    Args:
        model: the model to edit (pass a deep copy to keep the dense one).
        linears: dotted name -> Linear inside ``model``.
        budget: cost ratio B; each layer gets ``rank_for_budget(m, n, B)``.
        make_layer: builds the replacement from the dense layer and its rank.

    Returns:
        ``model``, edited.
    """
    for name, lin in linears.items():
        rank = rank_for_budget(lin.out_features, lin.in_features, budget)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make_layer(name, lin, rank))
    return model
