"""ONNX export and ONNX Runtime CPU latency, measured as interleaved per-round ratios.

Timing rules of the project: 2 intra-op threads, spinning disabled, variants interleaved
in rounds (order rotated each round so none always runs first), the reported figure is
the median over rounds of the per-round ratio ``dense time / variant time``.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gblr_compress.errors import InputError
from gblr_compress.export import export_onnx
from gblr_compress.layer import FrozenGBLR

__all__ = ["OrtEncoder", "SpeedResult", "export_encoder", "int8_encoder", "make_session", "measure_speed", "ort_embed"]


def export_encoder(model: nn.Module, path: Path, opset: int = 17) -> Path:
    """Export ``model(input_ids, attention_mask) -> embedding`` with dynamic batch/seq axes.

    Models holding FrozenGBLR layers go through gblr-compress's ``export_onnx``. Others use
    the TorchScript exporter: it traces the HF BERT in about a second, where the
    dynamo exporter takes ~20 s per model on 2 cores and gives the same graph here.
    """
    model.eval()
    ids = torch.ones(2, 16, dtype=torch.long)  # (B, T) example; axes are dynamic
    mask = torch.ones_like(ids)
    if any(isinstance(m, FrozenGBLR) for m in model.modules()):
        # gblr-compress models go through the product's exporter (sliced-GEMM subgraphs,
        # ORT-verified); tracing FrozenGBLR's PyTorch forward gives a slow gather graph.
        export_onnx(model, {"input_ids": ids, "attention_mask": mask}, path, opset=max(opset, 18))
        return path
    axes = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer/deprecation chatter from transformers and torch.onnx
        torch.onnx.export(
            model,
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "embedding": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


class OrtEncoder(nn.Module):
    """An exported encoder run in onnxruntime behind the torch call signature, so the
    benchmark embeds and times it like the other contenders.

    Args:
        path: the ONNX file (``input_ids``, ``attention_mask`` -> ``(B, H)`` embedding).
        linear_cost: exact Linear multiply-adds per token the graph performs.
    """

    def __init__(self, path: Path, linear_cost: int) -> None:
        super().__init__()
        self.onnx_path = Path(path)
        self.linear_cost = linear_cost
        self._session = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._session is None:
            self._session = make_session(self.onnx_path)
        return ort_embed(self._session, input_ids, attention_mask)  # (B, H)


def int8_encoder(dense: nn.Module, folder: Path | None = None) -> OrtEncoder:
    """The dense encoder exported to ONNX, then onnxruntime's dynamic int8 quantization
    (``quantize_dynamic``, per-channel int8 weights, activations quantized at run time).

    Its Linear multiply-adds are all kept (as int8): the cost is the dense cost.
    """
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = Path(folder or tempfile.mkdtemp(prefix="minilm_int8_"))
    fp32 = export_encoder(dense, folder / "dense_fp32.onnx")
    out = folder / "int8_dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "please run pre-processing" advice
        quantize_dynamic(str(fp32), str(out), per_channel=True, weight_type=QuantType.QInt8)
    cost = sum(m.in_features * m.out_features for n, m in dense.named_modules()
               if isinstance(m, nn.Linear) and ".encoder.layer." in f".{n}")
    return OrtEncoder(out, cost)


def make_session(path: Path, threads: int = 2):
    """An ORT CPU session with ``threads`` intra-op threads and spinning disabled."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_embed(session, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run an exported encoder: (B, T) int64 inputs -> (B, H) embeddings."""
    feeds = {"input_ids": input_ids.numpy().astype(np.int64), "attention_mask": attention_mask.numpy().astype(np.int64)}
    return torch.from_numpy(session.run(None, feeds)[0])


@dataclass(frozen=True)
class SpeedResult:
    """Latency of one variant relative to the reference (the first variant).

    Attributes:
        speedup: median over rounds of ``t_reference / t_variant`` (> 1 is faster).
        speedup_lo / speedup_hi: min and max of the per-round ratios (spread).
        median_ms: median per-call time, for context only (machine dependent).
        round_ms: per-call time in each round, in round order: two variants' per-round
            ratios (:func:`latency_ratio`) compare them under the same machine state.
    """

    speedup: float
    speedup_lo: float
    speedup_hi: float
    median_ms: float
    round_ms: list[float]


def measure_speed(
    paths: dict[str, Path],
    batch: int = 8,
    seq: int = 128,
    rounds: int = 15,
    calls: int = 3,
    threads: int = 2,
    seed: int = 0,
) -> dict[str, SpeedResult]:
    """Interleaved latency of exported encoders; ratios are vs the first entry of ``paths``.

    Args:
        paths: name -> ONNX file; the first is the reference (dense).
        batch: sentences per call.
        seq: tokens per sentence (all real tokens, the worst case for a padded batch).
        rounds: rounds; each round times every variant, in a rotated order.
        calls: calls per variant per round; the round's time is their mean.
        threads: intra-op threads.
        seed: token ids are random (latency does not depend on their values).
    """
    if not paths:
        raise InputError("no models to time")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g)  # (B, T)
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, seq), dtype=np.int64)}
    sessions = {name: make_session(p, threads) for name, p in paths.items()}
    names = list(sessions)
    for s in sessions.values():  # warm-up: allocations, first-run kernel selection
        for _ in range(2):
            s.run(None, feeds)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            for _ in range(calls):
                sessions[name].run(None, feeds)
            times[name].append((time.perf_counter() - t0) / calls)
    ref = times[names[0]]
    out = {}
    for name in names:
        ratios = [a / b for a, b in zip(ref, times[name])]
        out[name] = SpeedResult(
            speedup=statistics.median(ratios),
            speedup_lo=min(ratios),
            speedup_hi=max(ratios),
            median_ms=1e3 * statistics.median(times[name]),
            round_ms=[1e3 * t for t in times[name]],
        )
    return out


def latency_ratio(a: SpeedResult, b: SpeedResult) -> tuple[float, float, float]:
    """``(median, min, max)`` over rounds of ``t_a / t_b`` (> 1: ``a`` is slower), for two
    variants timed in the same :func:`measure_speed` run."""
    ratios = [x / y for x, y in zip(a.round_ms, b.round_ms)]
    return statistics.median(ratios), min(ratios), max(ratios)
