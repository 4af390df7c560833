"""Finding and swapping linear layers; calling models on any batch shape."""

from __future__ import annotations

import torch
from torch import nn

from gblr_compress.swap import as_linear, find_linears, is_linear_like, replace_module
from samples.models import tiny_encoder


class Conv1D(nn.Module):
    """The HuggingFace GPT-2 layout: weight (in, out), y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_find_linears_globs_and_order() -> None:
    model = tiny_encoder()
    names = find_linears(model)
    assert names[:6] == ["layers.0.q", "layers.0.k", "layers.0.v", "layers.0.o", "layers.0.fc1", "layers.0.fc2"]
    assert find_linears(model, include=["layers.1.*"]) == [n for n in names if n.startswith("layers.1.")]
    assert "layers.0.o" not in find_linears(model, exclude=["*.o"])
    assert find_linears(nn.Sequential(nn.ReLU())) == []


def test_conv1d_counts_as_linear_and_converts_exactly() -> None:
    conv = Conv1D(7, 5)
    assert is_linear_like(conv) and find_linears(nn.Sequential(conv)) == ["0"]
    x = torch.randn(3, 5)
    torch.testing.assert_close(as_linear(conv)(x), conv(x))


def test_replace_module_in_sequential() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    old = replace_module(model, "0", nn.Identity())
    assert isinstance(old, nn.Linear) and isinstance(model[0], nn.Identity)
