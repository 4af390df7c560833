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
