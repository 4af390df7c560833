"""Calibration data: files, input specs, synthetic inputs, and the choice between them.

:func:`calibration_batches` is the one place that decides where a run's calibration
batches come from: a ``--calib`` file (:func:`load_calib`), else the batches stored in
a bundle, else synthetic inputs (:func:`synthetic_inputs`) shaped by ``--input-spec``
(:func:`parse_input_spec`) or by the bundle's ``example_inputs``. :func:`check_inputs_fit`
proves one batch runs through the model before any work is done.

Batches follow :mod:`gblr_compress.batches`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gblr_compress.batches import Batch, as_batch_list, check_batch, eval_mode, run_model
from gblr_compress.checkpoint import LoadedModel, existing_path, short_reason
from gblr_compress.errors import InputError

__all__ = [
    "calibration_batches",
    "check_inputs_fit",
    "load_calib",
    "parse_input_spec",
    "spec_like",
    "synthetic_inputs",
    "vocab_hint",
]


# ------------------------------------------------------------ calibration files
def load_calib(path: str | os.PathLike) -> list[Batch]:
    """Read calibration batches from ``.pt`` or ``.npz``.

    ``.pt`` (read with ``weights_only=True``, so it cannot run code): a tensor, a tuple
    or dict of tensors (one batch), or a list of such batches (a list is always a list
    of batches; positional inputs of one batch are a tuple). ``.npz``: one batch;
    named arrays become dict inputs (``model(**batch)``), ``arr_0, arr_1, ...`` (what
    ``np.savez(path, a, b)`` writes) become a tuple, a lone ``arr_0`` a tensor.

    Raises:
        InputError: missing, unreadable or malformed file.
    """
    p = existing_path(path)
    if p.suffix == ".npz":
        return [_load_npz(p)]
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"cannot read calibration data {p} ({short_reason(exc, 90)}); expected a .pt of tensors "
            "(a tensor, tuple/dict of tensors, or a list of those) or an .npz"
        ) from exc
    return as_batch_list(obj, f"calibration data {p}")


def _load_npz(p: Path) -> Batch:
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in data.files}
    except Exception as exc:
        raise InputError(f"cannot read calibration data {p} as .npz: {short_reason(exc)}") from exc
    if not arrays:
        raise InputError(f"calibration data {p} holds no arrays")
    for k, v in arrays.items():  # strings, dates, ...: nothing a model takes
        if v.dtype.kind not in "biufc":
            raise InputError(f"calibration data {p}: array {k!r} holds {v.dtype} values, not numbers")
    try:
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    except TypeError as exc:  # a numeric dtype torch has no tensor type for
        raise InputError(f"calibration data {p}: {short_reason(exc)}") from None
    positional = [f"arr_{i}" for i in range(len(tensors))]
    if sorted(tensors) == sorted(positional):
        items = tuple(tensors[k] for k in positional)
        return items[0] if len(items) == 1 else items
    return tensors


# --------------------------------------------------------------- input specs
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "bool": torch.bool,
}

_SPEC_ITEM = re.compile(r"\s*(?:(?P<name>[A-Za-z_]\w*)\s*:)?\s*(?P<dtype>\w+)\s*\[(?P<dims>[^\]]*)\]\s*")


def parse_input_spec(spec: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Parse ``"input_ids:int64[8,128],attention_mask:int64[8,128]"``.

    Names may be left out for positional inputs (``"float32[8,64]"``); they are then
    numbered ``"0", "1", ...`` and :func:`synthetic_inputs` builds a tuple.

    Returns:
        ``{name: (dtype, shape)}`` in the order given.

    Raises:
        InputError: malformed spec, unknown dtype, non-positive dimension, mixed
            named/positional entries or a repeated name.
    """
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    pos = 0
    named = None
    text = spec.strip()
    if not text:
        raise InputError("input spec is empty; expected e.g. input_ids:int64[8,128]")
    while pos < len(text):
        m = _SPEC_ITEM.match(text, pos)
        if m is None:
            raise InputError(f"cannot parse input spec at {text[pos:pos + 30]!r}; expected e.g. input_ids:int64[8,128]")
        name, dtype_name, dims = m.group("name"), m.group("dtype"), m.group("dims")
        if dtype_name not in _DTYPES:
            raise InputError(f"unknown dtype {dtype_name!r} in input spec; known: {', '.join(_DTYPES)}")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError as exc:
            raise InputError(f"input spec dimensions must be integers, got [{dims}]") from exc
        if not shape or any(d <= 0 for d in shape):
            raise InputError(f"input spec dimensions must be positive, got [{dims}]")
        if named is None:
            named = name is not None
        elif named != (name is not None):
            raise InputError("input spec mixes named and unnamed inputs")
        key = name if name is not None else str(len(out))
        if key in out:
            raise InputError(f"input {key!r} appears twice in the input spec")
        out[key] = (_DTYPES[dtype_name], shape)
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise InputError(f"cannot parse input spec at {text[pos:pos + 30]!r}; separate inputs with ','")
            pos += 1
    return out


def vocab_hint(model: nn.Module) -> int | None:
    """``num_embeddings`` of the model's first ``nn.Embedding`` (safe id range), if any."""
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            return int(mod.num_embeddings)
    return None


def synthetic_inputs(
    spec: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    n_batches: int,
    seed: int = 0,
    vocab_hint: int | None = None,
) -> list[Batch]:
    """Random batches matching a parsed input spec (for data-free compression).

    Floats are standard normal. Integer inputs named like masks (``*mask*``) are ones,
    ``*type*``/``*segment*`` ids are zeros, ``*position*`` ids count ``0..T-1`` along
    the last axis; other integers are uniform in ``[0, vocab_hint)`` (``[0, 2)`` when no
    hint is known, which is safe for any embedding).

    Args:
        spec: output of :func:`parse_input_spec`.
        n_batches: how many batches.
        seed: generator seed; equal seeds give equal batches.
        vocab_hint: exclusive upper bound for token ids, e.g. :func:`vocab_hint`.

    Returns:
        A list of dict batches, or tuple batches (a lone tensor for one input) when
        the spec is positional.
    """
    if n_batches < 1:
        raise InputError(f"need at least one synthetic batch, got {n_batches}")
    gen = torch.Generator().manual_seed(seed)
    high = max(int(vocab_hint or 2), 1)
    positional = all(k.isdigit() for k in spec)
    batches: list[Batch] = []
    for _ in range(n_batches):
        made: dict[str, torch.Tensor] = {}
        for name, (dtype, shape) in spec.items():
            low = name.lower()
            if dtype.is_floating_point:
                t = torch.randn(shape, generator=gen).to(dtype)
            elif "mask" in low:
                t = torch.ones(shape, dtype=dtype)
            elif dtype == torch.bool:
                t = torch.randint(0, 2, shape, generator=gen).bool()
            elif "type" in low or "segment" in low:
                t = torch.zeros(shape, dtype=dtype)
            elif "position" in low:
                t = torch.arange(shape[-1]).expand(shape).to(dtype).clone()
            else:
                t = torch.randint(0, high, shape, generator=gen, dtype=dtype)
            made[name] = t
        if positional:
            items = tuple(made.values())
            batches.append(items[0] if len(items) == 1 else items)
        else:
            batches.append(made)
    return batches


def spec_like(batch: Batch) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The input spec of an example batch (same form as :func:`parse_input_spec`), so
    :func:`synthetic_inputs` can make more batches like it."""
    if isinstance(batch, torch.Tensor):
        return {"0": (batch.dtype, tuple(batch.shape))}
    if isinstance(batch, Mapping):
        return {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()}
    return {str(i): (v.dtype, tuple(v.shape)) for i, v in enumerate(batch)}


# ------------------------------------------------------------------ fit check
def check_inputs_fit(model: nn.Module, batch: Batch, what: str = "calibration data") -> Any:
    """Call ``model`` once on ``batch`` (no grad, eval mode) to prove the data fits
    (``what`` names the data in the error).

    Returns:
        The model's output, for callers that inspect it (e.g. logits or not).

    Raises:
        InputError: ``"calibration data does not fit the model: <short reason>"`` for any
            exception raised by the call.
    """
    try:
        check_batch(batch, "calibration batch")
        with torch.no_grad(), eval_mode(model):
            return run_model(model, batch)
    except InputError as exc:
        raise InputError(f"{what} does not fit the model: {short_reason(exc)}") from exc
    except Exception as exc:
        raise InputError(f"{what} does not fit the model: {type(exc).__name__}: {short_reason(exc)}") from exc


# ------------------------------------------------------------------ the choice
def calibration_batches(
    calib_path: str | os.PathLike | None,
    loaded: LoadedModel,
    input_spec: str | None,
    synthetic_batches: int,
    seed: int,
    warnings: list[str],
) -> tuple[list[Batch], bool]:
    """The run's calibration batches, and whether they are synthetic.

    In order of preference: the file at ``calib_path``, the batches stored in the
    bundle, synthetic batches shaped by ``input_spec``, synthetic batches shaped like the
    bundle's ``example_inputs``. Synthetic data appends a warning to ``warnings``.

    Args:
        calib_path: a ``.pt`` / ``.npz`` calibration file (see :func:`load_calib`), or None.
        loaded: the loaded model, with what its file carried.
        input_spec: e.g. ``"input_ids:int64[8,128]"`` (see :func:`parse_input_spec`).
        synthetic_batches: how many synthetic batches to make.
        seed: seed of the synthetic batches.
        warnings: where the synthetic-data warning goes.

    Raises:
        InputError: a bad file or spec, or nothing to build inputs from.
    """
    if calib_path:
        return load_calib(calib_path), False
    if loaded.calib:
        return list(loaded.calib), False
    if input_spec:
        spec = parse_input_spec(input_spec)
    elif loaded.example_inputs is not None:
        spec = spec_like(loaded.example_inputs)
    else:
        raise InputError(
            "no inputs to run the model on: give --calib FILE, --input-spec SPEC, "
            "or a bundle with example_inputs"
        )
    warnings.append(
        "no calibration data: using synthetic inputs; real data (--calib) gives much better results"
    )
    batches = synthetic_inputs(spec, synthetic_batches, seed, vocab_hint(loaded.model))
    return batches, True
