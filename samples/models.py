"""Model definitions shared by the samples, the tests and the benchmarks.

These are also valid ``--factory`` targets (``samples.models:digits_mlp``): a factory
builds the architecture so a state_dict or safetensors file can be loaded without
unpickling code.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DigitsMLP", "EncoderLayer", "TinyEncoder", "digits_mlp", "tiny_encoder", "bert_small"]


class DigitsMLP(nn.Module):
    """MLP for scikit-learn's 8x8 digits: 64 -> hidden -> hidden -> 10 logits."""

    def __init__(self, hidden: int = 512, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 64)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # (B, classes)


class EncoderLayer(nn.Module):
    """Post-LN BERT layer with explicit q/k/v/o Linears (every projection is swappable)."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape  # mask_bias: (B, 1, 1, T), 0 or a large negative
        hd = H // self.heads
        q = self.q(x).view(B, T, self.heads, hd).transpose(1, 2)  # (B, h, T, hd)
        k = self.k(x).view(B, T, self.heads, hd).transpose(1, 2)
        v = self.v(x).view(B, T, self.heads, hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd)) + mask_bias  # (B, h, T, T)
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H)
        x = self.ln1(x + self.o(y))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class TinyEncoder(nn.Module):
    """BERT-style encoder taking ``input_ids`` and ``attention_mask`` (B, T).

    Returns hidden states ``(B, T, hidden)``, or logits ``(B, classes)`` from masked mean
    pooling when ``classes`` is set.
    """

    def __init__(
        self,
        vocab: int = 1000,
        hidden: int = 64,
        layers: int = 2,
        heads: int = 4,
        ffn: int = 256,
        max_len: int = 128,
        classes: int | None = None,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.head = nn.Linear(hidden, classes) if classes else None

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)
        x = self.ln(self.tok(input_ids) + self.pos(pos)[None])  # (B, T, H)
        mask = attention_mask.to(x.dtype)
        mask_bias = ((1.0 - mask) * -1e4)[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, mask_bias)
        if self.head is None:
            return x
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(pooled)  # (B, classes)


def digits_mlp() -> DigitsMLP:
    """Factory for the digits MLP sample (64 -> 512 -> 512 -> 10)."""
    return DigitsMLP()


def tiny_encoder() -> TinyEncoder:
    """Factory for the small encoder classifier sample (2 layers, hidden 64, 4 classes)."""
    return TinyEncoder(vocab=1000, hidden=64, layers=2, heads=4, ffn=256, max_len=64, classes=4)


def bert_small() -> TinyEncoder:
    """A BERT-small sized encoder (6 layers, hidden 384, FFN 1536; 36 Linear layers),
    the size the speed targets are stated for. Random weights unless trained."""
    return TinyEncoder(vocab=8000, hidden=384, layers=6, heads=6, ffn=1536, max_len=128)
