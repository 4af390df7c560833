"""Loading models and calibration data, with one-line errors for anything unusable.

Supported model sources (see :func:`load_model`):

(a) a whole module saved with ``torch.save(model)``;
(b) a bundle dict saved with ``torch.save``: ``{"model": module, "example_inputs": ...,
    "calib": [...]}``;
(c) a state_dict (``.pt``/``.pth``) or ``.safetensors`` file plus a factory
    ``package.module:function`` that builds the architecture;
(d) a HuggingFace-style directory (``config.json`` + ``model.safetensors``) when
    ``transformers`` is installed.

Formats (a) and (b) are pickles: loading them runs code stored in the file, so only load
files you trust. Format (c) is the safe path (``torch.load(weights_only=True)`` or
safetensors, which hold tensors only).

A batch is what the model is called with: a Tensor (``model(x)``), a tuple of tensors
(``model(*batch)``) or a dict of tensors (``model(**batch)``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from gblr_compress.calib import run_model
from gblr_compress.errors import InputError

__all__ = [
    "Batch",
    "LoadedModel",
    "SUPPORTED_MODEL_FORMATS",
    "check_inputs_fit",
    "describe_batch",
    "find_linear_names",
    "load_calib",
    "load_factory",
    "load_model",
    "parse_input_spec",
    "synthetic_inputs",
    "vocab_hint",
]

Batch = Union[torch.Tensor, tuple, dict]

SUPPORTED_MODEL_FORMATS = (
    "a torch.save'd nn.Module, a bundle dict {'model': module, ...}, "
    "a state_dict .pt/.pth or .safetensors file with --factory package.module:function, "
    "or a HuggingFace directory (config.json + model.safetensors)"
)

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


@dataclass
class LoadedModel:
    """A model read from disk, plus whatever data came with it.

    Attributes:
        model: the module, on CPU, in eval mode.
        example_inputs: one batch stored in a bundle, else ``None``.
        calib: calibration batches stored in a bundle, else ``None``.
        source_format: ``"module"``, ``"bundle"``, ``"state_dict"``, ``"safetensors"`` or
            ``"huggingface"``.
    """

    model: nn.Module
    example_inputs: Batch | None
    calib: list[Batch] | None
    source_format: str


# ------------------------------------------------------------------------ helpers
def _short(exc: BaseException, limit: int = 160) -> str:
    """First line of an exception message, trimmed: user errors must stay one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """Let modules in the working directory be imported while loading.

    ``python -m`` puts the working directory on ``sys.path`` but an installed console
    script does not, so ``--factory samples.models:digits_mlp`` and pickled classes from
    the user's project would fail to import depending on how the tool was started.
    """
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _zip_kind(path: Path) -> str | None:
    """Recognize zip archives torch can write but we cannot compress (by their entries)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
        return "TorchScript"
    if any(n.endswith("/archive_format") or n.endswith("/models/model.json") for n in names):
        return "torch.export"
    return None


def _is_tensor_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or directory: {p}")
    return p


def find_linear_names(model: nn.Module) -> list[str]:
    """Dotted names of every ``nn.Linear`` in ``model``, in module order."""
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


def _finish(model: Any, path: Path, **kw: Any) -> LoadedModel:
    if not isinstance(model, nn.Module):
        raise InputError(f"{path} does not hold an nn.Module (got {type(model).__name__})")
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(f"{path} is a TorchScript archive, which cannot be compressed; supported: {SUPPORTED_MODEL_FORMATS}")
    if not find_linear_names(model):
        raise InputError(f"the model in {path} has no nn.Linear layers: nothing to compress")
    model = model.to("cpu").eval()
    return LoadedModel(model=model, **kw)


# ------------------------------------------------------------------------ factory
def load_factory(spec: str) -> nn.Module:
    """Build a model from ``"package.module:function"`` (called with no arguments).

    The module is imported with the working directory importable, like ``python -m``.

    Raises:
        InputError: malformed spec, import failure, missing or non-callable attribute,
            the call failed, or it did not return an ``nn.Module``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or not re.fullmatch(r"[\w.]+", module_name + attr):
        raise InputError(f"--factory must look like package.module:function, got {spec!r}")
    with _cwd_importable():
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any import-time failure is the user's module
            raise InputError(f"cannot import factory module {module_name!r}: {_short(exc)}") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"factory {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"factory {spec!r} is not callable (it is a {type(target).__name__})")
    try:
        model = target()
    except Exception as exc:
        raise InputError(f"factory {spec!r} failed: {type(exc).__name__}: {_short(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise InputError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, factory: str) -> None:
    try:
        result = model.load_state_dict(dict(state), strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        detail = str(exc).strip().splitlines()[-1].strip()
        raise InputError(f"{path} does not match the model built by {factory!r}: {detail[:160]}") from exc
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[0]!r}")
        raise InputError(f"{path} does not match the model built by {factory!r}: {'; '.join(parts)}")


# -------------------------------------------------------------------------- models
def load_model(path: str | os.PathLike, factory: str | None = None) -> LoadedModel:
    """Load a model in any supported format (see the module docstring).

    Without ``factory`` a ``.pt``/``.pth`` file is unpickled with
    ``torch.load(weights_only=False)``: **this runs code from the file**; only load
    checkpoints you trust. With ``factory`` the file must be a state_dict and is read
    safely (``weights_only=True`` or safetensors).

    Args:
        path: checkpoint file, ``.safetensors`` file or HuggingFace directory.
        factory: ``"package.module:function"`` building the architecture for a
            state_dict / safetensors file.

    Returns:
        A :class:`LoadedModel` whose model is on CPU in eval mode.

    Raises:
        InputError: the path is missing, unreadable, of an unsupported kind, or holds
            a model without ``nn.Linear`` layers.
    """
    p = _check_path(path)
    if p.is_dir():
        return _load_hf_dir(p)
    if p.suffix == ".safetensors":
        return _load_safetensors(p, factory)
    kind = _zip_kind(p)
    if kind is not None:
        raise InputError(
            f"{p} is a {kind} archive, which cannot be compressed; supported: {SUPPORTED_MODEL_FORMATS}"
        )
    if factory is not None:
        return _load_state_dict_file(p, factory)
    with _cwd_importable():
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as exc:
            # The pickle names a class that cannot be found in this environment.
            raise InputError(
                f"cannot unpickle {p}: {_short(exc)}; make the model's code importable, "
                "or save a state_dict and pass --factory"
            ) from exc
        except Exception as exc:
            raise InputError(
                f"cannot read {p} as a PyTorch checkpoint ({_short(exc, 90)}); supported: "
                f"{SUPPORTED_MODEL_FORMATS}"
            ) from exc
    if isinstance(obj, nn.Module):
        return _finish(obj, p, example_inputs=None, calib=None, source_format="module")
    if isinstance(obj, Mapping) and "model" in obj:
        return _from_bundle(obj, p)
    if _is_tensor_mapping(obj) or (isinstance(obj, Mapping) and _is_tensor_mapping(obj.get("state_dict"))):
        raise InputError(
            f"{p} holds a state_dict: pass --factory package.module:function to build the architecture"
        )
    raise InputError(
        f"{p} holds a {type(obj).__name__}, not a model; supported: {SUPPORTED_MODEL_FORMATS}"
    )


def _from_bundle(obj: Mapping[str, Any], p: Path) -> LoadedModel:
    unknown = sorted(set(obj) - {"model", "example_inputs", "calib"})
    if unknown:
        raise InputError(f"bundle {p} has unknown key(s) {unknown}; allowed: model, example_inputs, calib")
    example = obj.get("example_inputs")
    if isinstance(example, list):
        example = tuple(example)  # positional inputs; a tuple is the canonical form
    if example is not None:
        _check_batch(example, f"bundle {p} example_inputs")
    calib = obj.get("calib")
    if calib is not None:
        calib = _as_batch_list(calib, f"bundle {p} calib")
    return _finish(obj["model"], p, example_inputs=example, calib=calib, source_format="bundle")


def _load_state_dict_file(p: Path, factory: str) -> LoadedModel:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"cannot read {p} as a state_dict with weights_only=True ({_short(exc, 90)}); "
            "a whole pickled model is loaded without --factory"
        ) from exc
    if isinstance(obj, Mapping) and _is_tensor_mapping(obj.get("state_dict")):
        obj = obj["state_dict"]  # common trainer layout: {"state_dict": ..., "epoch": ...}
    if not _is_tensor_mapping(obj):
        raise InputError(f"{p} is not a state_dict (a dict of name -> tensor)")
    model = load_factory(factory)
    _load_state_into(model, obj, p, factory)
    return _finish(model, p, example_inputs=None, calib=None, source_format="state_dict")


def _load_safetensors(p: Path, factory: str | None) -> LoadedModel:
    if factory is None:
        raise InputError(
            f"{p} holds weights only: pass --factory package.module:function to build the architecture"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"cannot read {p} as safetensors: {_short(exc)}") from exc
    if not state:
        raise InputError(f"{p} holds no tensors")
    model = load_factory(factory)
    _load_state_into(model, state, p, factory)
    return _finish(model, p, example_inputs=None, calib=None, source_format="safetensors")


def _load_hf_dir(p: Path) -> LoadedModel:
    if not (p / "config.json").is_file():
        raise InputError(f"{p} is a directory without config.json; supported: {SUPPORTED_MODEL_FORMATS}")
    try:
        import transformers
    except ImportError as exc:
        raise InputError(
            f"{p} is a HuggingFace directory: loading it needs `pip install transformers`"
        ) from exc
    try:
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
        # No trust_remote_code: a directory must not run code of its own here.
        model = cls.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:
        raise InputError(f"cannot load HuggingFace model from {p}: {_short(exc)}") from exc
    return _finish(model, p, example_inputs=None, calib=None, source_format="huggingface")


# ----------------------------------------------------------------------- batches
def _check_batch(batch: Any, what: str) -> None:
    if isinstance(batch, torch.Tensor):
        return
    if isinstance(batch, tuple) and batch and all(isinstance(t, torch.Tensor) for t in batch):
        return
    if _is_tensor_mapping(batch):
        return
    raise InputError(f"{what}: a batch must be a tensor, a tuple of tensors or a dict of tensors")


def _as_batch_list(obj: Any, what: str) -> list[Batch]:
    """A list is a list of batches; a tensor, tuple or dict is one batch."""
    batches = obj if isinstance(obj, list) else [obj]
    if not batches:
        raise InputError(f"{what} is an empty list")
    for b in batches:
        _check_batch(b, what)
    kinds = {type(b).__name__ for b in batches}
    if len(kinds) > 1:
        raise InputError(f"{what}: batches mix kinds {sorted(kinds)}")
    return list(batches)


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
    p = _check_path(path)
    if p.suffix == ".npz":
        return [_load_npz(p)]
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"cannot read calibration data {p} ({_short(exc, 90)}); expected a .pt of tensors "
            "(a tensor, tuple/dict of tensors, or a list of those) or an .npz"
        ) from exc
    return _as_batch_list(obj, f"calibration data {p}")


def _load_npz(p: Path) -> Batch:
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in data.files}
    except Exception as exc:
        raise InputError(f"cannot read calibration data {p} as .npz: {_short(exc)}") from exc
    if not arrays:
        raise InputError(f"calibration data {p} holds no arrays")
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    positional = [f"arr_{i}" for i in range(len(tensors))]
    if sorted(tensors) == sorted(positional):
        items = tuple(tensors[k] for k in positional)
        return items[0] if len(items) == 1 else items
    return tensors


# --------------------------------------------------------------- input specs
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


# ------------------------------------------------------------------ fit check
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's own flag back.

    Running in train mode would update BatchNorm statistics: the user's model must not
    change because we looked at it.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def check_inputs_fit(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` once on ``batch`` (no grad, eval mode) to prove the data fits.

    Returns:
        The model's output, for callers that inspect it (e.g. logits or not).

    Raises:
        InputError: ``"calibration data does not fit the model: <short reason>"`` for any
            exception raised by the call.
    """
    try:
        _check_batch(batch, "calibration batch")
        with torch.no_grad(), _eval_mode(model):
            return run_model(model, batch)
    except InputError as exc:
        raise InputError(f"calibration data does not fit the model: {_short(exc)}") from exc
    except Exception as exc:
        raise InputError(
            f"calibration data does not fit the model: {type(exc).__name__}: {_short(exc)}"
        ) from exc


def describe_batch(batch: Batch) -> str:
    """Short text like ``input_ids:int64[8,64], attention_mask:int64[8,64]`` for messages."""

    def one(t: torch.Tensor) -> str:
        return f"{str(t.dtype).removeprefix('torch.')}[{','.join(map(str, t.shape))}]"

    if isinstance(batch, Mapping):
        return ", ".join(f"{k}:{one(v)}" for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        return ", ".join(one(t) for t in batch)
    return one(batch)

