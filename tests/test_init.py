"""Initialization within a FLOP budget: exact recovery, block-sparse structure,
activation-aware quality on a trained digits MLP, exact costs, singular moments."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gblr_compress.budget import greedy_allocation
from gblr_compress.calib import Moment, collect_moments
from gblr_compress.errors import InputError
from gblr_compress.init import (
    InitConfig,
    init_layer,
    initialize_,
    relative_error,
    truncated_svd_layer,
    whitened_svd_layer,
)
from gblr_compress.layer import GBLRLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, GBLRLinear):
        return module.dense_weight(hard=True).detach().double()
    return module.weight.detach().double()


def _linear(W: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0])
    lin.weight.data = W.float().clone()
    return lin


def test_random_low_rank_matrices_are_recovered_at_their_rank_cost() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes, ranks = [(48, 40), (30, 70)], [3, 6]
    model = nn.Sequential(*[nn.Linear(n, m) for m, n in shapes])
    for lin, (m, n), k in zip(model, shapes, ranks):
        lin.weight.data = torch.randn(m, k, generator=gen) @ torch.randn(k, n, generator=gen)
    ref = [lin.weight.detach().double().clone() for lin in model]
    cost = sum(k * (m + n) for (m, n), k in zip(shapes, ranks))
    dense = sum(m * n for m, n in shapes)
    cfg = InitConfig(budget=(cost + 0.5) / dense, data_free=True, refine_steps=2)
    result = initialize_(model, cfg)
    for (name, rec), W, k in zip(result.layers.items(), ref, ranks):
        assert rec.allocated_cost == k * (rec.in_features + rec.out_features)
        assert relative_error(W, _weight(model.get_submodule(name)), None) < 1e-4
    assert result.exact_cost <= result.budget_cost == cost


def test_block_sparse_matrix_beats_truncated_svd_at_equal_cost() -> None:
    gen = torch.Generator().manual_seed(1)
    m = n = 64
    W = torch.zeros(m, n)
    for r0, c0 in ((0, 8), (16, 40), (32, 56), (48, 24)):
        cols = [(c0 + j) % n for j in range(16)]  # one block wraps past the end
        W[r0 : r0 + 16, cols] = torch.randn(16, 16, generator=gen)
    cost = 4 * 16 * (16 + 16)  # block-sparse cost: 4 dense 16x16 blocks
    module, rec = init_layer(_linear(W), cost, InitConfig(data_free=True, refine_steps=5))
    svd = truncated_svd_layer(_linear(W), cost // (m + n))
    err = relative_error(W.double(), _weight(module), None)
    err_svd = relative_error(W.double(), _weight(svd), None)
    assert rec.status == "gblr" and rec.exact_cost <= cost and svd.exact_cost() == cost
    assert err < 0.1 and err_svd > 0.5


def test_activation_aware_init_on_a_trained_digits_mlp(digits) -> None:
    model = digits.model
    fit, held, test = list(digits.X_train[:1000].split(200)), [digits.X_train[1000:]], [digits.X_test]
    names = ["fc1", "fc2", "fc3"]
    dense = {n: model.get_submodule(n) for n in names}
    test_m = collect_moments(model, names, test)
    fit_m = collect_moments(model, names, fit)
    student = copy.deepcopy(model)
    cfg = InitConfig(budget=0.15, refine_steps=5)
    result = initialize_(student, cfg, calib=fit, holdout=held, names=names)
    assert result.exact_cost <= result.budget_cost
    assert sum(r.dense_cost for r in result.layers.values() if r.status == "skipped") == (
        result.budget_cost - result.max_cost
    )
    C_in = test_m["fc2"].mean()  # hidden activations: far from isotropic
    eig = torch.linalg.eigvalsh(C_in)
    assert eig[-1] > 100 * eig.clamp_min(0)[eig.numel() // 2]  # anisotropic inputs
    for name in names:
        rec = result.layers[name]
        if rec.status == "skipped":
            continue
        W = dense[name].weight.detach().double()
        C = test_m[name].mean()
        err = relative_error(W, _weight(student.get_submodule(name)), C)
        rank = rec.allocated_cost // (rec.in_features + rec.out_features)
        ws = whitened_svd_layer(dense[name], rank, fit_m[name], damping=cfg.damping)
        assert ws.exact_cost() <= rec.allocated_cost
        err_ws = relative_error(W, _weight(ws), C)
        free, _ = init_layer(
            dense[name], rec.allocated_cost, InitConfig(budget=0.15, data_free=True, refine_steps=5)
        )
        err_free = relative_error(W, _weight(free), C)
        assert err <= err_ws + 1e-9, (name, err, err_ws)
        assert err < err_free, (name, err, err_free)
        assert rec.exact_cost <= rec.allocated_cost


class _Bag(nn.Module):
    """Unchained layers of random shapes; forward runs only the first."""

    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(n, m) for m, n in shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


def test_exact_costs_within_allocation_for_random_shapes_and_budgets() -> None:
    gen = torch.Generator().manual_seed(2)
    for trial in range(4):
        shapes = [tuple(int(v) for v in torch.randint(2, 40, (2,), generator=gen)) for _ in range(3)]
        model = _Bag(shapes)
        budget = [1.0, 0.02, 0.4, 0.77][trial]
        x = torch.randn(64, shapes[0][1], generator=gen)
        names = ["layers.0"]  # the layer the bag's forward runs
        cfg = InitConfig(budget=budget, refine_steps=3, width_fractions=(0.5,))
        calib = [x] if trial % 2 else None
        result = initialize_(model, cfg, calib=calib, names=None if calib is None else names)
        for name, rec in result.layers.items():
            module = model.get_submodule(name)
            assert rec.exact_cost <= max(rec.allocated_cost, 0) or rec.status == "skipped"
            if rec.status == "skipped":
                assert isinstance(module, nn.Linear) and rec.exact_cost == rec.dense_cost
            else:
                assert module.exact_cost() == rec.exact_cost <= rec.allocated_cost
        assert sum(r.allocated_cost for r in result.layers.values()) <= result.budget_cost
        assert result.exact_cost <= result.budget_cost


def test_singular_moments_do_not_crash_or_nan() -> None:
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(32, 24)
    X = torch.randn(5, 32, generator=gen, dtype=torch.float64)  # fewer samples than features
    X[:, 7] = 0.0  # a dead input feature
    moment = Moment(X.T @ X, 5)
    for damping in (0.0, 0.1):
        cfg = InitConfig(damping=damping, refine_steps=3)
        module, rec = init_layer(lin, 300, cfg, moment=moment, holdout=moment)
        w = _weight(module)
        assert torch.isfinite(w).all() and rec.exact_cost <= 300
        assert math.isfinite(rec.calib_error) and math.isfinite(rec.heldout_error)
    zero = Moment(torch.zeros(32, 32, dtype=torch.float64), 10)  # all-dead inputs
    module, rec = init_layer(lin, 300, InitConfig(refine_steps=0), moment=zero, holdout=zero)
    assert torch.isfinite(_weight(module)).all() and rec.heldout_error == 0.0


def test_greedy_allocation_favours_slow_spectra_and_goes_dense() -> None:
    fast = torch.tensor([0.99] + [0.01 / 63] * 63)
    slow = torch.full((64,), 1.0 / 64)
    alloc = greedy_allocation([fast, slow], [(64, 64), (64, 64)], 40 * 128)
    assert alloc[1] > alloc[0] >= 128 and sum(alloc) <= 40 * 128
    # a tiny layer whose next component reaches its dense cost goes dense
    alloc = greedy_allocation([torch.tensor([0.5, 0.5])], [(2, 2)], 4)
    assert alloc == [4]


def test_config_validation() -> None:
    with pytest.raises(InputError):
        InitConfig(budget=0.0)
    with pytest.raises(InputError):
        InitConfig(max_groups=0)
    with pytest.raises(InputError):
        InitConfig(damping=-1.0)
    with pytest.raises(InputError):
        initialize_(nn.Sequential(nn.Linear(4, 4)), InitConfig(), names=["nope"])


def test_layers_searched_in_parallel_give_the_same_model_as_one_at_a_time() -> None:
    from samples.models import TinyEncoder

    torch.manual_seed(0)
    model = TinyEncoder(vocab=50, hidden=32, layers=2, heads=2, ffn=64, max_len=16).eval()
    calib = [{"input_ids": torch.randint(0, 50, (4, 16))} for _ in range(4)]
    cfg = InitConfig(budget=0.4, refine_steps=3, moment_tokens=96)
    out = []
    for threads in (1, 2):  # one worker, then two layers at a time
        torch.set_num_threads(threads)
        student = copy.deepcopy(model)
        result = initialize_(student, cfg, calib=calib[:3], holdout=calib[3:])
        assert torch.get_num_threads() == threads  # restored after the pool
        out.append((student.state_dict(), [r.status for r in result.layers.values()]))
    torch.set_num_threads(1)
    assert out[0][1] == out[1][1]
    for k, v in out[0][0].items():
        torch.testing.assert_close(out[1][0][k], v, rtol=1e-4, atol=1e-5)


def test_budget_goes_to_the_layer_the_outputs_depend_on() -> None:
    """Two layers with the same weights and inputs; one reaches the output 30x damped.
    Weighed by sensitivity the loud one gets more of the budget; unweighed, the same."""

    class TwoPaths(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.loud, self.quiet = nn.Linear(24, 24), nn.Linear(24, 24)
            self.quiet.load_state_dict(self.loud.state_dict())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.loud(x) + self.quiet(x) / 30

    calib = [torch.randn(64, 24) for _ in range(4)]
    alloc = {}
    for batches in (0, 2):
        result = initialize_(TwoPaths(), InitConfig(budget=0.4, sensitivity_batches=batches, max_groups=1),
                             calib=calib)
        alloc[batches] = {n: rec.allocated_cost for n, rec in result.layers.items()}
        assert (result.layers["loud"].sensitivity is None) == (batches == 0)
    # Unweighed, the layers tie up to the leftover that buys no whole component.
    assert abs(alloc[0]["loud"] - alloc[0]["quiet"]) < 24 + 24
    assert alloc[2]["loud"] > alloc[2]["quiet"] + 2 * (24 + 24)
    assert alloc[2]["loud"] + alloc[2]["quiet"] <= math.floor(0.4 * 2 * 24 * 24)


def test_stages_stats_allocate_init_layers_equal_initialize_(digits) -> None:
    from gblr_compress.init import allocate, collect_stats, init_layers_

    fit, held = [digits.X_train[:600]], [digits.X_train[600:]]
    cfg = InitConfig(budget=0.3, refine_steps=0)
    names = ["fc1", "fc2", "fc3"]
    seen: list[str] = []
    model = copy.deepcopy(digits.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = collect_stats(model, cfg, fit, held, names, lambda e: seen.append(e.phase))
    assert list(dict.fromkeys(seen)) == ["moments", "holdout", "sensitivity", "spectra"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert stats.names == names and not stats.data_free
    assert set(stats.moments) == set(stats.holdout) == set(stats.spectra) == set(names)
    allocation = allocate(stats, cfg)
    assert sum(allocation.costs.values()) <= allocation.budget_cost
    assert allocation.budget_cost == math.floor(0.3 * sum(m * n for m, n in stats.shapes.values()))
    staged = init_layers_(model, cfg, stats, allocation, lambda e: seen.append(e.phase))
    assert seen[-1] == "layers"

    whole = copy.deepcopy(digits.model)
    result = initialize_(whole, cfg, calib=fit, holdout=held, names=names)
    assert {n: r.allocated_cost for n, r in staged.layers.items()} == allocation.costs
    for name, rec in result.layers.items():
        other = staged.layers[name]
        assert (other.status, other.allocated_cost, other.exact_cost) == (
            rec.status, rec.allocated_cost, rec.exact_cost
        )
        assert other.heldout_error == rec.heldout_error
    for k, v in whole.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_data_free_stats_have_only_spectra() -> None:
    from gblr_compress.init import allocate, collect_stats

    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6))
    stats = collect_stats(model, InitConfig(budget=0.5))
    assert stats.data_free and not stats.moments and not stats.sensitivity
    assert stats.names == ["0", "2"] and stats.shapes == {"0": (8, 12), "2": (6, 8)}
    W = model[0].weight.detach().double()
    s2 = torch.linalg.svdvals(W) ** 2  # data-free: C = I, no damping
    torch.testing.assert_close(stats.spectra["0"], s2, rtol=1e-8, atol=1e-10)
    assert allocate(stats, InitConfig(budget=0.5)).budget_cost == (8 * 12 + 6 * 8) // 2


def _brute_windows(a: torch.Tensor, b: torch.Tensor, total: int, r: int) -> float:
    """The best ``A(R) * B(J)`` over every row / column window pair within ``total``."""
    def best(x: torch.Tensor, w: int) -> float:
        xx = torch.cat([x, x])
        return max(float(xx[s:s + w].sum()) for s in range(x.numel()))
    m, n = a.numel(), b.numel()
    return max(best(a, rw) * best(b, min(total - rw, n)) for rw in range(max(1, min(r, m)), m + 1)
               if min(total - rw, n) >= max(1, min(r, n)))


def test_window_choice_is_exact_on_narrow_axes_and_bounded_on_wide_ones(monkeypatch) -> None:
    from gblr_compress.init import search

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(40, generator=g, dtype=torch.float64) ** 4, torch.rand(30, generator=g, dtype=torch.float64) ** 4

    def captured(win: tuple[int, int, int, int]) -> float:
        rs, rw, cs, cw = win
        return float(torch.cat([a, a])[rs:rs + rw].sum() * torch.cat([b, b])[cs:cs + cw].sum())

    for total, r in ((25, 1), (40, 4), (70, 8)):
        assert captured(search.choose_windows(a, b, total, r)) == pytest.approx(_brute_windows(a, b, total, r))
    # An axis too long for every width (an LM head's vocabulary) compares 256 evenly
    # spaced widths, and still lands near the best pair.
    seen: list[int] = []
    real = search.best_windows
    monkeypatch.setattr(search, "best_windows", lambda x, w=None: (seen.append(w.numel()), real(x, w))[1])
    monkeypatch.setattr(search, "MAX_WIDTH_CELLS", 8 * 600)
    a = torch.rand(600, generator=g, dtype=torch.float64) ** 4
    win = search.choose_windows(a, b, 300, 4)
    assert seen == [256, 256] and win[1] + win[3] <= 300
    assert captured(win) >= 0.99 * _brute_windows(a, b, 300, 4)
