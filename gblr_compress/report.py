"""The compression report: a versioned JSON record, and its rich rendering.

The pipeline fills a :class:`CompressionReport`; this module defines it, writes and reads
it (a ``.json`` file, or the ``gblr.report`` metadata of an exported ``.onnx``) and renders
it as tables and per-layer block-layout heatmaps. Every cost figure is recomputed from
the per-layer structure dicts (``LayerStructure.to_dict()``), never trusted from JSON, so
a report cannot disagree with the structures it carries. The schema is documented in
``docs/report-schema.md``.

Example:
    >>> report = load_report("model.onnx")
    >>> render_inspect(report, rich.console.Console())
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gblr_compress import __version__
from gblr_compress.errors import InputError
from gblr_compress.gaudi import component_cost, window_indices

__all__ = [
    "REPORT_VERSION",
    "SHADES",
    "CompressionReport",
    "LayerReport",
    "coverage_matrix",
    "heatmap_lines",
    "load_report",
    "render_inspect",
    "render_summary",
    "report_from_dict",
    "report_to_dict",
    "write_pngs",
    "write_report",
]

REPORT_VERSION = 1
REPORT_METADATA_KEY = "gblr.report"
# Shades from empty to the layer's highest total rank; plain ASCII so logs stay readable.
SHADES = " .:-=+*#%@"
HEATMAP_ROWS = 12
HEATMAP_COLS = 48
_STATUSES = ("compressed", "skipped")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _live_blocks(structure: dict[str, Any] | None) -> list[tuple[int, int, int, int, int]]:
    """``(row_start, row_width, col_start, col_width, rank)`` of blocks with a nonzero cost."""
    if not structure:
        return []
    out = []
    for b in structure.get("blocks", []):
        rs, rw = int(b["rows"][0]), int(b["rows"][1])
        cs, cw = int(b["cols"][0]), int(b["cols"][1])
        r = int(b["rank"])
        if component_cost(rw, cw, r) > 0:  # dead blocks cost nothing and are not drawn
            out.append((rs, rw, cs, cw, r))
    return out


@dataclass
class LayerReport:
    """What happened to one linear layer.

    Attributes:
        name: dotted module path.
        in_features, out_features: ``n`` and ``m`` of the dense layer.
        status: ``"compressed"`` or ``"skipped"``.
        reason: why it was skipped, or which init won.
        dense_cost: ``m * n``.
        allocated_cost: the init's share of the global budget.
        structure: ``LayerStructure.to_dict()`` of the frozen layer (None when skipped).
        init_kind: ``"gblr"``, ``"lowrank"`` or ``"skipped"``.
        calib_error, heldout_error: init relative output error on fit / held-out data.
        baseline_heldout_error: whitened SVD at equal cost, held-out.
        export_form: form chosen by the exporter (``"lowrank"``, ``"segments"``, ...).
        export_params: weight parameters the exported layer really stores.
        sensitivity: the layer's weight in the init's budget split (how much its relative
            error moves the model's outputs); None when not measured (data-free init).
    """

    name: str
    in_features: int
    out_features: int
    status: str
    reason: str = ""
    dense_cost: int = 0
    allocated_cost: int = 0
    structure: dict[str, Any] | None = None
    init_kind: str = "gblr"
    calib_error: float | None = None
    heldout_error: float | None = None
    baseline_heldout_error: float | None = None
    export_form: str | None = None
    export_params: int | None = None
    sensitivity: float | None = None

    @property
    def compressed(self) -> bool:
        """True when the layer was replaced by a GBLR layer."""
        return self.status == "compressed"

    @property
    def cost(self) -> int:
        """Exact multiply-adds per token, recomputed from the blocks (dense when skipped)."""
        if not self.compressed:
            return self.dense_cost
        return sum(component_cost(rw, cw, r) for _, rw, _, cw, r in _live_blocks(self.structure))

    @property
    def blocks(self) -> int:
        """Number of live blocks (0 when skipped)."""
        return len(_live_blocks(self.structure)) if self.compressed else 0

    @property
    def total_rank(self) -> int:
        """Sum of the ranks of the live blocks (0 when skipped)."""
        return sum(b[4] for b in _live_blocks(self.structure)) if self.compressed else 0


@dataclass(kw_only=True)
class CompressionReport:
    """The whole run: inputs, settings, per-layer results, quality, parity and timings.

    Attributes:
        version: schema version (:data:`REPORT_VERSION`).
        tool_version: gblr-compress version that wrote it.
        created: ISO 8601 UTC time stamp.
        source: ``{"model", "format", "calib", "calib_batches", "synthetic_calib"}``.
        settings: run settings (``budget``, ``steps``, ``lr``, ``seed``, ...).
        layers: one :class:`LayerReport` per targeted linear layer.
        quality: phase (``init``, ``distilled``, ``frozen``) ->
            ``{"rel_error", "cosine", "top1"?}``, held-out teacher vs student.
        parity: ``{"max_abs_diff", "tolerance", "ok"}`` from ONNX verification, or None.
        seconds: wall time per phase (``load``, ``init``, ..., ``total``).
        outputs: ``{"onnx": path, "report": path}``.
        model_params: ``{"dense": before, "compressed": after}`` for the whole model.
    """

    version: int = REPORT_VERSION
    tool_version: str = __version__
    created: str = field(default_factory=_utc_now)
    source: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)
    quality: dict[str, dict[str, float]] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    model_params: dict[str, int] = field(default_factory=dict)

    # Derived totals: one place, from the per-layer structures.
    @property
    def linear_dense_cost(self) -> int:
        """Sum of ``m * n`` over the reported linear layers."""
        return sum(l.dense_cost for l in self.layers)

    @property
    def linear_cost(self) -> int:
        """Sum of exact layer costs (skipped layers count dense)."""
        return sum(l.cost for l in self.layers)

    @property
    def budget(self) -> float | None:
        """The requested budget fraction, if the settings carry one."""
        b = self.settings.get("budget")
        return None if b is None else float(b)

    @property
    def budget_cost(self) -> int | None:
        """``floor(budget * linear_dense_cost)``: the multiply-adds the run was allowed."""
        b = self.budget
        return None if b is None else math.floor(b * self.linear_dense_cost)

    @property
    def achieved(self) -> float | None:
        """``linear_cost / linear_dense_cost`` (None without layers)."""
        d = self.linear_dense_cost
        return self.linear_cost / d if d else None

    @property
    def compressed_count(self) -> int:
        """Number of compressed layers."""
        return sum(l.compressed for l in self.layers)

    @property
    def skipped_count(self) -> int:
        """Number of skipped layers."""
        return sum(not l.compressed for l in self.layers)

    def budget_share(self, layer: LayerReport) -> float | None:
        """``layer.cost / budget_cost`` (None when the budget is unknown or zero)."""
        bc = self.budget_cost
        return layer.cost / bc if bc else None

    def totals(self) -> dict[str, Any]:
        """The derived totals, as written under ``"totals"`` for readers of the JSON."""
        return {
            "linear_dense_cost": self.linear_dense_cost,
            "linear_cost": self.linear_cost,
            "budget_cost": self.budget_cost,
            "achieved": self.achieved,
            "compressed": self.compressed_count,
            "skipped": self.skipped_count,
            "layers": {
                l.name: {
                    "cost": l.cost,
                    "blocks": l.blocks,
                    "rank": l.total_rank,
                    "share": self.budget_share(l),
                }
                for l in self.layers
            },
        }


# ------------------------------------------------------------------- JSON round-trip
def report_to_dict(report: CompressionReport) -> dict[str, Any]:
    """JSON-able dict of ``report``, with the derived totals under ``"totals"``.

    ``"totals"`` is for readers (dashboards, jq); :func:`report_from_dict` ignores it and
    recomputes everything from the structures.
    """
    d: dict[str, Any] = {f.name: getattr(report, f.name) for f in fields(report) if f.name != "layers"}
    d["layers"] = [{f.name: getattr(l, f.name) for f in fields(l)} for l in report.layers]
    d["totals"] = report.totals()
    return json.loads(json.dumps(d))  # a deep, plain copy: no shared dicts with the report


def _bad(msg: str) -> InputError:
    return InputError(f"malformed report: {msg}")


def _check_structure(name: str, s: Any, m: int, n: int) -> dict[str, Any]:
    if not isinstance(s, dict) or not isinstance(s.get("blocks"), list):
        raise _bad(f"layer {name!r}: structure must be an object with a 'blocks' list")
    if (s.get("out_features"), s.get("in_features")) != (m, n):
        raise _bad(f"layer {name!r}: structure shape does not match {m} x {n}")
    for b in s["blocks"]:
        try:
            (rs, rw), (cs, cw), r = b["rows"], b["cols"], b["rank"]
            ints = [int(v) for v in (rs, rw, cs, cw, r)]
        except (KeyError, TypeError, ValueError):
            raise _bad(f"layer {name!r}: a block needs rows [start, width], cols [start, width], rank") from None
        rs, rw, cs, cw, r = ints
        if not (0 <= rs < m and 0 <= rw <= m and 0 <= cs < n and 0 <= cw <= n and r >= 0):
            raise _bad(f"layer {name!r}: block window out of range: rows {[rs, rw]} cols {[cs, cw]}")
    return s


def _layer_from_dict(d: Any) -> LayerReport:
    if not isinstance(d, dict):
        raise _bad("each layer must be an object")
    known = {f.name for f in fields(LayerReport)}
    missing = [k for k in ("name", "in_features", "out_features", "status") if k not in d]
    if missing:
        raise _bad(f"layer is missing {', '.join(missing)}")
    try:
        layer = LayerReport(**{k: v for k, v in d.items() if k in known})
        layer.in_features, layer.out_features = int(layer.in_features), int(layer.out_features)
        layer.dense_cost = int(layer.dense_cost) or layer.in_features * layer.out_features
        layer.allocated_cost = int(layer.allocated_cost)
        if layer.sensitivity is not None:
            if isinstance(layer.sensitivity, (str, bool)):
                raise TypeError("sensitivity must be a number")
            layer.sensitivity = float(layer.sensitivity)
    except (TypeError, ValueError):
        raise _bad(f"layer {d.get('name')!r} has fields of the wrong type") from None
    if layer.status not in _STATUSES:
        raise _bad(f"layer {layer.name!r}: status must be compressed or skipped, got {layer.status!r}")
    if layer.dense_cost != layer.in_features * layer.out_features:
        raise _bad(f"layer {layer.name!r}: dense_cost is not out_features * in_features")
    if layer.structure is not None:
        _check_structure(layer.name, layer.structure, layer.out_features, layer.in_features)
    elif layer.compressed:
        raise _bad(f"layer {layer.name!r} is compressed but has no structure")
    return layer


def report_from_dict(d: Any) -> CompressionReport:
    """Rebuild a report from :func:`report_to_dict` output.

    Derived figures (``"totals"``, block ``"cost"`` entries) are ignored: they are
    recomputed from the block windows and ranks.

    Raises:
        InputError: unknown version, or a dict that is not a well-formed report.
    """
    if not isinstance(d, dict):
        raise InputError("not a gblr-compress report: expected a JSON object")
    if "version" not in d or "layers" not in d:
        raise InputError("not a gblr-compress report: no 'version' and 'layers' keys")
    if d["version"] != REPORT_VERSION:
        raise InputError(f"unsupported report version {d['version']!r} (this tool reads version {REPORT_VERSION})")
    if not isinstance(d["layers"], list):
        raise _bad("'layers' must be a list")
    kw: dict[str, Any] = {}
    for f in fields(CompressionReport):
        if f.name in ("layers", "version") or f.name not in d:
            continue
        kw[f.name] = d[f.name]
    for key in ("source", "settings", "quality", "seconds", "outputs", "model_params"):
        if key in kw and not isinstance(kw[key], dict):
            raise _bad(f"{key!r} must be an object")
    if kw.get("parity") is not None and not isinstance(kw["parity"], dict):
        raise _bad("'parity' must be an object or null")
    budget = kw.get("settings", {}).get("budget")
    if budget is not None and not isinstance(budget, (int, float)):
        raise _bad("settings.budget must be a number")
    return CompressionReport(version=REPORT_VERSION, layers=[_layer_from_dict(l) for l in d["layers"]], **kw)


def write_report(report: CompressionReport, path: str | Path) -> Path:
    """Write ``report`` as indented JSON, atomically.

    The text goes to a temporary file in the same directory, then ``os.replace`` puts it in
    place, so a reader never sees a partial report and a failure leaves no file behind.

    Raises:
        InputError: the output directory does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"output directory does not exist: {path.parent}")
    text = json.dumps(report_to_dict(report), indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load_report(path: str | Path) -> CompressionReport:
    """Read a report from a ``.json`` file or from an exported ``.onnx`` file's metadata.

    Raises:
        InputError: missing file, a file that is not a report, or an ONNX file without
            a ``gblr.report`` entry.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    if path.suffix.lower() == ".onnx":
        # Lazy: onnx is only needed for this branch and must stay under export/.
        from gblr_compress.export.metadata import read_metadata

        meta = read_metadata(path)
        if REPORT_METADATA_KEY not in meta:
            raise InputError(f"ONNX file has no {REPORT_METADATA_KEY} metadata: {path}")
        text, where = meta[REPORT_METADATA_KEY], f"{path} ({REPORT_METADATA_KEY})"
    else:
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            raise InputError(f"not a JSON report (binary data): {path}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not a JSON report: {where}: {exc.msg} at line {exc.lineno}") from None
    return report_from_dict(d)


# ------------------------------------------------------------------------ heatmaps
def coverage_matrix(structure: dict[str, Any]) -> np.ndarray:
    """``(m, n)`` int array: total rank of the live blocks covering each weight entry.

    Wrapping windows cover both ends of their axis, as the frozen layer does.
    """
    m, n = int(structure["out_features"]), int(structure["in_features"])
    cov = np.zeros((m, n), dtype=np.int64)
    for rs, rw, cs, cw, r in _live_blocks(structure):
        rows = np.asarray(window_indices(rs, rw, m))
        cols = np.asarray(window_indices(cs, cw, n))
        cov[np.ix_(rows, cols)] += r
    return cov


def _bins(length: int, cells: int) -> np.ndarray:
    """Start index of each of ``min(length, cells)`` near-equal bins over ``length``."""
    k = min(length, cells)
    return (np.arange(k) * length) // k


def heatmap_lines(
    structure: dict[str, Any], max_rows: int = HEATMAP_ROWS, max_cols: int = HEATMAP_COLS
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


# ----------------------------------------------------------------------- rendering
def _int(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _num(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(float(v), fmt)


def _ratio(a: int | None, b: int | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


_WRAPPING = {"layer": 16, "ranks": 8, "windows": 12}


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
        f"Layers: {report.compressed_count} compressed, {report.skipped_count} skipped "
        f"(of {n_lin} linear layers)"
    )
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
        dense_rest = sum(l.dense_cost for l in report.layers if not l.compressed)
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

    if report.seconds:
        s = _table(console, "Time", *report.seconds.keys())
        s.add_row(*(f"{float(v):.1f}s" for v in report.seconds.values()))
        console.print(s)
    for kind, out in report.outputs.items():
        console.print(f"{kind}: {out}")


def _block_cols(layer: LayerReport) -> tuple[str, str]:
    blocks = _live_blocks(layer.structure) if layer.compressed else []
    ranks = ", ".join(str(b[4]) for b in blocks) or "-"
    windows = ", ".join(f"{b[1]}x{b[3]}" for b in blocks) or "-"
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
    t = _table(
        console,
        "Layers (windows: rows x cols per block; err / svd: init held-out error / whitened SVD at equal cost; "
        "sens.: weight in the budget split, largest = 1)", "layer", "m x n", "status", "blocks", "ranks", "windows",
        "cost", "share", "err / svd", "sens.", "form",
    )
    top = max((l.sensitivity for l in report.layers if l.sensitivity), default=None)
    for l in report.layers:
        ranks, windows = _block_cols(l)
        t.add_row(
            l.name,
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
            how = f"init {l.init_kind}" if l.compressed else "skipped"
            console.print(Text(f"{l.name}: {how}: {l.reason}"))
    console.print(
        f"Budget: requested {_pct(report.budget)}, achieved {_pct(report.achieved, 2)} of "
        f"{_int(report.linear_dense_cost)} dense multiply-adds per token"
    )
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
