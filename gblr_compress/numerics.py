"""Numerical checks before the long phases: finite weights, data and outputs, and the
compute dtype.

A NaN or Inf in a weight or a calibration tensor poisons every activation moment and
every loss after it; caught late it shows up as an internal error after minutes of work,
or worse as a broken exported model. :func:`check_finite_model`,
:func:`check_finite_batches` and :func:`check_finite_outputs` refuse such inputs with one
line naming the tensor, before any work is done.

Half-precision checkpoints (float16 / bfloat16) are computed in float32
(:func:`to_float32`): moments, window searches and the distillation need float32
precision (float16 sums of squares overflow at 65504), and the exported ONNX model is
float32 unless ``--export-dtype`` asks for float16 (:mod:`gblr_compress.export.half`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gblr_compress.batches import Batch, flatten_outputs
from gblr_compress.errors import InputError

__all__ = [
    "HALF_DTYPES",
    "batches_to_float32",
    "check_declared_size",
    "check_finite_batches",
    "check_finite_model",
    "check_finite_outputs",
    "to_float32",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _bad_count(t: torch.Tensor) -> int:
    """Number of NaN / Inf entries of a floating tensor (0 for other dtypes)."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return 0
    return int((~torch.isfinite(t)).sum())


def _describe(t: torch.Tensor, bad: int) -> str:
    kinds = []
    if bool(torch.isnan(t).any()):
        kinds.append("NaN")
    if bool(torch.isinf(t).any()):
        kinds.append("Inf")
    return f"{'/'.join(kinds)} in {bad:,} of {t.numel():,} values"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_declared_size(model: nn.Module, batches: Sequence[Batch], limit_bytes: int | None) -> None:
    """Refuse weights or calibration data larger than the memory there is.

    A file can declare far more values than it stores (a stride-0 view saved by
    ``torch.save`` keeps one element for a tensor of any shape); every check and every
    phase after loading would materialize them, so the declared size is compared with
    ``limit_bytes`` (what the machine has available) before anything touches them.

    Raises:
        InputError: ``"calibration data declares 37.3 GiB of values ..."``.
    """
    if limit_bytes is None:
        return
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    data = sum(t.numel() * t.element_size() for b in batches for _, t in _named_tensors(b))
    for what, size in (("the model's weights", weights), ("the calibration data", data)):
        if size > limit_bytes:
            raise InputError(f"{what} declare {_gib(size)} of values, more than the {_gib(limit_bytes)} available")


def check_finite_model(model: nn.Module) -> None:
    """Refuse a model with a NaN or Inf in any parameter or floating buffer.

    Raises:
        InputError: ``"the model's weight fc1.weight holds NaN in 3 of 2,048 values"``.
    """
    for kind, named in (("weight", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            bad = _bad_count(t.detach())
            if bad:
                raise InputError(
                    f"the model's {kind} {name} holds {_describe(t.detach(), bad)}: "
                    "nothing can be compressed from it; check the checkpoint"
                )


def _named_tensors(batch: Batch) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        yield "input", batch
    elif isinstance(batch, Mapping):
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                yield f"input {k!r}", v
    elif isinstance(batch, (tuple, list)):
        for i, v in enumerate(batch):
            if isinstance(v, torch.Tensor):
                yield f"input {i}", v


def check_finite_batches(batches: Sequence[Batch], what: str = "calibration data") -> None:
    """Refuse batches with a NaN or Inf in any floating tensor.

    Raises:
        InputError: ``"calibration data batch 4, input 'x', holds Inf in 1 of 512 values"``.
    """
    for i, batch in enumerate(batches):
        for name, t in _named_tensors(batch):
            bad = _bad_count(t)
            if bad:
                raise InputError(f"{what} batch {i}, {name}, holds {_describe(t, bad)}")


def check_finite_outputs(outputs: Any) -> None:
    """Refuse a model whose output on a calibration batch is not finite (weights or
    inputs of a scale that overflows float32).

    Raises:
        InputError: ``"the model's output 0 on the first calibration batch holds Inf ..."``.
    """
    for i, t in enumerate(flatten_outputs(outputs)):
        bad = _bad_count(t.detach())
        if bad:
            raise InputError(
                f"the model's output {i} on the first calibration batch holds {_describe(t.detach(), bad)}: "
                "the weights or inputs overflow float32"
            )


def to_float32(model: nn.Module) -> str | None:
    """Cast a model with float16 / bfloat16 parameters or buffers to float32 in place.

    Returns:
        The half dtype found (``"float16"`` / ``"bfloat16"``), or None when the model
        was left as it is.
    """
    found = None
    for t in [*model.parameters(), *model.buffers()]:
        if t.dtype in HALF_DTYPES:
            found = str(t.dtype).removeprefix("torch.")
            break
    if found is None:
        return None
    model.float()  # casts floating parameters and buffers only; integer buffers stay
    return found


def _batch_float32(batch: Batch) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.float() if batch.dtype in HALF_DTYPES else batch
    if isinstance(batch, Mapping):
        return {k: _batch_float32(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_batch_float32(v) for v in batch)
    return batch


def batches_to_float32(batches: Sequence[Batch]) -> list[Batch]:
    """The batches with every float16 / bfloat16 tensor cast to float32 (for a model
    :func:`to_float32` cast); other tensors unchanged."""
    return [_batch_float32(b) for b in batches]
