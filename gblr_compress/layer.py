"""GBLRLinear (trainable structure) and FrozenGBLR (static windows, fast forward).

A GBLRLinear holds ``K`` component groups; group ``k`` is a rank-``r`` block
``(U_k * a_k) @ (V_k * b_k)`` whose row mask ``a_k`` and column mask ``b_k`` are Gaudi
masks (see :mod:`gblr_compress.gaudi`). All ``r`` components of a group share one pair of
windows, so a layer can be a few large blocks, which is what runs fast after export.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gblr_compress.gaudi import (
    boxcar_mask,
    component_cost,
    gaudi_mask,
    round_start,
    round_width,
    window_indices,
    window_slices,
)
from gblr_compress.structure import Block, LayerStructure, canonical_block, merge_blocks

__all__ = ["GBLRLayerConfig", "GBLRLinear", "FrozenGBLR"]


@dataclass(frozen=True)
class GBLRLayerConfig:
    """Shape of the GBLR family for one layer.

    Attributes:
        num_groups: ``K``, the number of component groups (blocks with their own
            windows). Few, large blocks run fast in onnxruntime; keep this small.
        rank: ``r``, rank of each group (components sharing one pair of windows).
        sigma: initial Gaudi smoothing; ``None`` means the exact boxcar.
    """

    num_groups: int = 4
    rank: int = 1
    sigma: float | None = None

    def __post_init__(self) -> None:
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.sigma is not None and not self.sigma > 0:
            raise ValueError(f"sigma must be > 0 or None, got {self.sigma}")


class GBLRLinear(nn.Module):
    """Linear layer whose weight is a sum of ``K`` rank-``r`` masked blocks.

    Parameters (all trainable):
        U: ``(K, m, r)`` left factors.  V: ``(K, r, n)`` right factors.
        widths: ``(2, K)`` fractional widths, row 0 over outputs, row 1 over inputs.
        locations: ``(2, K)`` fractional starts, same layout; cyclic.
        bias: ``(m,)`` or None.

    ``sigma`` is a buffer (``inf`` = exact boxcar) that distillation anneals. In training
    mode the forward pass uses smooth Gaudi masks at ``sigma`` (straight-through rounded
    when ``round_ste`` is set); in eval mode it uses the exact rounded boxcars, i.e. the
    structure that freezing would deploy.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: GBLRLayerConfig = GBLRLayerConfig(),
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        K, r = config.num_groups, config.rank
        self.in_features = in_features
        self.out_features = out_features
        self.num_groups = K
        self.rank = r
        self.U = nn.Parameter(torch.zeros(K, out_features, r, **kw))  # (K, m, r)
        self.V = nn.Parameter(torch.zeros(K, r, in_features, **kw))  # (K, r, n)
        self.widths = nn.Parameter(torch.ones(2, K, **kw))  # (2, K): rows, cols
        self.locations = nn.Parameter(torch.zeros(2, K, **kw))  # (2, K)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        sigma = math.inf if config.sigma is None else float(config.sigma)
        self.register_buffer("sigma", torch.tensor(sigma, dtype=torch.float64))
        self.round_ste = False

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: GBLRLayerConfig = GBLRLayerConfig()
    ) -> GBLRLinear:
        """Full-width truncated-SVD start: group ``k`` takes singular triplets
        ``k*r .. (k+1)*r - 1`` of the dense weight, split as ``P sqrt(S)`` and
        ``sqrt(S) Q^T``. With ``K*r = min(m, n)`` the layer reproduces the weight;
        with ``K`` rank-1 groups it equals the rank-``K`` truncated SVD.

        Window search and budgets are :mod:`gblr_compress.init`'s job; this constructor
        only gives an exact, structure-agnostic starting point.
        """
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            config,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        P, S, Qh = torch.linalg.svd(weight.double(), full_matrices=False)
        K, r = config.num_groups, config.rank
        take = min(K * r, S.numel())
        root = S[:take].sqrt()
        U = torch.zeros(K * r, linear.out_features, dtype=torch.float64)
        V = torch.zeros(K * r, linear.in_features, dtype=torch.float64)
        U[:take] = (P[:, :take] * root).T
        V[:take] = root[:, None] * Qh[:take]
        with torch.no_grad():
            layer.U.copy_(U.reshape(K, r, -1).transpose(1, 2))
            layer.V.copy_(V.reshape(K, r, -1))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @classmethod
    @torch.no_grad()
    def from_blocks(
        cls,
        blocks: Sequence[Block],
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None = None,
        rank: int | None = None,
        num_groups: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> GBLRLinear:
        """A layer whose group ``k`` is ``blocks[k]`` at its exact windows (the inverse of
        :meth:`to_blocks`).

        Groups have rank ``rank`` (default: the largest block rank; lower-rank blocks are
        zero-padded) and there are ``num_groups`` of them (default: one per block; extra
        groups get zero widths, i.e. are dead). Windows are not canonicalized, so a block
        keeps its start even when it spans its whole axis. The layer is filled in
        float64 and then cast to ``dtype`` (default float32) on ``device``.

        Example:
            >>> layer = GBLRLinear.from_blocks(structure.blocks, n, m, structure.bias)
            >>> layer.exact_cost() == structure.cost
            True
        """
        m, n = out_features, in_features
        K = max(num_groups or len(blocks), 1)
        r = max(rank if rank is not None else max((b.rank for b in blocks), default=1), 1)
        f64 = torch.float64
        layer = cls(n, m, GBLRLayerConfig(num_groups=K, rank=r), bias=bias is not None, dtype=f64)
        layer.widths.zero_()
        for k, b in enumerate(blocks):
            R, J = b.row_indices(m), b.col_indices(n)
            layer.U[k, R, : b.rank] = b.U.to(f64)
            layer.V[k, : b.rank, J] = b.V.to(f64)
            layer.widths[0, k] = b.row_width / m
            layer.widths[1, k] = b.col_width / n
            layer.locations[0, k] = b.row_start / m
            layer.locations[1, k] = b.col_start / n
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer.to(device=device, dtype=torch.float32 if dtype is None else dtype)

    @torch.no_grad()
    def split_groups(self, num_groups: int) -> GBLRLinear:
        """A layer with ``num_groups`` groups made by splitting each group's rank.

        Each group's ``r`` components are cut into consecutive runs of rank
        ``r' = K * r // num_groups`` that keep the group's windows, so the new groups can
        shrink and die independently under the proximal step. Components past the last
        full run are dropped (for SVD-ordered content, the weakest ones); when every
        component is kept the function is unchanged.
        """
        K, m, r = self.U.shape
        if num_groups % K or num_groups < K or (num_groups // K) > r:
            raise ValueError(f"cannot split {K} groups of rank {r} into {num_groups}")
        per = num_groups // K  # new groups per old group
        r_new = r // per
        cfg = GBLRLayerConfig(num_groups=num_groups, rank=r_new)
        out = GBLRLinear(self.in_features, self.out_features, cfg, bias=self.bias is not None,
                         device=self.U.device, dtype=self.U.dtype)
        keep = per * r_new
        out.U.copy_(self.U[:, :, :keep].reshape(K, m, per, r_new).permute(0, 2, 1, 3).reshape(num_groups, m, r_new))
        out.V.copy_(self.V[:, :keep].reshape(K, per, r_new, -1).reshape(num_groups, r_new, -1))
        out.widths.copy_(self.widths.repeat_interleave(per, dim=1))
        out.locations.copy_(self.locations.repeat_interleave(per, dim=1))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.sigma.copy_(self.sigma)
        return out

    # -------------------------------------------------------------------- structure
    def integer_windows(self) -> dict[str, torch.Tensor]:
        """Rounded windows of every group as int64 ``(K,)`` tensors.

        Keys: ``row_start``, ``row_width``, ``col_start``, ``col_width``.
        """
        m, n = self.out_features, self.in_features
        return {
            "row_start": round_start(self.locations[0], m),
            "row_width": round_width(self.widths[0], m),
            "col_start": round_start(self.locations[1], n),
            "col_width": round_width(self.widths[1], n),
        }

    def group_costs(self) -> list[int]:
        """Exact cost of each group under the rounded structure (0 for dead groups)."""
        win = self.integer_windows()
        return [
            component_cost(int(rw), int(cw), self.rank)
            for rw, cw in zip(win["row_width"].tolist(), win["col_width"].tolist())
        ]

    def exact_cost(self) -> int:
        """Exact multiply-adds per input vector of the rounded structure (GBLR.md s.2):
        the cost of what freezing deploys, i.e. groups with identical windows merged into
        one block before :func:`~gblr_compress.gaudi.component_cost`'s rule (a merged
        block of full rank is stored dense, so it may cost less than its groups' sum)."""
        m, n = self.out_features, self.in_features
        win = self.integer_windows()
        ranks: dict[tuple[int, int, int, int], int] = {}
        for rs, rw, cs, cw in zip(*(win[k].tolist() for k in ("row_start", "row_width", "col_start", "col_width"))):
            if component_cost(rw, cw, self.rank) == 0:
                continue
            # canonical_block's rule: a full-width window is the same whatever its start.
            key = (0 if rw == m else rs, rw, 0 if cw == n else cs, cw)
            ranks[key] = ranks.get(key, 0) + self.rank
        return sum(component_cost(rw, cw, r) for (_, rw, _, cw), r in ranks.items())

    @property
    def dense_cost(self) -> int:
        """``m * n``: the cost of the dense layer this one replaces."""
        return self.out_features * self.in_features

    def masks(self, hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Row masks ``(K, m)`` and column masks ``(K, n)``.

        Args:
            hard: exact 0/1 boxcars of the rounded windows (no gradient to the
                structure); otherwise Gaudi masks at the current ``sigma``.
        """
        m, n = self.out_features, self.in_features
        if hard:
            win = self.integer_windows()
            dt = self.U.dtype
            rows = boxcar_mask(win["row_start"], win["row_width"], m).to(self.U.device, dt)
            cols = boxcar_mask(win["col_start"], win["col_width"], n).to(self.U.device, dt)
            return rows, cols
        sigma = None if math.isinf(float(self.sigma)) else float(self.sigma)
        rows = gaudi_mask(self.widths[0], self.locations[0], m, sigma, self.round_ste)
        cols = gaudi_mask(self.widths[1], self.locations[1], n, sigma, self.round_ste)
        return rows, cols

    def factors(self, hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked factors as one low-rank pair: ``A (m, K*r)`` and ``B (K*r, n)``,
        so that the layer's weight is ``A @ B``."""
        rows, cols = self.masks(hard)
        K, m, r = self.U.shape
        A = (self.U * rows[:, :, None]).permute(1, 0, 2).reshape(m, K * r)  # (m, K*r)
        B = (self.V * cols[:, None, :]).reshape(K * r, self.in_features)  # (K*r, n)
        return A, B

    def dense_weight(self, hard: bool | None = None) -> torch.Tensor:
        """The ``(m, n)`` weight ``sum_k (U_k a_k)(V_k b_k)``; ``hard`` defaults to eval mode."""
        A, B = self.factors(not self.training if hard is None else hard)
        return A @ B

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight as a detached tensor, for model code that reads a Linear's
        ``weight`` in its forward (HuggingFace's T5 checks ``wo.weight.dtype`` there):
        made anew on each read, never used by this layer's forward;
        :meth:`dense_weight` is the differentiable one."""
        with torch.no_grad():
            return self.dense_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., n)
        A, B = self.factors(hard=not self.training)
        m, n = self.out_features, self.in_features
        if A.shape[1] * (m + n) < m * n:
            y = (x @ B.T) @ A.T  # (..., K*r) -> (..., m)
        else:
            y = x @ (A @ B).T  # materializing is cheaper than the two-matmul path
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def clamp_structure_(self) -> None:
        """Keep widths in [0, 1] and locations in [0, 1) (cyclic) after an update."""
        self.widths.clamp_(0.0, 1.0)
        self.locations.sub_(torch.floor(self.locations))

    # ----------------------------------------------------------------------- freeze
    @torch.no_grad()
    def to_blocks(self) -> list[Block]:
        """The live groups as blocks at their rounded windows, factors cropped and copied
        (dtype and device of the layer), in group order; dead groups (zero cost) are
        dropped. Windows are as rounded: neither canonicalized nor merged."""
        m, n = self.out_features, self.in_features
        win = self.integer_windows()
        blocks = []
        for k in range(self.num_groups):
            rs, rw = int(win["row_start"][k]), int(win["row_width"][k])
            cs, cw = int(win["col_start"][k]), int(win["col_width"][k])
            if component_cost(rw, cw, self.rank) == 0:
                continue
            rows = torch.tensor(window_indices(rs, rw, m), device=self.U.device)
            cols = torch.tensor(window_indices(cs, cw, n), device=self.V.device)
            blocks.append(Block(rs, rw, cs, cw, self.U[k][rows].clone(), self.V[k][:, cols].clone()))
        return blocks

    @torch.no_grad()
    def to_structure(self, name: str = "") -> LayerStructure:
        """Freeze: round windows, drop dead groups, crop factors, merge identical windows."""
        m, n = self.out_features, self.in_features
        blocks = [canonical_block(b, m, n) for b in self.to_blocks()]
        bias = None if self.bias is None else self.bias.detach().clone()
        return LayerStructure(n, m, merge_blocks(blocks), bias, name=name)

    def to_frozen(self, name: str = "") -> FrozenGBLR:
        """A :class:`FrozenGBLR` computing the same eval-mode function."""
        return FrozenGBLR(self.to_structure(name))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"groups={self.num_groups}, rank={self.rank}, bias={self.bias is not None}"
        )


class FrozenGBLR(nn.Module):
    """Static-window GBLR layer: ``y[rows] += U @ (V @ x[cols])`` per block, plus bias.

    Its forward never materializes the ``(m, n)`` weight (``weight`` does, for model
    code that reads it). The factors are parameters, so a
    content-only recovery can fine-tune them with the windows fixed.
    """

    def __init__(self, structure: LayerStructure) -> None:
        super().__init__()
        self.in_features = structure.in_features
        self.out_features = structure.out_features
        self.name = structure.name
        self.info = dict(structure.info)
        self.windows = [b.window_key() for b in structure.blocks]
        self.U = nn.ParameterList([nn.Parameter(b.U.detach().clone()) for b in structure.blocks])
        self.V = nn.ParameterList([nn.Parameter(b.V.detach().clone()) for b in structure.blocks])
        self.bias = (
            None if structure.bias is None else nn.Parameter(structure.bias.detach().clone())
        )
        # Slices are fixed at freeze time; computing them once keeps forward lean.
        self._col_slices = [window_slices(cs, cw, self.in_features) for _, _, cs, cw in self.windows]
        self._row_slices = [window_slices(rs, rw, self.out_features) for rs, rw, _, _ in self.windows]
        self._eye: dict[tuple[int, str], tuple[int, bool]] = {}

    def identity_params(self) -> int:
        """Elements of the identity factors of pruned-window blocks: stored here so that
        every block is a (U, V) pair, never exported (a pruned window exports as one
        dense MatMul), so parameter counts leave them out."""
        total = 0
        for k in range(len(self.U)):
            side = self.identity_side(k)
            if side is not None:
                total += (self.U if side == "U" else self.V)[k].numel()
        return total

    def identity_side(self, k: int) -> str | None:
        """``"U"`` / ``"V"`` when block ``k`` is a dense block stored with that factor the
        identity (a pruned window, :mod:`~gblr_compress.init.prune`), so forward skips
        multiplying by it; None otherwise. Checked again whenever a factor changes in place
        (fine-tuning)."""
        for name, f in (("U", self.U[k]), ("V", self.V[k])):
            if self._is_eye(k, name, f):
                return name
        return None

    def _is_eye(self, k: int, name: str, f: torch.Tensor) -> bool:
        """Whether factor ``name`` of block ``k`` is the identity, cached per factor and
        version: fine-tuning a pruned window changes its other factor every step, and
        the identity need not be compared again for that."""
        hit = self._eye.get((k, name))
        if hit is not None and hit[0] == f._version:
            return hit[1]
        eye = f.shape[0] == f.shape[1] and torch.equal(f.detach(), torch.eye(f.shape[0], dtype=f.dtype, device=f.device))
        self._eye[(k, name)] = (f._version, eye)
        return eye

    def structure(self) -> LayerStructure:
        """The current record (windows plus the possibly fine-tuned factors)."""
        blocks = [
            Block(*key, U.detach().clone(), V.detach().clone())
            for key, U, V in zip(self.windows, self.U, self.V)
        ]
        bias = None if self.bias is None else self.bias.detach().clone()
        return LayerStructure(
            self.in_features, self.out_features, blocks, bias, name=self.name, info=dict(self.info)
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(m, n)`` weight the blocks represent, detached, for model code
        that reads a Linear's ``weight`` in its forward (HuggingFace's T5 checks
        ``wo.weight.dtype`` there): made anew on each read, never used by this layer's
        forward or its export."""
        w = self.structure().dense_weight()
        ref = next(iter(self.parameters()), None)
        return w if ref is None else w.to(device=ref.device, dtype=ref.dtype)

    @property
    def cost(self) -> int:
        """Exact multiply-adds per input vector (bias excluded)."""
        return sum(component_cost(rw, cw, V.shape[0]) for (_, rw, _, cw), V in zip(self.windows, self.V))

    def exact_cost(self) -> int:
        """The same as :attr:`cost`, under the name :class:`GBLRLinear` uses."""
        return self.cost

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., n)
        lead = x.shape[:-1]
        if self.bias is None:
            y = x.new_zeros(*lead, self.out_features)
        else:
            y = self.bias.expand(*lead, self.out_features).clone()
        for k, (U, V, cols, rows) in enumerate(zip(self.U, self.V, self._col_slices, self._row_slices)):
            parts = [x[..., lo:hi] for lo, hi in cols]
            xs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (..., cw)
            side = self.identity_side(k)
            if side == "U":  # a dense block stored as (I, W): pruned producer rows
                out = xs @ V.T  # (..., rw)
            elif side == "V":  # (W, I): pruned consumer columns
                out = xs @ U.T
            else:
                out = (xs @ V.T) @ U.T  # (..., rw)
            off = 0
            for lo, hi in rows:
                y[..., lo:hi] += out[..., off : off + hi - lo]
                off += hi - lo
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"blocks={len(self.windows)}, cost={self.cost}, bias={self.bias is not None}"
        )
