"""Loading models, with one-line errors for anything unusable.

Supported model sources (see :func:`load_model`):

(a) a whole module saved with ``torch.save(model)``;
(b) a bundle dict saved with ``torch.save``: ``{"model": module, "example_inputs": ...,
    "calib": [...]}``;
(c) a state_dict (``.pt``/``.pth``) or ``.safetensors`` file plus a factory
    ``package.module:function`` that builds the architecture;
(d) a HuggingFace-style directory (``config.json`` + ``model.safetensors``) when
    ``transformers`` is installed; a sentence-transformers folder (``modules.json``)
    keeps its pooling and normalization (:mod:`gblr_compress.pooling`).

Formats (a) and (b) are pickles: loading them runs code stored in the file, so only load
files you trust. Format (c) is the safe path (``torch.load(weights_only=True)`` or
safetensors, which hold tensors only).

A model whose forward takes one dict of token tensors (a pickled sentence-transformers
model) is wrapped in :class:`~gblr_compress.adapter.DictCall`, which takes named tensors;
torch's ``nn.MultiheadAttention`` modules are replaced by
:class:`~gblr_compress.attention.CalledAttention`, whose projections are called Linears.

A bundle's ``example_inputs`` and ``calib`` are batches (:mod:`gblr_compress.batches`).
Calibration files, input specs and synthetic inputs are in :mod:`gblr_compress.calibration`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gblr_compress.adapter import DICT_KEYS, DictCall, find_tokenizer, takes_one_dict
from gblr_compress.attention import call_attention_
from gblr_compress.batches import Batch, as_batch_list, check_batch, is_tensor_mapping
from gblr_compress.errors import InputError
from gblr_compress.pooling import SentenceChain, SentencePooling, read_sentence_chain, transformer_folder
from gblr_compress.swap import find_linears

__all__ = [
    "LoadedModel",
    "SUPPORTED_MODEL_FORMATS",
    "existing_path",
    "load_factory",
    "load_model",
    "short_reason",
]

SUPPORTED_MODEL_FORMATS = (
    "a torch.save'd nn.Module, a bundle dict {'model': module, ...}, "
    "a state_dict .pt/.pth or .safetensors file with --factory package.module:function, "
    "or a HuggingFace directory (config.json + model.safetensors)"
)

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
def short_reason(exc: BaseException, limit: int = 160) -> str:
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
    try:  # is_zipfile itself raises on some corrupted end records
        if not zipfile.is_zipfile(path):
            return None
        names = zipfile.ZipFile(path).namelist()
    except Exception:  # BadZipFile, OSError, struct errors...: a sniff, torch.load judges the file
        return None
    if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
        return "TorchScript"
    if any(n.endswith("/archive_format") or n.endswith("/models/model.json") for n in names):
        return "torch.export"
    return None


def existing_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path; raises :class:`InputError` when nothing is there."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or directory: {p}")
    return p


def _finish(model: Any, path: Path, **kw: Any) -> LoadedModel:
    if not isinstance(model, nn.Module):
        raise InputError(f"{path} does not hold an nn.Module (got {type(model).__name__})")
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(f"{path} is a TorchScript archive, which cannot be compressed; supported: {SUPPORTED_MODEL_FORMATS}")
    if not find_linears(model):
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
        raise InputError(f"the factory must look like package.module:function, got {spec!r}")
    with _cwd_importable():
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any import-time failure is the user's module
            raise InputError(f"cannot import factory module {module_name!r}: {short_reason(exc)}") from exc
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
        raise InputError(f"factory {spec!r} failed: {type(exc).__name__}: {short_reason(exc)}") from exc
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
def load_model(
    path: str | os.PathLike, factory: str | None = None, warn: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a model in any supported format (see the module docstring).

    Without ``factory`` a ``.pt``/``.pth`` file is unpickled with
    ``torch.load(weights_only=False)``: **this runs code from the file**; only load
    checkpoints you trust. With ``factory`` the file must be a state_dict and is read
    safely (``weights_only=True`` or safetensors).

    Args:
        path: checkpoint file, ``.safetensors`` file or HuggingFace directory.
        factory: ``"package.module:function"`` building the architecture for a
            state_dict / safetensors file.
        warn: called with a one-line warning right before a file is unpickled (the
            only load that can run code from the file); None: no warning.
        note: called with a one-line note on what was loaded when it is not what the
            file names (a HuggingFace folder's base model, see :func:`_load_hf_dir`; a
            bundle's keys besides model, example_inputs and calib, which are ignored; a
            model whose forward takes one dict, wrapped in
            :class:`~gblr_compress.adapter.DictCall`; ``nn.MultiheadAttention`` modules
            replaced by :class:`~gblr_compress.attention.CalledAttention`).

    Returns:
        A :class:`LoadedModel` whose model is on CPU in eval mode.

    Raises:
        InputError: the path is missing, unreadable, of an unsupported kind, or holds
            a model without ``nn.Linear`` layers.
    """
    loaded = _load_any(existing_path(path), factory, warn, note)
    replaced = call_attention_(loaded.model)
    if replaced and note is not None:
        note(f"{path}: {replaced} nn.MultiheadAttention module(s) run as explicit attention whose q_proj / "
             "k_proj / v_proj / out_proj are called Linear layers, so they can be compressed (same function)")
    if takes_one_dict(loaded.model):
        loaded.model = _dict_call(loaded.model)
        if note is not None:
            names = ", ".join(loaded.model.input_names)
            note(f"{path}: its forward takes one dict of token tensors ({type(loaded.model.model).__name__}): "
                 f"it is called, and its graph exported, with the named tensors {names}")
    return loaded


def _dict_call(model: nn.Module) -> DictCall:
    """``model`` (its forward takes one dict) wrapped to take named tensors: the keys its
    tokenizer makes where it carries one, else input_ids and attention_mask."""
    tok = find_tokenizer(model)
    names = tuple(getattr(tok, "model_input_names", None) or ("input_ids", "attention_mask"))
    names = tuple(k for k in names if k in DICT_KEYS)
    return DictCall(model, names if "input_ids" in names else ("input_ids", "attention_mask"))


def _load_any(p: Path, factory: str | None, warn: Callable[[str], None] | None,
              note: Callable[[str], None] | None) -> LoadedModel:
    """:func:`load_model` before its attention is replaced and a dict-taking forward wrapped."""
    if p.is_dir():
        return _load_hf_dir(p, note)
    if p.suffix == ".safetensors":
        return _load_safetensors(p, factory)
    kind = _zip_kind(p)
    if kind is not None:
        raise InputError(
            f"{p} is a {kind} archive, which cannot be compressed; supported: {SUPPORTED_MODEL_FORMATS}"
        )
    if factory is not None:
        return _load_state_dict_file(p, factory)
    if warn is not None:
        warn(f"{p} is a pickle: loading it runs code from the file")
    with _cwd_importable():
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as exc:
            # The pickle names a class that cannot be found in this environment.
            raise InputError(
                f"cannot unpickle {p}: {short_reason(exc)}; make the model's code importable, "
                "or save a state_dict and pass --factory"
            ) from exc
        except Exception as exc:
            raise InputError(
                f"cannot read {p} as a PyTorch checkpoint ({short_reason(exc, 90)}); supported: "
                f"{SUPPORTED_MODEL_FORMATS}"
            ) from exc
    if isinstance(obj, nn.Module):
        return _finish(obj, p, example_inputs=None, calib=None, source_format="module")
    nested = None if is_tensor_mapping(obj) else _nested_state_dict(obj)
    if is_tensor_mapping(obj) or nested is not None:
        where = "" if nested is None else f" under {nested!r}"
        raise InputError(
            f"{p} holds a state_dict{where}: pass --factory package.module:function to build the architecture"
        )
    if isinstance(obj, Mapping) and "model" in obj:
        return _from_bundle(obj, p, note)
    raise InputError(
        f"{p} holds a {type(obj).__name__}, not a model; supported: {SUPPORTED_MODEL_FORMATS}"
    )


# Where training scripts put the weights in a checkpoint dict ({"state_dict": ...,
# "epoch": ...}, {"model_state_dict": ..., "optimizer_state_dict": ...}, {"model": ...}).
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def _nested_state_dict(obj: Any) -> str | None:
    """The key of ``obj`` (a checkpoint dict) that holds its state_dict, if any."""
    if not isinstance(obj, Mapping):
        return None
    return next((k for k in _STATE_DICT_KEYS if is_tensor_mapping(obj.get(k))), None)


def _from_bundle(obj: Mapping[str, Any], p: Path, note: Callable[[str], None] | None = None) -> LoadedModel:
    # A training script's checkpoint also holds its optimizer, epoch and so on: the
    # model is what matters, the rest is named (a misspelt "calib" would show here).
    unknown = sorted(map(str, set(obj) - {"model", "example_inputs", "calib"}))
    if unknown and note is not None:
        note(f"bundle {p}: ignoring key(s) {', '.join(unknown)} (read: model, example_inputs, calib)")
    example = obj.get("example_inputs")
    if isinstance(example, list):
        example = tuple(example)  # positional inputs; a tuple is the canonical form
    if example is not None:
        check_batch(example, f"bundle {p} example_inputs")
    calib = obj.get("calib")
    if calib is not None:
        calib = as_batch_list(calib, f"bundle {p} calib")
    return _finish(obj["model"], p, example_inputs=example, calib=calib, source_format="bundle")


def _load_state_dict_file(p: Path, factory: str) -> LoadedModel:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"cannot read {p} as a state_dict with weights_only=True ({short_reason(exc, 90)}); "
            "a whole pickled model is loaded without --factory"
        ) from exc
    nested = None if is_tensor_mapping(obj) else _nested_state_dict(obj)
    if nested is not None:
        obj = obj[nested]  # a trainer's layout: {"state_dict": ..., "epoch": ...}
    if not is_tensor_mapping(obj):
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
        raise InputError(f"cannot read {p} as safetensors: {short_reason(exc)}") from exc
    if not state:
        raise InputError(f"{p} holds no tensors")
    model = load_factory(factory)
    _load_state_into(model, state, p, factory)
    return _finish(model, p, example_inputs=None, calib=None, source_format="safetensors")


def _load_hf_dir(p: Path, note: Callable[[str], None] | None = None) -> LoadedModel:
    """A HuggingFace folder's model (:func:`_load_hf_model`); a sentence-transformers
    folder's base model with the pooling and normalization its ``modules.json``
    declares (:class:`~gblr_compress.pooling.SentencePooling`), or its base model alone
    when that chain holds more than this package computes (``note`` says so)."""
    chain = read_sentence_chain(p)
    if not isinstance(chain, SentenceChain):
        if chain is not None and note is not None:
            note(f"{p} is a sentence-transformers folder, but {chain}: compressed as its base model, "
                 "whose graph returns token states without the sentence embedding")
        return _load_hf_model(transformer_folder(p), note)
    loaded = _load_hf_model(chain.base, note)
    base = type(loaded.model).__name__
    loaded.model = SentencePooling(loaded.model, chain.modes, chain.normalize).eval()
    if note is not None:
        how = " + ".join(chain.modes) + (" pooling, normalized" if chain.normalize else " pooling")
        note(f"{p} is a sentence-transformers folder: {base} with its {how}; the graph returns {base}'s "
             "outputs and sentence_embedding (what SentenceTransformer.encode gives), and its layers are named "
             "model.<name> (--include / --exclude patterns match them with or without the prefix)")
    return loaded


def _load_hf_model(p: Path, note: Callable[[str], None] | None = None) -> LoadedModel:
    """The folder's model as its config names it, or its base model (``AutoModel``)
    when the folder's weights do not hold that class's head: a sentence-transformers
    folder says ``MPNetForMaskedLM`` but ships the encoder only, and a head initialized
    at random would be the teacher's output (``note`` says which was loaded)."""
    if not (p / "config.json").is_file():
        raise InputError(f"{p} is a directory without config.json; supported: {SUPPORTED_MODEL_FORMATS}")
    try:
        import transformers
    except ImportError as exc:
        raise InputError(
            f"{p} is a HuggingFace directory: loading it needs `pip install transformers`"
        ) from exc
    try:
        # Never trust_remote_code: a directory must not run code of its own here.
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
        # transformers' own "newly initialized" warning would contradict the note below.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            model, info = cls.from_pretrained(str(p), local_files_only=True, trust_remote_code=False,
                                              output_loading_info=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
        missing = list(info.get("missing_keys") or [])
        if missing and cls is not transformers.AutoModel:
            model = transformers.AutoModel.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
            if note is not None:
                note(f"{p}: the weights hold no {arch} head ({len(missing)} missing, e.g. {missing[0]}): "
                     f"loaded the base model ({type(model).__name__}) instead")
    except Exception as exc:
        raise InputError(f"cannot load HuggingFace model from {p}: {short_reason(exc)}") from exc
    return _finish(model, p, example_inputs=None, calib=None, source_format="huggingface")
