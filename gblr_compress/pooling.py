"""sentence-transformers folders: the base model with the pooling and normalization the
folder declares, as one module.

A sentence-transformers model saved as a folder (what ``SentenceTransformer.save`` and
the model hubs give) is a HuggingFace base model plus a ``modules.json`` that chains it
with a ``Pooling`` module (``1_Pooling/config.json``) and often a ``Normalize``. Loaded
as a plain HuggingFace folder, the pooling is lost: the graph returns token states and
the user pools them. :class:`SentencePooling` puts the declared chain back: the deployed
graph returns the base model's outputs (``last_hidden_state``, a BERT's
``pooler_output``) and the embedding ``SentenceTransformer.encode`` gives
(``sentence_embedding``).

Pure torch and JSON: sentence-transformers itself is never imported.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gblr_compress.adapter import DICT_KEYS

__all__ = ["POOLING_MODES", "SentenceChain", "SentencePooling", "pool", "read_sentence_chain", "transformer_folder"]

# The pooling modes this module computes, in the order sentence-transformers
# concatenates them when several are on (``Pooling.forward``).
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")
_CONFIG_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                "mean": "pooling_mode_mean_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}
# Modes sentence-transformers has that are not computed here.
_OTHER_MODES = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
_ST = "sentence_transformers.models."


@dataclass(frozen=True)
class SentenceChain:
    """What a folder's ``modules.json`` declares, when this module can compute it.

    Attributes:
        base: the folder holding the base model (``config.json``).
        modes: the pooling modes on, in :data:`POOLING_MODES` order.
        normalize: whether a ``Normalize`` module follows the pooling.
    """

    base: Path
    modes: tuple[str, ...]
    normalize: bool


def _modules(folder: Path) -> list[tuple[str, str]] | str | None:
    """``(type, path)`` of each module ``folder/modules.json`` lists, in order; a one-line
    reason when the file cannot be read; None when there is none."""
    path = folder / "modules.json"
    if not path.is_file():
        return None
    try:
        modules = json.loads(path.read_text())
        return [(str(m["type"]), str(m.get("path", ""))) for m in sorted(modules, key=lambda m: int(m["idx"]))]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return f"its modules.json cannot be read ({type(exc).__name__})"


def transformer_folder(folder: Path) -> Path:
    """The folder holding a sentence-transformers folder's base model and tokenizer:
    the path its ``modules.json`` gives the ``Transformer`` module (``""`` in folders
    saved by sentence-transformers 2 and later; ``0_Transformer`` in older ones and in
    some hub copies), or ``folder`` itself for a plain HuggingFace folder or a
    ``modules.json`` that names no such directory."""
    return _base_folder(folder, _modules(folder))


def _base_folder(folder: Path, kinds: list[tuple[str, str]] | str | None) -> Path:
    """:func:`transformer_folder` from ``folder``'s modules (:func:`_modules`) already read."""
    if not isinstance(kinds, list) or not kinds or kinds[0][0] != f"{_ST}Transformer":
        return folder
    base = folder / kinds[0][1]
    return base if base.is_dir() else folder


def read_sentence_chain(folder: Path) -> SentenceChain | str | None:
    """The chain ``folder/modules.json`` declares: a :class:`SentenceChain`, or a
    one-line reason why it cannot be computed here (a ``Dense`` layer, a weighted-mean
    or last-token pooling, an unreadable file), or None when the folder has no
    ``modules.json`` naming a sentence-transformers ``Transformer`` followed by a
    ``Pooling`` (a plain HuggingFace folder)."""
    kinds = _modules(folder)
    if not isinstance(kinds, list):
        return kinds
    if len(kinds) < 2 or kinds[0][0] != f"{_ST}Transformer" or kinds[1][0] != f"{_ST}Pooling":
        return None
    rest = [k for k, _ in kinds[2:]]
    if any(k != f"{_ST}Normalize" for k in rest):
        others = ", ".join(sorted({k.rsplit(".", 1)[-1] for k in rest if k != f"{_ST}Normalize"}))
        return f"its modules.json chains {others} after the pooling, which is not computed here"
    try:
        config = json.loads((folder / kinds[1][1] / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"its pooling config cannot be read ({type(exc).__name__})"
    if not isinstance(config, Mapping):
        return "its pooling config is not a JSON object"
    unsupported = [k for k in _OTHER_MODES if config.get(k)]
    if unsupported:
        return f"its pooling ({', '.join(unsupported)}) is not computed here"
    modes = tuple(m for m in POOLING_MODES if config.get(_CONFIG_KEYS[m]))
    if not modes:
        return "its pooling config turns no pooling mode on"
    return SentenceChain(_base_folder(folder, kinds), modes, bool(rest))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, modes: Sequence[str]) -> torch.Tensor:
    """Sentence vectors from token states ``(B, T, H)`` as sentence-transformers'
    ``Pooling`` computes them, the modes' vectors concatenated: ``(B, H * len(modes))``.

    ``attention_mask`` ``(B, T)`` marks the real tokens (None: all are)."""
    B, T, _ = hidden.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=hidden.device)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    count = mask.sum(1).clamp_min(1e-9)  # (B, 1), as sentence-transformers clamps it
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            # Padded positions may never win (sentence-transformers fills them with -1e9).
            out.append(hidden.masked_fill(mask == 0, -1e9).max(1).values)
        elif mode == "mean":
            out.append((hidden * mask).sum(1) / count)
        elif mode == "mean_sqrt_len":
            out.append((hidden * mask).sum(1) / count.sqrt())
        else:
            raise ValueError(f"unknown pooling mode {mode!r}; known: {POOLING_MODES}")
    return torch.cat(out, dim=1)  # (B, H * len(modes))


class SentencePooling(nn.Module):
    """A HuggingFace base model followed by a sentence-transformers pooling (and
    normalization): returns the base model's tensor outputs (``last_hidden_state``
    ``(B, T, H)``, a BERT's ``pooler_output``) and ``sentence_embedding``
    ``(B, H * len(modes))``.

    The base model's outputs stay: they are what the distillation compares (the
    embedding is pooled from the token states, so it is left out of that comparison,
    :attr:`pooled_outputs`), and what a user of the plain folder already reads. On
    all-MiniLM-L6-v2's folder at budget 0.8 from 256 hand-written sentences, news
    sentences' embedding cosine to ``SentenceTransformer.encode``: 0.9613 distilled on
    the token states and the pooler output (the plain folder: 0.9605 / 0.9614, seeds 0 /
    1), 0.9580 / 0.9585 on the token states alone, 0.9564 on the token states and the
    embedding (``benchmarks/README.md``).

    Attributes:
        model: the base model (its layers are named ``model.<name>`` here).
        modes: the pooling modes, in :data:`POOLING_MODES` order.
        normalize: whether the sentence vector is L2-normalized.
        input_names: the token inputs the base model's forward takes, in the wrapper's
            forward order (``input_ids`` first).
        pooled_outputs: outputs computed from the others, which the distillation's
            output term leaves out (:func:`~gblr_compress.distill.output_term`).
    """

    pooled_outputs = ("sentence_embedding",)
    # The base model's layers are named "model.<name>"; --include / --exclude patterns
    # written for the plain folder match them without it (swap.find_linears).
    wrapped_prefix = "model."

    def __init__(self, model: nn.Module, modes: Sequence[str], normalize: bool) -> None:
        super().__init__()
        bad = [m for m in modes if m not in POOLING_MODES]
        if not modes or bad:
            raise ValueError(f"modes must be among {POOLING_MODES}, got {tuple(modes)}")
        self.model = model
        self.modes = tuple(m for m in POOLING_MODES if m in modes)
        self.normalize = normalize
        try:
            takes = set(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            takes = set(DICT_KEYS)
        self.input_names = tuple(k for k in DICT_KEYS if k == "input_ids" or k in takes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        out = self.model(**{k: v for k, v in given.items() if v is not None and k in self.input_names})
        outputs = _base_outputs(out)
        hidden = outputs["last_hidden_state"]  # (B, T, H)
        sentence = pool(hidden, attention_mask, self.modes)  # (B, H * len(modes))
        if self.normalize:
            sentence = F.normalize(sentence, p=2.0, dim=1)
        return {**outputs, "sentence_embedding": sentence}


def _base_outputs(out: Any) -> dict[str, torch.Tensor]:
    """The base model's tensor outputs by name, token states first as
    ``last_hidden_state``: a HuggingFace output's fields, else its first tensor (what
    sentence-transformers' ``Transformer`` reads)."""
    if isinstance(out, Mapping):
        named = {str(k): v for k, v in out.items() if isinstance(v, torch.Tensor)}
    else:
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        named = {"last_hidden_state": first} if isinstance(first, torch.Tensor) else {}
    hidden = named.get("last_hidden_state", next(iter(named.values()), None))
    if hidden is None or hidden.dim() != 3:
        raise ValueError("the base model's first output is not a (batch, tokens, hidden) tensor")
    return {"last_hidden_state": hidden, **{k: v for k, v in named.items() if v is not hidden}}
