"""Deployable files and their measured trade-off: int8 on top, fidelity and latency.

A candidate is one file a user could ship: the compressed model at a budget, the dense
model, each in float or int8. :class:`Bench` holds the files of one run in a temporary
folder, quantizes them (:func:`~gblr_compress.export.quantize.quantize_int8`), scores
each against the dense model on the held-out batches in onnxruntime
(:func:`~gblr_compress.export.measure.onnx_fidelity`), and times them all in one
interleaved run on the run's input shape (:func:`~gblr_compress.export.measure.latency`),
relative to the dense fp32 file. ``--quantize int8`` and ``--target-fidelity`` both
record their candidates this way, so the report shows what was traded for what.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from gblr_compress.batches import Batch
from gblr_compress.errors import InputError
from gblr_compress.export import LayerExport, OnnxGraph, Parity, build_onnx, save_onnx, verify_graph
from gblr_compress.export.measure import Timing, latency, onnx_fidelity
from gblr_compress.export.quantize import QuantizeResult, quantize_int8
from gblr_compress.pipeline import CompressResult
from gblr_compress.report import Candidate

__all__ = ["DENSE", "Bench", "Entry", "Timer", "int8_check", "timer"]

DENSE = "dense"
# A latency function: label -> file, one input batch, the reference label -> timings.
Timer = Callable[[Mapping[str, Path], Batch, str], Mapping[str, Timing]]


@dataclass
class Entry:
    """A candidate and the file it was measured on."""

    candidate: Candidate
    path: Path
    layers: list[LayerExport] = field(default_factory=list)  # the exported forms (report)
    result: CompressResult | None = None  # the compression behind it (None: dense)
    parity: Parity | None = None  # ORT vs PyTorch of a float file (an int8 file has none)


def timer(rounds: int) -> Timer:
    """The default latency function: :func:`~gblr_compress.export.measure.latency` with ``rounds``."""

    def timed(paths: Mapping[str, Path], inputs: Batch, reference: str) -> Mapping[str, Timing]:
        return latency(paths, inputs, reference, rounds=rounds)

    return timed


@dataclass
class Bench:
    """The candidate files of one run, in a temporary folder (:meth:`close` removes it).

    Attributes:
        dense: the dense model (the fidelity reference; its fp32 file the speed one).
        held: held-out batches the fidelity is measured on.
        example: one input batch in the user's shape (exported with, timed on).
        logits: whether top-1 is scored (see :attr:`CompressConfig.logits`).
        opset: ONNX opset of the exported files.
        dense_cost: the target layers' dense cost (each candidate's ``dense_cost``).
        timer: latency function (default: interleaved onnxruntime rounds).
        probe: the shift probe's batches (:attr:`~gblr_compress.job.Job.shift_probe`):
            when given, each file's mean cosine on them is recorded too
            (``fidelity["probe_cosine"]``, see :attr:`Candidate.search_cosine`).
    """

    dense: nn.Module
    held: Sequence[Batch]
    example: Batch
    logits: bool
    opset: int
    dense_cost: int
    timer: Timer = field(default_factory=lambda: timer(9))
    probe: Sequence[Batch] = ()
    entries: dict[str, Entry] = field(default_factory=dict)
    quantization: QuantizeResult | None = None
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gblr-deploy-")))

    def close(self) -> None:
        """Remove the temporary files."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _key(self, budget: float | str, int8: bool, distilled: bool) -> str:
        b = budget if isinstance(budget, str) else f"{budget:.4f}"
        return f"{b}{'-int8' if int8 else ''}{'-distilled' if distilled else ''}"

    def add_float(self, model: nn.Module, budget: float | str, cost: int, distilled: bool,
                  result: CompressResult | None = None, graph: OnnxGraph | None = None) -> Entry:
        """Export ``model`` (verified against PyTorch) and score the file.

        Args:
            model: the frozen student, or the dense model.
            budget, cost, distilled: what the candidate records.
            result: the compression behind it (kept for the report of a chosen file).
            graph: the already built and verified graph of ``model`` (not rebuilt).
        """
        key = self._key(budget, False, distilled)
        path = self.folder / f"{key}.onnx"
        parity = None
        if graph is None:
            graph = build_onnx(model, self.example, opset=self.opset)
            parity = verify_graph(graph, model)
        save_onnx(graph, path)
        cand = Candidate(budget=budget, int8=False, cost=cost, dense_cost=self.dense_cost,
                         fidelity=self._fidelity(path), distilled=distilled)
        self.entries[key] = Entry(cand, path, list(graph.layers), result, parity)
        return self.entries[key]

    def add_int8(self, source: Entry) -> Entry:
        """Quantize ``source``'s file to int8 and score the result."""
        c = source.candidate
        key = self._key(c.budget, True, c.distilled)
        path = self.folder / f"{key}.onnx"
        q = quantize_int8(source.path, path)
        if c.budget != DENSE or self.quantization is None:
            self.quantization = q  # what the report says was quantized: a compressed file's
        cand = Candidate(budget=c.budget, int8=True, cost=c.cost, dense_cost=c.dense_cost,
                         fidelity=self._fidelity(path), distilled=c.distilled)
        self.entries[key] = Entry(cand, path, source.layers, source.result)
        return self.entries[key]

    def add_dense(self, result: CompressResult | None = None) -> Entry:
        """The dense model's fp32 file: the speed reference. Its fidelity is measured
        too (1 up to float rounding); it meets any target by definition."""
        return self.add_float(self.dense, DENSE, self.dense_cost, distilled=False, result=result)

    def _fidelity(self, path: Path) -> dict[str, float]:
        if not self.held:
            raise InputError("measuring a file's fidelity needs held-out calibration data")
        fid = onnx_fidelity(path, self.dense, self.held, self.logits)
        if self.probe:
            fid["probe_cosine"] = onnx_fidelity(path, self.dense, self.probe, self.logits)["cosine"]
        return fid

    def time_all(self) -> None:
        """One interleaved timing run over every file; fills latency and speedup."""
        ref = self._key(DENSE, False, False)
        if ref not in self.entries:
            self.add_dense()
        times = self.timer({k: e.path for k, e in self.entries.items()}, self.example, ref)
        for k, e in self.entries.items():
            e.candidate.latency_ms, e.candidate.speedup = times[k].ms, times[k].speedup

    def entry(self, budget: float | str, int8: bool, distilled: bool = False) -> Entry | None:
        """The entry of that candidate, if it was added."""
        return self.entries.get(self._key(budget, int8, distilled))

    def candidates(self) -> list[Candidate]:
        """Every candidate, fastest first (unmeasured last)."""
        return sorted((e.candidate for e in self.entries.values()),
                      key=lambda c: -(c.speedup if c.speedup is not None else -math.inf))


def int8_check(float_fid: Mapping[str, float], int8_fid: Mapping[str, float], tolerance: float) -> str | None:
    """None when the int8 file keeps its float file's mean cosine within ``tolerance``,
    else the one-line reason. Exact parity does not apply to an int8 graph: the
    tolerance is on the held-out cosine against the dense model."""
    drop = float(float_fid["cosine"]) - float(int8_fid["cosine"])
    if drop > tolerance:
        return (f"the int8 file loses {drop:.4f} held-out cosine against the float file "
                f"(tolerance {tolerance}): run without --quantize, or raise --int8-tolerance")
    return None
