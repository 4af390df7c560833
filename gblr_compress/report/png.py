"""Block layouts as PNG images (matplotlib, optional)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gblr_compress.errors import InputError
from gblr_compress.report.heatmap import coverage_matrix
from gblr_compress.report.schema import CompressionReport

__all__ = ["PLOT_HINT", "write_pareto_png", "write_pngs"]

PLOT_HINT = "pip install 'gblr-compress[plot]' (matplotlib)"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError(f"--png needs matplotlib: {PLOT_HINT}") from None
    return plt


def write_pareto_png(report: CompressionReport, path: str | Path) -> Path:
    """The measured trade-off as a picture: held-out cosine (the lower of it and the
    shift probe's, what the target search decides on, when the run had a probe) vs
    measured speedup over dense fp32, float and int8 candidates apart, dense fp32 and dense + int8 as labelled
    reference points, the chosen file ringed, the target (if any) as a line.

    Raises:
        InputError: matplotlib is not installed, or the report has no timed candidates.
    """
    plt = _pyplot()
    timed = [c for c in report.candidates if c.speedup is not None and c.search_cosine is not None]
    if not timed:
        raise InputError("the report has no timed candidates to plot")
    fig, ax = plt.subplots(figsize=(7, 5))
    for int8, marker, label in ((False, "o", "gblr float"), (True, "s", "gblr + int8")):
        pts = [c for c in timed if c.int8 == int8 and c.budget != "dense"]
        if pts:
            ax.scatter([c.speedup for c in pts], [c.search_cosine for c in pts], marker=marker, label=label,
                       facecolors=["tab:blue" if c.distilled else "none" for c in pts], edgecolors="tab:blue")
    for c in timed:
        if c.budget == "dense":
            ax.scatter([c.speedup], [c.search_cosine], marker="D", color="tab:red" if c.int8 else "black")
            ax.annotate(c.label, (c.speedup, c.search_cosine), textcoords="offset points", xytext=(5, -12))
        else:
            ax.annotate(f"{float(c.budget):.2g}", (c.speedup, c.search_cosine), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    chosen = report.chosen
    if chosen is not None and chosen.speedup is not None and chosen.search_cosine is not None:
        ax.scatter([chosen.speedup], [chosen.search_cosine], s=250, facecolors="none", edgecolors="tab:green",
                   linewidths=2, label=f"chosen: {chosen.label}")
    target = report.deploy.get("target")
    if target is not None:
        ax.axhline(float(target), color="gray", linestyle="--", linewidth=1, label=f"target {target}")
    ax.set_xlabel("speedup vs dense fp32 (onnxruntime, median of per-round ratios)")
    probed = any(c.probe_cosine is not None for c in timed)
    ax.set_ylabel("lower of held-out and shift-probe mean cosine vs dense" if probed
                  else "held-out mean cosine vs dense")
    ax.set_title("measured trade-off (filled: distilled)")
    ax.legend(fontsize=8, loc="lower left")
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_pngs(report: CompressionReport, out_dir: str | Path) -> list[Path]:
    """One PNG of the block layout (total rank per weight entry) per compressed layer,
    and ``pareto.png`` (:func:`write_pareto_png`) when the report has timed candidates.

    Raises:
        InputError: matplotlib is not installed, or ``out_dir`` is not a directory.
    """
    plt = _pyplot()
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
    if any(c.speedup is not None and c.search_cosine is not None for c in report.candidates):
        written.append(write_pareto_png(report, out_dir / "pareto.png"))
    return written
