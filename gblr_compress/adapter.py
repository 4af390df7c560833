"""Models whose forward takes one dict of token tensors, called with named tensors.

A pickled sentence-transformers model (``SentenceTransformer``) runs
``forward(features)``, where ``features`` is ``{"input_ids": ..., "attention_mask": ...}``,
and returns that dict with its outputs added (``token_embeddings``,
``sentence_embedding``). The rest of the package calls a model with a tensor, positional
tensors or keyword tensors, and exports a graph whose inputs are named tensors, so such a
model is wrapped once, at load time, in :class:`DictCall`: its forward takes
``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the tokenizer makes them),
builds the dict and returns the floating-point outputs the model added. The deployed
graph then takes those names and returns those outputs.

Pure torch; no sentence-transformers import (the class is recognized by its module name).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["DICT_KEYS", "DictCall", "find_tokenizer", "from_sentence_transformers", "takes_one_dict"]

# The token tensors a DictCall can pass, in its forward's order.
DICT_KEYS = ("input_ids", "attention_mask", "token_type_ids")

# An annotation that names a dict: "dict[str, Tensor]", typing.Dict[...], Mapping[...].
_DICT_ANNOTATION = re.compile(r"^(typing\.|collections\.abc\.)?(dict|Dict|Mapping|MutableMapping)\b")


def takes_one_dict(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes one argument that is a dict of tensors: it is
    annotated as a dict or mapping, or the model is a sentence-transformers model (whose
    older versions inherit ``nn.Sequential.forward(input)``, with no annotation).

    A one-argument forward annotated otherwise (or not at all, outside
    sentence-transformers) takes a tensor: ``nn.Sequential`` of layers, most models.
    """
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return False
    if len(params) != 1:
        return False
    if from_sentence_transformers(model):
        return True
    ann = params[0].annotation
    if ann is inspect.Parameter.empty:
        return False
    text = ann if isinstance(ann, str) else (ann.__name__ if isinstance(ann, type) else repr(ann))
    return bool(_DICT_ANNOTATION.match(text.strip()))


def from_sentence_transformers(model: nn.Module) -> bool:
    """Whether ``model``'s class (or a base class) comes from sentence-transformers."""
    return any(c.__module__.split(".")[0] == "sentence_transformers" for c in type(model).__mro__)


def find_tokenizer(model: nn.Module) -> Any | None:
    """The HuggingFace tokenizer a model carries as a ``tokenizer`` attribute (a
    sentence-transformers model, a wrapper that keeps its tokenizer), on the model or any
    submodule; None when there is none. Recognized by what calibration uses of it
    (``get_vocab``, ``model_input_names``, called on a text), not by its class."""
    for mod in model.modules():
        try:
            tok = getattr(mod, "tokenizer", None)
        except Exception:  # a property that fails without its backing module
            continue
        if tok is not None and callable(tok) and hasattr(tok, "get_vocab") and hasattr(tok, "model_input_names"):
            return tok
    return None


class DictCall(nn.Module):
    """``model`` called as ``model({"input_ids": ..., "attention_mask": ..., ...})``.

    Attributes:
        model: the wrapped model (its layers are named ``model.<name>`` here).
        input_names: the keys the forward passes (a subset of :data:`DICT_KEYS`, in
            that order): the tokenizer's ``model_input_names`` where known.
        pooled_outputs: outputs pooled from the others, which the distillation's output
            term leaves out (:func:`~gblr_compress.distill.output_term`): a
            sentence-transformers model's ``sentence_embedding``, pooled from its
            ``token_embeddings`` (all-MiniLM-L6-v2 pickled that way, budget 0.8 from 256
            hand-written sentences: news cosine 0.9582 with it left out, 0.9569 compared).
    """

    # The model's layers are named "model.<name>"; --include / --exclude patterns written
    # for the model itself match them without it (swap.find_linears).
    wrapped_prefix = "model."

    def __init__(self, model: nn.Module, input_names: tuple[str, ...] = ("input_ids", "attention_mask")) -> None:
        super().__init__()
        if "input_ids" not in input_names or not set(input_names) <= set(DICT_KEYS):
            raise ValueError(f"input_names must hold input_ids and only {DICT_KEYS}, got {input_names}")
        self.model = model
        self.input_names = tuple(k for k in DICT_KEYS if k in input_names)
        self.pooled_outputs: tuple[str, ...] = ("sentence_embedding",) if from_sentence_transformers(model) else ()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> Any:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        features = {k: v for k, v in given.items() if v is not None}
        # A fresh dict: sentence-transformers adds its outputs to the dict it is given.
        out = self.model(dict(features))
        if isinstance(out, Mapping):
            # The outputs the model added; the inputs it passes through (and strings
            # such as a "modality" tag) are not outputs a graph should return.
            return {k: v for k, v in out.items()
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in features}
        return out
