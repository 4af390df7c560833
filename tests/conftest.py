"""Shared fixtures: deterministic seeds and random GBLR structures."""

from __future__ import annotations

import random

import pytest
import torch

from gblr_compress.layer import GBLRLayerConfig, GBLRLinear
from samples.digits import TrainedDigits


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


@pytest.fixture(scope="session")
def digits() -> TrainedDigits:
    """The trained digits MLP (a few seconds on 2 cores), shared by the test modules."""
    return TrainedDigits()
