"""scikit-learn's bundled digits and a DigitsMLP trained on them in a few seconds.

Shared by the tests and ``benchmarks/init_bench.py`` so that they all measure the same
trained model. (``samples/make_samples.py`` trains the bundled sample files itself, with
its own split, so that rebuilding them never depends on this helper.)
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from samples.models import DigitsMLP

__all__ = ["TrainedDigits"]


class TrainedDigits:
    """The 1,797 digits, shuffled and standardized; the first 1,200 train a DigitsMLP.

    Attributes:
        X_train, y_train: (1200, 64) float32 inputs and their labels.
        X_test, y_test: the other 597.
        model: the trained DigitsMLP, in eval mode (about 0.97 test accuracy).
    """

    def __init__(self, epochs: int = 30, seed: int = 0) -> None:
        from sklearn.datasets import load_digits  # the `samples` extra

        gen = torch.Generator().manual_seed(seed)
        X, y = load_digits(return_X_y=True)
        X = torch.tensor(X, dtype=torch.float32)
        y = torch.tensor(y)
        perm = torch.randperm(len(X), generator=gen)
        X, y = X[perm], y[perm]
        # Border pixels are constant in the training split: clamp their std.
        mu, sd = X[:1200].mean(0), X[:1200].std(0).clamp_min(1e-3)
        X = (X - mu) / sd
        self.X_train, self.y_train = X[:1200], y[:1200]
        self.X_test, self.y_test = X[1200:], y[1200:]
        torch.manual_seed(seed)
        model = DigitsMLP()
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(epochs):
            for idx in torch.randperm(1200, generator=gen).split(64):
                opt.zero_grad()
                loss = F.cross_entropy(model(self.X_train[idx]), self.y_train[idx])
                loss.backward()
                opt.step()
        self.model = model.eval()

    def accuracy(self, model: torch.nn.Module) -> float:
        """Test accuracy of ``model`` (the dense one or a compressed copy)."""
        with torch.no_grad():
            return float((model(self.X_test).argmax(-1) == self.y_test).float().mean())
