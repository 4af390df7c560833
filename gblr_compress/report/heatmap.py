"""Block-layout heatmaps: which weight entries a layer's blocks cover, and how densely.

Pure numpy over a layer's structure (windows and ranks); the text form is drawn by
:mod:`gblr_compress.report.render`, the image form by :mod:`gblr_compress.report.png`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gblr_compress.gaudi import window_indices
from gblr_compress.structure import LayerStructure, layout_from_dict

__all__ = ["HEATMAP_COLS", "HEATMAP_ROWS", "SHADES", "coverage_matrix", "heatmap_lines"]

# Shades from empty to the layer's highest total rank; plain ASCII so logs stay readable.
SHADES = " .:-=+*#%@"
HEATMAP_ROWS = 12
HEATMAP_COLS = 48


def coverage_matrix(structure: dict[str, Any] | LayerStructure) -> np.ndarray:
    """``(m, n)`` int array: total rank of the live blocks covering each weight entry.

    Args:
        structure: a :class:`~gblr_compress.structure.LayerStructure`, or its
            ``to_dict()`` (parsed with :func:`~gblr_compress.structure.layout_from_dict`).

    Wrapping windows cover both ends of their axis, as the frozen layer does.
    """
    s = structure if isinstance(structure, LayerStructure) else layout_from_dict(structure)
    m, n = s.out_features, s.in_features
    cov = np.zeros((m, n), dtype=np.int64)
    for b in s.blocks:
        if b.cost == 0:
            continue
        rows = np.asarray(window_indices(b.row_start, b.row_width, m))
        cols = np.asarray(window_indices(b.col_start, b.col_width, n))
        cov[np.ix_(rows, cols)] += b.rank
    return cov


def _bins(length: int, cells: int) -> np.ndarray:
    """Start index of each of ``min(length, cells)`` near-equal bins over ``length``."""
    k = min(length, cells)
    return (np.arange(k) * length) // k


def heatmap_lines(
    structure: dict[str, Any] | LayerStructure, max_rows: int = HEATMAP_ROWS, max_cols: int = HEATMAP_COLS
) -> list[str]:
    """The block layout of one layer as text, one string per character row.

    The ``m x n`` matrix is cut into at most ``max_rows x max_cols`` cells; each cell is
    shaded by the mean total rank over its entries, on :data:`SHADES` from empty (space)
    to the layer's highest total rank (``@``). A cell touched by any block is never
    blank, so thin blocks stay visible.
    """
    cov = coverage_matrix(structure).astype(np.float64)  # (m, n)
    m, n = cov.shape
    rb, cb = _bins(m, max_rows), _bins(n, max_cols)
    sums = np.add.reduceat(np.add.reduceat(cov, rb, axis=0), cb, axis=1)  # (R, C)
    hit = np.add.reduceat(np.add.reduceat((cov > 0).astype(np.int64), rb, axis=0), cb, axis=1) > 0
    sizes = np.outer(np.diff(np.append(rb, m)), np.diff(np.append(cb, n)))  # entries per cell
    mean = sums / sizes
    top = cov.max() if cov.size else 0.0
    levels = len(SHADES) - 1
    if top > 0:
        idx = np.ceil(mean / top * levels).astype(np.int64)
    else:
        idx = np.zeros_like(mean, dtype=np.int64)
    idx = np.where(hit, np.clip(idx, 1, levels), 0)
    return ["".join(SHADES[i] for i in row) for row in idx]
