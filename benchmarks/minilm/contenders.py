"""The contenders: each is ``(dense_model, calib_batches, budget) -> compressed nn.Module``.

A contender must not modify ``dense_model`` (deep-copy it) and must return a model with
the same call signature, ``model(input_ids, attention_mask) -> (B, H)`` embeddings, whose
summed cost over the 36 encoder Linears is at most ``budget`` times the dense cost.
The benchmark prints one row per entry of :data:`CONTENDERS`, in insertion order;
:func:`register` adds one, :func:`set_distill_hook` swaps the fine-tune of
``whitened-svd+distill``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from .baselines import (
    asvd_layer,
    collect_activation_stats,
    compress_linears,
    truncated_svd_layer,
    whitened_svd_layer,
)
from .model import Batch, SentenceEncoder, encoder_linears

if TYPE_CHECKING:
    from gblr_compress.distill import DistillConfig
    from gblr_compress.init import InitConfig

__all__ = [
    "BUDGET_FREE",
    "CONTENDERS",
    "PENDING",
    "Contender",
    "DistillHook",
    "asvd",
    "gblr_init",
    "int8_dynamic",
    "prune_anchor",
    "plain_svd",
    "register",
    "set_distill_hook",
    "set_training_texts",
    "whitened_svd",
]

Contender = Callable[[nn.Module, list[Batch], float], nn.Module]
# (student, dense teacher, calib batches) -> the fine-tuned student.
DistillHook = Callable[[nn.Module, nn.Module, list[Batch]], nn.Module]

CONTENDERS: dict[str, Contender] = {}
# Slots announced in the table until something fills them: name -> what it waits for.
PENDING: dict[str, str] = {
    "whitened-svd+distill": "waits for a distillation hook (set_distill_hook)",
    "gblr-data-free": "waits for gblr_compress init/freeze/export (CLI path, no calib)",
    "gblr-calibrated": "waits for gblr_compress init/distill/freeze/export (CLI path)",
}

ASVD_ALPHA = 0.5
WHITEN_DAMPING = 1e-2
# Seed of gblr-compress's init and distillation, for both contenders that use them
# (minilm_bench --seed): a second seed shows how much a figure moves by chance.
SEED = 0
# The reordered copies the command trains on beside calibration batches made from text
# (gblr_compress.job.Job.reorder_copies), by id of those batches: set_training_texts.
_EXTRA: dict[int, tuple[list[Batch], list[Batch]]] = {}


def set_training_texts(calib: list[Batch], sentences: list[str], tokenizer: object,
                       vocab_share: float | None = None, copy_lengths: str | None = None,
                       general: bool = False, reorder: bool = True) -> tuple[int, int]:
    """Give the gblr rows (and ``whitened-svd+distill``'s distillation) calibrated on
    ``calib`` (made in order from ``sentences``, :func:`~minilm.model.make_batches`) what
    the command adds with ``--calib-text``: the default reordered copies of the training
    texts (those outside the held-out share), ``vocab_share`` of their words (None: the
    command's default) drawn from the tokenizer's vocabulary, at the lengths
    ``copy_lengths`` says (``--copy-lengths``; None: the command's default); with
    ``general``, also the command's default count of the package's general English
    sentences (``--general-text``; WordNet usage examples, disjoint from the ``wordnet``
    source's scored sentences); ``reorder`` off: no copies (``--reorder-copies 0``).
    Returns ``(copies, general sentences)``."""
    from gblr_compress.job import COPY_LENGTHS, VOCAB_SHARE, general_text_count, reorder_copy_count, split_texts
    from gblr_compress.pipeline import CompressConfig
    from gblr_compress.text import general_texts, run_copy, vocabulary_words

    from .model import make_batches

    fit, _ = split_texts(sentences, calib, CompressConfig().holdout_fraction, list(range(len(sentences))))
    copies = reorder_copy_count(None, len(fit), False) if reorder else 0
    words = vocabulary_words(tokenizer.get_vocab())
    share = VOCAB_SHARE if vocab_share is None else vocab_share
    lengths = COPY_LENGTHS if copy_lengths is None else copy_lengths
    texts = [run_copy(fit, words, share, SEED, k, lengths)[0] for k in range(copies)]
    added = general_texts(general_text_count(None, fit, False), SEED) if general else []
    if added:
        texts.append(added)
    _EXTRA.clear()
    _EXTRA[id(calib)] = (calib, [b for t in texts for b in make_batches(tokenizer, t, batch_size=32)])
    return copies, len(added)


def _training_extra(calib: list[Batch]) -> list[Batch]:
    entry = _EXTRA.get(id(calib))
    return entry[1] if entry is not None and entry[0] is calib else []


def register(name: str) -> Callable[[Contender], Contender]:
    """Decorator: add a contender to :data:`CONTENDERS` (and fill its pending slot)."""

    def deco(fn: Contender) -> Contender:
        CONTENDERS[name] = fn
        PENDING.pop(name, None)
        return fn

    return deco


@register("svd")
def plain_svd(dense: nn.Module, calib: list[Batch], budget: float) -> nn.Module:
    """Truncated SVD of every encoder Linear; data-free (``calib`` is unused)."""
    student = copy.deepcopy(dense)
    return compress_linears(student, encoder_linears(student), budget, lambda _n, lin, r: truncated_svd_layer(lin, r))


@register("asvd")
def asvd(dense: nn.Module, calib: list[Batch], budget: float) -> nn.Module:
    """ASVD-style activation-scaled SVD, scale = mean|x|^0.5 per input column."""
    student = copy.deepcopy(dense)
    linears = encoder_linears(student)
    stats = collect_activation_stats(student, linears, calib)
    return compress_linears(
        student, linears, budget, lambda n, lin, r: asvd_layer(lin, r, stats.mean_abs[n], ASVD_ALPHA)
    )


@register("whitened-svd")
def whitened_svd(dense: nn.Module, calib: list[Batch], budget: float) -> nn.Module:
    """SVD-LLM-style whitened SVD (Cholesky of the damped input Gram matrix)."""
    student = copy.deepcopy(dense)
    linears = encoder_linears(student)
    # Statistics of the dense model's own activations at every layer (not sequentially
    # updated after earlier layers are compressed), as in SVD-LLM's basic variant.
    stats = collect_activation_stats(student, linears, calib)
    return compress_linears(
        student, linears, budget, lambda n, lin, r: whitened_svd_layer(lin, r, stats.gram[n], WHITEN_DAMPING)
    )


def set_distill_hook(hook: DistillHook, name: str = "whitened-svd+distill") -> None:
    """Register ``whitened SVD -> hook(student, dense, calib)`` as the contender ``name``.

    Args:
        hook: fine-tunes the compressed student against the dense teacher on the
            calibration batches and returns it (the lead provides the distillation).
        name: the row label.
    """

    def contender(dense: nn.Module, calib: list[Batch], budget: float) -> nn.Module:
        return hook(whitened_svd(dense, calib, budget), dense, calib)

    register(name)(contender)


def _bert_names(dense: nn.Module) -> tuple[str, ...]:
    """The encoder Linears' names inside ``dense.bert`` (the HuggingFace BertModel)."""
    return tuple(name.removeprefix("bert.") for name in encoder_linears(dense))


def _gblr(dense: nn.Module, calib: list[Batch], budget: float, data_free: bool, distilled: bool = True,
          init: InitConfig | None = None, distill: DistillConfig | None = None) -> nn.Module:
    """What ``gblr-compress MODEL_DIR --include 'encoder.layer.*' --calib ...`` does, as
    the library call the CLI makes: compress the HuggingFace BertModel itself (its
    outputs, every token's last hidden state and the pooler output, are the
    distillation targets, default loss), then put the mean pooling back on top. With
    :func:`set_training_texts` for ``calib``, the command's reordered copies train too
    (what ``--calib-text`` does). ``init`` / ``distill``: other settings than the
    command's (``data_free`` and ``distilled`` still win)."""
    from gblr_compress.init import InitConfig
    from gblr_compress.pipeline import CompressConfig, compress, default_distill

    distill = distill or default_distill()  # the command's distillation settings
    config = CompressConfig(budget=budget, include=_bert_names(dense), seed=SEED,
                            init=replace(init or InitConfig(), data_free=data_free),
                            distill=distill if distilled and not data_free else replace(distill, steps=0))
    bert = compress(dense.bert, config, calib=None if data_free else calib,
                    extra_fit=() if data_free else _training_extra(calib)).model
    return SentenceEncoder(bert).eval()


def gblr_with(dense: nn.Module, calib: list[Batch], budget: float, init: InitConfig,
              distill: DistillConfig | None) -> nn.Module:
    """The gblr rows with other settings (``benchmarks/variants_bench.py``): ``init``,
    then ``distill`` (None: no distillation, the ``gblr-init`` row's pipeline)."""
    return _gblr(dense, calib, budget, data_free=init.data_free, distilled=distill is not None,
                 init=init, distill=distill)


@register("gblr-data-free")
def gblr_data_free(dense: nn.Module, calib: list[Batch], budget: float) -> nn.Module:
    """GBLR init from the weights alone, frozen; no distillation (no data)."""
    return _gblr(dense, calib, budget, data_free=True)


@register("gblr-init")
def gblr_init(dense: nn.Module, calib: list[Batch], budget: float) -> nn.Module:
    """Activation-aware GBLR init, frozen; no distillation (``DistillConfig(steps=0)``)."""
    return _gblr(dense, calib, budget, data_free=False, distilled=False)


# Moments of the dense model's consumers, per flavour of the anchor (with or without the
# training texts): the statistics depend on the data only, so every budget reuses one
# pass while the batch lists it was made from are the same objects.
_ANCHOR_MOMENTS: dict[bool, tuple[list[Batch], list[Batch] | None, dict]] = {}


def _anchor(dense: nn.Module, calib: list[Batch], budget: float, texts: bool) -> nn.Module:
    from benchmarks.prune_anchor import consumer_moments, linear_cost, prune_anchor_

    names = list(encoder_linears(dense))
    extra = _training_extra(calib) if texts else None
    cached = _ANCHOR_MOMENTS.get(texts)
    if cached is None or cached[0] is not calib or cached[1] is not extra:
        cached = _ANCHOR_MOMENTS[texts] = (calib, extra, consumer_moments(dense, [*calib, *(extra or [])]))
    student = copy.deepcopy(dense)
    prune_anchor_(student, [], int(budget * linear_cost(dense, names)), moments=cached[2])
    return student.eval()


@register("prune-anchor")
def prune_anchor(dense: nn.Module, calib: list[Batch], budget: float) -> nn.Module:
    """FFN units and heads pruned by output energy, each consumer refit by least
    squares (``benchmarks/prune_anchor.py``), no fine-tune; global split to the exact
    cost ``floor(B * dense cost)``."""
    return _anchor(dense, calib, budget, texts=False)


@register("prune-anchor+texts")
def prune_anchor_texts(dense: nn.Module, calib: list[Batch], budget: float) -> nn.Module:
    """The anchor with its importance and refit statistics over the texts the gblr rows
    train on (:func:`set_training_texts`: the reordered copies and the package's general
    English sentences beside ``calib``): whether the command's lead is its data."""
    return _anchor(dense, calib, budget, texts=True)


@register("int8-dynamic")
def int8_dynamic(dense: nn.Module, calib: list[Batch], budget: float) -> nn.Module:
    """onnxruntime ``quantize_dynamic`` (int8 weights, per channel) of the dense ONNX
    graph; data-free and budget-free: every Linear multiply-add is kept (in int8), so
    its exact cost is the dense cost, shown beside the budget rows."""
    from .speed import int8_encoder

    if id(dense) not in _INT8:  # the same model at every budget: build it once
        _INT8.clear()
        _INT8[id(dense)] = int8_encoder(dense)
    return _INT8[id(dense)]


_INT8: dict[int, nn.Module] = {}
# Contenders without a budget knob: their rows show their own exact cost.
BUDGET_FREE = {"int8-dynamic"}


@register("gblr-calibrated")
def gblr_calibrated(dense: nn.Module, calib: list[Batch], budget: float) -> nn.Module:
    """Activation-aware GBLR init + the command's default distillation, frozen."""
    return _gblr(dense, calib, budget, data_free=False)


def _as_gblr(low: nn.Module) -> nn.Module:
    """A LowRankLinear as a GBLRLinear with one full-width group (same function)."""
    from gblr_compress.layer import GBLRLayerConfig, GBLRLinear

    first, second = low.first.weight.detach(), low.second.weight.detach()  # (r, n), (m, r)
    layer = GBLRLinear(first.shape[1], second.shape[0], GBLRLayerConfig(num_groups=1, rank=first.shape[0]),
                       bias=low.second.bias is not None, dtype=first.dtype)
    with torch.no_grad():
        layer.U[0].copy_(second)
        layer.V[0].copy_(first)
        layer.widths.fill_(1.0)
        layer.locations.zero_()
        if low.second.bias is not None:
            layer.bias.copy_(low.second.bias.detach())
    return layer


@register("whitened-svd+distill")
def whitened_svd_distilled(dense: nn.Module, calib: list[Batch], budget: float) -> nn.Module:
    """The whitened-SVD row's model, then the distillation ``gblr-calibrated`` gets
    (gblr-compress's own distillation phases, same defaults, held-out share and loss),
    structure fixed: separates what the structure buys from what the distillation buys."""
    from gblr_compress.freeze import freeze_
    from gblr_compress.pipeline import CompressConfig, default_distill, distill_and_recover, split_batches
    from gblr_compress.swap import replace_module

    extra = _training_extra(calib)  # the copies and general sentences gblr-calibrated trains on
    student = whitened_svd(dense, [*calib, *extra], budget)  # statistics over them too, as the gblr init's
    for name in encoder_linears(dense):
        replace_module(student, name, _as_gblr(student.get_submodule(name)))
    config = CompressConfig(budget=budget, distill=replace(default_distill(), structure_lr=0.0), seed=SEED)
    fit, held = split_batches(list(calib), config.holdout_fraction)
    fit += extra
    max_cost = sum(student.get_submodule(n).exact_cost() for n in encoder_linears(dense))
    # The same targets gblr-calibrated distills on: the BertModel's outputs; and the same
    # seeding as compress(), so dropout draws do not depend on what ran before.
    torch.manual_seed(config.seed)
    teacher = copy.deepcopy(dense.bert)  # distillation freezes its teacher's parameters
    distill_and_recover(student.bert, teacher, fit, held, max_cost, config)
    freeze_(student)
    return student.eval()
