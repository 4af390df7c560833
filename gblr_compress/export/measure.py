"""Measuring exported files: held-out fidelity against the dense model, and latency.

Both are what a deployment choice rests on, measured on the file that ships:

- :func:`onnx_fidelity` runs an ONNX file in onnxruntime on held-out batches and scores
  it against the dense PyTorch model with :func:`~gblr_compress.distill.agreement`, the
  same relative error / mean cosine / top-1 the report prints for the PyTorch student.
- :func:`latency` times several files on one input in interleaved rounds (spinning off,
  so one session's idle threads do not steal the next one's cores), and gives each
  file's median time and the median of its per-round ratios to a reference file.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gblr_compress.batches import Batch
from gblr_compress.distill import agreement
from gblr_compress.export.trace import ModelCall
from gblr_compress.export.verify import session

__all__ = ["OrtModel", "Timing", "latency", "onnx_fidelity"]


def _as_input(a: np.ndarray, ort_type: str) -> np.ndarray:
    """``a`` as the graph input takes it: float arrays cast to a float16 input's type
    (a float16 file, see :mod:`gblr_compress.export.half`), the rest as they are."""
    if ort_type == "tensor(float16)" and a.dtype.kind == "f":
        return a.astype(np.float16)
    return a


class OrtModel(nn.Module):
    """An ONNX file behind a module's call, so PyTorch-side tools can score it.

    Called like the model it was exported from (keyword inputs by name, positional ones
    as ``input_0..``); returns the graph outputs as a tuple of tensors (one output:
    the tensor itself).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.sess = session(Path(path))
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.types = {i.name: i.type for i in self.sess.get_inputs()}

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        given = dict(kwargs) if kwargs else {f"input_{i}": t for i, t in enumerate(args)}
        # The exporter drops inputs the graph does not use: feed only the ones it kept.
        feeds = {n: _as_input(given[n].detach().cpu().numpy(), self.types[n]) for n in self.inputs}
        # A float16 file's outputs are scored in float32, like the PyTorch model's.
        out = [torch.from_numpy(o).float() if o.dtype == np.float16 else torch.from_numpy(o)
               for o in self.sess.run(None, feeds)]
        return out[0] if len(out) == 1 else tuple(out)


def onnx_fidelity(
    path: str | Path, dense: nn.Module, batches: Sequence[Batch], logits: bool = True
) -> dict[str, float]:
    """Held-out agreement of the ONNX file ``path`` with the dense model.

    Returns:
        ``{"rel_error", "cosine", "top1"?}`` as :func:`~gblr_compress.distill.agreement`
        defines them (padded positions left out; top-1 only for logits).
    """
    with torch.no_grad():
        return agreement(OrtModel(path), dense.eval(), batches, logits)


@dataclass(frozen=True)
class Timing:
    """One file's latency: median milliseconds per call over the rounds, and the median
    of its per-round ratios to the reference (``speedup`` = reference time / its time)."""

    ms: float
    speedup: float


def latency(
    paths: Mapping[str, str | Path], inputs: Batch, reference: str, rounds: int = 9, calls: int = 5
) -> dict[str, Timing]:
    """Time the ONNX files ``paths`` on ``inputs`` in interleaved rounds.

    Each round runs every file ``calls`` times (after one warm-up call per file outside
    the rounds) in an order rotated by one each round, so slow drifts of the machine hit
    all files alike; the ratio to ``reference`` is taken within each round.

    Args:
        paths: label -> file.
        inputs: one batch as the model takes it (the user's input shape).
        reference: the label the speedups are relative to (dense fp32).
        rounds, calls: rounds, and timed calls per file per round.
    """
    call = ModelCall(inputs)
    feeds_all = {n: t.detach().cpu().numpy() for n, t in zip(call.names, call.tensors)}
    sessions = {k: session(Path(p)) for k, p in paths.items()}
    feeds = {k: {i.name: _as_input(feeds_all[i.name], i.type) for i in s.get_inputs()} for k, s in sessions.items()}
    for k, s in sessions.items():
        s.run(None, feeds[k])
    labels = list(sessions)
    per_round: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(rounds):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for k in order:
            t0 = time.perf_counter()
            for _ in range(calls):
                sessions[k].run(None, feeds[k])
            per_round[k].append((time.perf_counter() - t0) / calls)
    ref = per_round[reference]
    return {
        k: Timing(1000 * statistics.median(v), statistics.median(a / b for a, b in zip(ref, v)))
        for k, v in per_round.items()
    }
