"""Shared fixtures: deterministic seeds and random GBLR structures."""

from __future__ import annotations

import random

import pytest
import torch

from gblr_compress.layer import GBLRLayerConfig, GBLRLinear


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: many small factorizations on a shared 2-core box
    are far faster without OpenMP barriers."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    random.seed(0)


def random_gblr(
    m: int,
    n: int,
    K: int,
    r: int,
    gen: torch.Generator,
    dead: int = 0,
    dtype: torch.dtype = torch.float64,
) -> GBLRLinear:
    """A GBLRLinear with random content and random integer windows (some wrapping);
    the first ``dead`` groups get a zero row or column width."""
    layer = GBLRLinear(n, m, GBLRLayerConfig(num_groups=K, rank=r), dtype=dtype)
    with torch.no_grad():
        layer.U.copy_(torch.randn(K, m, r, generator=gen, dtype=dtype))
        layer.V.copy_(torch.randn(K, r, n, generator=gen, dtype=dtype))
        layer.bias.copy_(torch.randn(m, generator=gen, dtype=dtype))
        for axis, size in ((0, m), (1, n)):
            w = torch.randint(1, size + 1, (K,), generator=gen)
            s = torch.randint(0, size, (K,), generator=gen)
            layer.widths[axis] = w.to(dtype) / size
            layer.locations[axis] = s.to(dtype) / size
        for k in range(dead):
            layer.widths[k % 2, k] = 0.0
    return layer


class Digits:
    """scikit-learn's bundled digits, standardized, and a DigitsMLP trained on them."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        from samples.models import DigitsMLP

        gen = torch.Generator().manual_seed(0)
        X, y = load_digits(return_X_y=True)
        X = torch.tensor(X, dtype=torch.float32)
        y = torch.tensor(y)
        perm = torch.randperm(len(X), generator=gen)
        X, y = X[perm], y[perm]
        mu, sd = X[:1200].mean(0), X[:1200].std(0).clamp_min(1e-3)
        X = (X - mu) / sd
        self.X_train, self.y_train = X[:1200], y[:1200]
        self.X_test, self.y_test = X[1200:], y[1200:]
        torch.manual_seed(0)
        model = DigitsMLP()
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(30):
            for idx in torch.randperm(1200, generator=gen).split(64):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(self.X_train[idx]), self.y_train[idx])
                loss.backward()
                opt.step()
        self.model = model.eval()

    def accuracy(self, model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((model(self.X_test).argmax(-1) == self.y_test).float().mean())


@pytest.fixture(scope="session")
def digits() -> Digits:
    """The trained digits MLP (a few seconds on 2 cores), shared by the test modules."""
    return Digits()
