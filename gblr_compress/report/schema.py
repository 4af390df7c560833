"""The compression report's schema: a versioned JSON record and its file I/O.

The pipeline fills a :class:`CompressionReport`; this module defines it and writes and
reads it (a ``.json`` file, or the ``gblr.report`` metadata of an exported ``.onnx``).
Every cost figure comes from the per-layer structure dicts (``LayerStructure.to_dict()``)
read back with :func:`~gblr_compress.structure.layout_from_dict`, the structure's own
parser, never trusted from JSON, so a report cannot disagree with the structures it
carries. The schema is documented in ``docs/report-schema.md``.

Example:
    >>> report = load_report("model.onnx")
    >>> report.linear_cost <= report.budget_cost
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gblr_compress import __version__
from gblr_compress.errors import InputError
from gblr_compress.files import write_text_atomic
from gblr_compress.structure import LayerStructure, layout_from_dict

__all__ = [
    "Candidate",
    "REPORT_METADATA_KEY",
    "REPORT_VERSION",
    "CompressionReport",
    "LayerReport",
    "load_report",
    "report_from_dict",
    "report_to_dict",
    "write_report",
]

REPORT_VERSION = 1
REPORT_METADATA_KEY = "gblr.report"
_STATUSES = ("compressed", "skipped", "excluded")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class LayerReport:
    """What happened to one linear layer.

    Attributes:
        name: dotted module path.
        in_features, out_features: ``n`` and ``m`` of the dense layer.
        status: ``"compressed"``, ``"skipped"`` (the init left it dense; it counts in
            the budget at its dense cost) or ``"excluded"`` (left dense before the init
            and kept out of the budget: not used by the outputs, or its weight is tied).
        reason: why it was skipped or excluded, or which init won.
        dense_cost: ``m * n``.
        allocated_cost: the init's share of the global budget.
        structure: ``LayerStructure.to_dict()`` of the frozen layer (None when skipped).
        init_kind: ``"gblr"``, ``"lowrank"``, ``"pruned"`` or ``"skipped"``.
        calib_error, heldout_error: init relative output error on fit / held-out data.
        baseline_heldout_error: whitened SVD at equal cost, held-out.
        export_form: form chosen by the exporter (``"lowrank"``, ``"segments"``, ...).
        export_params: weight parameters the exported layer really stores.
        sensitivity: the layer's weight in the init's budget split (how much its relative
            error moves the model's outputs); None when not measured (data-free init).
        note: a numerical fault the init worked around for this layer (a rank-deficient
            activation moment damped, a singular or non-finite one replaced by the
            identity: a data-free init); empty when there was none.
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
    note: str = ""

    @property
    def compressed(self) -> bool:
        """True when the layer was replaced by a GBLR layer."""
        return self.status == "compressed"

    @property
    def in_budget(self) -> bool:
        """False for a layer excluded from the budget (unused or tied)."""
        return self.status != "excluded"

    def layout(self) -> LayerStructure | None:
        """The frozen structure's windows and ranks (no weights), parsed from
        :attr:`structure`; None when skipped or without a structure."""
        if not self.compressed or self.structure is None:
            return None
        return layout_from_dict(self.structure)

    @property
    def cost(self) -> int:
        """Exact multiply-adds per token of the structure's live blocks (dense when skipped)."""
        s = self.layout()
        return self.dense_cost if s is None else s.cost

    @property
    def blocks(self) -> int:
        """Number of live blocks (0 when skipped)."""
        s = self.layout()
        return 0 if s is None else len(s.blocks)

    @property
    def total_rank(self) -> int:
        """Sum of the ranks of the live blocks (0 when skipped)."""
        s = self.layout()
        return 0 if s is None else s.rank


@dataclass
class Candidate:
    """One deployable file that was measured: the trade-off the report shows.

    Attributes:
        budget: the budget it was compressed to, or ``"dense"`` (the model as given).
        int8: whether its weights are int8 (onnxruntime dynamic quantization).
        cost: exact multiply-adds per token of the target Linear layers (in the budget).
        dense_cost: the same layers' dense cost (``cost / dense_cost`` is the share kept).
        fidelity: held-out ``{"rel_error", "cosine", "top1"?, "probe_cosine"?}`` of the
            file against the dense model (onnxruntime for ONNX files); ``probe_cosine``
            is the mean cosine on the shift probe (the held-out texts' words reordered,
            :func:`~gblr_compress.text.reorder_words`) when the run had one.
        latency_ms: median onnxruntime milliseconds per call on the run's input shape.
        speedup: median per-round ratio dense fp32 time / its time.
        chosen: the file that was written (at most one candidate).
        distilled: whether it was distilled (else: init only, or dense).
    """

    budget: float | str
    int8: bool
    cost: int
    dense_cost: int
    fidelity: dict[str, float] = field(default_factory=dict)
    latency_ms: float | None = None
    speedup: float | None = None
    chosen: bool = False
    distilled: bool = False

    @property
    def label(self) -> str:
        """``dense``, ``dense+int8``, ``0.5`` or ``0.5+int8``."""
        b = self.budget if isinstance(self.budget, str) else f"{self.budget:.3g}"
        return b + ("+int8" if self.int8 else "")

    def _figure(self, key: str) -> float | None:
        c = self.fidelity.get(key)
        return None if c is None else float(c)

    @property
    def cosine(self) -> float | None:
        """Held-out mean cosine vs the dense model (None when not measured)."""
        return self._figure("cosine")

    @property
    def probe_cosine(self) -> float | None:
        """Mean cosine on the shift probe (None when the run had none)."""
        return self._figure("probe_cosine")

    @property
    def search_cosine(self) -> float | None:
        """What ``--target-fidelity`` compares with F: the lower of the held-out and the
        shift probe's cosines (the held-out one alone without a probe)."""
        known = [c for c in (self.cosine, self.probe_cosine) if c is not None]
        return min(known) if known else None

    @classmethod
    def from_dict(cls, d: Any) -> Candidate:
        """Rebuild from the JSON object; checks every field's type.

        Raises:
            InputError: a malformed candidate.
        """
        if not isinstance(d, dict):
            raise _bad("each candidate must be an object")
        missing = [k for k in ("budget", "int8", "cost", "dense_cost") if k not in d]
        if missing:
            raise _bad(f"candidate is missing {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        c = cls(**{k: v for k, v in d.items() if k in known})
        budget_ok = c.budget == "dense" or (isinstance(c.budget, (int, float)) and not isinstance(c.budget, bool)
                                            and 0 < c.budget <= 1)
        numbers = [c.latency_ms, c.speedup, *c.fidelity.values()] if isinstance(c.fidelity, dict) else [None, "x"]
        if (not budget_ok or not all(isinstance(v, bool) for v in (c.int8, c.chosen, c.distilled))
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in (c.cost, c.dense_cost))
                or not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in numbers)):
            raise _bad(f"candidate {d.get('budget')!r} has fields of the wrong type")
        return c


@dataclass(kw_only=True)
class CompressionReport:
    """The whole run: inputs, settings, per-layer results, quality, parity and timings.

    Attributes:
        version: schema version (:data:`REPORT_VERSION`).
        tool_version: gblr-compress version that wrote it.
        created: ISO 8601 UTC time stamp.
        source: ``{"model", "format", "calib", "calib_batches", "synthetic_calib", "heldout"}``.
        settings: run settings (``budget``, ``steps``, ``lr``, ``seed``, ...).
        layers: one :class:`LayerReport` per targeted linear layer.
        quality: phase (``init``, ``distilled``, ``frozen``) ->
            ``{"rel_error", "cosine", "top1"?}``, held-out teacher vs student.
        parity: ``{"max_abs_diff", "tolerance", "ok"}`` from ONNX verification, or None.
        seconds: wall time per phase (``load``, ``init``, ..., ``total``).
        outputs: ``{"onnx": path, "report": path}``.
        model_params: ``{"dense": before, "compressed": after}`` for the whole model.
        memory: ``{"estimate": bytes, "available": bytes or None, "peak": {phase:
            bytes}}``: the estimate the run was checked against, and the resident-set
            high-water mark of each phase (empty in reports of older versions).
        notes: what the run worked around, one line each (a half-precision checkpoint
            computed in float32, a distillation stopped on a non-finite or diverging
            loss and the best state restored).
        gate: ``{"min_fidelity", "cosine", "parity_ok", "passed", "forced"}`` when a
            minimum fidelity was asked for or a failed check was forced through; None
            otherwise.
        candidates: the deployable files measured (:class:`Candidate`): with
            ``--quantize int8`` the float and the int8 file, with ``--target-fidelity``
            every file the search measured; empty otherwise.
        deploy: what the deployment step did: ``quantization`` (what became integer
            kernels, what stayed float and why), ``target`` (the fidelity asked for),
            ``choice`` (which candidate won and why), ``timing`` (rounds, input shape),
            ``search_seconds``.
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
    memory: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    gate: dict[str, Any] | None = None
    candidates: list[Candidate] = field(default_factory=list)
    deploy: dict[str, Any] = field(default_factory=dict)

    @property
    def chosen(self) -> Candidate | None:
        """The candidate that was written, if the run measured candidates."""
        return next((c for c in self.candidates if c.chosen), None)

    # Derived totals: one place, from the per-layer structures.
    @property
    def linear_dense_cost(self) -> int:
        """Sum of ``m * n`` over the reported linear layers in the budget."""
        return sum(l.dense_cost for l in self.layers if l.in_budget)

    @property
    def linear_cost(self) -> int:
        """Sum of exact layer costs in the budget (skipped layers count dense)."""
        return sum(l.cost for l in self.layers if l.in_budget)

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
        """Number of layers the init left dense (in the budget)."""
        return sum(l.status == "skipped" for l in self.layers)

    @property
    def excluded_count(self) -> int:
        """Number of layers left dense and out of the budget (unused or tied)."""
        return sum(l.status == "excluded" for l in self.layers)

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
            "excluded": self.excluded_count,
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
    d: dict[str, Any] = {f.name: getattr(report, f.name) for f in fields(report)
                         if f.name not in ("layers", "candidates")}
    d["layers"] = [{f.name: getattr(l, f.name) for f in fields(l)} for l in report.layers]
    d["candidates"] = [{f.name: getattr(c, f.name) for f in fields(c)} for c in report.candidates]
    d["totals"] = report.totals()
    return json.loads(json.dumps(d))  # a deep, plain copy: no shared dicts with the report


def _bad(msg: str) -> InputError:
    return InputError(f"malformed report: {msg}")


def _check_structure(name: str, s: Any, m: int, n: int) -> None:
    """The structure parses (:func:`~gblr_compress.structure.layout_from_dict`) and has
    the layer's shape."""
    try:
        layout = layout_from_dict(s)
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:  # e.g. a rank past int64
        raise _bad(f"layer {name!r}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]}") from None
    if (layout.out_features, layout.in_features) != (m, n):
        raise _bad(f"layer {name!r}: structure shape does not match {m} x {n}")


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
        for key in ("name", "status", "reason", "init_kind", "note"):
            if not isinstance(getattr(layer, key), str):
                raise TypeError(f"{key} must be a string")
        if layer.export_form is not None and not isinstance(layer.export_form, str):
            raise TypeError("export_form must be a string or null")
        for key in ("calib_error", "heldout_error", "baseline_heldout_error", "export_params"):
            v = getattr(layer, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TypeError(f"{key} must be a number or null")
    except (TypeError, ValueError):
        raise _bad(f"layer {d.get('name')!r} has fields of the wrong type") from None
    if layer.status not in _STATUSES:
        raise _bad(f"layer {layer.name!r}: status must be compressed, skipped or excluded, got {layer.status!r}")
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
        if f.name in ("layers", "version", "candidates") or f.name not in d:
            continue
        kw[f.name] = d[f.name]
    for key in ("source", "settings", "quality", "seconds", "outputs", "model_params", "memory", "deploy"):
        if key in kw and not isinstance(kw[key], dict):
            raise _bad(f"{key!r} must be an object")
    for key in ("parity", "gate"):
        if kw.get(key) is not None and not isinstance(kw[key], dict):
            raise _bad(f"{key!r} must be an object or null")
    if "notes" in kw and not (isinstance(kw["notes"], list) and all(isinstance(n, str) for n in kw["notes"])):
        raise _bad("'notes' must be a list of strings")
    budget = kw.get("settings", {}).get("budget")
    if budget is not None and not isinstance(budget, (int, float)):
        raise _bad("settings.budget must be a number")
    candidates = d.get("candidates", [])
    if not isinstance(candidates, list):
        raise _bad("'candidates' must be a list")
    if sum(bool(isinstance(c, dict) and c.get("chosen")) for c in candidates) > 1:
        raise _bad("more than one candidate is marked chosen")
    return CompressionReport(version=REPORT_VERSION, layers=[_layer_from_dict(l) for l in d["layers"]],
                             candidates=[Candidate.from_dict(c) for c in candidates], **kw)


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
    return write_text_atomic(path, text)


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
