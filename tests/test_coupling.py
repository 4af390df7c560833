"""Coupling groups: found by module structure, and a coupled permutation keeps the function."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gblr_compress.coupling import CouplingGroup, find_groups, permute_

transformers = pytest.importorskip("transformers")


class Wrapper(nn.Module):
    """A wrapper holding a HF model, as the sentence-embedding wrapper does."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=input_ids).last_hidden_state


def _bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16)
    return Wrapper(transformers.BertModel(cfg, add_pooling_layer=False)).eval()


def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=40, max_position_embeddings=16)
    return Wrapper(transformers.LlamaModel(cfg)).eval()


def _check(model: nn.Module, kind: str) -> list[CouplingGroup]:
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    groups = [g for g in find_groups(model) if g.kind == kind]
    permuted = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    for g in groups:
        if g.kv_group > 1:  # whole key/value groups move, query heads shuffle inside them
            kv = torch.randperm(g.units // g.kv_group, generator=gen)
            perm = torch.cat([kv_h * g.kv_group + torch.randperm(g.kv_group, generator=gen) for kv_h in kv])
        else:
            perm = torch.randperm(g.units, generator=gen)
        assert not torch.equal(perm, torch.arange(g.units))
        permute_(permuted, g, perm)
    first = model.get_submodule(groups[0].producers[0]).weight
    assert not torch.equal(first, permuted.get_submodule(groups[0].producers[0]).weight)
    with torch.no_grad():
        out = permuted(ids)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), float((out - ref).abs().max())
    return groups


def test_bert_groups_are_found_inside_a_wrapper() -> None:
    groups = find_groups(_bert())
    ffn = [g for g in groups if g.kind == "ffn"]
    attn = [g for g in groups if g.kind == "attention"]
    assert [g.consumer for g in ffn] == ["inner.encoder.layer.0.output.dense", "inner.encoder.layer.1.output.dense"]
    assert ffn[0].producers == ("inner.encoder.layer.0.intermediate.dense",) and ffn[0].units == 48
    assert attn[0].producers == ("inner.encoder.layer.0.attention.self.query",)
    assert attn[0].kv_producers == ("inner.encoder.layer.0.attention.self.key",
                                    "inner.encoder.layer.0.attention.self.value")
    assert attn[0].consumer == "inner.encoder.layer.0.attention.output.dense"
    assert (attn[0].units, attn[0].unit_size, attn[0].kv_group) == (4, 8, 1)


def test_llama_groups_have_gate_and_grouped_heads() -> None:
    groups = find_groups(_llama())
    ffn = [g for g in groups if g.kind == "ffn"]
    attn = [g for g in groups if g.kind == "attention"]
    assert ffn[0].producers == ("inner.layers.0.mlp.gate_proj", "inner.layers.0.mlp.up_proj")
    assert ffn[0].consumer == "inner.layers.0.mlp.down_proj" and ffn[0].units == 40
    assert attn[0].consumer == "inner.layers.0.self_attn.o_proj"
    assert (attn[0].units, attn[0].unit_size, attn[0].kv_group) == (4, 8, 2)


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
@pytest.mark.parametrize("kind", ["ffn", "attention"])
def test_coupled_permutation_keeps_the_function(build, kind: str) -> None:
    assert _check(build(), kind)


def test_permutation_that_splits_a_kv_group_is_refused() -> None:
    model = _llama()
    g = next(g for g in find_groups(model) if g.kind == "attention")
    with pytest.raises(ValueError, match="key/value group"):
        permute_(model, g, torch.tensor([0, 2, 1, 3]))
    with pytest.raises(ValueError, match="permutation"):
        permute_(model, g, torch.tensor([0, 0, 1, 2]))


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
def test_pruned_heads_compute_the_model_without_those_heads(build) -> None:
    # Pruned windows of an attention group (kept heads first, one full-rank block per
    # layer) inside the real HF model equal the dense model with the pruned heads'
    # output-projection columns zeroed: the pruned heads' leftovers are never read.
    from gblr_compress.init.prune import prune_group, pruned_structures
    from gblr_compress.layer import FrozenGBLR
    from gblr_compress.swap import replace_module

    model = build()
    g = next(g for g in find_groups(model) if g.kind == "attention")
    lin = {n: model.get_submodule(n) for n in g.layers}
    G, size = g.kv_group, g.unit_size
    W2 = lin[g.consumer].weight.detach().double()
    h = W2.shape[1]
    pruned = prune_group(W2, torch.eye(h, dtype=torch.float64), g.units // G - 1, per_unit=1,
                         refit=False, unit_size=G * size)
    rows = {p: G * size for p in g.producers} | {p: size for p in g.kv_producers}
    t = {n: (n, lin[n].weight.detach().double(), None if lin[n].bias is None else lin[n].bias.detach().double())
         for n in g.layers}
    recs = pruned_structures([(*t[p], rows[p]) for p in rows], t[g.consumer], pruned)
    ref = copy.deepcopy(model)
    dropped = pruned.order[-1:]
    cols = (dropped[:, None] * G * size + torch.arange(G * size)).reshape(-1)
    with torch.no_grad():
        ref.get_submodule(g.consumer).weight[:, cols] = 0.0
    for n, s in recs.items():
        replace_module(model, n, FrozenGBLR(s).float())
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), atol=1e-5, rtol=1e-4)
    assert recs[g.consumer].cost == recs[g.consumer].out_features * (h - G * size)
