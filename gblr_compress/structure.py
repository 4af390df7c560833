"""The frozen per-layer record: integer windows, cropped factors, exact cost.

One ``LayerStructure`` is what freezing produces and what the frozen layer, the ONNX
export, the report and reloading all consume, so each figure (cost, block count) is
computed here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gblr_compress.gaudi import component_cost, window_indices

__all__ = ["Block", "canonical_block", "LayerStructure", "layout_from_dict", "merge_blocks", "STRUCTURE_VERSION"]

STRUCTURE_VERSION = 1


@dataclass
class Block:
    """One rank-``rank`` block: ``y[rows] += U @ (V @ x[cols])``.

    The one block record: the init's search fits them (float64), a GBLRLinear is built
    from them (:meth:`~gblr_compress.layer.GBLRLinear.from_blocks`) and freezes back into
    them, and a :class:`LayerStructure` holds them for the frozen layer, export and report.

    Attributes:
        row_start, row_width: output window (cyclic) over ``out_features``.
        col_start, col_width: input window (cyclic) over ``in_features``.
        U: ``(row_width, rank)`` cropped left factor, rows in window order.
        V: ``(rank, col_width)`` cropped right factor, columns in window order.
    """

    row_start: int
    row_width: int
    col_start: int
    col_width: int
    U: torch.Tensor
    V: torch.Tensor

    def __post_init__(self) -> None:
        if self.U.dim() != 2 or self.V.dim() != 2:
            raise ValueError("Block factors must be 2-D")
        if self.U.shape != (self.row_width, self.V.shape[0]):
            raise ValueError(
                f"U has shape {tuple(self.U.shape)}, expected ({self.row_width}, rank)"
            )
        if self.V.shape[1] != self.col_width:
            raise ValueError(
                f"V has shape {tuple(self.V.shape)}, expected (rank, {self.col_width})"
            )

    @property
    def rank(self) -> int:
        """Rank of the block (number of merged rank-1 or rank-r components, summed)."""
        return int(self.V.shape[0])

    @property
    def cost(self) -> int:
        """Exact multiply-adds per input vector (GBLR.md section 2)."""
        return component_cost(self.row_width, self.col_width, self.rank)

    def window_key(self) -> tuple[int, int, int, int]:
        """Identity of the block's windows; blocks with equal keys merge."""
        return (self.row_start, self.row_width, self.col_start, self.col_width)

    def row_indices(self, m: int) -> torch.Tensor:
        """``(row_width,)`` int64 output indices of the window over ``m`` outputs, in
        window order (the order of ``U``'s rows)."""
        return torch.tensor(window_indices(self.row_start, self.row_width, m))

    def col_indices(self, n: int) -> torch.Tensor:
        """``(col_width,)`` int64 input indices of the window over ``n`` inputs, in window
        order (the order of ``V``'s columns)."""
        return torch.tensor(window_indices(self.col_start, self.col_width, n))


def canonical_block(block: Block, m: int, n: int) -> Block:
    """The same block with full-width windows starting at 0.

    A window covering the whole axis is the same set of indices whatever its start, but
    a nonzero start would make it look like a wrapping window to the exporter and keep
    it from merging with its twins. Factors are rotated so every row/column keeps its
    values (``U`` row ``j`` belongs to output ``(start + j) % m``).
    """
    rs, cs, U, V = block.row_start, block.col_start, block.U, block.V
    if block.row_width == m and rs != 0:
        U, rs = torch.roll(U, shifts=rs, dims=0), 0
    if block.col_width == n and cs != 0:
        V, cs = torch.roll(V, shifts=cs, dims=1), 0
    if (rs, cs) == (block.row_start, block.col_start):
        return block
    return Block(rs, block.row_width, cs, block.col_width, U, V)


@dataclass
class LayerStructure:
    """A frozen GBLR layer: shape, blocks and bias.

    Attributes:
        in_features: ``n``, length of the input axis.
        out_features: ``m``, length of the output axis.
        blocks: live blocks (no dead ones; identical windows already merged).
        bias: ``(m,)`` or ``None``.
        name: dotted module name in the model, if known.
        info: free-form JSON-able facts recorded by the stage that built it
            (e.g. the init method chosen), carried into reports.
    """

    in_features: int
    out_features: int
    blocks: list[Block]
    bias: torch.Tensor | None = None
    name: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for b in self.blocks:
            if not (0 <= b.row_start < self.out_features and 0 <= b.col_start < self.in_features):
                raise ValueError(f"block window start out of range: {b.window_key()}")
            if not (0 < b.row_width <= self.out_features and 0 < b.col_width <= self.in_features):
                raise ValueError(f"block window width out of range: {b.window_key()}")
        if self.bias is not None and self.bias.shape != (self.out_features,):
            raise ValueError(f"bias shape {tuple(self.bias.shape)} != ({self.out_features},)")
        self.blocks = [canonical_block(b, self.out_features, self.in_features) for b in self.blocks]

    @property
    def cost(self) -> int:
        """Exact multiply-adds per input vector of all blocks (bias excluded)."""
        return sum(b.cost for b in self.blocks)

    @property
    def dense_cost(self) -> int:
        """Multiply-adds of the dense layer it replaces: ``m * n``."""
        return self.out_features * self.in_features

    @property
    def rank(self) -> int:
        """Total rank over all blocks."""
        return sum(b.rank for b in self.blocks)

    def dense_weight(self) -> torch.Tensor:
        """The ``(m, n)`` matrix the blocks represent (for checks and reports only)."""
        dtype = self.blocks[0].U.dtype if self.blocks else torch.float32
        w = torch.zeros(self.out_features, self.in_features, dtype=dtype)
        for b in self.blocks:
            rows, cols = b.row_indices(self.out_features), b.col_indices(self.in_features)
            w[rows[:, None], cols[None, :]] += b.U.detach() @ b.V.detach()
        return w

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (no tensors): shape, windows, ranks and exact costs."""
        return {
            "version": STRUCTURE_VERSION,
            "name": self.name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "has_bias": self.bias is not None,
            "cost": self.cost,
            "dense_cost": self.dense_cost,
            "blocks": [
                {
                    "rows": [b.row_start, b.row_width],
                    "cols": [b.col_start, b.col_width],
                    "rank": b.rank,
                    "cost": b.cost,
                }
                for b in self.blocks
            ],
            "info": dict(self.info),
        }

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The structure's tensors by name, for saving next to :meth:`to_dict`."""
        out: dict[str, torch.Tensor] = {}
        for i, b in enumerate(self.blocks):
            out[f"{prefix}blocks.{i}.U"] = b.U.detach().contiguous()
            out[f"{prefix}blocks.{i}.V"] = b.V.detach().contiguous()
        if self.bias is not None:
            out[f"{prefix}bias"] = self.bias.detach().contiguous()
        return out

    @classmethod
    def from_dict(
        cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str = ""
    ) -> LayerStructure:
        """Rebuild from :meth:`to_dict` output and :meth:`tensors` output.

        Raises:
            ValueError: on an unknown version or tensors that do not match the windows.
        """
        if meta.get("version") != STRUCTURE_VERSION:
            raise ValueError(f"unsupported structure version {meta.get('version')!r}")
        blocks = []
        for i, bm in enumerate(meta["blocks"]):
            blocks.append(
                Block(
                    row_start=int(bm["rows"][0]),
                    row_width=int(bm["rows"][1]),
                    col_start=int(bm["cols"][0]),
                    col_width=int(bm["cols"][1]),
                    U=tensors[f"{prefix}blocks.{i}.U"],
                    V=tensors[f"{prefix}blocks.{i}.V"],
                )
            )
        bias = tensors.get(f"{prefix}bias") if meta.get("has_bias") else None
        return cls(
            in_features=int(meta["in_features"]),
            out_features=int(meta["out_features"]),
            blocks=blocks,
            bias=bias,
            name=str(meta.get("name", "")),
            info=dict(meta.get("info", {})),
        )


def merge_blocks(blocks: list[Block]) -> list[Block]:
    """Merge blocks with identical windows into one block of summed rank.

    Components sharing both windows are one sliced GEMM pair of higher rank; order of
    first appearance is kept so results are deterministic.
    """
    groups: dict[tuple[int, int, int, int], list[Block]] = {}
    for b in blocks:
        groups.setdefault(b.window_key(), []).append(b)
    merged = []
    for key, group in groups.items():
        if len(group) == 1:
            merged.append(group[0])
            continue
        merged.append(
            Block(
                row_start=key[0],
                row_width=key[1],
                col_start=key[2],
                col_width=key[3],
                U=torch.cat([g.U for g in group], dim=1),
                V=torch.cat([g.V for g in group], dim=0),
            )
        )
    return merged


def layout_from_dict(meta: dict[str, Any]) -> LayerStructure:
    """A :class:`LayerStructure` from :meth:`LayerStructure.to_dict` output alone: shape,
    windows and ranks, so ``cost``, ``rank`` and the blocks are the record's own; no
    weights (the factors are ``meta``-device tensors: shapes without memory).

    For readers of JSON (reports): blocks of zero cost (a zero width or rank) are
    dropped, as freezing drops them; a missing ``version`` is accepted (hand-written
    layouts), a different one is not.

    Raises:
        ValueError: not a structure dict, a malformed block, or a window out of range.
    """
    if not isinstance(meta, dict) or not isinstance(meta.get("blocks"), list):
        raise ValueError("structure must be an object with a 'blocks' list")
    if meta.get("version", STRUCTURE_VERSION) != STRUCTURE_VERSION:
        raise ValueError(f"unsupported structure version {meta.get('version')!r}")
    try:
        m, n = int(meta["out_features"]), int(meta["in_features"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("structure needs integer out_features and in_features") from None
    blocks = []
    for bm in meta["blocks"]:
        try:
            (rs, rw), (cs, cw), r = bm["rows"], bm["cols"], bm["rank"]
            rs, rw, cs, cw, r = (int(v) for v in (rs, rw, cs, cw, r))
        except (KeyError, TypeError, ValueError):
            raise ValueError("a block needs rows [start, width], cols [start, width], rank") from None
        if min(rw, cw, r) < 0:
            raise ValueError(f"block window out of range: rows {[rs, rw]} cols {[cs, cw]} rank {r}")
        if component_cost(rw, cw, r) == 0:  # dead: costs nothing, computes nothing
            continue
        U = torch.empty(rw, r, device="meta")  # (row_width, rank), shape only
        V = torch.empty(r, cw, device="meta")  # (rank, col_width)
        blocks.append(Block(rs, rw, cs, cw, U, V))
    return LayerStructure(
        in_features=n,
        out_features=m,
        blocks=blocks,
        name=str(meta.get("name", "")),
        info=dict(meta["info"]) if isinstance(meta.get("info"), dict) else {},
    )
