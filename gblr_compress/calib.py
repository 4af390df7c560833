"""What calibration batches tell about a model: input moments, layer sensitivity, and
augmented token batches.

Batches follow the protocol of :mod:`gblr_compress.batches` (a tensor, a tuple/list or a
dict of tensors; padded positions given by an ``attention_mask``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gblr_compress.batches import (
    Batch,
    chunk_batch,
    eval_mode,
    first_tensor,
    flatten_outputs,
    leading_size,
    no_token_axis,
    per_token,
    positions,
    real_positions,
    run_model,
    token_ids,
    token_mask,
    with_token_ids,
)
from gblr_compress.progress import Progress, ProgressEvent
from gblr_compress.swap import last_block

__all__ = [
    "Moment",
    "augment_tokens",
    "collect_moments",
    "layer_sensitivity",
    "sensitivity_target",
]


@dataclass
class Moment:
    """Streamed second moment of one layer's inputs.

    Attributes:
        xtx: ``(n, n)`` float64 sum of ``x x^T`` over every input vector seen.
        count: number of input vectors summed (all leading dims flattened).
        xsum: ``(n,)`` float64 sum of ``x`` (None where not collected): a pruned
            window folds the mean of the units it drops into the consumer's bias.
    """

    xtx: torch.Tensor
    count: int
    xsum: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        """``n``, the input width of the layer."""
        return int(self.xtx.shape[0])

    def mean(self) -> torch.Tensor:
        """``(n, n)`` float64 mean second moment ``X^T X / count`` (zeros when empty)."""
        return self.xtx / max(self.count, 1)

    def first(self) -> torch.Tensor | None:
        """``(n,)`` float64 mean input ``sum(x) / count`` (None when not collected)."""
        return None if self.xsum is None else self.xsum / max(self.count, 1)


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args:
        return args[0]
    return kwargs.get("input", kwargs.get("x"))


@dataclass
class _Product:
    """One input tensor's ``x^T x`` (in the input's precision, possibly a reused
    workspace: it is valid until the next product) and the layers that read that tensor."""

    key: tuple
    x: torch.Tensor
    prod: torch.Tensor
    rows: int
    xsum: torch.Tensor  # (n,) float64 sum of the rows
    uses: dict[str, int] = field(default_factory=dict)  # layer name -> times it read x


class _SharedSums:
    """Per-layer float64 sums of ``x^T x`` where layers that always read the same input
    share one tensor: q/k/v and gate/up of a transformer hold one moment instead of
    three and two. Sharing is kept only while it stays exact: a layer whose inputs
    differ from its partners' in some batch gets a copy of its own from then on."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._members: dict[int, set[str]] = {}  # id(sum tensor) -> layers sharing it

    def get(self, name: str) -> torch.Tensor | None:
        """The layer's sum, or None when it saw no input."""
        return self._sums.get(name)

    def add(self, p: _Product) -> None:
        """Add ``p.prod`` (times each layer's read count) to the sums of its readers."""
        groups: dict[tuple[int | None, int], list[str]] = {}
        for name, times in p.uses.items():
            acc = self._sums.get(name)
            groups.setdefault((None if acc is None else id(acc), times), []).append(name)
        for (aid, times), names in groups.items():
            if aid is None:
                self._share(p.prod.to(torch.float64, copy=True).mul_(times), names)
                continue
            acc = self._sums[names[0]]
            if self._members[aid] != set(names):  # only some of the layers sharing this sum read this input
                self._members[aid] -= set(names)  # never empty: the others still share it
                acc = acc.clone()
                self._share(acc, names)
            # Added in place with the float32 product cast on the fly: a float64 copy
            # of a 3,072-wide product is 75 MB, freshly mapped (and page-faulted) each
            # time; on MPNet-base those copies took as long as the products.
            acc.add_(p.prod, alpha=times)

    def _share(self, t: torch.Tensor, names: list[str]) -> None:
        for name in names:
            self._sums[name] = t
        self._members[id(t)] = set(names)


@torch.no_grad()
def collect_moments(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[Batch],
    progress: Progress | None = None,
    max_rows: int | None = None,
    phase: str = "moments",
) -> dict[str, Moment]:
    """Stream ``X^T X`` of each named layer's input over calibration batches.

    Forward pre-hooks flatten every leading dim (batch, sequence, ...) and add the
    batch's ``x^T x`` to a float64 accumulator, so no activation is kept. Layers fed the
    same tensor in one forward (q/k/v projections) share one product, which is the
    dominant cost on transformer encoders, and while they always do, one accumulator
    (the returned moments of such layers are the same tensor; nothing may modify it).

    When a dict batch holds an ``attention_mask`` whose shape is the leading shape of a
    layer's input (``(batch, seq)`` for ``(batch, seq, n)``), padded positions are left
    out: their hidden states are not what the layer sees in use.

    Args:
        model: the model; it runs in eval mode under ``no_grad`` (its mode is restored).
        names: dotted names of the layers (e.g. from ``swap.find_linears``).
        batches: calibration batches, anything :func:`run_model` accepts.
        progress: gets ``ProgressEvent(phase, i, total)`` after each batch (``total``
            is 0 when ``batches`` has no length).
        max_rows: use at most this many input vectors per layer and batch, evenly
            strided (``None``: all). Neighbouring tokens are strongly correlated, so
            half the rows of a long-sequence batch estimate the moment nearly as well
            at half the cost.
        phase: the phase the events name (``"moments"``, or ``"holdout"``).

    Returns:
        ``{name: Moment}`` for every name.

    Example:
        >>> moments = collect_moments(model, ["fc1", "fc2"], [x0, x1])
        >>> moments["fc1"].xtx.shape
        torch.Size([64, 64])
    """
    modules = {name: model.get_submodule(name) for name in names}
    sums = _SharedSums()
    counts = {name: 0 for name in names}
    firsts: dict[str, torch.Tensor] = {}  # per layer: float64 sum of its input vectors
    # The product of the input tensor the last hook saw: q, k and v (and gate / up) read
    # the same tensor one after the other, so its x^T x is computed once and added once
    # to one accumulator they share. Only one product is held at a time: keeping every
    # product of a batch (and the inputs they came from) until its end was 1.3 GB on a
    # 135M-parameter LM. The entry holds the tensor itself so its memory cannot be
    # reused by another tensor with the same address while the entry lives.
    last: list[_Product] = []
    state: dict[str, torch.Tensor | None] = {"mask": None}
    space = _Workspace()  # the one live product's memory, reused batch after batch

    def flush() -> None:
        if last:
            sums.add(last.pop())

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _layer_input(args, kwargs)
            if not isinstance(x, torch.Tensor):
                return
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version)
            if not last or last[0].key != key:
                flush()
                x2 = _rows(x.detach(), state["mask"], max_rows)  # (N, n)
                # The batch product in the input's precision (float32 GEMMs are ~2x
                # faster); the cross-batch sum, where error accumulates, is float64.
                xf = x2 if x2.is_floating_point() else x2.double()
                last.append(_Product(key, x, _gram(xf, space), x2.shape[0], xf.sum(0, dtype=torch.float64)))
            entry = last[0]
            entry.uses[name] = entry.uses.get(name, 0) + 1
            counts[name] += entry.rows
            firsts[name] = entry.xsum if name not in firsts else firsts[name] + entry.xsum

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    total = len(batches) if hasattr(batches, "__len__") else 0  # type: ignore[arg-type]
    try:
        for i, batch in enumerate(batches):
            state["mask"] = token_mask(batch)
            run_model(model, batch)
            flush()
            if progress is not None:
                progress(ProgressEvent(phase, i + 1, total))
    finally:
        last.clear()
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, module in modules.items():
        acc = sums.get(name)
        if acc is None:
            n = _in_features(module)
            acc = torch.zeros(n, n, dtype=torch.float64)
        n = int(acc.shape[0])
        out[name] = Moment(acc, counts[name], firsts.get(name, torch.zeros(n, dtype=torch.float64)))
    return out


def _rows(x: torch.Tensor, mask: torch.Tensor | None, max_rows: int | None) -> torch.Tensor:
    """``x``'s input vectors as ``(N, n)``: unpadded positions only when ``mask`` matches
    its leading shape, then at most ``max_rows`` of them, evenly strided. One gather: the
    strided rows are picked among the unpadded positions' indices, not copied twice."""
    flat = x.reshape(-1, x.shape[-1])  # (positions, n)
    idx = None
    if per_token(x, mask):
        idx = mask.to(x.device).reshape(-1).nonzero().squeeze(1)
    count = flat.shape[0] if idx is None else idx.numel()
    if max_rows is not None and count > max_rows > 0:
        pick = torch.linspace(0, count - 1, max_rows, device=x.device).round().long()
        idx = pick if idx is None else idx[pick]
    return flat if idx is None else flat[idx]


class _Workspace:
    """Reused ``(n, n)`` buffers, one per width and dtype: a fresh 3,072-wide product is
    37 MB, above the allocator's mapping threshold, so each one was mapped and
    page-faulted anew."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """An uninitialized ``(n, n)`` tensor of ``like``'s dtype and device."""
        key = (n, like.dtype, like.device)
        if key not in self._bufs:
            self._bufs[key] = like.new_empty(n, n)
        return self._bufs[key]


def _gram(x: torch.Tensor, space: _Workspace | None = None) -> torch.Tensor:
    """``x^T x`` for ``x (N, n)``; wide inputs in two column halves, the mirrored block
    copied instead of multiplied (3/4 of the multiply-adds of one GEMM). With ``space``
    the result is written into its reused buffer (valid until the next call)."""
    n = x.shape[1]
    out = x.new_empty(n, n) if space is None else space.get(n, x)
    if n < 1024:
        return torch.mm(x.T, x, out=out)
    h = n // 2
    a, b = x[:, :h], x[:, h:]
    torch.mm(a.T, a, out=out[:h, :h])
    torch.mm(b.T, a, out=out[h:, :h])
    out[:h, h:] = out[h:, :h].T
    torch.mm(b.T, b, out=out[h:, h:])
    return out


def _in_features(module: nn.Module) -> int:
    n = getattr(module, "in_features", None)
    if n is None:  # Conv1D keeps its weight as (in, out)
        n = module.weight.shape[0]
    return int(n)


def layer_sensitivity(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[Batch],
    probes: int = 4,
    seed: int = 0,
    target: str | None = None,
) -> dict[str, float]:
    """How much each layer's relative output error moves the model's outputs (or the
    output of the module named ``target``; see :func:`sensitivity_target`).

    For an error of relative size ``e`` spread evenly over layer ``l``'s outputs ``o_l``
    (``N_l`` entries), the expected squared change of the model's outputs ``y`` is, to
    first order, ``e^2 * ||o_l||^2 / N_l * tr(J_l J_l^T)``, with ``J_l = dy/do_l``. The
    returned weight is that change per unit ``e^2``, relative to ``||y||^2``: so
    ``sum_l weight_l * e_l^2`` estimates the squared relative output error that layer
    errors ``e_l`` cause together. The trace is estimated with Hutchinson probes
    (``E ||J^T v||^2`` over Gaussian ``v``): one forward and ``probes`` backward passes
    per batch give every layer at once. A layer called more than once per forward pass is
    measured at its last call.

    Args:
        model: the model (its parameters get no gradients; call it in eval mode).
        names: dotted names of the layers.
        batches: a few calibration batches.
        probes: random output directions per batch.
        seed: seed of the probes.
        target: a module downstream of every named layer whose output (its first
            tensor) stands for the model's outputs; None: the model's outputs.

    Returns:
        Weight per layer name (0 for a layer that no batch reached).
    """
    modules = {n: model.get_submodule(n) for n in names}
    outs: dict[str, torch.Tensor] = {}
    taken: list[torch.Tensor] = []

    def take(_m: nn.Module, _args: tuple, out: object) -> None:
        taken.append(first_tensor(out))

    def tap(name: str) -> Callable:
        # Adding a requires-grad zero puts the layer's output in the autograd graph
        # without asking the model's parameters for gradients.
        def hook(_m: nn.Module, _args: tuple, out: object) -> torch.Tensor | None:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            lifted = out + torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            outs[name] = lifted
            return lifted

        return hook

    gen = torch.Generator().manual_seed(seed)
    trace = dict.fromkeys(names, 0.0)
    energy = dict.fromkeys(names, 0.0)
    y2 = 0.0
    saved = {p: p.requires_grad for p in model.parameters()}
    handles = [m.register_forward_hook(tap(n)) for n, m in modules.items()]
    if target is not None:
        handles.append(model.get_submodule(target).register_forward_hook(take))
    try:
        for p in saved:
            p.requires_grad_(False)
        with torch.enable_grad():
            for chunks in (_row_chunks(model, b) for b in batches):
                # Each layer's mean squared output over the whole batch, from its chunks.
                sq = dict.fromkeys(names, 0.0)
                num = dict.fromkeys(names, 0)
                for batch, out in chunks:
                    taps = dict(outs)
                    outs.clear()
                    found = flatten_outputs(out) if target is None else taken[-1:]
                    taken.clear()
                    ys = [y for y in found if y.requires_grad]
                    del out, found
                    live = [n for n in names if n in taps]
                    if not ys or not live:
                        continue
                    mask = token_mask(batch)
                    # Outputs at padded positions are never used: they get no probe weight.
                    keep = [_real(y, mask) for y in ys]
                    y2 += sum(float((y.detach().double() * w).pow(2).sum()) for y, w in zip(ys, keep))
                    for n in live:
                        o = real_positions(taps[n].detach(), mask)
                        sq[n] += float(o.double().pow(2).sum())
                        num[n] += o.numel()
                    for k in range(probes):
                        vs = [torch.randn(y.shape, generator=gen).to(y) * w for y, w in zip(ys, keep)]
                        grads = torch.autograd.grad(
                            ys, [taps[n] for n in live], vs, retain_graph=k < probes - 1, allow_unused=True
                        )
                        for n, g in zip(live, grads):
                            if g is not None:
                                trace[n] += float(g.double().pow(2).sum()) / probes
                        del vs, grads
                    del ys, keep, taps  # this chunk's graph goes before the next one is built
                for n in names:
                    if num[n]:
                        energy[n] += sq[n] / num[n]
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
    if y2 <= 0.0:
        return dict.fromkeys(names, 0.0)
    # energy, trace and y2 are each sums over the batches, so the weights carry a common
    # factor (about the batch count); the allocation only compares layers, so it is left.
    return {n: energy[n] * trace[n] / y2 for n in names}


@torch.no_grad()
def sensitivity_target(model: nn.Module, names: Sequence[str], batch: Batch) -> str | None:
    """The module whose output :func:`layer_sensitivity` should weigh layers by, or None
    for the model's outputs.

    A model whose outputs have no token axis (a sentence-embedding wrapper's pooled,
    normalized vector) is weighed on the last transformer block's per-token output
    instead, when every named layer sits in the blocks: errors that pooling or the
    normalization hide on the calibration batch still change what other inputs see.
    Measured on all-MiniLM-L6-v2 at budget 0.5 (init only, 2,256 Wikipedia sentences):
    the wrapper's news-sentence cosine rose 0.830 -> 0.865 (its HuggingFace folder,
    weighed on every token's last hidden state, keeps 0.882). Models with per-token
    outputs (an encoder folder, a causal LM's logits) and models without blocks keep
    their outputs.
    """
    last = last_block(model, names)
    if last is None:
        return None
    seen: list[torch.Tensor | None] = []
    handle = model.get_submodule(last).register_forward_hook(lambda _m, _a, out: seen.append(first_tensor(out)))
    try:
        with eval_mode(model):
            outs = flatten_outputs(run_model(model, batch))
    finally:
        handle.remove()
    hidden = seen[-1] if seen else None
    if hidden is None or not no_token_axis(outs, hidden):
        return None  # the outputs are per token already (or the block's output is not)
    return last


# Positions one sensitivity pass runs at once. Rows of a batch are independent, so
# row chunks estimate the same traces (their probes are drawn apart); the backward
# graph of one 8 x 128-token batch of a 49k-vocabulary LM (its logits, the probes and
# every layer's output) took about 2.4 GB at once.
_SENSITIVITY_POSITIONS = 512


def _row_chunks(model: nn.Module, batch: Batch) -> Iterator[tuple[Batch, Any]]:
    """``(chunk, model output)`` over row chunks of ``batch`` of about
    :data:`_SENSITIVITY_POSITIONS` positions each, one at a time; the whole batch when
    it is that small or when the model does not take fewer rows (a batch size fixed in
    its code)."""
    rows = leading_size(batch)
    per = max(1, rows * _SENSITIVITY_POSITIONS // max(positions(batch), 1))
    if per >= rows:
        yield batch, run_model(model, batch)
        return
    try:
        first = run_model(model, chunk_batch(batch, 0, per))
    except Exception:  # noqa: BLE001 - whatever fails here, the whole batch is the fallback
        yield batch, run_model(model, batch)
        return
    yield chunk_batch(batch, 0, per), first
    del first
    for lo in range(per, rows, per):
        part = chunk_batch(batch, lo, min(lo + per, rows))
        yield part, run_model(model, part)


def _real(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | float:
    """1 at ``y``'s real positions and 0 at padding, broadcastable to ``y``, when ``mask``
    is its leading shape; otherwise 1."""
    if per_token(y, mask):
        return mask.to(y.device, y.dtype).unsqueeze(-1)
    return 1.0


def _interior(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) bool: real positions except each row's first and last real one (where
    tokenizers put their special tokens)."""
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None or mask.shape != ids.shape else mask
    inner = real.clone()
    inner[:, 0] = False
    last = (real.long().cumsum(1) == real.long().sum(1, keepdim=True)) & real
    return inner & ~last


def augment_tokens(batches: Sequence[Batch], rate: float, copies: int, seed: int = 0) -> list[Batch]:
    """New calibration batches: copies of token batches with some tokens replaced.

    Distillation needs no labels, so any input the teacher can answer is a training
    sample. A few hundred sentences are few enough that a student fits them and not the
    language (GBLR design notes); resampling a share of each sentence's tokens from the
    calibration set's own tokens keeps the inputs near the data while making every copy
    new. Each row's first and last real tokens (a tokenizer's special tokens) and
    padding are kept.

    Args:
        batches: calibration batches; only token batches are copied (see
            :func:`~gblr_compress.batches.token_ids`); batches of float features yield nothing.
        rate: share of each row's inner tokens replaced, in [0, 1).
        copies: augmented copies made of each token batch.
        seed: seed of the draws.

    Returns:
        ``copies`` new batches per token batch (copy-major order), or ``[]``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    if rate == 0.0 or copies < 1:
        return []
    found = [(b, ids, _interior(ids, token_mask(b))) for b in batches if (ids := token_ids(b)) is not None]
    if not found:
        return []
    pool = torch.cat([ids[inner].cpu() for _, ids, inner in found])
    if pool.numel() == 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    out: list[Batch] = []
    for _ in range(copies):
        for batch, ids, inner in found:
            hit = (torch.rand(ids.shape, generator=gen) < rate) & inner.cpu()
            new = ids.clone()
            draws = pool[torch.randint(pool.numel(), (int(hit.sum()),), generator=gen)]
            new[hit.to(ids.device)] = draws.to(ids.device, ids.dtype)
            out.append(with_token_ids(batch, new))
    return out
