"""Block layouts as PNG images (matplotlib, optional)."""

from __future__ import annotations

import re
from pathlib import Path

from gblr_compress.errors import InputError
from gblr_compress.report.heatmap import coverage_matrix
from gblr_compress.report.schema import CompressionReport

__all__ = ["write_pngs"]


def write_pngs(report: CompressionReport, out_dir: str | Path) -> list[Path]:
    """One PNG of the block layout (total rank per weight entry) per compressed layer.

    Raises:
        InputError: matplotlib is not installed, or ``out_dir`` is not a directory.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--png needs matplotlib: pip install matplotlib") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for l in report.layers:
        if not l.compressed or l.structure is None:
            continue
        cov = coverage_matrix(l.structure)  # (m, n)
        fig, ax = plt.subplots(figsize=(6, 6 * min(2.0, max(0.25, cov.shape[0] / cov.shape[1]))))
        im = ax.imshow(cov, cmap="viridis", aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="total rank")
        ax.set_title(f"{l.name}: {l.blocks} blocks, cost {l.cost:,} of {l.dense_cost:,}")
        ax.set_xlabel("input column")
        ax.set_ylabel("output row")
        path = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", l.name or "layer") + ".png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
