"""A forward that takes one dict of token tensors (sentence-transformers) is recognized
and called with named tensors; other one-argument forwards are left alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict  # noqa: UP035 (the old spelling users' code still has)

import pytest
import torch
from torch import nn

from gblr_compress.adapter import DictCall, find_tokenizer, takes_one_dict
from gblr_compress.text import forward_inputs
from tests.cli_models import DictEncoder, SmallMLP


class _TypingDict(nn.Module):
    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: UP006
        return features["input_ids"].float()


class _Mapping(nn.Module):
    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return batch["input_ids"].float()


class _Plain(nn.Module):
    def forward(self, x):  # no annotation: a tensor, as almost every model takes
        return x


def test_which_forwards_take_one_dict() -> None:
    assert takes_one_dict(DictEncoder()) and takes_one_dict(_TypingDict()) and takes_one_dict(_Mapping())
    assert not takes_one_dict(SmallMLP()) and not takes_one_dict(_Plain())
    assert not takes_one_dict(nn.Sequential(nn.Linear(2, 2)))
    # sentence-transformers' older models inherit nn.Sequential.forward(input): the
    # class's package says what it takes.
    st = type("SentenceTransformer", (nn.Sequential,), {"__module__": "sentence_transformers.model"})
    assert takes_one_dict(st(nn.Linear(2, 2)))


def test_dict_call_passes_named_tensors_and_returns_what_the_model_added() -> None:
    torch.manual_seed(0)
    inner = DictEncoder().eval()
    call = DictCall(inner, ("input_ids", "token_type_ids", "attention_mask"))
    assert call.input_names == ("input_ids", "attention_mask", "token_type_ids")  # the forward's order
    assert forward_inputs(call) == ["input_ids", "attention_mask", "token_type_ids"]
    assert forward_inputs(DictCall(inner)) == ["input_ids", "attention_mask"]
    ids = torch.randint(0, 64, (3, 7))
    mask = torch.ones_like(ids)
    out = call(input_ids=ids, attention_mask=mask)
    assert list(out) == ["token_embeddings", "sentence_embedding"]  # no input passthroughs
    ref = inner({"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(out["sentence_embedding"], ref["sentence_embedding"])
    with pytest.raises(ValueError):
        DictCall(inner, ("attention_mask",))


def test_a_sentence_transformers_embedding_is_left_out_of_the_output_term() -> None:
    from gblr_compress.distill import output_term

    torch.manual_seed(0)
    plain = DictCall(DictEncoder().eval())
    st_class = type("SentenceTransformer", (DictEncoder,), {"__module__": "sentence_transformers.model"})
    st = DictCall(st_class().eval())
    ids = torch.randint(0, 64, (2, 5))
    out = st(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert st.pooled_outputs == ("sentence_embedding",) and plain.pooled_outputs == ()
    assert list(output_term(out, st)) == ["token_embeddings"]
    assert list(output_term(out, plain)) == ["token_embeddings", "sentence_embedding"]  # its outputs are its own


def test_find_tokenizer_on_the_model_or_a_submodule() -> None:
    class Tok:  # what calibration reads of a HuggingFace tokenizer
        model_input_names = ["input_ids", "attention_mask"]

        def __call__(self, text: str) -> dict:
            return {"input_ids": [1, 2]}

        def get_vocab(self) -> dict:
            return {"a": 1}

    inner = DictEncoder()
    assert find_tokenizer(inner) is None
    inner.tokenizer = Tok()
    assert find_tokenizer(nn.Sequential(inner)) is inner.tokenizer
    inner.tokenizer = "not a tokenizer"
    assert find_tokenizer(inner) is None
