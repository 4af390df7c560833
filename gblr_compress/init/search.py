"""The per-layer window search on one weight, all in float64 except where noted.

Windows live on the original ``W``: a block with rows ``R`` and columns ``J`` is fitted
against ``G = E[R] C[:, J]`` and the sub-moment ``C_JJ = L_J L_J^T`` of its own columns
(``Z = G L_J^{-T}``, truncated SVD, map back by ``L_J^{-1}``), which is exactly the
whitened SVD when ``J`` is every column. A window chosen in the whitened space would not be
a window after mapping back.

Pieces, in the order :func:`~gblr_compress.init.init_layer` uses them: the constants of
one layer (:class:`LayerFit`), the residual with its block fits and window profiles
(:class:`Residual`), the (groups, rank) shapes to try (:func:`search_shapes`), the greedy
search (:func:`greedy_search`), the block-coordinate refit (:func:`refit`) and the short
gradient refinement of widths and locations (:func:`gd_refine`); plus the whitened SVD as
one full-width block (:func:`lowrank_blocks`). Fitted blocks are
:class:`~gblr_compress.structure.Block` records with float64 factors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gblr_compress.budget import project_widths_
from gblr_compress.gaudi import window_indices, window_slices
from gblr_compress.init.config import InitConfig
from gblr_compress.init.linalg import cholesky, top_svd
from gblr_compress.layer import GBLRLinear
from gblr_compress.structure import Block

__all__ = [
    "LayerFit",
    "Residual",
    "best_windows",
    "choose_windows",
    "search_shapes",
    "greedy_search",
    "refit",
    "gd_refine",
    "lowrank_blocks",
    "assemble",
    "to_layer",
]

_F64 = torch.float64


# Window sums are computed this many (width, start) cells at a time (32 MiB of float64).
_WINDOW_CELLS = 1 << 22
# choose_windows compares every width pair while widths x the longer axis stay within
# this many cells (every layer of the models measured: 3,072 x 3,072), evenly spaced
# widths beyond. All widths of a 30,522-row LM head at once took a 7.5 GB temporary
# and 5.5 s per window choice (286 s for the layer's init; 37 s with 4,096 widths).
MAX_WIDTH_CELLS = 1 << 25


def best_windows(a: torch.Tensor, widths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each width in ``widths`` (default: every width ``0..n``), the largest cyclic
    window sum of ``a (n,)`` and its start; computed a bounded block of widths at a time."""
    n = a.numel()
    cs = torch.cat([a.new_zeros(1), torch.cumsum(torch.cat([a, a]), 0)])  # (2n+1,)
    if widths is None:
        widths = torch.arange(n + 1)
    # Each distinct width once, ascending: a run of consecutive widths (the usual case)
    # is read through a strided view, cs[s + w] at [w, s], without an index tensor.
    uniq, inverse = torch.unique(widths, return_inverse=True)
    k = uniq.numel()
    best = a.new_empty(k)
    start = torch.empty(k, dtype=torch.long)
    step = max(1, _WINDOW_CELLS // max(n, 1))
    for i in range(0, k, step):
        w = uniq[i : i + step]
        if int(w[-1] - w[0]) == w.numel() - 1:
            ends = cs[int(w[0]) :].as_strided((w.numel(), n), (1, 1))
        else:
            ends = cs[w[:, None] + torch.arange(n)[None, :]]
        best[i : i + step], start[i : i + step] = (ends - cs[:n]).max(dim=1)
    return best[inverse], start[inverse]


def choose_windows(
    a: torch.Tensor, b: torch.Tensor, total: int, r: int
) -> tuple[int, int, int, int] | None:
    """Row and column windows with ``rw + cw <= total`` maximizing captured energy.

    The energy a block captures is estimated as ``A(R) * B(J) / (A * B)`` from the row
    profile ``a (m,)`` and column profile ``b (n,)`` of the residual's leading components
    (exact for a rank-1 residual). Widths below ``r`` would waste rank, so they are not
    offered unless the axis is shorter. Where the widths times the longer axis exceed
    :data:`MAX_WIDTH_CELLS`, evenly spaced row widths that fit are compared (at least
    256).
    """
    m, n = a.numel(), b.numel()
    lo, hi = max(1, min(r, m)), min(m, total - max(1, min(r, n)))
    if hi < lo:
        return None
    rw = torch.arange(lo, hi + 1)
    cw = (total - rw).clamp(max=n)
    ok = cw >= max(1, min(r, n))
    rw, cw = rw[ok], cw[ok]
    if rw.numel() == 0:
        return None
    keep = max(256, MAX_WIDTH_CELLS // max(m, n))
    if rw.numel() > keep:
        pick = torch.linspace(0, rw.numel() - 1, keep).round().long().unique()
        rw, cw = rw[pick], cw[pick]
    bestA, startA = best_windows(a, rw)
    bestB, startB = best_windows(b, cw)
    score = bestA * bestB
    j = int(torch.argmax(score))
    return int(startA[j]) % m, int(rw[j]), int(startB[j]) % n, int(cw[j])


class LayerFit:
    """Per-layer constants shared by every search on one weight: ``W``, the regularized
    moment ``C = L L^T`` and products of them, plus Cholesky factors of the column
    sub-moments ``C_JJ`` (keyed by window; the same windows recur across shapes and refits).
    """

    def __init__(self, W: torch.Tensor, C: torch.Tensor, L: torch.Tensor) -> None:
        self.W, self.C, self.L = W, C, L
        self.WC = W @ C  # (m, n)
        self.WL = W @ L  # (m, n) whitened weight
        self.diagC = C.diagonal().clone()  # (n,)
        self.L32 = L.float()  # for the float32 window profiles
        self.total = float((W * self.WC).sum())
        self._chol: dict[tuple[int, int], torch.Tensor] = {}

    def chol(self, cs: int, cw: int) -> torch.Tensor:
        """Lower Cholesky factor ``(cw, cw)`` of ``C_JJ`` for the column window ``(cs, cw)``."""
        key = (cs, cw)
        if key not in self._chol:
            J = torch.tensor(window_indices(cs, cw, self.C.shape[0]))
            self._chol[key] = cholesky(self.C[J][:, J])
        return self._chol[key]


class Residual:
    """Residual ``E = W - W_hat`` kept together with ``E C`` (so block fits are cheap),
    updated per block, and the whitened residual ``E L`` (for the window profiles).

    ``tr(E C E^T) = sum(E * EC)`` is the absolute squared output error.
    """

    def __init__(self, lay: LayerFit) -> None:
        self.lay = lay
        self.C, self.L = lay.C, lay.L
        self.E = lay.W.clone()  # (m, n)
        self.EC = lay.WC.clone()  # (m, n)
        # E L is only read by the window profiles, once per greedy step, while refits add
        # and remove blocks many times: it is recomputed on demand instead of kept in sync.
        self._EL: torch.Tensor | None = lay.WL
        self.total = lay.total

    def add(self, g: Block, sign: float) -> None:
        """``E[R, J] += sign * U V``; keeps ``EC`` in sync (``O(rw cw n)``)."""
        m, n = self.E.shape
        J = g.col_indices(n)
        U = sign * g.U  # (rw, r)
        B = U @ g.V  # (rw, cw)
        CJ = self.C[J]  # (cw, n)
        if g.rank * (g.row_width + g.col_width) < g.row_width * g.col_width:
            BC = U @ (g.V @ CJ)  # through the rank: O(r (rw + cw) n)
        else:
            BC = B @ CJ  # (rw, n)
        self._EL = None
        # Contiguous slices instead of advanced indexing: index_put on (rw, cw) is slow.
        i = 0
        for r0, r1 in window_slices(g.row_start, g.row_width, m):
            rows = slice(i, i + r1 - r0)
            j = 0
            for c0, c1 in window_slices(g.col_start, g.col_width, n):
                self.E[r0:r1, c0:c1] += B[rows, j : j + c1 - c0]
                j += c1 - c0
            self.EC[r0:r1] += BC[rows]
            i += r1 - r0

    def error2(self) -> float:
        return max(float((self.E * self.EC).sum()), 0.0)

    def fit(self, rs: int, rw: int, cs: int, cw: int, r: int) -> tuple[Block, float]:
        """Best rank-``r`` block on the windows against the current residual, and its
        error reduction ``||trunc_r(G L_J^{-T})||^2``."""
        m, n = self.E.shape
        R = torch.tensor(window_indices(rs, rw, m))
        J = torch.tensor(window_indices(cs, cw, n))
        G = self.EC[R][:, J]  # (rw, cw)
        Lj = self.lay.chol(cs, cw)  # (cw, cw)
        Z = torch.linalg.solve_triangular(Lj, G.T, upper=False).T  # G Lj^{-T}: (rw, cw)
        P, S, Qh = top_svd(Z, r)
        k = S.numel()
        root = S.sqrt()
        U = torch.zeros(rw, r, dtype=_F64)
        V = torch.zeros(r, cw, dtype=_F64)
        U[:, :k] = P * root
        Vw = root[:, None] * Qh  # (k, cw) in whitened coordinates
        V[:k] = torch.linalg.solve_triangular(Lj.T, Vw.T, upper=True).T  # Vw Lj^{-1}
        return Block(rs, rw, cs, cw, U, V), float((S * S).sum())

    def profiles(self, t: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row ``(m,)`` and column ``(n,)`` energy of the residual's top-1 and top-``t``
        whitened components (one pair, or two when ``t > 1``), in original coordinates.

        Rows are unchanged by whitening; a column's share is its squared column norm of
        the mapped-back truncation times ``C_jj``. One float32 eigendecomposition serves
        both: the profiles only rank windows, the fit itself is float64.
        """
        m, n = self.E.shape
        t = max(1, min(t, m, n))
        if self._EL is None:
            self._EL = self.E.float() @ self.lay.L32  # (m, n); profiles only rank windows
        ZE = self._EL.float()  # (m, n)
        if m <= n:
            evals, evecs = torch.linalg.eigh(ZE @ ZE.T)  # (m,), (m, m) ascending
            P = evecs[:, -t:].flip(1)  # (m, t)
            s2 = evals[-t:].flip(0).clamp_min(0.0)  # (t,)
            rows = P * P * s2  # (m, t): per-component row energy
            # S Qh L^{-1} = P^T E L L^{-1} = P^T E: no triangular solve needed.
            cols = (P.T @ self.E.float()) ** 2  # (t, n)
        else:
            evals, evecs = torch.linalg.eigh(ZE.T @ ZE)  # (n,), (n, n) ascending
            Q = evecs[:, -t:].flip(1)  # (n, t)
            s2 = evals[-t:].flip(0).clamp_min(0.0)  # (t,)
            rows = (ZE @ Q) ** 2  # (m, t) = (P S)^2
            # Qh L^{-1}: solve X L = Q^T with L lower triangular.
            QL = torch.linalg.solve_triangular(self.lay.L32, Q.T, upper=False, left=False)
            cols = QL**2 * s2[:, None]  # (t, n) = (S Qh L^{-1})^2
        diag = self.lay.diagC.float()  # (n,)
        out = [(rows[:, 0].double(), (cols[0] * diag).double())]
        if t > 1:
            out.append((rows.sum(1).double(), (cols.sum(0) * diag).double()))
        return out


def search_shapes(m: int, n: int, cost: int, cfg: InitConfig) -> list[tuple[int, int]]:
    """(groups, rank) pairs to try: groups of widths ``f (m + n)`` filling the cost.

    Group counts are the powers of two up to ``max_groups`` and ``max_groups`` itself
    (1, 2, 4 by default): neighbouring counts give near-identical structures, and each
    greedy step costs an eigendecomposition of the residual. A single group tries only
    the widest fraction: one small window leaves most of a weight uncovered, and it cannot
    be abandoned early (see ``greedy_search``), so it only cost time.
    """
    counts = sorted({1 << i for i in range(cfg.max_groups.bit_length())} | {cfg.max_groups})
    shapes = []
    for K in (k for k in counts if k <= cfg.max_groups):
        for f in cfg.width_fractions if K > 1 else [max(cfg.width_fractions)]:
            total = max(2, int(f * (m + n)))
            r = cost // (K * total)
            if r >= 1 and (K, r) not in shapes:
                shapes.append((K, r))
    return shapes


# A greedy search whose residual, part-way, is this much above the whitened SVD's error at
# the same spent cost is abandoned: on transformer layers such searches never caught up
# (their final error stayed 1.1-6x the SVD's), and they were most of the init time.
_ABANDON_RATIO = 1.1


def greedy_search(
    res: Residual, cost: int, K: int, r: int, svd_err2: Callable[[int], float] | None = None
) -> list[Block]:
    """Fit ``K`` rank-``r`` groups one after another on the residual, each within an even
    share of the cost left, windows placed where the residual's leading components carry
    their energy (profiles of the top-1 and the top-``r`` components are both tried).

    ``svd_err2(c)``: squared error of the whitened SVD at cost ``c``; when given, the search
    returns no groups once it falls hopelessly behind it (see ``_ABANDON_RATIO``).
    """
    groups: list[Block] = []
    left = cost
    for k in range(K):
        if svd_err2 is not None and 0 < k and res.error2() > _ABANDON_RATIO * svd_err2(cost - left):
            return []
        total = (left // (K - k)) // r  # widths the group may span: rw + cw
        if total < 2:
            break
        best: tuple[Block, float] | None = None
        tried = set()
        for a, b in res.profiles(r):
            win = choose_windows(a, b, total, r)
            if win is None or win in tried:
                continue
            tried.add(win)
            g, gain = res.fit(*win, r)
            if best is None or gain > best[1]:
                best = (g, gain)
        if best is None or best[1] <= 0.0:
            break
        res.add(best[0], -1.0)
        groups.append(best[0])
        left -= best[0].cost
    return groups


def refit(res: Residual, groups: list[Block], sweeps: int) -> list[Block]:
    """Block-coordinate descent on the content with windows fixed (never increases the
    error): each group is refitted against the residual of all the others."""
    r = groups[0].rank if groups else 0
    for _ in range(sweeps):
        for k, g in enumerate(groups):
            res.add(g, +1.0)
            new, _ = res.fit(g.row_start, g.row_width, g.col_start, g.col_width, r)
            res.add(new, -1.0)
            groups[k] = new
    return groups


def gd_refine(
    lay: LayerFit, groups: list[Block], r: int, cost: int, cfg: InitConfig
) -> list[Block]:
    """Short Adam descent on U, V, widths and locations with annealed Gaudi masks.

    The loss is the relative output error in trace form, evaluated through the low-rank
    factors (``tr(A B C W^T)``, ``tr(A^T A B C B^T)``) so a step costs ``O(K r n^2)``, not
    ``O(m n^2)``. Widths are projected onto the layer's allocation after every step.
    Returns the groups at the rounded final windows (content to be refitted).
    """
    W, C = lay.W, lay.C
    m, n = W.shape
    dt = torch.float32  # structure refinement tolerates float32; the refit is float64
    proto = nn.Linear(n, m, bias=False)
    proto.weight.data = W.to(dt)
    layer = to_layer(groups, proto, r).to(dt)
    layer.train()
    layer.round_ste = True
    Cd, CWt = C.to(dt), lay.WC.T.to(dt)  # (n, n), (n, m): C W^T = (W C)^T, C symmetric
    energy = lay.total
    if not energy > 0.0:
        return groups
    scale_u = float(layer.U.detach().abs().max()) or 1.0
    scale_v = float(layer.V.detach().abs().max()) or 1.0
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(
        [
            {"params": [layer.U], "lr": cfg.refine_lr * scale_u},
            {"params": [layer.V], "lr": cfg.refine_lr * scale_v},
            {"params": [layer.widths, layer.locations], "lr": 1.0 / max(m, n)},
        ]
    )
    s0, s1 = max(m, n) / 8.0, 4.0 * max(m, n)
    steps = cfg.refine_steps
    for i in range(steps):
        layer.sigma.fill_(s0 * (s1 / s0) ** (i / max(steps - 1, 1)))
        A, B = layer.factors(hard=False)  # (m, Kr), (Kr, n)
        BC = B @ Cd  # (Kr, n)
        cross = (A.T * (B @ CWt)).sum()  # tr(A B C W^T)
        quad = ((A.T @ A) * (BC @ B.T)).sum()  # tr(A B C B^T A^T)
        loss = (energy - 2.0 * cross + quad) / energy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        layer.clamp_structure_()
        project_widths_([layer], cost, iters=30)  # 2^-30 of the shift range is plenty here
    return [
        Block(*b.window_key(), b.U.to(_F64), b.V.to(_F64)) for b in layer.to_blocks()
    ]


def assemble(groups: Sequence[Block], m: int, n: int) -> torch.Tensor:
    W_hat = torch.zeros(m, n, dtype=_F64)
    for g in groups:
        W_hat[g.row_indices(m)[:, None], g.col_indices(n)[None, :]] += g.U @ g.V
    return W_hat


def lowrank_blocks(
    W: torch.Tensor, L: torch.Tensor, rank: int, WL: torch.Tensor | None = None
) -> list[Block]:
    """Whitened truncated SVD as one full-width group: ``trunc_R(W L) L^{-1}``
    (``WL``: the whitened weight when already computed)."""
    m, n = W.shape
    if rank <= 0:
        return []
    P, S, Qh = top_svd(W @ L if WL is None else WL, rank)  # (m, R), (R,), (R, n)
    root = S.sqrt()
    V = torch.linalg.solve_triangular(L.T, (root[:, None] * Qh).T, upper=True).T  # (R, n)
    return [Block(0, m, 0, n, P * root, V)]


def to_layer(
    blocks: Sequence[Block], linear: nn.Linear, r: int, num_groups: int | None = None
) -> GBLRLinear:
    """A GBLRLinear of rank-``r`` groups holding the blocks at their exact windows, with
    the bias, dtype and device of ``linear`` (the dense layer it replaces)."""
    weight = linear.weight
    return GBLRLinear.from_blocks(
        blocks, linear.in_features, linear.out_features, linear.bias, rank=max(r, 1),
        num_groups=num_groups, device=weight.device, dtype=weight.dtype,
    )
