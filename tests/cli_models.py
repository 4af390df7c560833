"""A small model for CLI tests, importable as a --factory (``tests.cli_models:small_mlp``)."""

from __future__ import annotations

import torch
from torch import nn


class SmallMLP(nn.Module):
    """32 -> 64 -> 64 -> 5."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def small_mlp() -> SmallMLP:
    """Factory for the CLI tests."""
    return SmallMLP()


class NoLinear(nn.Module):
    """A model without any Linear layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class SentenceWrapper(nn.Module):
    """The usual sentence-embedding wrapper, in small: token embedding, two layers, the
    L2-normalized mean over real tokens. ``pooler`` is computed and thrown away, as a
    wrapped HuggingFace ``BertModel``'s pooler is."""

    def __init__(self, vocab: int = 64, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.fc1 = nn.Linear(hidden, 64)
        self.fc2 = nn.Linear(64, hidden)
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))  # (B, T, H)
        _ = torch.tanh(self.pooler(h[:, 0]))  # unused by the output
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)


class TiedLM(nn.Module):
    """A tiny causal-LM-like model whose output head shares the token embedding."""

    def __init__(self, vocab: int = 64, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.fc1 = nn.Linear(hidden, 64)
        self.fc2 = nn.Linear(64, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        return self.lm_head(h + self.fc2(torch.relu(self.fc1(h))))  # (B, T, vocab)


class Spectrum(nn.Module):
    """One bias-free 64 x 64 Linear whose singular values are given, so the fidelity a
    budget keeps is known: a rank-r layer costs ``r * 128`` of the dense 4,096, and keeps
    the r largest singular directions of the (isotropic) inputs."""

    def __init__(self, singular: torch.Tensor) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
        v, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
        self.fc = nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(u @ torch.diag(singular) @ v.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # (B, T, 64)


def two_level() -> Spectrum:
    """24 singular values 1, 40 of 0.02: budget >= 0.8 (rank >= 25) keeps cosine ~0.9997,
    budget 0.7 (rank 22) about 0.96, lower budgets less."""
    return Spectrum(torch.cat([torch.ones(24), torch.full((40,), 0.02)]))


def flat() -> Spectrum:
    """64 equal singular values: budget 0.9 (rank 28) keeps only ~0.66 cosine; int8
    keeps ~0.9999."""
    return Spectrum(torch.ones(64))


class TorchEncoder(nn.Module):
    """torch's own ``nn.TransformerEncoder``: in eval mode without gradients its layers
    run one fused kernel on their Linears' weights unless the fast path is off, and its
    attention reads ``out_proj.weight`` without calling ``out_proj``."""

    def __init__(self, vocab: int = 50, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


class DictEncoder(nn.Module):
    """A sentence-transformers model in small: ``forward(features)`` takes one dict of
    token tensors and returns it with ``token_embeddings`` and ``sentence_embedding``
    added; it carries its tokenizer (set by the test) as ``tokenizer``."""

    def __init__(self, vocab: int = 64, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.fc1 = nn.Linear(hidden, 64)
        self.fc2 = nn.Linear(64, hidden)
        self.tokenizer: object | None = None

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = self.emb(features["input_ids"])
        h = h + self.fc2(torch.relu(self.fc1(h)))
        m = features["attention_mask"].unsqueeze(-1).to(h.dtype)
        features.update({"token_embeddings": h, "sentence_embedding": (h * m).sum(1) / m.sum(1).clamp_min(1.0)})
        return features
