"""The report as rich text: the end-of-run summary and ``inspect``'s per-layer tables and
block-layout heatmaps. The only module of the report that imports rich."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gblr_compress.report.heatmap import SHADES, coverage_matrix, heatmap_lines
from gblr_compress.report.schema import Candidate, CompressionReport, LayerReport

__all__ = ["render_candidates", "render_deploy", "render_inspect", "render_summary"]


def _int(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _num(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(float(v), fmt)


def _ratio(a: int | None, b: int | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


_WRAPPING = {"layer": 16, "ranks": 8, "windows": 12}


def common_prefix(names: list[str]) -> str:
    """The longest dotted prefix every name in ``names`` continues (``"model.0.model."``
    for a wrapped encoder's layers), or ``""`` when there are fewer than two names or
    the prefix would leave one of them empty."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    k = 0
    # Stop one short of the shortest name: a name is never shown empty.
    while k < min(len(p) for p in parts) - 1 and len({p[k] for p in parts}) == 1:
        k += 1
    return ".".join(parts[0][:k]) + "." if k else ""


def _table(console: Console, title: str, *columns: str) -> Table:
    # The title is printed as its own line: a table title wraps to the table's width.
    console.print(Text(title, style="bold"))
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for c in columns:
        left = c in ("", "layer", "phase", "status", "form", "windows")
        # Figures never wrap; long dotted names fold and the per-block lists (ranks,
        # windows) wrap at ", ", each keeping a readable minimum width.
        t.add_column(
            c,
            justify="left" if left else "right",
            no_wrap=c not in _WRAPPING,
            overflow="fold",
            min_width=_WRAPPING.get(c),
            max_width=12 if c == "ranks" else None,
        )
    return t


def render_summary(report: CompressionReport, console: Console) -> None:
    """Print the end-of-run summary: sizes, budget, held-out agreement, parity, timings."""
    n_lin = len(report.layers)
    console.print(
        f"Layers: {report.compressed_count} compressed, {report.skipped_count} skipped"
        + (f", {report.excluded_count} left dense outside the budget" if report.excluded_count else "")
        + f" (of {n_lin} linear layers)"
    )
    for l in report.layers:
        if l.status == "excluded":
            console.print(Text(f"  {l.name}: left dense: {l.reason}"))
        if l.note:  # a numerical fault the init worked around
            console.print(Text(f"  {l.name}: {l.note}"))
    t = _table(console, "Size", "", "dense", "compressed", "ratio")
    t.add_row(
        "linear multiply-adds / token",
        _int(report.linear_dense_cost),
        _int(report.linear_cost),
        _ratio(report.linear_cost, report.linear_dense_cost),
    )
    # Parameters equal cost for linear weights (GBLR.md s.2); the exporter's count shows
    # any padding the chosen forms store.
    exported = [l.export_params for l in report.layers if l.compressed]
    if exported and all(p is not None for p in exported):
        # Layers the budget kept dense ("skipped"); the ones left outside it ("excluded",
        # e.g. a tied lm_head) are in neither column, like linear_dense_cost.
        dense_rest = sum(l.dense_cost for l in report.layers if l.status == "skipped")
        stored = sum(exported) + dense_rest  # type: ignore[arg-type]
        t.add_row(
            "linear weight params (exported)",
            _int(report.linear_dense_cost),
            _int(stored),
            _ratio(stored, report.linear_dense_cost),
        )
    mp = report.model_params
    if mp.get("dense") is not None and mp.get("compressed") is not None:
        t.add_row("whole-model params", _int(mp["dense"]), _int(mp["compressed"]), _ratio(mp["compressed"], mp["dense"]))
    console.print(t)

    b = report.budget
    console.print(
        f"Budget: requested {_pct(b)} of linear cost ({_int(report.budget_cost)} multiply-adds), "
        f"achieved {_pct(report.achieved, 2)} ({_int(report.linear_cost)})"
    )

    if report.quality:
        q = _table(console, "Held-out agreement (teacher vs student)", "phase", "cosine", "rel error", "top-1")
        for phase, vals in report.quality.items():
            top1 = vals.get("top1")
            q.add_row(phase, _num(vals.get("cosine")), _num(vals.get("rel_error")), _pct(top1) if top1 is not None else "-")
        console.print(q)

    p = report.parity
    if p is None:
        console.print("ONNX Runtime parity: not checked")
    else:
        verdict = "ok" if p.get("ok") else "FAILED"
        console.print(
            f"ONNX Runtime parity: {verdict} (max abs diff {_num(p.get('max_abs_diff'), '.3g')}, "
            f"tolerance {_num(p.get('tolerance'), '.3g')})"
        )
    g = report.gate
    if g is not None:
        verdict = "passed" if g.get("passed") else ("FAILED, written with --force" if g.get("forced") else "FAILED")
        console.print(Text(f"Fidelity gate: {verdict} (held-out cosine {_num(g.get('cosine'))}, "
                           f"minimum {_num(g.get('min_fidelity'))})"))
    _render_notes(report, console)

    render_deploy(report, console)
    if report.seconds:
        s = _table(console, "Time", *report.seconds.keys())
        s.add_row(*(f"{float(v):.1f}s" for v in report.seconds.values()))
        console.print(s)
    for kind, out in report.outputs.items():
        console.print(f"{kind}: {out}")


def _render_notes(report: CompressionReport, console: Console) -> None:
    """One ``Note:`` line per entry of the report's notes."""
    for note in report.notes:
        console.print(Text(f"Note: {note}"))


def render_candidates(candidates: list[Candidate], console: Console, target: float | None = None) -> None:
    """The measured trade-off: one row per candidate file, fastest first. A run with a
    shift probe shows its cosine too; the target is checked on the lower of the two."""
    probed = any(c.probe_cosine is not None for c in candidates)
    title = "Candidates (held-out fidelity vs the dense model; latency: onnxruntime, medians of interleaved rounds"
    title += f"; target: {'the lower cosine' if probed else 'cosine'} >= {target})" if target is not None else ")"
    t = _table(console, title, "", "file", "int8", "cost", "share", "cosine", *(["probe cos"] if probed else []),
               "rel error", "top-1", "ms", "speedup", "distilled")
    for c in candidates:
        top1 = c.fidelity.get("top1")
        score = c.search_cosine
        meets = target is None or score is None or score >= target or (c.budget == "dense" and not c.int8)
        t.add_row(
            "*" if c.chosen else ("" if meets else "x"),
            "dense" if c.budget == "dense" else f"budget {float(c.budget):.3g}",
            "yes" if c.int8 else "no",
            _int(c.cost),
            _pct(c.cost / c.dense_cost if c.dense_cost else None),
            _num(c.cosine),
            *([_num(c.probe_cosine)] if probed else []),
            _num(c.fidelity.get("rel_error")),
            _pct(top1) if top1 is not None else "-",
            _num(c.latency_ms, ".2f"),
            "-" if c.speedup is None else f"{c.speedup:.2f}x",
            "yes" if c.distilled else "no",
        )
    console.print(t)
    legend = "* chosen" + (", x misses the target" if target is not None else "")
    if probed:
        legend += "; probe cos: on the held-out texts' words reordered (the shift probe)"
    console.print(Text(legend))


def render_deploy(report: CompressionReport, console: Console) -> None:
    """The candidates table, the choice and what int8 quantization did (if recorded);
    the float16 conversion's held-out check (``--export-dtype float16``)."""
    half = report.deploy.get("export_dtype")
    if half:
        console.print(Text(
            f"float16 file: held-out cosine {half['heldout_float16']['cosine']:.4f} "
            f"(float32 graph {half['heldout_float32']['cosine']:.4f}, may lose {half['tolerance']}); "
            f"{half['float16_initializers']} initializers in float16"
        ))
    if not report.candidates:
        return
    render_candidates(report.candidates, console, report.deploy.get("target"))
    if report.deploy.get("choice"):
        console.print(Text(f"Chosen: {report.deploy['choice']}"))
    q = report.deploy.get("quantization")
    if q:
        console.print(Text(
            f"int8: {q.get('method')}; {q.get('integer_kernels')} integer GEMM kernels "
            f"({q.get('compressed_integer')} in compressed layers; {q.get('compressed_float', 0)} of their GEMMs "
            f"left float), {len(q.get('left_float', []))} MatMul/Gemm left in float in all"
        ))
        for reason in sorted({f["reason"] for f in q.get("left_float", [])}):
            n = sum(f["reason"] == reason for f in q["left_float"])
            console.print(Text(f"  float ({n}): {reason}"))


def _block_cols(layer: LayerReport) -> tuple[str, str]:
    s = layer.layout()
    blocks = [] if s is None else s.blocks
    ranks = ", ".join(str(b.rank) for b in blocks) or "-"
    windows = ", ".join(f"{b.row_width}x{b.col_width}" for b in blocks) or "-"
    return ranks, windows


def render_inspect(report: CompressionReport, console: Console, heatmaps: bool = True) -> None:
    """Print the per-layer table and, per compressed layer, a block-layout heatmap.

    Args:
        report: the report to show.
        console: where to print; colours are only used on a terminal.
        heatmaps: draw the ``m x n`` layout of each compressed layer (rows = outputs,
            columns = inputs), shaded by total rank with :data:`SHADES`.
    """
    src = report.source.get("model", "?")
    console.print(f"gblr-compress report v{report.version} (tool {report.tool_version}, {report.created}) for {src}")
    # The table's narrowest column is the layer's name; the part every name shares (a
    # wrapper's "model.0.model.") is said once in the title instead of on every row.
    prefix = common_prefix([l.name for l in report.layers])
    t = _table(
        console,
        (f"Layers ({'names after ' + repr(prefix) + '; ' if prefix else ''}windows: rows x cols per block; "
         "err / svd: init held-out error / whitened SVD at equal cost; sens.: weight in the budget split, "
         "largest = 1)"), "layer", "m x n", "status", "blocks", "ranks", "windows",
        "cost", "share", "err / svd", "sens.", "form",
    )
    top = max((l.sensitivity for l in report.layers if l.sensitivity), default=None)
    for l in report.layers:
        ranks, windows = _block_cols(l)
        t.add_row(
            l.name[len(prefix):],
            f"{l.out_features} x {l.in_features}",
            l.status,
            str(l.blocks) if l.compressed else "-",
            ranks,
            windows,
            _int(l.cost),
            _pct(report.budget_share(l)),
            f"{_num(l.heldout_error, '.3f')} / {_num(l.baseline_heldout_error, '.3f')}",
            _num(None if top is None or l.sensitivity is None else l.sensitivity / top, ".2f"),
            l.export_form or "-",
        )
    t.add_row(
        "total", "", f"{report.compressed_count}/{len(report.layers)}", "", "", "",
        _int(report.linear_cost),
        _pct(report.linear_cost / report.budget_cost if report.budget_cost else None), "", "", "",
        end_section=False,
    )
    console.print(t)
    for l in report.layers:
        if l.reason:
            how = f"init {l.init_kind}" if l.compressed else ("left dense" if l.status == "excluded" else "skipped")
            console.print(Text(f"{l.name}: {how}: {l.reason}"))
    console.print(
        f"Budget: requested {_pct(report.budget)}, achieved {_pct(report.achieved, 2)} of "
        f"{_int(report.linear_dense_cost)} dense multiply-adds per token"
    )
    # The run's summary printed these; a report read later must say them too (a
    # distillation that was skipped, stopped, or ran again at a smaller step).
    _render_notes(report, console)
    render_deploy(report, console)
    if not heatmaps:
        return
    for l in report.layers:
        if not l.compressed or l.structure is None:
            continue
        lines = heatmap_lines(l.structure)
        top = int(coverage_matrix(l.structure).max())
        console.print()
        console.print(
            Text(
                f"{l.name}  {l.out_features} x {l.in_features}  ({len(lines)} x {len(lines[0]) if lines else 0} cells, "
                f"'{SHADES[1]}' low .. '{SHADES[-1]}' rank {top})"
            )
        )
        border = "+" + "-" * (len(lines[0]) if lines else 0) + "+"
        # Text() keeps rich from reading [..] in the art as markup.
        console.print(Text("\n".join([border, *(f"|{row}|" for row in lines), border])), highlight=False)
