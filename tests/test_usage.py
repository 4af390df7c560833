"""Unused and tied target layers are found on one batch."""

from __future__ import annotations

import torch
from torch import nn

from gblr_compress.swap import find_linears
from gblr_compress.usage import NEVER_CALLED, UNUSED, find_usage, tied_weights


class Wrapped(nn.Module):
    """A sentence-embedding-like wrapper: the 'pooler' is computed and thrown away,
    'spare' is never called, and the head shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.pooler = nn.Linear(8, 8)
        self.spare = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(self.emb(ids)))
        _ = self.pooler(h[:, 0])  # computed, unused
        return self.head(h), ids  # an integer output is no distillation target


def test_unused_never_called_and_tied() -> None:
    model = Wrapped()
    names = find_linears(model)
    usage = find_usage(model, torch.randint(0, 20, (2, 5)), names)
    assert usage.unused == {"pooler": UNUSED, "spare": NEVER_CALLED}
    assert usage.tied == {"head": "weight tied to emb"}
    assert set(usage.dense) == {"pooler", "spare", "head"}
    assert all(p.grad is None for p in model.parameters())  # the check trains nothing
    assert find_usage(model, torch.randint(0, 20, (2, 5)), names, include_tied=True).tied == {}


def test_shared_module_is_not_tied_to_itself() -> None:
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert tied_weights(model, ["0"]) == {}
    assert find_usage(model, torch.randn(2, 4), ["0"]).dense == {}
