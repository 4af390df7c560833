"""The pruning + least-squares anchor (benchmarks/prune_anchor.py) on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.prune_anchor import (
    compressible_linears,
    find_unit_groups,
    linear_cost,
    prune_anchor_,
    refit_consumer,
)
from gblr_compress.errors import InputError

transformers = pytest.importorskip("transformers")


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, attn_implementation="eager")
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so pruning visibly changes outputs
        for p in model.encoder.parameters():
            p.mul_(10.0) if p.dim() == 2 else None
    return model


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches(n: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(4, 10, dtype=torch.long)
        mask[0, 7:] = 0  # some padding: left out of the statistics
        out.append({"input_ids": torch.randint(0, 64, (4, 10), generator=g), "attention_mask": mask})
    return out


def test_groups_and_names_of_bert_and_llama() -> None:
    bert, llama = _bert(), _llama()
    kinds = sorted(g.kind for g in find_unit_groups(bert))
    assert kinds == ["ffn", "ffn", "heads", "heads"]
    assert len(compressible_linears(bert)) == 12 and linear_cost(bert, compressible_linears(bert)) == 2 * (
        4 * 32 * 32 + 2 * 32 * 64)
    groups = find_unit_groups(llama)
    assert [g.kind for g in groups] == ["ffn", "ffn"] and groups[0].producers[0].endswith("gate_proj")
    names = compressible_linears(llama)
    assert len(names) == 14 and not any("lm_head" in n for n in names)


def test_target_at_dense_cost_changes_nothing() -> None:
    bert = _bert()
    pruned = copy.deepcopy(bert)
    dense_cost = linear_cost(bert, compressible_linears(bert))
    res = prune_anchor_(pruned, _batches(), dense_cost)
    assert res.cost == dense_cost and all(k == 64 or k == 4 for k in res.kept.values())
    ev = _batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(pruned(**ev).last_hidden_state, bert(**ev).last_hidden_state)


@pytest.mark.parametrize("frac", [0.8, 0.5, 0.3])
def test_cost_is_exact_and_within_target(frac: float) -> None:
    bert = _bert()
    names = compressible_linears(bert)
    dense_cost = linear_cost(bert, names)
    target = int(frac * dense_cost)
    pruned = copy.deepcopy(bert)
    res = prune_anchor_(pruned, _batches(), target)
    # The real Linear shapes give the reported cost; it is within one unit of the target.
    assert res.cost == linear_cost(pruned, names) <= target
    assert target - res.cost < 32 * 2  # less than one FFN unit (32 in + 32 out) left unused
    for g in find_unit_groups(bert):
        k = res.kept[g.name] * g.unit
        assert pruned.get_submodule(g.consumer).in_features == k
        assert all(pruned.get_submodule(p).out_features == k for p in g.producers)
    ev = _batches(1, seed=5)[0]
    with torch.no_grad():  # the pruned model runs (head counts follow the Linears)
        assert pruned(**ev).last_hidden_state.shape == (4, 10, 32)


def test_llama_ffn_pruning_runs_and_keeps_attention() -> None:
    llama = _llama()
    names = compressible_linears(llama)
    target = int(0.8 * linear_cost(llama, names))
    pruned = copy.deepcopy(llama)
    res = prune_anchor_(pruned, _batches(), target, forward=lambda b: pruned.model(**b))
    assert res.cost <= target and pruned.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    # down_proj had no bias; the folded mean of the pruned units needs one.
    assert pruned.model.layers[0].mlp.down_proj.bias is not None
    ev = _batches(1, seed=5)[0]
    with torch.no_grad():
        assert pruned(**ev).logits.shape == (4, 10, 64)


def test_mpnet_prunes_ffn_units_only_and_runs() -> None:
    torch.manual_seed(0)
    cfg = transformers.MPNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64)
    mpnet = transformers.MPNetModel(cfg).eval()
    groups = find_unit_groups(mpnet)
    assert [g.kind for g in groups] == ["ffn", "ffn"] and groups[0].consumer.endswith("output.dense")
    names = compressible_linears(mpnet)
    assert len(names) == 12  # q, k, v, o and the FFN pair of each layer count in the cost
    target = int(0.6 * linear_cost(mpnet, names))
    pruned = copy.deepcopy(mpnet)
    res = prune_anchor_(pruned, _batches(), target, kinds=("ffn",))
    assert res.cost == linear_cost(pruned, names) <= target
    assert pruned.encoder.layer[0].attention.attn.q.weight.shape == (32, 32)
    ev = _batches(1, seed=5)[0]
    with torch.no_grad():
        assert pruned(**ev).last_hidden_state.shape == (4, 10, 32)


def test_refit_recovers_a_pruned_unit_that_the_kept_ones_predict() -> None:
    """Column 3 of the consumer's input is 2*x0 - x1 + 0.5: the least-squares refit
    folds it into the kept columns (and the bias) exactly; plain pruning cannot."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64)
    x[:, 3] = 2 * x[:, 0] - x[:, 1] + 0.5
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    mean, cov = x.mean(0), torch.cov(x.T, correction=0)
    keep = torch.tensor([0, 1, 2])
    want = x @ w.T + b
    errs = {}
    for refit in (True, False):
        w2, b2 = refit_consumer(w, b, mean, cov, keep, damping=1e-9, refit=refit)
        errs[refit] = float((x[:, keep] @ w2.T + b2 - want).pow(2).mean())
    assert errs[True] < 1e-10 < errs[False]


def test_refit_reduces_held_out_error_of_the_pruned_model() -> None:
    bert = _bert()
    target = int(0.6 * linear_cost(bert, compressible_linears(bert)))
    ev = _batches(4, seed=9)
    with torch.no_grad():
        want = torch.cat([bert(**b).last_hidden_state for b in ev])
    errs = {}
    for refit in (True, False):
        pruned = copy.deepcopy(bert)
        prune_anchor_(pruned, _batches(20), target, refit=refit)
        with torch.no_grad():
            got = torch.cat([pruned(**b).last_hidden_state for b in ev])
        errs[refit] = float((got - want).pow(2).mean())
    assert errs[True] < errs[False]


def test_bad_input_is_an_input_error() -> None:
    bert = _bert()
    with pytest.raises(InputError, match="below"):
        prune_anchor_(copy.deepcopy(bert), _batches(), 10)
    with pytest.raises(InputError, match="no BERT-like"):
        find_unit_groups(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_uniform_split_prunes_every_group_alike() -> None:
    llama = _llama()
    names = compressible_linears(llama)
    target = int(0.8 * linear_cost(llama, names))
    pruned = copy.deepcopy(llama)
    res = prune_anchor_(pruned, _batches(), target, split="uniform", forward=lambda b: pruned.model(**b))
    assert res.cost <= target
    assert max(res.kept.values()) - min(res.kept.values()) <= 1


def test_the_minilm_anchor_with_texts_counts_the_batches_beside_the_calibration() -> None:
    from benchmarks.minilm import contenders
    from benchmarks.minilm.model import SentenceEncoder

    dense, calib = SentenceEncoder(_bert()), _batches(4)
    contenders._EXTRA.clear()
    contenders._EXTRA[id(calib)] = (calib, [])  # nothing beside: the plain anchor's model
    plain = contenders.prune_anchor(dense, calib, 0.5)
    same = contenders.prune_anchor_texts(dense, calib, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), same.state_dict().values(), strict=True))
    contenders._ANCHOR_MOMENTS.clear()
    contenders._EXTRA[id(calib)] = (calib, _batches(8, seed=1))
    moved = contenders.prune_anchor_texts(dense, calib, 0.5)
    again = contenders.prune_anchor(dense, calib, 0.5)  # the plain anchor ignores the texts
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), moved.state_dict().values(),
                                                       strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
    contenders._EXTRA.clear()
    contenders._ANCHOR_MOMENTS.clear()
