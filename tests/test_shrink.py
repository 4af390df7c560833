"""Pruned groups leave the graph as smaller layers (gblr_compress/export/shrink.py): the
view computes the frozen model's function with fewer units, heads included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gblr_compress.export import export_onnx
from gblr_compress.export.shrink import shrink_pruned
from gblr_compress.layer import FrozenGBLR
from gblr_compress.structure import Block, LayerStructure


def _rows(lin: nn.Linear, keep: int) -> FrozenGBLR:
    """A pruned producer: only the first ``keep`` output rows, stored as (I, W)."""
    W = lin.weight.detach()
    return FrozenGBLR(LayerStructure(lin.in_features, lin.out_features,
                                     [Block(0, keep, 0, lin.in_features, torch.eye(keep), W[:keep].clone())],
                                     lin.bias.detach().clone()))


def _cols(lin: nn.Linear, keep: int) -> FrozenGBLR:
    """A pruned consumer: only the first ``keep`` input columns, stored as (W, I)."""
    W = lin.weight.detach()
    return FrozenGBLR(LayerStructure(lin.in_features, lin.out_features,
                                     [Block(0, lin.out_features, 0, keep, W[:, :keep].clone(), torch.eye(keep))],
                                     lin.bias.detach().clone()))


def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def test_pruned_heads_and_units_become_smaller_layers_with_the_same_function(tmp_path) -> None:
    model = _bert()
    layer0 = model.encoder.layer[0]
    att, ffn = layer0.attention, layer0
    for name in ("query", "key", "value"):  # keep heads 0 and 1 of 4 (8 dims each)
        setattr(att.self, name, _rows(getattr(att.self, name), 16))
    att.output.dense = _cols(att.output.dense, 16)
    ffn.intermediate.dense = _rows(ffn.intermediate.dense, 20)  # keep 20 of 48 FFN units
    ffn.output.dense = _cols(ffn.output.dense, 20)
    ids = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def run(m: nn.Module):
        return m(**batch).last_hidden_state

    with torch.no_grad():
        ref = run(model)
        view, shrunk = shrink_pruned(model, run)
        got = run(view)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    shapes = {s.name: (s.out_features, s.in_features) for s in shrunk}
    assert shapes == {
        "encoder.layer.0.attention.self.query": (16, 32), "encoder.layer.0.attention.self.key": (16, 32),
        "encoder.layer.0.attention.self.value": (16, 32), "encoder.layer.0.attention.output.dense": (32, 16),
        "encoder.layer.0.intermediate.dense": (20, 32), "encoder.layer.0.output.dense": (32, 20),
    }
    assert view.encoder.layer[0].attention.self.num_attention_heads == 2
    assert model.encoder.layer[0].attention.self.num_attention_heads == 4  # the model is left as it was
    assert isinstance(model.encoder.layer[0].intermediate.dense, FrozenGBLR)
    # the export takes the view and is verified against the model itself
    out = export_onnx(model, batch, tmp_path / "m.onnx")
    assert out.ort_ok and out.max_abs_diff <= out.tolerance
    forms = {le.name: le.form for le in out.layers}
    assert all(forms[n] == "pruned" for n in shapes), forms


def test_a_group_that_is_not_fully_pruned_stays_as_it_was() -> None:
    model = _bert()
    layer0 = model.encoder.layer[0]
    layer0.intermediate.dense = _rows(layer0.intermediate.dense, 20)  # producer pruned, consumer dense
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))

    def run(m: nn.Module):
        return m(input_ids=ids).last_hidden_state

    with torch.no_grad():
        view, shrunk = shrink_pruned(model, run)
    assert view is model and shrunk == []
