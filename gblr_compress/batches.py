"""The batch protocol: what a model is called with, and how its outputs are read.

A batch is one forward call's input: a tensor (``model(x)``), a tuple/list of tensors
(``model(*batch)``) or a dict of tensors (``model(**batch)``). Outputs may be a tensor, a
tuple/list, a dict or a HuggingFace ``ModelOutput`` (a dict subclass).

Every tensor/tuple/dict dispatch of the package lives here: calling a model, moving and
cutting batches, the attention mask and token ids of a token batch, and the two ways an
output is read (:func:`flatten_outputs` for losses, :func:`graph_outputs` for export).
Only torch is imported (and the package's error type).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gblr_compress.errors import InputError

__all__ = [
    "Batch",
    "as_batch_list",
    "check_batch",
    "chunk_batch",
    "first_tensor",
    "flatten_outputs",
    "graph_outputs",
    "is_tensor_mapping",
    "leading_size",
    "move_batch",
    "no_token_axis",
    "per_token",
    "plain_attention",
    "real_positions",
    "run_model",
    "split_batches",
    "token_ids",
    "eval_mode",
    "positions",
    "token_mask",
    "with_token_ids",
]

Batch = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


# ----------------------------------------------------------------- calling a model
def first_tensor(out: object) -> torch.Tensor | None:
    """A module's hidden states: its output itself, or the first tensor of a (nested)
    tuple/list (HF layers return ``(hidden_states, attentions, ...)`` in some
    versions); None when there is no tensor there."""
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


def run_model(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on a batch: a tensor, positional tuple/list, or keyword dict, with
    torch's fused encoder path off (:func:`plain_attention`). Every forward of the
    package goes through here: statistics, distillation, evaluation, the export's trace
    and its verification."""
    if not isinstance(batch, (torch.Tensor, Mapping, tuple, list)):
        raise TypeError(f"a batch must be a tensor, tuple/list or dict, got {type(batch).__name__}")
    with plain_attention():
        if isinstance(batch, torch.Tensor):
            return model(batch)
        if isinstance(batch, Mapping):
            return model(**batch)
        return model(*batch)


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a model output, in a stable order (loss targets).

    Dicts (and ``ModelOutput``) are read in key order; nested tuples are flattened;
    integer tensors and non-tensors are skipped, since they are not distillation targets.
    See :func:`graph_outputs` for the strict reading an exported graph needs.
    """
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return []


def graph_outputs(out: Any) -> tuple[list[torch.Tensor], list[str]]:
    """A model output as graph outputs: every tensor, one level deep, with its name
    (dict keys, else ``output_i``).

    Unlike :func:`flatten_outputs` nothing is skipped or flattened: each output of the
    traced graph must be one of the model's, under a stable name, so what a graph
    cannot carry is refused.

    Raises:
        InputError: an output the graph cannot carry (nested containers, non-tensors).
    """
    if isinstance(out, torch.Tensor):
        return [out], ["output_0"]
    if isinstance(out, (tuple, list)):
        items = list(out)
        names = [f"output_{i}" for i in range(len(items))]
    elif isinstance(out, dict):
        items, names = list(out.values()), [str(k) for k in out]
    else:
        raise InputError(f"model output must be a Tensor, tuple/list or dict of Tensors, got {type(out).__name__}")
    if not all(isinstance(t, torch.Tensor) for t in items):
        raise InputError("every model output must be a Tensor (nested outputs are not supported)")
    return items, names


# -------------------------------------------------------------------- validation
def is_tensor_mapping(obj: Any) -> bool:
    """True for a non-empty mapping of ``str`` -> tensor (a dict batch or a state_dict)."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def check_batch(batch: Any, what: str) -> None:
    """Raise unless ``batch`` is a tensor, a non-empty tuple of tensors or a dict of tensors.

    Raises:
        InputError: ``"<what>: a batch must be ..."``.
    """
    if isinstance(batch, torch.Tensor):
        return
    if isinstance(batch, tuple) and batch and all(isinstance(t, torch.Tensor) for t in batch):
        return
    if is_tensor_mapping(batch):
        return
    raise InputError(f"{what}: a batch must be a tensor, a tuple of tensors or a dict of tensors")


def as_batch_list(obj: Any, what: str) -> list[Batch]:
    """A list is a list of batches; a tensor, tuple or dict is one batch.

    Raises:
        InputError: an empty list, a malformed batch, or batches of mixed kinds.
    """
    batches = obj if isinstance(obj, list) else [obj]
    if not batches:
        raise InputError(f"{what} is an empty list")
    for b in batches:
        check_batch(b, what)
    kinds = {type(b).__name__ for b in batches}
    if len(kinds) > 1:
        raise InputError(f"{what}: batches mix kinds {sorted(kinds)}")
    return list(batches)


# ------------------------------------------------------------- moving and cutting
def move_batch(batch: Batch, device: torch.device | str) -> Batch:
    """The batch with every tensor on ``device``, same container type."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def leading_size(batch: Batch) -> int:
    """The batch's leading (sample) size: shared by all its non-scalar tensors, else 1."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    sizes = {v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim()}
    return sizes.pop() if len(sizes) == 1 else 1


def chunk_batch(batch: Batch, lo: int, hi: int) -> Batch:
    """Samples ``lo:hi`` of every non-scalar tensor of the batch, same container type."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    if isinstance(batch, Mapping):
        return {k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in batch.items()}
    return type(batch)(v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() else v for v in batch)


def split_batches(
    batches: Sequence[Batch], fraction: float, min_batches: int = 8
) -> tuple[list[Batch], list[Batch]]:
    """Split calibration batches into (fit, holdout).

    Few large batches (e.g. one tensor of 1000 samples) are first cut along their
    leading axis into at least ``min_batches`` pieces, so both parts get data and the
    distillation gets several steps' worth of distinct batches. The held-out part is the
    last ``ceil(fraction * count)`` batches (none when ``fraction`` is 0 or only one
    batch exists).
    """
    batches = list(batches)
    if 0 < len(batches) < min_batches:
        pieces: list[Batch] = []
        per = math.ceil(min_batches / len(batches))
        for b in batches:
            size = leading_size(b)
            step = max(1, math.ceil(size / per))
            pieces.extend(chunk_batch(b, lo, min(lo + step, size)) for lo in range(0, size, step))
        batches = pieces
    held = math.ceil(fraction * len(batches)) if fraction > 0 and len(batches) > 1 else 0
    return batches[: len(batches) - held], batches[len(batches) - held :]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's own flag back.

    Running in train mode would update BatchNorm statistics (and draw dropout): the
    user's model must not change because we looked at it.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def plain_attention() -> Iterator[None]:
    """torch's fused encoder path off for the duration (:func:`run_model` runs in it).

    In eval mode without gradients ``nn.TransformerEncoderLayer`` runs one fused kernel
    on its Linears' ``weight`` tensors instead of calling them: a compressed layer's
    ``weight`` is its dense matrix, so the student would run at full cost, and the
    kernel has no ONNX export (``aten::_transformer_encoder_layer_fwd``). With the
    path off every Linear is called as a module.
    """
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


# ------------------------------------------------------------------ token batches
def positions(batch: Batch) -> int:
    """Input vectors one batch runs through the layers: the real (unpadded) tokens of a
    token batch, every element of an integer input, all but the feature axis of a float
    one."""
    mask = token_mask(batch)
    if mask is not None:
        return int(mask.sum())
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else (
        batch if isinstance(batch, torch.Tensor) else batch[0])
    shape = tuple(first.shape)
    if first.is_floating_point():
        shape = shape[:-1]
    return max(1, math.prod(shape))


def token_mask(batch: Batch) -> torch.Tensor | None:
    """The batch's ``attention_mask`` as booleans, when it has one (dict batches).

    Positions where it is 0 are padding: what a model computes there is never used, so
    moments and distillation losses leave them out wherever a tensor's leading shape is
    the mask's (``(batch, seq)`` for ``(batch, seq, features)``).
    """
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() >= 1:
            return mask != 0
    return None


def per_token(t: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``t`` holds one vector per position of ``mask`` (its leading shape)."""
    return mask is not None and t.dim() >= 2 and tuple(mask.shape) == tuple(t.shape[:-1])


def no_token_axis(outputs: Sequence[torch.Tensor], hidden: torch.Tensor) -> bool:
    """Whether none of ``outputs`` is per token while ``hidden`` (a block's output,
    ``(batch, tokens, features)``) is: a sentence-embedding wrapper's pooled, normalized
    vector."""
    if hidden.dim() < 3 or not hidden.is_floating_point():
        return False
    tokens = tuple(hidden.shape[:2])
    return not any(o.dim() >= 2 and tuple(o.shape[:2]) == tokens for o in outputs)


def real_positions(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``t``'s vectors at the unpadded positions, ``(N, features)``, when ``mask`` is
    its leading shape; otherwise ``t`` unchanged (pooled or 2-D tensors)."""
    if per_token(t, mask):
        return t[mask.to(t.device)]
    return t


def token_ids(batch: Batch) -> torch.Tensor | None:
    """The batch's token ids: a dict's ``input_ids``, a bare 2-D integer tensor, or the
    first element of a tuple/list when that is one (other integer inputs, such as position
    or segment ids, must not be resampled)."""
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
    elif isinstance(batch, (tuple, list)):
        ids = batch[0] if batch else None
    else:
        ids = batch
    integer = isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dtype != torch.bool
    if integer and ids.dim() == 2:
        return ids
    return None


def with_token_ids(batch: Batch, ids: torch.Tensor) -> Batch:
    """The batch with its token ids (where :func:`token_ids` finds them) replaced by ``ids``."""
    if isinstance(batch, Mapping):
        return {**batch, "input_ids": ids}
    if isinstance(batch, (tuple, list)):
        return type(batch)([ids, *batch[1:]])
    return ids
