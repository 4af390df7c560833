"""The batch protocol: calling a model, reading its outputs, moving and cutting batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gblr_compress.batches import (
    as_batch_list,
    check_batch,
    flatten_outputs,
    graph_outputs,
    move_batch,
    real_positions,
    run_model,
    split_batches,
    token_ids,
    token_mask,
    with_token_ids,
)
from gblr_compress.errors import InputError


def test_run_model_and_flatten_outputs() -> None:
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    assert torch.equal(run_model(lin, x), lin(x))
    assert torch.equal(run_model(lin, (x,)), lin(x))
    assert torch.equal(run_model(lin, {"input": x}), lin(x))
    out = {"a": torch.ones(2), "b": (torch.zeros(1), torch.arange(3)), "c": None}
    flat = flatten_outputs(out)
    assert [t.tolist() for t in flat] == [[1.0, 1.0], [0.0]]  # integer tensors skipped
    moved = move_batch({"x": x, "y": (x, x)}, "cpu")
    assert isinstance(moved["y"], tuple) and torch.equal(moved["x"], x)


def test_split_batches_cuts_one_big_batch() -> None:
    fit, held = split_batches([torch.zeros(100, 3)], 0.2)
    assert sum(b.shape[0] for b in fit + held) == 100 and len(held) == 2 and len(fit) == 6
    fit, held = split_batches([{"a": torch.zeros(4, 2), "b": torch.ones(4, 2)}] * 10, 0.25)
    assert len(fit) == 7 and len(held) == 3


def test_graph_outputs_name_every_tensor_and_refuse_nesting() -> None:
    a, b = torch.ones(2), torch.arange(3)
    assert graph_outputs(a)[1] == ["output_0"]
    tensors, names = graph_outputs({"logits": a, "ids": b})
    assert names == ["logits", "ids"] and tensors[1] is b  # integer outputs are kept
    assert graph_outputs((a, b))[1] == ["output_0", "output_1"]
    with pytest.raises(InputError, match="nested"):
        graph_outputs((a, (a, a)))
    with pytest.raises(InputError, match="must be a Tensor"):
        graph_outputs(None)


def test_batch_checks_token_ids_and_real_positions() -> None:
    x = torch.randn(2, 3)
    check_batch(x, "b")
    check_batch((x, x), "b")
    for bad in ((), [x], {"a": 1}, 3):
        with pytest.raises(InputError, match="b: a batch must be"):
            check_batch(bad, "b")
    assert len(as_batch_list(x, "c")) == 1 and len(as_batch_list([x, x], "c")) == 2
    with pytest.raises(InputError, match="mix kinds"):
        as_batch_list([x, (x,)], "c")
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": mask}
    assert token_ids(batch) is ids and token_ids((ids, mask)) is ids and token_ids(x) is None
    assert torch.equal(with_token_ids(batch, ids + 1)["input_ids"], ids + 1)
    assert torch.equal(with_token_ids((ids, mask), ids + 1)[1], mask)
    m = token_mask(batch)
    assert m.dtype == torch.bool and token_mask(ids) is None
    h = torch.randn(2, 4, 5)  # (B, T, C)
    assert real_positions(h, m).shape == (5, 5)
    assert real_positions(x, m) is x  # not per token: unchanged
