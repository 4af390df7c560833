"""GBLRLinear and FrozenGBLR: SVD reproduction, freezing parity, exact cost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gblr_compress.gaudi import boxcar_mask
from gblr_compress.layer import FrozenGBLR, GBLRLayerConfig, GBLRLinear
from tests.conftest import random_gblr


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


@pytest.mark.parametrize("m,n,K", [(12, 20, 3), (20, 12, 4), (16, 16, 16)])
def test_full_width_full_rank_reproduces_weight(m: int, n: int, K: int) -> None:
    lin = nn.Linear(n, m)
    r = -(-min(m, n) // K)  # ceil: K*r >= min(m, n)
    layer = GBLRLinear.from_linear(lin, GBLRLayerConfig(num_groups=K, rank=r)).eval()
    assert _rel(layer.dense_weight(hard=True), lin.weight.detach()) < 1e-4
    x = torch.randn(5, n)
    assert _rel(layer(x), lin(x)) < 1e-4


def test_rank_R_full_width_components_equal_truncated_svd() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(30, 24, dtype=torch.float64)
    R = 5
    layer = GBLRLinear.from_linear(lin, GBLRLayerConfig(num_groups=R, rank=1)).eval()
    P, S, Qh = torch.linalg.svd(lin.weight.detach())
    trunc = P[:, :R] @ torch.diag(S[:R]) @ Qh[:R]
    assert _rel(layer.dense_weight(), trunc) < 1e-10
    # Soft masks at sigma=None with integer (full) widths give the same weight.
    assert _rel(layer.dense_weight(hard=False), trunc) < 1e-10


def test_training_forward_two_matmul_and_dense_paths_agree() -> None:
    gen = torch.Generator().manual_seed(3)
    for m, n, K, r in [(40, 50, 2, 3), (8, 6, 4, 4)]:  # cheap low-rank path, dense path
        layer = random_gblr(m, n, K, r, gen).train()
        x = torch.randn(3, 7, n, generator=gen, dtype=torch.float64)
        want = x @ layer.dense_weight(hard=False).T + layer.bias
        assert _rel(layer(x), want) < 1e-10


def test_exact_cost_equals_brute_force_mask_count() -> None:
    gen = torch.Generator().manual_seed(5)
    for trial in range(40):
        m = int(torch.randint(1, 40, (1,), generator=gen))
        n = int(torch.randint(1, 40, (1,), generator=gen))
        K = int(torch.randint(1, 6, (1,), generator=gen))
        r = int(torch.randint(1, 4, (1,), generator=gen))
        layer = random_gblr(m, n, K, r, gen, dead=trial % 3)
        rows, cols = layer.masks(hard=True)
        alive = (rows.sum(1) > 0) & (cols.sum(1) > 0)
        # Groups with identical windows are one block; a block costs at most rows * cols.
        merged: dict[tuple, list[int]] = {}
        for k in range(K):
            if alive[k]:
                key = (tuple(rows[k].tolist()), tuple(cols[k].tolist()))
                merged.setdefault(key, [int(rows[k].sum()), int(cols[k].sum()), 0])[2] += r
        brute = sum(min(rk * (rw + cw), rw * cw) for rw, cw, rk in merged.values())
        assert layer.exact_cost() == brute
        assert layer.to_structure().cost == brute
        for k in range(min(trial % 3, K)):
            assert layer.group_costs()[k] == 0


def test_soft_masks_at_sigma_none_match_hard_masks() -> None:
    gen = torch.Generator().manual_seed(7)
    layer = random_gblr(33, 18, 5, 2, gen)
    soft_r, soft_c = layer.masks(hard=False)
    hard_r, hard_c = layer.masks(hard=True)
    assert (soft_r - hard_r).abs().max() < 1e-9
    assert (soft_c - hard_c).abs().max() < 1e-9


def _assert_frozen_matches(layer: GBLRLinear) -> FrozenGBLR:
    layer.eval()
    frozen = layer.to_frozen()
    x = torch.randn(4, 3, layer.in_features, dtype=layer.U.dtype)
    want = layer(x)
    got = frozen(x)
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-5
    assert frozen.cost == frozen.exact_cost() == layer.exact_cost()
    return frozen


def test_frozen_matches_eval_on_random_structures() -> None:
    gen = torch.Generator().manual_seed(11)
    wraps = 0
    for trial in range(30):
        m = int(torch.randint(2, 48, (1,), generator=gen))
        n = int(torch.randint(2, 48, (1,), generator=gen))
        layer = random_gblr(m, n, 4, 2, gen, dead=trial % 2)
        win = layer.integer_windows()
        wraps += int(((win["row_start"] + win["row_width"]) > m).any())
        wraps += int(((win["col_start"] + win["col_width"]) > n).any())
        _assert_frozen_matches(layer)
    assert wraps > 10  # the random structures really exercised wrapping windows


def test_frozen_overlapping_blocks_and_merging() -> None:
    gen = torch.Generator().manual_seed(2)
    layer = random_gblr(20, 30, 4, 2, gen)
    with torch.no_grad():
        # Groups 0 and 1 share windows (merge into one rank-4 block); group 2 overlaps them.
        layer.widths[:, 0] = layer.widths[:, 1] = torch.tensor([10 / 20, 12 / 30], dtype=torch.float64)
        layer.locations[:, 0] = layer.locations[:, 1] = torch.tensor([15 / 20, 25 / 30], dtype=torch.float64)
        layer.widths[:, 2] = torch.tensor([8 / 20, 9 / 30], dtype=torch.float64)
        layer.locations[:, 2] = torch.tensor([18 / 20, 27 / 30], dtype=torch.float64)
    frozen = _assert_frozen_matches(layer)
    ranks = sorted(V.shape[0] for V in frozen.V)
    assert len(frozen.V) == 3 and ranks == [2, 2, 4]


def test_frozen_single_block() -> None:
    gen = torch.Generator().manual_seed(4)
    layer = random_gblr(16, 24, 1, 3, gen)
    frozen = _assert_frozen_matches(layer)
    assert len(frozen.V) == 1


def test_frozen_all_dead_outputs_bias() -> None:
    gen = torch.Generator().manual_seed(6)
    layer = random_gblr(10, 12, 3, 2, gen)
    with torch.no_grad():
        layer.widths[1] = 0.0
    frozen = _assert_frozen_matches(layer)
    assert len(frozen.V) == 0 and frozen.cost == 0
    x = torch.randn(5, 12, dtype=torch.float64)
    assert torch.equal(frozen(x), layer.bias.detach().expand(5, 10))


def test_frozen_is_trainable_and_structure_roundtrips() -> None:
    gen = torch.Generator().manual_seed(8)
    frozen = random_gblr(9, 14, 3, 2, gen).to_frozen()
    x = torch.randn(6, 14, dtype=torch.float64)
    frozen(x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in frozen.parameters())
    again = FrozenGBLR(frozen.structure())
    assert torch.allclose(again(x), frozen(x))


def test_clamp_structure_keeps_ranges() -> None:
    layer = GBLRLinear(8, 8, GBLRLayerConfig(num_groups=2))
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[1.3, -0.2], [0.5, 0.5]]))
        layer.locations.copy_(torch.tensor([[1.25, -0.25], [0.0, 0.99]]))
    layer.clamp_structure_()
    assert layer.widths.min() >= 0 and layer.widths.max() <= 1
    assert torch.allclose(layer.locations, torch.tensor([[0.25, 0.75], [0.0, 0.99]]))


def test_boxcar_hard_masks_match_integer_windows() -> None:
    gen = torch.Generator().manual_seed(9)
    layer = random_gblr(13, 17, 3, 1, gen)
    win = layer.integer_windows()
    rows, _ = layer.masks(hard=True)
    assert torch.equal(rows, boxcar_mask(win["row_start"], win["row_width"], 13).double())


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        GBLRLayerConfig(num_groups=0)
    with pytest.raises(ValueError):
        GBLRLayerConfig(rank=0)
    with pytest.raises(ValueError):
        GBLRLayerConfig(sigma=-1.0)


def test_split_groups_keeps_the_function_when_rank_divides() -> None:
    gen = torch.Generator().manual_seed(5)
    layer = random_gblr(20, 30, K=2, r=6, gen=gen)
    split = layer.split_groups(6)
    assert split.num_groups == 6 and split.rank == 2
    assert split.exact_cost() == layer.exact_cost()
    torch.testing.assert_close(split.dense_weight(hard=True), layer.dense_weight(hard=True))
    x = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(split.eval()(x), layer.eval()(x))
    with pytest.raises(ValueError):
        layer.split_groups(3)


def test_from_blocks_inverts_to_blocks_on_random_structures() -> None:
    gen = torch.Generator().manual_seed(7)
    for trial in range(6):
        layer = random_gblr(11 + trial, 9 + 2 * trial, 4, 2, gen, dead=trial % 3).eval()
        blocks = layer.to_blocks()
        assert len(blocks) == sum(c > 0 for c in layer.group_costs())
        again = GBLRLinear.from_blocks(
            blocks, layer.in_features, layer.out_features, layer.bias, dtype=torch.float64
        ).eval()
        assert again.exact_cost() == layer.exact_cost() == sum(b.cost for b in blocks)
        assert [b.window_key() for b in again.to_blocks()] == [b.window_key() for b in blocks]
        x = torch.randn(5, layer.in_features, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(again(x), layer(x), rtol=1e-12, atol=1e-12)
        s = layer.to_structure()
        assert again.to_structure().to_dict() == s.to_dict()


def test_from_blocks_pads_lower_rank_blocks_and_adds_dead_groups() -> None:
    from gblr_compress.structure import Block

    gen = torch.Generator().manual_seed(3)
    b1 = Block(2, 5, 7, 4, torch.randn(5, 3, generator=gen), torch.randn(3, 4, generator=gen))
    b2 = Block(0, 8, 0, 10, torch.randn(8, 1, generator=gen), torch.randn(1, 10, generator=gen))
    layer = GBLRLinear.from_blocks([b1, b2], 10, 8, num_groups=3)
    assert (layer.num_groups, layer.rank, layer.bias) == (3, 3, None)
    assert layer.U.dtype == torch.float32
    assert layer.group_costs() == [b1.cost, 8 * 3 + 10 * 3, 0]  # b2 padded to rank 3
    W = torch.zeros(8, 10)
    for b in (b1, b2):
        W[b.row_indices(8)[:, None], b.col_indices(10)[None, :]] += b.U @ b.V
    torch.testing.assert_close(layer.dense_weight(hard=True).detach(), W)


def test_weight_reads_the_dense_weight_detached_in_both_layer_kinds() -> None:
    # Model code reads a Linear's ``weight`` (HuggingFace's T5: ``wo.weight.dtype``);
    # both layer kinds answer with the dense matrix they compute, without a graph.
    torch.manual_seed(0)
    layer = GBLRLinear.from_linear(nn.Linear(12, 10), GBLRLayerConfig(2, 3)).eval()
    w = layer.weight
    assert isinstance(w, torch.Tensor) and not w.requires_grad and w.shape == (10, 12)
    torch.testing.assert_close(w, layer.dense_weight(hard=True).detach())
    frozen = FrozenGBLR(layer.to_structure())
    fw = frozen.weight
    assert not fw.requires_grad and fw.dtype == frozen.U[0].dtype
    x = torch.randn(4, 12)
    torch.testing.assert_close(x @ fw.T + frozen.bias, frozen(x).detach())
    torch.testing.assert_close(fw, w)
