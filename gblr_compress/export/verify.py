"""Check an ONNX model against PyTorch in onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gblr_compress.errors import FidelityError, InputError
from gblr_compress.export.trace import ModelCall

__all__ = ["VerificationError", "compare", "reference", "verify_onnx"]


class VerificationError(FidelityError):
    """The exported ONNX model does not reproduce the PyTorch model (one-line message).

    Attributes:
        max_abs_diff, tolerance: the measured difference and its bound, when outputs
            could be compared (None for a count or shape mismatch).
    """

    def __init__(self, message: str, max_abs_diff: float | None = None, tolerance: float | None = None) -> None:
        super().__init__(message, forceable=True)
        self.max_abs_diff, self.tolerance = max_abs_diff, tolerance


def session(path: Path) -> Any:
    """An onnxruntime CPU session on 2 threads with spinning off (steady timings)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare(path: Path, call: ModelCall, ref: list[torch.Tensor]) -> tuple[float, float]:
    """Run ``path`` on ``call``'s inputs; ``(max abs diff, tolerance)`` against ``ref``.

    The tolerance is ``1e-4 * max(1, max |reference|)``.

    Raises:
        VerificationError: outputs differ in count, shape, or beyond the tolerance.
    """
    sess = session(path)
    feeds_all = {n: t.detach().cpu().numpy() for n, t in zip(call.names, call.tensors)}
    # The exporter drops inputs the graph does not use; feed only the ones it kept.
    feeds = {i.name: feeds_all[i.name] for i in sess.get_inputs()}
    got = sess.run(None, feeds)
    if len(got) != len(ref):
        raise VerificationError(f"ONNX model returns {len(got)} outputs, PyTorch {len(ref)}")
    diff, scale = 0.0, 1.0
    for g, r in zip(got, ref):
        r = r.detach().cpu().double().numpy()
        if g.shape != r.shape:
            raise VerificationError(f"ONNX output shape {g.shape} != PyTorch {r.shape}")
        if r.size:
            diff = max(diff, float(np.max(np.abs(g.astype(np.float64) - r))))
            scale = max(scale, float(np.max(np.abs(r))))
    tol = 1e-4 * scale
    if not diff <= tol:  # also catches NaN
        raise VerificationError(
            f"ONNX model differs from PyTorch: max abs diff {diff:.3g} > tolerance {tol:.3g}", diff, tol
        )
    return diff, tol


def verify_onnx(path: str | Path, model: nn.Module, inputs: Any) -> float:
    """Run ``path`` in onnxruntime on ``inputs`` and compare with ``model``.

    Args:
        path: an ONNX file written by :func:`~gblr_compress.export.export_onnx`.
        model: the PyTorch model (its FrozenGBLR layers compute the reference).
        inputs: a Tensor, tuple of Tensors (named ``input_0..``) or dict keyed by input name.

    Returns:
        The max absolute difference over all outputs.

    Raises:
        VerificationError: the difference exceeds ``1e-4 * max(1, max |reference|)``.
        InputError: the file does not exist or the inputs are malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}")
    call = ModelCall(inputs)
    return compare(path, call, reference(model, call))[0]


def reference(model: nn.Module, call: ModelCall) -> list[torch.Tensor]:
    """PyTorch's outputs on ``call``'s inputs, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return call.run(model)[0]
    finally:
        model.train(was_training)
