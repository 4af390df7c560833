"""torch's nn.MultiheadAttention as explicit attention with called Linear projections:
the same function in every calling form torch's layers use, its heads a coupling group."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gblr_compress.attention import CalledAttention, call_attention_
from gblr_compress.batches import run_model
from gblr_compress.coupling import find_groups, permute_


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim, vdim", [(None, None), (20, 24)])
def test_called_attention_matches_multihead_attention(batch_first, kdim, vdim) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=vdim).eval()
    called = CalledAttention(mha).eval()
    b, n_q, n_k = 3, 5, 7
    q, k, v = torch.randn(b, n_q, 32), torch.randn(b, n_k, kdim or 32), torch.randn(b, n_k, vdim or 32)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    padding = torch.zeros(b, n_k, dtype=torch.bool)
    padding[0, -2:] = True
    per_head = torch.rand(b * 4, n_q, n_k) > 0.8
    per_head[..., 0] = False  # no row fully masked (NaN in both)
    if kdim is None:  # the packed parameters read as the original's
        torch.testing.assert_close(called.in_proj_weight, mha.in_proj_weight.detach())
        torch.testing.assert_close(called.in_proj_bias, mha.in_proj_bias.detach())
    else:
        assert called.in_proj_weight is None and mha.in_proj_weight is None
    for kw in ({}, {"key_padding_mask": padding}, {"attn_mask": torch.randn(n_q, n_k)},
               {"attn_mask": per_head, "key_padding_mask": padding}, {"need_weights": False},
               {"average_attn_weights": False}):
        with torch.no_grad():
            want, got = mha(q, k, v, **kw), called(q, k, v, **kw)
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)


def test_torch_encoder_and_decoder_keep_their_function() -> None:
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 2,
                                enable_nested_tensor=False).eval()
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0), 1).eval()
    enc2, dec2 = copy.deepcopy(enc), copy.deepcopy(dec)
    assert call_attention_(enc2) == 2 and call_attention_(dec2) == 2  # the decoder's self and cross attention
    assert not any(isinstance(m, nn.MultiheadAttention) for m in [*enc2.modules(), *dec2.modules()])
    x = torch.randn(2, 6, 32)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": pad}, {"mask": causal, "is_causal": True}):
            torch.testing.assert_close(run_model(enc2, {"src": x, **kw}), run_model(enc, {"src": x, **kw}),
                                       atol=1e-5, rtol=1e-5)
        t, mem = torch.randn(4, 2, 32), torch.randn(6, 2, 32)
        tmask = nn.Transformer.generate_square_subsequent_mask(4)
        torch.testing.assert_close(run_model(dec2, (t, mem, tmask)), run_model(dec, (t, mem, tmask)),
                                   atol=1e-5, rtol=1e-5)


def test_heads_and_units_are_coupling_groups_and_permute_exactly() -> None:
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 1,
                                enable_nested_tensor=False).eval()
    call_attention_(enc)
    groups = {g.kind: g for g in find_groups(enc)}
    att, ffn = groups["attention"], groups["ffn"]
    assert att.producers == ("layers.0.self_attn.q_proj",) and att.consumer == "layers.0.self_attn.out_proj"
    assert att.kv_producers == ("layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj")
    assert (att.units, att.unit_size) == (4, 8)
    assert ffn.producers == ("layers.0.linear1",) and ffn.consumer == "layers.0.linear2" and ffn.units == 64
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        before = run_model(enc, x)
        permute_(enc, att, torch.tensor([2, 0, 3, 1]))
        permute_(enc, ffn, torch.randperm(64))
        torch.testing.assert_close(run_model(enc, x), before, atol=1e-5, rtol=1e-5)


def test_attention_with_extra_key_bias_is_left_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("attn", nn.MultiheadAttention(8, 2, add_bias_kv=True))
    assert call_attention_(model) == 0 and isinstance(model.attn, nn.MultiheadAttention)
