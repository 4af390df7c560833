"""The frozen record: exact cost, JSON/tensor round-trip, merging."""

from __future__ import annotations

import json

import pytest
import torch

from gblr_compress.structure import Block, LayerStructure, merge_blocks
from tests.conftest import random_gblr


def test_json_and_tensor_roundtrip_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    s = random_gblr(21, 13, 4, 2, gen, dead=1).to_structure(name="enc.0.fc1")
    s.info["init"] = "svd"
    meta = json.loads(json.dumps(s.to_dict()))
    back = LayerStructure.from_dict(meta, s.tensors())
    assert back.to_dict() == s.to_dict()
    assert torch.equal(back.dense_weight(), s.dense_weight())
    assert back.cost == s.cost == meta["cost"]
    assert meta["dense_cost"] == 21 * 13
    assert sum(b["cost"] for b in meta["blocks"]) == meta["cost"]


def test_cost_is_rank_times_widths_or_the_dense_block() -> None:
    b1 = Block(0, 4, 2, 6, torch.zeros(4, 3), torch.zeros(3, 6))
    b2 = Block(5, 3, 0, 10, torch.zeros(3, 1), torch.zeros(1, 10))
    s = LayerStructure(10, 8, [b1, b2])
    # b1 factored would cost 3 * (4 + 6) = 30 > 4 * 6: it is stored dense (GBLR.md s.7)
    assert s.cost == 4 * 6 + 1 * (3 + 10)
    assert s.rank == 4


def test_merge_identical_windows_sums_rank_and_keeps_weight() -> None:
    a = Block(1, 3, 2, 4, torch.randn(3, 1), torch.randn(1, 4))
    b = Block(1, 3, 2, 4, torch.randn(3, 2), torch.randn(2, 4))
    c = Block(0, 2, 0, 4, torch.randn(2, 1), torch.randn(1, 4))
    merged = merge_blocks([a, b, c])
    assert [x.rank for x in merged] == [3, 1]
    before = LayerStructure(8, 6, [a, b, c]).dense_weight()
    after = LayerStructure(8, 6, merged).dense_weight()
    assert torch.allclose(before, after, atol=1e-6)


def test_invalid_records_are_rejected() -> None:
    with pytest.raises(ValueError):
        Block(0, 3, 0, 4, torch.zeros(2, 1), torch.zeros(1, 4))
    with pytest.raises(ValueError):
        LayerStructure(4, 4, [Block(5, 1, 0, 1, torch.zeros(1, 1), torch.zeros(1, 1))])
    with pytest.raises(ValueError):
        LayerStructure.from_dict({"version": 999, "blocks": []}, {})


def test_full_width_windows_are_canonical_and_merge() -> None:
    gen = torch.Generator().manual_seed(7)
    m, n = 6, 5
    U = torch.randn(m, 2, generator=gen, dtype=torch.float64)
    V = torch.randn(2, n, generator=gen, dtype=torch.float64)
    shifted = LayerStructure(n, m, [Block(4, m, 3, n, U, V)])
    assert shifted.blocks[0].window_key() == (0, m, 0, n)
    dense = torch.zeros(m, n, dtype=torch.float64)
    rows = [(4 + j) % m for j in range(m)]
    cols = [(3 + j) % n for j in range(n)]
    dense[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = U @ V
    torch.testing.assert_close(shifted.dense_weight(), dense)
    layer = random_gblr(m, n, K=2, r=1, gen=gen)
    with torch.no_grad():
        layer.widths.fill_(1.0)
        layer.locations[:, 0] = torch.tensor([2 / m, 1 / n], dtype=torch.float64)
    record = layer.to_structure()
    assert len(record.blocks) == 1 and record.blocks[0].rank == 2  # same window once canonical
    torch.testing.assert_close(record.dense_weight(), layer.dense_weight(hard=True).detach())


def test_layout_from_dict_reads_windows_ranks_and_cost_without_weights() -> None:
    from gblr_compress.structure import layout_from_dict

    U, V = torch.randn(3, 2), torch.randn(2, 5)
    s = LayerStructure(8, 6, [Block(4, 3, 1, 5, U, V), Block(0, 6, 0, 8, torch.randn(6, 1), torch.randn(1, 8))])
    layout = layout_from_dict(s.to_dict())
    assert (layout.cost, layout.rank, len(layout.blocks)) == (s.cost, s.rank, 2) == (29, 3, 2)  # 3 x 5 at rank 2 is dense: 15
    assert [b.window_key() for b in layout.blocks] == [b.window_key() for b in s.blocks]
    assert layout.blocks[0].U.device.type == "meta"  # no weights held
    dead = {"out_features": 6, "in_features": 8, "blocks": [{"rows": [0, 0], "cols": [0, 8], "rank": 2}]}
    assert layout_from_dict(dead).blocks == []  # dead blocks dropped; no version is accepted
    for bad, msg in (
        ({**dead, "blocks": [{"rows": [9, 2], "cols": [0, 8], "rank": 1}]}, "out of range"),
        ({**dead, "blocks": [{"rows": [0, 2]}]}, "a block needs"),
        ({**dead, "version": 99}, "unsupported structure version"),
        ([], "must be an object"),
    ):
        with pytest.raises(ValueError, match=msg):
            layout_from_dict(bad)
