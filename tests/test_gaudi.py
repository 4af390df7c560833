"""Gaudi masks: exact boxcar limit, gradients, and exact cost arithmetic."""

from __future__ import annotations

import pytest
import torch

from gblr_compress.gaudi import (
    boxcar_mask,
    component_cost,
    gaudi_mask,
    is_full_rank,
    round_start,
    round_width,
    window_indices,
    window_slices,
)


def _brute_boxcar(start: int, width: int, n: int) -> torch.Tensor:
    m = torch.zeros(n)
    for j in range(width):
        m[(start + j) % n] = 1.0
    return m


@pytest.mark.parametrize("n", [1, 2, 7, 8, 31, 64, 385])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boxcar_limit_is_exact_for_all_windows(n: int, dtype: torch.dtype) -> None:
    # Every width 0..n paired with several starts, wrap-around included.
    widths, starts = [], []
    for w in range(n + 1):
        for s in sorted({0, n // 3, n - 1, (n - w // 2) % n}):
            widths.append(w)
            starts.append(s)
    wt = torch.tensor(widths, dtype=dtype) / n
    lt = torch.tensor(starts, dtype=dtype) / n
    got = gaudi_mask(wt, lt, n, sigma=None)
    want = torch.stack([_brute_boxcar(s, w, n) for s, w in zip(starts, widths)]).to(dtype)
    assert got.dtype == dtype
    assert (got - want).abs().max().item() < 1e-5
    exact = boxcar_mask(torch.tensor(starts), torch.tensor(widths), n)
    assert torch.equal(exact, want.to(exact.dtype))


def test_boxcar_limit_float64_is_near_machine_precision() -> None:
    n = 100
    w = torch.arange(0, n + 1, dtype=torch.float64) / n
    l = torch.full_like(w, 0.93)
    got = gaudi_mask(w, l, n)
    want = torch.stack([_brute_boxcar(93, int(i), n) for i in range(n + 1)]).double()
    assert (got - want).abs().max().item() < 1e-10


def test_infinite_sigma_equals_none() -> None:
    w = torch.tensor([0.25, 0.5])
    l = torch.tensor([0.1, 0.8])
    assert torch.allclose(gaudi_mask(w, l, 16, sigma=float("inf")), gaudi_mask(w, l, 16))


def test_straight_through_rounding_gives_boxcar_and_passes_gradient() -> None:
    n = 20
    w = torch.tensor([0.33, 0.51], requires_grad=True)  # 6.6 -> 7, 10.2 -> 10
    l = torch.tensor([0.92, 0.12], requires_grad=True)  # 18.4 -> 18, 2.4 -> 2
    mask = gaudi_mask(w, l, n, sigma=4.0, round_ste=True)
    hard = gaudi_mask(w, l, n, sigma=None, round_ste=True)
    want = torch.stack([_brute_boxcar(18, 7, n), _brute_boxcar(2, 10, n)])
    assert (hard - want).abs().max().item() < 1e-5
    (mask * torch.arange(n)).sum().backward()
    assert torch.isfinite(w.grad).all() and (w.grad != 0).all()
    assert torch.isfinite(l.grad).all() and (l.grad != 0).all()


def test_finite_sigma_gradients_are_finite_and_nonzero() -> None:
    w = torch.tensor([0.3, 0.7, 0.05], dtype=torch.float64, requires_grad=True)
    l = torch.tensor([0.0, 0.5, 0.95], dtype=torch.float64, requires_grad=True)
    mask = gaudi_mask(w, l, 50, sigma=3.0)
    target = torch.rand(3, 50, dtype=torch.float64)
    ((mask - target) ** 2).sum().backward()
    assert torch.isfinite(w.grad).all() and (w.grad.abs() > 0).all()
    assert torch.isfinite(l.grad).all() and (l.grad.abs() > 0).all()


def test_gradient_steps_move_window_toward_target() -> None:
    n = 64
    target = _brute_boxcar(30, 20, n)[None]  # window [30, 50)
    w = torch.tensor([0.15], requires_grad=True)  # ~10 wide
    # Starting at 23, [23, 33) overlaps the target by 3: without overlap, MSE is lowest
    # by shrinking the width to 0, which is the right answer for that loss.
    l = torch.tensor([0.36], requires_grad=True)
    opt = torch.optim.Adam([w, l], lr=0.01)

    def err() -> float:
        ww, ss = int(round_width(w, n)), int(round_start(l, n))
        return float((_brute_boxcar(ss, ww, n) - target[0]).abs().sum())

    before = err()
    for _ in range(150):
        opt.zero_grad()
        loss = ((gaudi_mask(w, l, n, sigma=6.0) - target) ** 2).sum()
        loss.backward()
        opt.step()
    after = err()
    assert before >= 20
    assert after <= 2
    assert abs(int(round_start(l, n)) - 30) <= 1
    assert abs(int(round_width(w, n)) - 20) <= 1


def test_window_helpers_cover_the_same_indices() -> None:
    n = 10
    for start in range(n):
        for width in range(n + 1):
            idx = window_indices(start, width, n)
            flat = [i for lo, hi in window_slices(start, width, n) for i in range(lo, hi)]
            assert flat == idx
            assert len(window_slices(start, width, n)) <= 2


def test_component_cost_counts_dead_components_as_zero() -> None:
    assert component_cost(3, 50, 2) == 106
    assert component_cost(0, 5, 2) == 0
    assert component_cost(3, 0, 2) == 0


def test_component_cost_of_a_full_rank_block_is_its_dense_size() -> None:
    # GBLR.md s.7: min(r (rows + cols), rows cols); a pruned window is stored dense.
    assert component_cost(3, 5, 2) == 15  # 2 * 8 = 16 > 3 * 5
    assert component_cost(16, 64, 16) == 16 * 64
    assert component_cost(64, 16, 16) == 64 * 16
    assert is_full_rank(16, 64, 16) and not is_full_rank(16, 64, 12)


def test_rounding_is_half_up_and_cyclic() -> None:
    assert round_width(torch.tensor([0.25, 0.125, 1.5, -1.0]), 4).tolist() == [1, 1, 4, 0]
    assert round_start(torch.tensor([0.999, 1.25, -0.25]), 4).tolist() == [0, 1, 3]
