"""Report heatmaps: coverage of wrapping windows, shading and downsampling."""

from __future__ import annotations

import numpy as np

from gblr_compress.report import SHADES, coverage_matrix, heatmap_lines
from tests.test_report_schema import make_structure


def test_coverage_and_heatmap_handle_wrapping_windows() -> None:
    _, s = make_structure()
    cov = coverage_matrix(s.to_dict())  # (24, 40)
    # Integer reference: the blocks' own index windows, summed by rank.
    ref = np.zeros((24, 40), dtype=np.int64)
    for b in s.blocks:
        rows = [(b.row_start + j) % 24 for j in range(b.row_width)]
        cols = [(b.col_start + j) % 40 for j in range(b.col_width)]
        ref[np.ix_(rows, cols)] += b.rank
    assert (cov == ref).all()
    assert cov[0, 0] == 2 and cov[0, 39] == 2  # the wrapping block covers both corners
    assert cov[0, 4] == 4 and cov[12, 20] == 0 and cov.max() == 4
    # Nonzero pattern equals that of the dense weight the structure represents.
    assert ((s.dense_weight().abs() > 0).numpy() <= (cov > 0)).all()
    lines = heatmap_lines(s.to_dict())
    assert len(lines) == 12 and {len(l) for l in lines} == {40}  # n = 40 < 48 columns
    assert lines[0][0] == "+" and lines[0][4] == "@" and lines[0][-1] == "+" and lines[0][20] == " "
    assert lines[7] == "    ++++++++" + " " * 28  # rows 14-15: only the 24x8 block
    # Downsampling a big layer: at most 12 x 48 cells, thin blocks stay visible.
    big = {
        "in_features": 1000, "out_features": 500,
        "blocks": [{"rows": [490, 20], "cols": [3, 1], "rank": 1}, {"rows": [100, 100], "cols": [500, 500], "rank": 4}],
    }
    lines = heatmap_lines(big)
    assert len(lines) == 12 and {len(l) for l in lines} == {48}
    assert set("".join(lines)) <= set(SHADES)
    # One input column of 1000 in a 42 x 21 cell: the lightest visible shade, at both
    # ends of the row axis because the window wraps (rows 490..499 and 0..9).
    assert lines[0][0] == lines[-1][0] == SHADES[1] and lines[0][1] == " "
    # Cell rows start at (i * 500) // 12: cell 3 (rows 125-165) lies inside the rank-4
    # block, cell 2 (rows 83-124) only 25 of 42 rows: mean 4*25/42 -> level ceil(5.36) = 6.
    assert lines[3][30] == SHADES[-1] and lines[2][30] == SHADES[6] and lines[3][23] == " "
