"""The global budget projection meets the exact cost, for random shapes and budgets."""

from __future__ import annotations

import torch

from gblr_compress.budget import budget_cost, project_widths_, shrink_widths_, total_cost
from gblr_compress.layer import GBLRLayerConfig, GBLRLinear


def _layers(gen: torch.Generator, count: int) -> list[GBLRLinear]:
    layers = []
    for _ in range(count):
        m, n = (int(v) for v in torch.randint(3, 200, (2,), generator=gen))
        K, r = int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
        layer = GBLRLinear(n, m, GBLRLayerConfig(num_groups=K, rank=r))
        with torch.no_grad():
            layer.widths.copy_(torch.rand(2, K, generator=gen))
            layer.locations.copy_(torch.rand(2, K, generator=gen))
        layers.append(layer)
    return layers


def test_projection_meets_budget_for_random_shapes_and_budgets() -> None:
    gen = torch.Generator().manual_seed(1)
    for trial in range(40):
        layers = _layers(gen, 1 + trial % 5)
        budget = float(torch.rand(1, generator=gen)) * 0.999 + 0.001
        max_cost = budget_cost(layers, budget)
        before = [layer.widths.detach().clone() for layer in layers]
        tau = project_widths_(layers, max_cost)
        assert total_cost(layers) <= max_cost
        for layer, w0 in zip(layers, before):
            assert (layer.widths <= w0 + 1e-7).all()  # only shrinks
            assert (layer.widths >= 0).all()
        if tau > 0:  # tight: a slightly smaller shift would break the budget
            for layer, w0 in zip(layers, before):
                layer.widths.data.copy_(w0)
            shrink_widths_(layers, tau * 0.98)
            assert total_cost(layers) > max_cost or tau < 1e-12


def test_projection_is_noop_within_budget_and_prices_bigger_axes_more() -> None:
    small = GBLRLinear(16, 16, GBLRLayerConfig(num_groups=2, rank=1))
    big = GBLRLinear(256, 256, GBLRLayerConfig(num_groups=2, rank=1))
    layers = [small, big]
    dense = small.dense_cost + big.dense_cost
    assert project_widths_(layers, dense) == 0.0
    assert torch.equal(small.widths, torch.ones(2, 2))
    project_widths_(layers, budget_cost(layers, 0.01))
    assert total_cost(layers) <= budget_cost(layers, 0.01)
    # a shared tau in cost units shrinks the expensive layer's fractions faster
    assert big.widths.mean() < small.widths.mean()


def test_cost_after_a_shift_equals_the_exact_cost_of_the_shifted_layers() -> None:
    import copy

    from gblr_compress.budget import _Costs

    gen = torch.Generator().manual_seed(2)
    for trial in range(20):
        layers = _layers(gen, 1 + trial % 6)
        if trial % 4 == 3:  # mixed width dtypes round each layer in its own dtype
            layers[0] = layers[0].double()
        costs = _Costs(layers)
        hi = max(1.0 / float(layer.rank * max(layer.in_features, layer.out_features)) for layer in layers)
        for tau in [0.0, *(float(t) * hi for t in torch.rand(10, generator=gen))]:
            shifted = copy.deepcopy(layers)
            shrink_widths_(shifted, tau)
            assert costs(tau) == total_cost(shifted)
        assert costs(0.0) == total_cost(layers)
