"""The compression report: schema and JSON I/O, heatmaps, rich rendering, PNG images.

``schema`` (the record, its files), ``heatmap`` (coverage math, numpy), ``render``
(rich tables) and ``png`` (matplotlib, optional). The rendering functions are loaded on
first use, so reading or writing a report does not import rich.

Example:
    >>> report = load_report("model.onnx")
    >>> render_inspect(report, rich.console.Console())
"""

from __future__ import annotations

from typing import Any

from gblr_compress.report.heatmap import SHADES, coverage_matrix, heatmap_lines
from gblr_compress.report.png import PLOT_HINT, write_pareto_png, write_pngs
from gblr_compress.report.schema import (
    REPORT_METADATA_KEY,
    REPORT_VERSION,
    Candidate,
    CompressionReport,
    LayerReport,
    load_report,
    report_from_dict,
    report_to_dict,
    write_report,
)

__all__ = [
    "PLOT_HINT",
    "Candidate",
    "REPORT_METADATA_KEY",
    "REPORT_VERSION",
    "SHADES",
    "CompressionReport",
    "LayerReport",
    "coverage_matrix",
    "heatmap_lines",
    "load_report",
    "render_candidates",
    "render_deploy",
    "render_inspect",
    "render_summary",
    "report_from_dict",
    "report_to_dict",
    "write_pareto_png",
    "write_pngs",
    "write_report",
]

_RENDER = ("render_candidates", "render_deploy", "render_inspect", "render_summary")


def __getattr__(name: str) -> Any:
    # rich is imported only when something is drawn (PEP 562 module attribute).
    if name in _RENDER:
        from gblr_compress.report import render

        return getattr(render, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
