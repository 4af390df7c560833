"""Calibration batches: calling a model on one, and reading its outputs.

A batch is whatever the model's forward takes: a tensor, a tuple/list of tensors
(positional arguments) or a dict of tensors (keyword arguments). Outputs may be a tensor,
a tuple/list, a dict or a HuggingFace ``ModelOutput`` (a dict subclass).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = ["Batch", "run_model", "flatten_outputs", "move_batch"]

Batch = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


def run_model(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on a batch: a tensor, positional tuple/list, or keyword dict."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(f"a batch must be a tensor, tuple/list or dict, got {type(batch).__name__}")


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a model output, in a stable order.

    Dicts (and ``ModelOutput``) are read in key order; nested tuples are flattened;
    integer tensors and non-tensors are skipped, since they are not distillation targets.
    """
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return []


def move_batch(batch: Batch, device: torch.device | str) -> Batch:
    """The batch with every tensor on ``device``, same container type."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch
