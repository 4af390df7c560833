"""torch's ``nn.MultiheadAttention`` with its projections as called Linear layers.

``nn.MultiheadAttention`` keeps its query/key/value projections in one parameter
(``in_proj_weight``) and reads ``out_proj.weight`` without calling ``out_proj``, so none
of its four projections is a Linear layer the model calls: nothing in it could be
compressed (``nn.TransformerEncoder``'s attention stayed dense, a third of a layer's
Linear cost). :func:`call_attention_` replaces each plain ``nn.MultiheadAttention`` in a
loaded model by :class:`CalledAttention`, which computes the same function (to float
rounding) with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` called as modules,
so they are compressed, exported and counted like any other Linear; the attention's
heads are found as a coupling group (:mod:`gblr_compress.coupling`).

The user's file is not touched: the replacement is made on the model in memory. Pure
torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CalledAttention", "call_attention_"]


class CalledAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward, with its projections as called Linears.

    Supports what ``nn.MultiheadAttention`` does without ``bias_k`` / ``bias_v`` /
    ``add_zero_attn``: batched and unbatched inputs, ``batch_first`` either way,
    different key / value sizes, boolean or float ``attn_mask`` (2-D or one per
    head) and ``key_padding_mask``, ``is_causal`` without a mask, and the attention
    weights when asked (averaged over heads by default). Dropout on the weights in
    training mode, as the original.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e, heads = mha.embed_dim, mha.num_heads
        self.embed_dim, self.num_heads, self.head_dim = e, heads, e // heads
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim  # read by torch's transformer layers
        bias = mha.in_proj_bias is not None
        like = {"device": mha.out_proj.weight.device, "dtype": mha.out_proj.weight.dtype}
        self.q_proj = nn.Linear(e, e, bias=bias, **like)
        self.k_proj = nn.Linear(mha.kdim, e, bias=bias, **like)
        self.v_proj = nn.Linear(mha.vdim, e, bias=bias, **like)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.chunk(3)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = mha.in_proj_bias.chunk(3) if bias else (None, None, None)
            for lin, w, b in zip((self.q_proj, self.k_proj, self.v_proj), weights, biases):
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
        self.out_proj = mha.out_proj
        self.train(mha.training)

    # nn.MultiheadAttention's packed parameters, for code that reads them (torch's own
    # layers do in checks): made anew from the projections on each read, detached.
    @property
    def in_proj_weight(self) -> torch.Tensor | None:
        """The query/key/value weights stacked (None when their input sizes differ)."""
        if not self._qkv_same_embed_dim:
            return None
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]).detach()

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """The query/key/value biases stacked (None without biases)."""
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]).detach()

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n_q, _ = query.shape
        n_k = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(b, n_q, h, d).transpose(1, 2)
        k = self.k_proj(key).view(b, n_k, h, d).transpose(1, 2)
        v = self.v_proj(value).view(b, n_k, h, d).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (b, h, n_q, n_k)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            add = _additive(attn_mask, scores.dtype)
            # (n_q, n_k) for every head, or (b * h, n_q, n_k): one per batch row and head
            scores = scores + (add.reshape(-1, h, n_q, n_k) if add.dim() == 3 else add)
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores.dtype).view(b, 1, 1, n_k)
        weights = scores.softmax(-1)
        if self.training and self.dropout > 0:
            weights = nn.functional.dropout(weights, self.dropout)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(b, n_q, h * d))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        w = weights.mean(1) if average_attn_weights else weights
        return out, (w.squeeze(0) if unbatched else w)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: not attended) as -inf where True; a float mask as is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def call_attention_(model: nn.Module) -> int:
    """Replace, in place, every ``nn.MultiheadAttention`` of ``model`` (exactly that
    class: a subclass may change its forward) without ``bias_k`` / ``bias_v`` /
    ``add_zero_attn`` by a :class:`CalledAttention`; returns how many were replaced."""
    # name "": the model itself is the attention, and nothing holds it to replace.
    targets = [(name, mod) for name, mod in model.named_modules()
               if name and type(mod) is nn.MultiheadAttention and mod.bias_k is None and mod.bias_v is None
               and not mod.add_zero_attn]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, CalledAttention(mod))
    return len(targets)
