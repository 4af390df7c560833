"""Distill a GBLR student against its dense teacher, with proximal width updates.

The student is the model after :func:`gblr_compress.init.initialize_`: its target layers
are :class:`~gblr_compress.layer.GBLRLinear`. Each step:

1. loss = distance(student outputs, teacher outputs) [+ matching of intermediate
   features to the teacher's: each transformer block's output, or each compressed
   layer's output in a model without repeated blocks];
2. AdamW step, content (U, V, bias) and structure (widths, locations) in separate groups;
3. proximal step: locations wrapped, widths clamped and projected onto the global budget
   with one shared shift (:func:`gblr_compress.budget.project_widths_`), so every state of
   the student, not only the last, has exact cost ``<= max_cost``.

Sigma is annealed from smooth masks (useful width gradients) to the exact boxcar, and the
last phase runs with straight-through rounding, so training ends on the function that
freezing deploys. Held-out calibration batches are scored on the hard (eval-mode)
structure every ``eval_every`` steps; the best held-out state is kept, because with a few
hundred calibration samples more steps mostly fit the calibration set (GBLR design notes).
The library prints nothing: progress goes through a callback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gblr_compress.batches import (
    Batch,
    chunk_batch,
    first_tensor,
    flatten_outputs,
    leading_size,
    no_token_axis,
    per_token,
    positions,
    real_positions,
    run_model,
    token_mask,
)
from gblr_compress.budget import project_widths_, total_cost
from gblr_compress.errors import ConfigError
from gblr_compress.layer import FrozenGBLR, GBLRLinear
from gblr_compress.memory import activation_bytes
from gblr_compress.progress import Progress, ProgressEvent
from gblr_compress.swap import block_modules, last_block

__all__ = [
    "DistillConfig",
    "DistillResult",
    "gblr_layers",
    "frozen_layers",
    "frozen_content",
    "feature_modules",
    "heldout_subset",
    "output_kind",
    "normalized_mse",
    "output_loss",
    "output_term",
    "kl_rows",
    "agreement",
    "distill_",
    "uses_kl",
    "row_errors",
]


@dataclass(frozen=True)
class DistillConfig:
    """Settings of the distillation loop.

    Attributes:
        steps: optimizer steps (one calibration batch each); 0 skips training.
        lr: peak learning rate of the content (U, V, bias).
        structure_lr: peak learning rate of widths and locations (fractions of the axis).
        weight_decay: AdamW decay of the content toward 0.
        init_decay: decoupled pull of the content back toward its values at the start
            of the loop (the init), applied after each step as
            ``p += min(1, lr_t * init_decay) * (p0 - p)`` with ``lr_t`` the step's
            learning rate: AdamW's decay with the init as its centre instead of 0, so a
            drift of about ``1 / init_decay`` per element balances Adam's unit steps.
            It keeps a copy of the content (one more copy of the factors in memory); 0
            disables it. Off by default: on all-MiniLM-L6-v2 it helped at budget 0.8 and
            0.5 with different values and lost at 0.3 with every one measured
            (benchmarks/README.md, "a pull toward the init").
        loss: ``"auto"`` (KL on a single logits output: 2-D classifier logits, or a
            causal LM's ``logits``; normalized MSE otherwise, see :func:`output_kind`),
            ``"mse"`` or ``"kl"`` (per output position, at the real positions only).
        temperature: KL temperature.
        layer_weight: weight of the feature term (normalized MSE of intermediate features
            vs the teacher's, averaged over the tapped modules, see ``features``); 0
            disables it. With ``features="blocks"``, a model whose outputs have no token
            axis (a sentence-embedding wrapper's pooled vector) has its output term
            taken on the last block's per-token output instead, the output its HuggingFace
            folder would give.
        features: which intermediate outputs the feature term compares: ``"blocks"``
            (the default) taps each repeated block that holds compressed layers (the
            children of an ``nn.ModuleList``, e.g. each transformer layer), or each
            compressed layer when the model has no such list; ``"layers"`` taps each
            compressed layer. Block outputs are what the rest of the model reads, they
            do not depend on how units inside a block are ordered, and they are a ninth
            of the size of every layer's output on a BERT or Llama layer.
        blur_start: mask edge blur at the start, as a fraction of the longer axis.
        ste_fraction: final fraction of the steps run on exact boxcars with
            straight-through rounding.
        warmup_fraction: linear warm-up share of the cosine schedule.
        eval_every: held-out evaluation period in steps (also the history period).
        seed: makes batch order and every random choice reproducible.
        heldout_tokens: input positions of the held-out batches each evaluation scores
            (evenly spaced batches holding about that many; None: all). An evaluation
            runs every ``eval_every`` steps; over a large held-out share it would cost
            more than the steps between (on a 135M LM, 19 batches took longer than 20
            steps' worth of training time allows).
        teacher_cache_mb: keep the teacher's outputs (and its layer outputs for the
            layer-wise term) per calibration batch, up to this many MiB, instead of
            running the teacher again every time a batch comes round (0: never keep).
            The teacher is fixed, so this changes no result, only the time: about a
            quarter of a step on a BERT-small encoder. An output made by a widening
            head (a causal LM's logits over its vocabulary) is kept as the head's
            input and remade on use, so a batch costs its hidden states, not its
            logits; nothing is kept when no batch comes round twice.
        activation_mb: what one forward/backward pass may keep for the backward, in
            MiB: a step whose batch would need more (estimated from the compressed
            layers' widths and the output's size per position, see
            :func:`activation_bytes_per_position`) runs its rows in chunks that fit and
            adds up their gradients, weighted by their share of the batch's positions
            (the step's loss is the same; the feature term is normalized per chunk). 0:
            whole batches. On SmolLM2-135M (8 x 128-token rows, 49,152-word
            vocabulary) three whole-batch steps took the run's peak from 5.1 to 6.9 GiB.
        min_steps: with a deadline, the phase does not train at all when fewer steps
            than this fit the time left (estimated before the first step from the
            held-out evaluation's forward passes, a training step costing about two
            teacher + student forwards; checked again after the timed first steps).
            On SmolLM2-135M on 2 cores 3 and 9 steps left the held-out loss where the
            init had it (the best state was the init) and cost 100-170 s and the run's
            memory peak.
        epochs: with more calibration batches, more steps: the run plans
            ``max(steps, ceil(epochs * batches))`` steps, so that thousands of sentences
            are each seen a few times (0: always ``steps``). MiniLM at budget 0.5 with
            2,256 Wikipedia sentences (56 fit batches): 100 steps kept news-sentence
            cosine 0.893, 300 steps 0.912, and more data moved unseen-text fidelity the
            most of anything measured, where more steps over a few hundred sentences
            only fit them.
        extra_seconds: the steps beyond ``steps`` that ``epochs`` adds are kept only
            while the whole loop is estimated (from its first timed steps) to finish
            within this many seconds; ``steps`` themselves always run (unless a
            ``deadline`` cuts them). Keeps a large model's default run near its
            ``steps`` (MPNet-base: 3.8 s a step on 2 cores).
        give_up: with held-out data, stop once this share of the steps has run and no
            evaluation has beaten the state before training (0: never); the result's
            ``gave_up`` says so and the student is left at its start, as a run that
            never gains leaves it. For a run that a smaller step follows when it gains
            nothing (:func:`~gblr_compress.pipeline.distill_and_recover`): the steps
            after that point would be thrown away with it.
    """

    steps: int = 200
    lr: float = 1e-3
    structure_lr: float = 1e-2
    weight_decay: float = 0.0
    init_decay: float = 0.0
    loss: str = "auto"
    temperature: float = 2.0
    layer_weight: float = 1.0
    features: str = "blocks"
    blur_start: float = 0.03
    ste_fraction: float = 0.3
    warmup_fraction: float = 0.05
    eval_every: int = 20
    seed: int = 0
    heldout_tokens: int | None = 8192
    teacher_cache_mb: float = 1024.0
    activation_mb: float = 1024.0
    min_steps: int = 20
    epochs: float = 0.0
    extra_seconds: float = 180.0
    give_up: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError("steps", f"must be >= 0, got {self.steps}")
        if not self.epochs >= 0:
            raise ConfigError("epochs", f"must be >= 0, got {self.epochs}")
        if not self.extra_seconds >= 0:
            raise ConfigError("extra_seconds", f"must be >= 0, got {self.extra_seconds}")
        if not self.lr >= 0:
            raise ConfigError("lr", f"must be >= 0, got {self.lr}")
        if not self.init_decay >= 0:
            raise ConfigError("init_decay", f"must be >= 0, got {self.init_decay}")
        if not self.structure_lr >= 0:
            raise ConfigError("structure_lr", f"must be >= 0, got {self.structure_lr}")
        if self.loss not in ("auto", "mse", "kl"):
            raise ConfigError("loss", f"must be auto, mse or kl, got {self.loss!r}")
        if self.features not in ("blocks", "layers"):
            raise ConfigError("features", f"must be blocks or layers, got {self.features!r}")
        if not 0.0 <= self.ste_fraction <= 1.0:
            raise ConfigError("ste_fraction", f"must be in [0, 1], got {self.ste_fraction}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        if self.eval_every < 1:
            raise ConfigError("eval_every", f"must be >= 1, got {self.eval_every}")
        if self.heldout_tokens is not None and self.heldout_tokens < 1:
            raise ConfigError("heldout_tokens", f"must be >= 1 or None, got {self.heldout_tokens}")
        if not self.teacher_cache_mb >= 0:
            raise ConfigError("teacher_cache_mb", f"must be >= 0, got {self.teacher_cache_mb}")
        if not self.activation_mb >= 0:
            raise ConfigError("activation_mb", f"must be >= 0, got {self.activation_mb}")
        if self.min_steps < 0:
            raise ConfigError("min_steps", f"must be >= 0, got {self.min_steps}")
        if not 0.0 <= self.give_up < 1.0:
            raise ConfigError("give_up", f"must be in [0, 1), got {self.give_up}")

    def planned_steps(self, batches: int) -> int:
        """Steps the loop plans over ``batches`` training batches before any timing
        trims them: ``steps``, or more with ``epochs`` (0 stays 0: no training)."""
        if self.steps == 0:
            return 0
        return max(self.steps, math.ceil(self.epochs * batches))


_TIMED_STEPS = 3  # steps timed before a deadline decides how many fit
# A held-out loss this many times the one before training has diverged: no later step
# will come back below the best state, so the loop stops and restores it.
_DIVERGED = 100.0


@dataclass
class DistillResult:
    """Outcome of :func:`distill_`.

    ``history`` holds one entry per evaluation: step, train loss, held-out loss, exact
    cost per layer and the widths of every layer, so the structure's path can be replayed.
    ``stopped`` says why the loop ended early on a numerical fault (a non-finite loss or
    parameter, a diverging held-out loss; see :func:`_fault`), None when it did not.
    ``skipped`` says why it did not train (too few steps fit the deadline, see
    ``DistillConfig.min_steps``), None when it did. ``cut`` says why it stopped after
    its timed first steps (measured, they showed that fewer than ``min_steps`` fit: the
    estimate before the first step was low), None when it did not. ``retried`` says why
    the state kept comes from a second run at a smaller step (see
    :func:`~gblr_compress.pipeline.distill_and_recover`), None when there was none.
    ``gave_up`` says why it stopped with no gain (``DistillConfig.give_up``: no held-out
    evaluation beat the start by that share of the steps; ``steps`` is then the number
    that ran), None when it did not. ``timed`` says how many of the data-scaled steps
    (``DistillConfig.epochs``) the measured step time kept within
    ``DistillConfig.extra_seconds`` when it kept fewer than planned, None otherwise: that
    count, unlike everything else in a run, follows how fast the machine ran.
    """

    steps: int
    best_step: int
    heldout_before: float | None
    heldout_after: float | None
    seconds: float
    history: list[dict] = field(default_factory=list)
    stopped: str | None = None
    skipped: str | None = None
    cut: str | None = None
    retried: str | None = None
    gave_up: str | None = None
    timed: str | None = None


def gblr_layers(model: nn.Module) -> dict[str, GBLRLinear]:
    """The GBLRLinear layers of a model by dotted name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GBLRLinear)}


def frozen_layers(model: nn.Module) -> dict[str, FrozenGBLR]:
    """The FrozenGBLR layers of a model by dotted name: during distillation, the pruned
    windows the init froze (their windows are fixed; their content trains)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FrozenGBLR)}


def frozen_content(layers: Mapping[str, FrozenGBLR]) -> list[nn.Parameter]:
    """The trainable content of frozen layers: each block's factors, except a pruned
    window's identity factor (it stays the identity, so the block stays one dense
    MatMul of the kept units and the export can still drop the pruned ones), and the bias.
    """
    params: list[nn.Parameter] = []
    for layer in layers.values():
        for k in range(len(layer.U)):
            side = layer.identity_side(k)
            if side != "U":
                params.append(layer.U[k])
            if side != "V":
                params.append(layer.V[k])
        if layer.bias is not None:
            params.append(layer.bias)
    return params


def output_kind(t: torch.Tensor, name: str | None = None) -> str:
    """What a model output is, for ``loss="auto"`` and the held-out top-1:

    - ``"embedding"``: 2-D with unit-norm rows (a normalized sentence embedding); a
      softmax over its coordinates means nothing, so it is matched by normalized MSE;
    - ``"logits"``: any other 2-D output with more than one column (a classifier), or an
      output the model itself names ``logits`` (a HuggingFace output field) at any rank:
      a causal LM's ``(B, T, vocab)`` next-token logits; KL;
    - ``"features"``: everything else (per-token states, scalars), normalized MSE.
    """
    if name == "logits" and t.dim() >= 2 and t.shape[-1] >= 2:
        return "logits"
    if t.dim() != 2 or t.shape[1] < 2:
        return "features"
    norms = t.detach().double().norm(dim=1)
    if bool(((norms - 1.0).abs() < 1e-3).all()):
        return "embedding"
    return "logits"


def _is_logits(t: torch.Tensor) -> bool:
    return output_kind(t) == "logits"


def normalized_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean((s - t)^2) / mean(t^2)``, over the unpadded positions when ``mask`` (a
    boolean ``attention_mask``) is the tensors' leading shape."""
    s, t = real_positions(s, mask), real_positions(t, mask)
    return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)


def output_loss(
    student_out: object,
    teacher_out: object,
    loss: str = "auto",
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between student and teacher outputs (any nesting of tensors).

    Normalized MSE ``mean((s - t)^2) / mean(t^2)`` per tensor, averaged; with ``"kl"`` (or
    ``"auto"`` on a single output that :func:`output_kind` takes for logits: 2-D rows not
    unit-norm, or a causal LM's ``logits``) the KL divergence of the tempered softmaxes,
    scaled by ``T^2`` and averaged over rows / positions (:func:`kl_rows`). ``mask`` is
    the batch's boolean attention mask
    (:func:`~gblr_compress.calib.token_mask`): per-token outputs are compared at the
    unpadded positions only, since what a model computes at padding is never used.
    """
    s_list, t_list = flatten_outputs(student_out), flatten_outputs(teacher_out)
    if len(s_list) != len(t_list) or not s_list:
        raise ValueError("student and teacher outputs do not match")
    if uses_kl(teacher_out, loss):
        s, t = s_list[0], t_list[0]
        s, t = real_positions(s, mask), real_positions(t, mask)  # per-token logits: real positions only
        return kl_rows(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), temperature)
    return torch.stack([normalized_mse(s, t, mask) for s, t in zip(s_list, t_list)]).mean()


def output_term(out: object, model: nn.Module) -> object:
    """The part of ``model``'s output ``out`` that the output term compares: all of it,
    less the outputs the model declares pooled from its others (a ``pooled_outputs``
    attribute of output names, :class:`~gblr_compress.pooling.SentencePooling`'s
    ``sentence_embedding``) when ``out`` is a dict that keeps another tensor.

    Fitting a pooled sentence vector fits the calibration sentences: all-MiniLM-L6-v2's
    sentence-transformers folder at budget 0.8 kept news embedding cosine 0.9564 with the
    embedding in the term beside the token states, 0.9613 with it left out."""
    drop = set(getattr(model, "pooled_outputs", ()))
    if not drop or not isinstance(out, Mapping):
        return out
    kept = {k: v for k, v in out.items() if k not in drop}
    return kept if flatten_outputs(kept) else out


def uses_kl(teacher_out: object, loss: str = "auto") -> bool:
    """Whether :func:`output_loss` compares these outputs by KL divergence: ``"kl"``, or
    ``"auto"`` on a single output :func:`output_kind` takes for logits."""
    t_list = flatten_outputs(teacher_out)
    return loss == "kl" or (
        loss == "auto" and len(t_list) == 1 and output_kind(t_list[0], _single_name(teacher_out)) == "logits"
    )


def _single_name(out: object) -> str | None:
    """The key of a one-tensor dict / ``ModelOutput`` (``"logits"`` for a HF causal LM or
    classifier), else None."""
    if isinstance(out, Mapping):
        keys = [k for k, v in out.items() if flatten_outputs(v)]
        return str(keys[0]) if len(keys) == 1 else None
    return None


# Rows of logits per chunk in kl_rows: 256 x 49,152 float32 is 50 MB a temporary.
_KL_CHUNK = 256


class _ChunkedKL(torch.autograd.Function):
    """Forward and backward of :func:`kl_rows` a chunk of rows at a time."""

    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        T, rows = temperature, s.shape[0]
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        for i in range(0, rows, _KL_CHUNK):
            ls = F.log_softmax(s[i : i + _KL_CHUNK].float() / T, -1)
            lt = F.log_softmax(t[i : i + _KL_CHUNK].float() / T, -1)
            total += (lt.exp() * (lt - ls)).sum(dtype=torch.float64)
        ctx.save_for_backward(s, t)
        ctx.temperature = T
        return (total * (T * T / max(rows, 1))).to(s.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        s, t = ctx.saved_tensors
        T, rows = ctx.temperature, s.shape[0]
        out = torch.empty_like(s)
        # d/ds of T^2 * KL(p_t || softmax(s / T)) = T * (softmax(s / T) - p_t), per row.
        scale = grad * (T / max(rows, 1))
        for i in range(0, rows, _KL_CHUNK):
            ps = F.softmax(s[i : i + _KL_CHUNK].float() / T, -1)
            pt = F.softmax(t[i : i + _KL_CHUNK].float() / T, -1)
            out[i : i + _KL_CHUNK] = ((ps - pt) * scale).to(s.dtype)
        return out, None, None


def kl_rows(s: torch.Tensor, t: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T^2 * mean over rows of KL(softmax(t / T) || softmax(s / T))`` for ``(N, C)``
    student / teacher logits (gradient to ``s`` only).

    The same value as ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True,
    reduction="batchmean") * T^2``, computed in chunks of rows: the plain form keeps
    about six ``(N, C)`` temporaries for its backward, which for a causal LM's 1,024
    positions x 49,152 vocabulary is 1.2 GB; this keeps none (one chunk at a time, the
    backward recomputes its softmaxes).
    """
    if s.shape != t.shape or s.dim() != 2:
        raise ValueError(f"kl_rows takes two (N, C) tensors of one shape, got {tuple(s.shape)} and {tuple(t.shape)}")
    return _ChunkedKL.apply(s, t.detach(), float(temperature))


@torch.no_grad()
def row_errors(student_out: object, teacher_out: object, mask: torch.Tensor | None, kl: bool,
               temperature: float = 2.0) -> torch.Tensor:
    """``(rows,)`` float64: each batch row's disagreement, for paired comparisons of two
    students on the same rows (rows are independent sentences or text windows; positions
    within a row are not).

    ``kl``: the KL divergence of the tempered softmaxes of the single logits output,
    averaged over the row's real positions (:func:`kl_rows`). Otherwise ``1 - cosine``
    averaged over the row's output vectors (last axis) at its real positions, every
    vector of every output counting once, as :func:`agreement`'s cosine. Outputs whose
    leading axis is not the rows' are left out.
    """
    s_list, t_list = flatten_outputs(student_out), flatten_outputs(teacher_out)
    rows = int(t_list[0].shape[0]) if t_list and t_list[0].dim() else 0
    if kl:
        s, t = s_list[0], t_list[0]
        out = []
        for i in range(rows):
            si, ti = s[i], t[i]
            if mask is not None and per_token(s, mask):
                si, ti = si[mask[i].to(si.device)], ti[mask[i].to(ti.device)]
            si, ti = si.reshape(-1, si.shape[-1]), ti.reshape(-1, ti.shape[-1])
            out.append(float(kl_rows(si.float(), ti.float(), temperature)) if si.shape[0] else 0.0)
        return torch.tensor(out, dtype=torch.float64)
    cos_sum = torch.zeros(rows, dtype=torch.float64)
    count = torch.zeros(rows, dtype=torch.float64)
    for s, t in zip(s_list, t_list):
        if s.dim() < 2 or int(s.shape[0]) != rows:
            continue
        cos = F.cosine_similarity(s.double(), t.double(), dim=-1)  # (rows, ...)
        cos = cos.reshape(rows, -1)
        if mask is not None and per_token(s, mask):
            keep = mask.to(cos.device).reshape(rows, -1).double()
            cos_sum += (cos * keep).sum(1)
            count += keep.sum(1)
        else:
            cos_sum += cos.sum(1)
            count += cos.shape[1]
    return 1.0 - cos_sum / count.clamp_min(1.0)


_AGREEMENT_ELEMENTS = 2**22  # output elements :func:`agreement` takes to float64 at once (32 MB)


@torch.no_grad()
def agreement(
    student: nn.Module, teacher: nn.Module, batches: Sequence[Batch], logits: bool = True
) -> dict[str, float]:
    """Teacher-vs-student agreement on batches: relative error, cosine and top-1 agreement.

    ``rel_error`` = ||s - t|| / ||t|| over all output tensors; ``cosine`` = mean cosine of
    the last-axis vectors; both at the unpadded positions only when a batch carries an
    ``attention_mask`` (as the distillation loss). ``top1`` = share of rows whose argmax
    agrees, only for a single 2-D output and ``logits`` set: pass ``logits=False`` for
    models whose 2-D output is an embedding, where an argmax means nothing.
    """
    diff2 = ref2 = 0.0
    cos_sum, cos_n, agree, rows = 0.0, 0, 0, 0
    for batch in batches:
        mask = token_mask(batch)
        if mask is not None and bool(mask.all()):
            mask = None  # every position is real (packed rows): no copy of the real ones
        s_list = flatten_outputs(run_model(student, batch))
        t_list = flatten_outputs(run_model(teacher, batch))
        logits = logits and len(t_list) == 1 and _is_logits(t_list[0])
        for s, t in zip(s_list, t_list):
            s, t = real_positions(s, mask), real_positions(t, mask)
            s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            # float64 a slice of rows at a time: a causal LM's batch of logits is 201 MB
            # in float32, and the float64 copies and their differences of the whole of
            # it set the distillation's memory peak on SmolLM2 (several GB at once).
            step = max(1, _AGREEMENT_ELEMENTS // max(s.shape[1], 1))
            for lo in range(0, s.shape[0], step):
                a, b = s[lo : lo + step].double(), t[lo : lo + step].double()
                diff2 += float((a - b).pow(2).sum())
                ref2 += float(b.pow(2).sum())
                cos = F.cosine_similarity(a, b, dim=-1)
                cos_sum += float(cos.sum())
                cos_n += cos.numel()
        if logits:
            agree += int((s_list[0].argmax(-1) == t_list[0].argmax(-1)).sum())
            rows += t_list[0].shape[0]
    out = {
        "rel_error": math.sqrt(diff2 / max(ref2, 1e-30)),
        "cosine": cos_sum / max(cos_n, 1),
    }
    if logits and rows:
        out["top1"] = agree / rows
    return out


def feature_modules(model: nn.Module, layer_names: Sequence[str], features: str = "blocks") -> list[str]:
    """Names of the modules whose outputs the feature term compares.

    ``"blocks"``: the children of every ``nn.ModuleList`` that hold at least one of
    ``layer_names`` (each transformer layer of a BERT or Llama stack), in model order;
    when there are none (a plain MLP), ``layer_names`` themselves. ``"layers"``:
    ``layer_names``.
    """
    if features == "layers":
        return list(layer_names)
    return block_modules(model, layer_names) or list(layer_names)


def _first_tensor(out: object) -> torch.Tensor:
    """A tapped block's hidden states (:func:`~gblr_compress.batches.first_tensor`);
    a module that returns no tensor cannot be compared."""
    t = first_tensor(out)
    if t is None:
        raise TypeError(f"a tapped module returned {type(out).__name__}, not a tensor")
    return t


class _LayerTaps:
    """Forward hooks that record the outputs of named modules on each forward pass."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [
            model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names
        ]

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, _inp: object, out: torch.Tensor) -> None:
            self.outputs[name] = _first_tensor(out)

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class _Recompute:
    """A cached output the teacher's head produced, kept as the head's input: a causal
    LM's logits (1,024 positions x 49,152 vocabulary: 201 MB a batch) are 85x the hidden
    states they come from, and one head GEMM remakes them exactly."""

    head: nn.Module
    x: torch.Tensor

    def tensor(self) -> torch.Tensor:
        return self.head(self.x)


class _HeadCapture:
    """While open, remembers the last call of the teacher's widening linear layers (out
    features >= 4 x in features): the module, its input and its output."""

    def __init__(self, model: nn.Module) -> None:
        self.last: tuple[nn.Module, torch.Tensor, torch.Tensor] | None = None
        self._heads = [m for m in model.modules() if _widens(m)]
        self._handles: list[Any] = []

    def __enter__(self) -> _HeadCapture:
        self.last = None
        self._handles = [m.register_forward_hook(self._hook) for m in self._heads]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: nn.Module, args: tuple, out: object) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            self.last = (module, args[0], out)


def _widens(module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    return module.out_features >= 4 * module.in_features


def _compact(out: object, last: tuple[nn.Module, torch.Tensor, torch.Tensor] | None) -> object:
    """``out`` as plain dicts / lists of tensors (what the losses read: the tensors in
    key order and the keys), the head's output replaced by a :class:`_Recompute`."""
    if isinstance(out, torch.Tensor):
        if last is not None and out is last[2]:
            return _Recompute(last[0], last[1].detach())
        return out
    if isinstance(out, Mapping):
        return {k: _compact(v, last) for k, v in out.items() if flatten_outputs(v)}
    if isinstance(out, (tuple, list)):
        return [_compact(v, last) for v in out]
    return out


def _expand(out: object) -> object:
    """A :func:`_compact` output with its recomputed tensors made again."""
    if isinstance(out, _Recompute):
        return out.tensor()
    if isinstance(out, dict):
        return {k: _expand(v) for k, v in out.items()}
    if isinstance(out, list):
        return [_expand(v) for v in out]
    return out


def _nbytes(out: object) -> int:
    if isinstance(out, _Recompute):
        return out.x.numel() * out.x.element_size()
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, dict):
        return sum(_nbytes(v) for v in out.values())
    if isinstance(out, list):
        return sum(_nbytes(v) for v in out)
    return 0


class _TeacherCache:
    """The teacher's outputs (and tapped layer outputs) per batch index, computed on first
    use and kept while the kept tensors stay within a byte budget. An output the
    teacher's widening head produced (a causal LM's logits) is kept as the head's input
    and remade on use (:class:`_Recompute`)."""

    def __init__(self, teacher: nn.Module, taps: _LayerTaps | None, limit_bytes: float) -> None:
        self.teacher, self.taps = teacher, taps
        self.limit, self.used = limit_bytes, 0.0
        self.kept: dict[int, tuple[object, dict[str, torch.Tensor]]] = {}
        self._capture = _HeadCapture(teacher)

    @torch.no_grad()
    def __call__(self, index: int, batch: Batch, keep: bool = True) -> tuple[object, dict[str, torch.Tensor]]:
        """``(teacher output, {layer name: teacher layer output})`` for batch ``index``;
        ``keep=False``: the caller will not ask for this batch again, so it is not kept."""
        if index in self.kept:
            out, tapped = self.kept[index]
            return _expand(out), tapped
        with self._capture as cap:
            out = run_model(self.teacher, batch)
        tapped = dict(self.taps.outputs) if self.taps is not None else {}
        if keep:
            small = _compact(out, cap.last)
            size = _nbytes(small) + sum(t.numel() * t.element_size() for t in tapped.values())
            if self.used + size <= self.limit:
                self.used += size
                self.kept[index] = (small, tapped)
        cap.last = None
        return out, tapped


def activation_bytes_per_position(layers: Sequence[nn.Module], output_features: int) -> int:
    """Bytes one input position keeps for the backward pass, estimated by the run's
    memory estimate's rule (:func:`~gblr_compress.memory.activation_bytes`) over the
    compressed layers' widths and the output's float32 features per position."""
    widths = sum(int(getattr(l, "in_features", 0)) + int(getattr(l, "out_features", 0)) for l in layers)
    return activation_bytes(1, widths, 4 * output_features)


def _chunk_rows(batch: Batch, out: object, tapped: Mapping[str, torch.Tensor], per_position: int,
                limit_bytes: float) -> int:
    """Rows per chunk of a training step: all of them when the batch's activations fit
    ``limit_bytes`` (or no limit), or when some output or tapped tensor is not indexed
    by the batch's rows first (it could not be cut along with them)."""
    rows = leading_size(batch)
    mask = token_mask(batch)
    need = (positions(batch) if mask is None else mask.numel()) * per_position  # padding takes memory too
    if limit_bytes <= 0 or need <= limit_bytes or rows < 2:
        return rows
    if any(t.dim() == 0 or t.shape[0] != rows for t in [*flatten_outputs(out), *tapped.values()]):
        return rows
    return max(1, min(rows, int(rows * limit_bytes // need)))


def _row_slice(out: object, lo: int, hi: int) -> object:
    """Rows ``lo:hi`` of every tensor of a (nested) model output, containers kept as
    plain dicts / lists (what the losses read)."""
    if isinstance(out, torch.Tensor):
        return out[lo:hi]
    if isinstance(out, Mapping):
        return {k: _row_slice(v, lo, hi) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return [_row_slice(v, lo, hi) for v in out]
    return out


def heldout_subset(batches: Sequence[Batch], tokens: int | None) -> list[Batch]:
    """Evenly spaced batches holding about ``tokens`` input positions (all when they
    hold fewer, or ``tokens`` is None); at least one batch when there are any."""
    batches = list(batches)
    if tokens is None or not batches:
        return batches
    sizes = [positions(b) for b in batches]
    if sum(sizes) <= tokens:
        return batches
    count = max(1, min(len(batches), round(tokens / (sum(sizes) / len(sizes)))))
    step = len(batches) / count
    return [batches[int(i * step)] for i in range(count)]


def _sigma_for(layer: GBLRLinear, blur: float) -> float:
    """Gaudi sigma (frequency bins) whose edge blur is ``blur`` elements of the longer
    axis: a Gaussian low-pass of width sigma smears an edge over ~ n / (2 pi sigma)."""
    n = max(layer.in_features, layer.out_features)
    return n / (2.0 * math.pi * max(blur, 1e-6))


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _heldout_loss(
    student: nn.Module, teacher: _TeacherCache, batches: Sequence[Batch], config: DistillConfig
) -> float:
    modes = {m: m.training for m in student.modules()}
    student.eval()  # eval mode = exact rounded boxcars = what freezing deploys
    with torch.no_grad():
        losses = [
            float(output_loss(output_term(run_model(student, b), student), output_term(teacher(i, b)[0], student),
                              config.loss, config.temperature, token_mask(b)))
            for i, b in enumerate(batches)
        ]
    for m, training in modes.items():  # each module back to its own mode
        m.train(training)
    return sum(losses) / len(losses)


def _train_compressed_only(student: nn.Module, layers: Sequence[GBLRLinear]) -> None:
    """Train mode for the GBLR layers (soft masks), eval mode for everything else.

    The teacher runs in eval mode, so the rest of the student must too: dropout would
    add noise the teacher does not have, and BatchNorm would use batch statistics
    instead of the running ones both models deploy with.
    """
    student.eval()
    for layer in layers:
        layer.train()


def distill_(
    student: nn.Module,
    teacher: nn.Module,
    calib: Sequence[Batch],
    max_cost: int,
    config: DistillConfig = DistillConfig(),
    holdout: Sequence[Batch] = (),
    progress: Progress | None = None,
    phase: str = "distill",
    deadline: float | None = None,
) -> DistillResult:
    """Train the student's GBLR layers in place to match the teacher within ``max_cost``.

    Args:
        student: model whose target layers are GBLRLinear (trained in place).
        teacher: the dense model (kept in eval mode, never updated).
        calib: training batches (tensor, tuple or dict of tensors each).
        max_cost: exact cost the GBLR layers may share (e.g. ``InitResult.max_cost``).
        config: loop settings.
        holdout: batches never trained on; they pick the best state (evenly spaced ones
            up to ``config.heldout_tokens`` positions are scored).
        progress: gets a :class:`~gblr_compress.progress.ProgressEvent` after every
            step (loss, exact cost and its bound, and the held-out loss when measured).
        phase: the phase the events name (``"distill"``; the recovery's ``"recover"``).
        deadline: a ``time.perf_counter()`` time to finish by: after a few timed steps
            the run keeps only the steps that fit (held-out evaluations counted), with
            its schedule laid out over them; ``result.steps`` says how many ran. None:
            all steps.

    Returns:
        A :class:`DistillResult`; the student holds the best held-out state (or the last
        one when there is no held-out data), always within ``max_cost``.

    Example:
        >>> result = distill_(student, teacher, fit_batches, init.max_cost,
        ...                   DistillConfig(steps=200), holdout=held_batches)
    """
    start = time.perf_counter()
    layers = gblr_layers(student)
    frozen = frozen_layers(student)
    if not layers and not frozen:
        raise ValueError("the student has no GBLRLinear or FrozenGBLR layers to distill")
    if not calib:
        raise ValueError("distillation needs at least one calibration batch")
    layer_list = list(layers.values())
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    project_widths_(layer_list, max_cost)

    holdout = heldout_subset(holdout, config.heldout_tokens)
    held_teacher = _TeacherCache(teacher, None, config.teacher_cache_mb * 2**20)
    t_eval = time.perf_counter()
    heldout_before = _heldout_loss(student, held_teacher, holdout, config) if holdout else None
    # The first evaluation also runs the teacher; later ones reuse its cached outputs
    # when they fit, so this over-estimates them a little (the deadline stays safe).
    t_eval = time.perf_counter() - t_eval
    planned = config.planned_steps(len(calib))
    result = DistillResult(planned, 0, heldout_before, heldout_before, 0.0)
    result.history.append(_snapshot(0, None, heldout_before, layers))
    if config.steps == 0:
        result.seconds = time.perf_counter() - start
        return result
    if deadline is not None and holdout and config.min_steps > 0:
        # A step runs the teacher and the student forward and the student backward
        # (about two forwards): about two of the evaluation's forward pairs.
        per_step = 2.0 * t_eval / len(holdout)
        fits = int(max(0.0, deadline - time.perf_counter() - t_eval) / per_step)
        if fits < min(config.min_steps, planned):
            result.steps = 0
            result.skipped = (f"about {fits} steps fit the time budget (about {per_step:.0f} s a step), "
                              f"fewer than {config.min_steps}")
            result.seconds = time.perf_counter() - start
            return result

    gen = torch.Generator().manual_seed(config.seed)
    content = [p for l in layer_list for p in (l.U, l.V, l.bias) if p is not None] + frozen_content(frozen)
    structure = [p for l in layer_list for p in (l.widths, l.locations)]
    trainable = {id(p) for p in content + structure}
    anchors = [p.detach().clone() for p in content] if config.init_decay > 0 else None
    for p in student.parameters():  # only the compressed layers learn
        if id(p) not in trainable:
            p.requires_grad_(False)
    # One parameter at a time (foreach=False): the multi-tensor step holds a temporary
    # as large as all the content at once (135 MB for 141 MB of parameters, measured),
    # about 340 MB at the peak of a 135M-parameter LM's distillation; on CPU it is not
    # faster enough to matter next to a step's forward and backward passes.
    opt = torch.optim.AdamW(
        [{"params": content, "lr": config.lr, "weight_decay": config.weight_decay, "base_lr": config.lr}],
        foreach=False,
    )
    # Structure moves by SGD on globally normalized gradients, not Adam: Adam's per-
    # parameter scaling moves every width at the same speed, so the shared proximal
    # shrink could not tell important groups from idle ones and none would die.
    # A student whose compressed layers are all pruned windows has no structure to move.
    sopt = torch.optim.SGD(structure, lr=config.structure_lr, momentum=0.9) if structure else None
    if sopt is not None:
        sopt.param_groups[0]["base_lr"] = config.structure_lr
    tracked = {**layers, **frozen}  # whose state the best held-out state saves
    names = feature_modules(student, [*layers, *frozen], config.features)
    use_taps = config.layer_weight > 0 and bool(names)
    s_taps = _LayerTaps(student, names) if use_taps else None
    t_taps = _LayerTaps(teacher, names) if use_taps else None
    fit_teacher = _TeacherCache(teacher, t_taps, held_teacher.limit - held_teacher.used)
    steps = planned
    warmup = max(1, int(config.warmup_fraction * steps))
    ste_start = int(round((1.0 - config.ste_fraction) * steps))
    t_loop = time.perf_counter()
    per_position: int | None = None  # activation bytes a position keeps, set on the first step
    # For a model whose outputs have no token axis (a sentence-embedding wrapper), the
    # output term compares the last block's per-token output instead, as the init's
    # layer weights do (calib.sensitivity_target): the pooled, normalized vector hides
    # errors that other inputs see. Decided on the first step.
    last = last_block(student, [*layers, *frozen]) if use_taps and config.features == "blocks" else None
    per_token_out: bool | None = None
    best = heldout_before if heldout_before is not None else math.inf
    best_state = _gblr_state(tracked) if holdout else None
    order: list[int] = []
    # Without held-out data the last evaluated state is what a numerical fault falls
    # back to (with it, the best held-out state is).
    safe_state = best_state if holdout else _gblr_state(tracked)
    _train_compressed_only(student, layer_list)
    checked: list[nn.Module] = [*layer_list, *frozen.values()]  # parameters checked for faults
    try:
        step = 0
        while step < steps:
            if not order:
                order = torch.randperm(len(calib), generator=gen).tolist()
            index = order.pop()
            batch = calib[index]
            _set_mask_schedule(layer_list, step, ste_start, config)
            for group in opt.param_groups + (sopt.param_groups if sopt is not None else []):
                group["lr"] = group["base_lr"] * _lr_factor(step, steps, warmup)
            # A batch is drawn again only once the first pass over them ends.
            t_out, t_layers = fit_teacher(index, batch, keep=steps > len(calib))
            opt.zero_grad(set_to_none=True)
            if sopt is not None:
                sopt.zero_grad(set_to_none=True)
            if per_position is None:  # the first step's outputs size the chunks and pick the output term
                per_position = activation_bytes_per_position(
                    [*layer_list, *frozen.values()], int(flatten_outputs(t_out)[0].shape[-1]))
                per_token_out = last is not None and no_token_axis(flatten_outputs(t_out), t_layers[last])
            rows = leading_size(batch)
            per = _chunk_rows(batch, t_out, t_layers, per_position, config.activation_mb * 2**20)
            total = max(positions(batch), 1)
            loss = torch.zeros(())
            for lo in range(0, rows, per):
                # Rows are independent: each chunk's gradient, weighted by its share of
                # the positions, adds up to the step's (see DistillConfig.activation_mb).
                part = batch if per >= rows else chunk_batch(batch, lo, min(lo + per, rows))
                t_part = t_out if per >= rows else _row_slice(t_out, lo, lo + per)
                mask = token_mask(part)
                s_out = run_model(student, part)
                if per_token_out:
                    part_loss = normalized_mse(s_taps.outputs[last], t_layers[last][lo:lo + per], mask)
                else:
                    part_loss = output_loss(output_term(s_out, student), output_term(t_part, student), config.loss,
                                            config.temperature, mask)
                if use_taps:
                    terms = [normalized_mse(s_taps.outputs[n], t_layers[n][lo:lo + per], mask) for n in names]
                    part_loss = part_loss + config.layer_weight * torch.stack(terms).mean()
                result.stopped = _fault(step + 1, part_loss, None, None, checked)
                if result.stopped:
                    break
                share = 1.0 if per >= rows else positions(part) / total
                (part_loss * share).backward()
                loss = loss + part_loss.detach() * share
                del s_out, part_loss, t_part
            if result.stopped:
                break
            opt.step()
            if anchors is not None:
                with torch.no_grad():  # pull toward the init, scaled by the step's lr like AdamW's decay
                    pull = min(1.0, opt.param_groups[0]["lr"] * config.init_decay)
                    for p, p0 in zip(content, anchors):
                        p.lerp_(p0, pull)
            if sopt is not None:
                _normalize_grads(structure)
                sopt.step()
            with torch.no_grad():  # proximal step: cyclic locations, widths onto the budget
                for layer in layer_list:
                    layer.clamp_structure_()
                project_widths_(layer_list, max_cost)
            result.stopped = _fault(step + 1, None, None, None, checked)
            if result.stopped:
                break
            done = step = step + 1
            held = None
            timed = done == _TIMED_STEPS and done < steps
            if timed and (deadline is not None or steps > config.steps):
                # Fit the run into the time left: the schedule (warm-up, cosine decay,
                # the exact-boxcar phase) is laid out anew over the steps that fit.
                # Each step also carries its share of the held-out evaluations, and
                # the last step is followed by one.
                per_step = (time.perf_counter() - t_loop) / done + t_eval / config.eval_every
                fits = steps
                if steps > config.steps:  # the data-scaled extra steps, within extra_seconds
                    extra_left = start + config.extra_seconds - time.perf_counter() - t_eval
                    fits = max(config.steps, min(steps, done + int(max(0.0, extra_left) / per_step)))
                    if fits < steps:
                        result.timed = (f"{fits} of the {steps} steps planned ({config.epochs:g} passes over "
                                        f"{len(calib)} batches) fit {config.extra_seconds:g} s at the measured "
                                        f"step time ({per_step:.2f} s; at least {config.steps} run)")
                if deadline is not None:
                    fits = min(fits, done + int(max(0.0, deadline - time.perf_counter() - t_eval) / per_step))
                if fits < min(config.min_steps, config.steps):
                    # Too few to move anything: stop here, the best state is kept.
                    result.cut = (f"after {done} timed steps about {fits} fit the time budget "
                                  f"({per_step:.0f} s a step), fewer than {config.min_steps}")
                    fits = done
                if fits < steps:
                    steps = max(done, fits)
                    warmup = min(warmup, max(1, int(config.warmup_fraction * steps)))
                    ste_start = int(round((1.0 - config.ste_fraction) * steps))
                    result.steps = steps
            if done % config.eval_every == 0 or done == steps:
                held = _heldout_loss(student, held_teacher, holdout, config) if holdout else None
                result.history.append(_snapshot(done, loss.item(), held, layers))
                if held is not None and held < best:
                    best, best_state, result.best_step = held, _gblr_state(tracked, into=best_state), done
                if not holdout:
                    safe_state = _gblr_state(tracked, into=safe_state)
                result.stopped = _fault(done, None, held, heldout_before, checked)
                if result.stopped:
                    break
                if (config.give_up > 0 and held is not None and result.best_step == 0 and done < steps
                        and done >= config.give_up * steps):
                    # The steps left would be thrown away with the run (a smaller step
                    # follows one that gains nothing), so they are not spent.
                    result.gave_up = f"the held-out loss stayed above the start's for {done} of {steps} steps"
                    result.steps = steps = done  # the loop ends here, its progress complete
            if progress is not None:
                progress(ProgressEvent(phase, done, steps, loss=loss.item(),
                                       cost=total_cost(layer_list), max_cost=max_cost, heldout=held))
    finally:
        for taps in (s_taps, t_taps):
            if taps is not None:
                taps.close()
        # The last step's gradients would otherwise live on with the student through
        # the freeze and the export (340 MB on a 135M-parameter LM at budget 0.8).
        opt.zero_grad(set_to_none=True)
        if sopt is not None:
            sopt.zero_grad(set_to_none=True)
        # The optimizer's moments (twice the content) and the teacher's kept outputs are
        # let go here, not when this frame is freed: the first optimizer torch makes in a
        # process leaves its creating frame in a reference cycle, which kept both alive
        # after the run until the cyclic collector ran (a library call of distill_ in a
        # fresh process). The command's runs did not hit it (no frame was left at the
        # second run's start), so this is not what raises the second run's peak.
        opt.state.clear()
        if sopt is not None:
            sopt.state.clear()
        held_teacher.kept.clear()
        fit_teacher.kept.clear()
        anchors = None
        for layer in layer_list:  # leave the student on exact boxcars
            layer.sigma.fill_(math.inf)
            layer.round_ste = False
    if result.stopped and best_state is None:
        best_state = safe_state  # no held-out data: the last evaluated state
        result.best_step = max((h["step"] for h in result.history), default=0)
    if best_state is not None:
        _load_gblr_state(tracked, best_state)
        result.heldout_after = best
        for layer in layer_list:  # the saved state may carry a soft-phase sigma
            layer.sigma.fill_(math.inf)
    else:
        result.best_step = steps
    student.eval()
    result.seconds = time.perf_counter() - start
    return result


def _fault(
    step: int, loss: torch.Tensor | None, held: float | None, held_before: float | None,
    layers: Sequence[nn.Module],
) -> str | None:
    """Why the loop must stop at ``step`` (one line), or None: a non-finite training
    loss (checked before the backward pass), held-out loss or parameter (after the
    update), or a held-out loss past :data:`_DIVERGED` times the one before training."""
    if loss is not None and not bool(torch.isfinite(loss.detach())):
        return f"training loss is {loss.item()} at step {step}"
    if held is not None and not math.isfinite(held):
        return f"held-out loss is {held} at step {step}"
    if held is not None and held_before is not None and held_before > 0 and held > _DIVERGED * held_before:
        return f"held-out loss diverged at step {step} ({held:.4g}, {held / held_before:.0f}x the start)"
    if loss is None and held is None:
        for layer in layers:
            for p in layer.parameters():
                if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                    return f"a parameter became non-finite at step {step}"
    return None


def _normalize_grads(params: Sequence[torch.Tensor]) -> None:
    """Scale the structure gradients so the largest entry is 1 (relative sizes kept)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    top = max(float(g.abs().max()) for g in grads)
    if top > 0 and math.isfinite(top):
        for g in grads:
            g.div_(top)


def _set_mask_schedule(layers: Sequence[GBLRLinear], step: int, ste_start: int, config: DistillConfig) -> None:
    """Anneal the edge blur geometrically to ~0.25 element, then exact boxcars + STE."""
    if step >= ste_start:
        for layer in layers:
            layer.sigma.fill_(math.inf)
            layer.round_ste = True
        return
    frac = step / max(1, ste_start)
    for layer in layers:
        longest = max(layer.in_features, layer.out_features)
        b0 = max(1.0, config.blur_start * longest)
        blur = b0 * (0.25 / b0) ** frac
        layer.sigma.fill_(_sigma_for(layer, blur))
        layer.round_ste = False


def _gblr_state(layers: Mapping[str, nn.Module],
                into: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of the layers' state. With ``into`` (the copy saved last, no longer
    needed) it is written over that one where the tensors match, so saving a new best
    state never holds two copies at once (each is as large as the trained content)."""
    if into is None:
        return {n: {k: v.detach().clone() for k, v in l.state_dict().items()} for n, l in layers.items()}
    for n, l in layers.items():
        saved = into.setdefault(n, {})
        for k, v in l.state_dict().items():
            old = saved.get(k)
            if old is not None and old.shape == v.shape and old.dtype == v.dtype:
                old.copy_(v.detach())
            else:
                saved[k] = v.detach().clone()
    return into


def _load_gblr_state(layers: Mapping[str, nn.Module], state: dict[str, dict[str, torch.Tensor]]) -> None:
    for n, l in layers.items():
        l.load_state_dict(state[n])


def _snapshot(step: int, loss: float | None, held: float | None, layers: dict[str, GBLRLinear]) -> dict:
    return {
        "step": step,
        "loss": loss,
        "heldout": held,
        "costs": {n: l.exact_cost() for n, l in layers.items()},
        "widths": {n: l.widths.detach().clone() for n, l in layers.items()},
    }
