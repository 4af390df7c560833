"""Model level: statistics -> budget split -> per-layer init, as three visible stages.

1. :func:`collect_stats`: the target layers' input moments on the fit and held-out
   batches, their sensitivity and their whitened spectra (progress stages ``"moments"``,
   ``"holdout"``, ``"sensitivity"``, ``"spectra"``).
2. :func:`allocate`: the global budget split across layers from those spectra.
3. :func:`init_layers_`: each layer searched within its allocation by
   :func:`~gblr_compress.init.init_layer` and swapped in (stage ``"layers"``).

:func:`initialize_` runs the three for a caller that has only batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from gblr_compress.batches import Batch, positions
from gblr_compress.budget import dense_budget, greedy_allocation
from gblr_compress.calib import Moment, collect_moments, layer_sensitivity, sensitivity_target
from gblr_compress.coupling import CouplingGroup, find_groups
from gblr_compress.errors import InputError
from gblr_compress.init.config import InitConfig, InitResult, LayerInit
from gblr_compress.init.layer import init_layer
from gblr_compress.init.linalg import cholesky, gram_spectrum, whitening_moment
from gblr_compress.init.prune import (
    PrunedGroup,
    keep_order,
    prune_group,
    pruned_structures,
    unit_importance,
    units_for_cost,
)
from gblr_compress.layer import FrozenGBLR
from gblr_compress.progress import Progress, ProgressEvent
from gblr_compress.swap import as_linear, find_linears, is_linear_like, replace_module

__all__ = [
    "InitStats",
    "Allocation",
    "target_layers",
    "collect_stats",
    "allocate",
    "init_layers_",
    "initialize_",
    "choose_group_form",
    "unit_split_alternative",
]

_F64 = torch.float64



@dataclass
class InitStats:
    """What the init knows about the target layers before any of them is replaced.

    Attributes:
        names: dotted names of the target layers, in model order.
        shapes: ``(out_features, in_features)`` of each layer.
        moments: input second moment of each layer on the fit batches (empty when
            data-free).
        holdout: the same on the held-out batches (empty without them).
        sensitivity: each layer's weight in the budget split (empty: weigh alike).
        spectra: squared singular values of each whitened weight ``W L``, descending.
        data_free: whether the weight error (no activation statistics) is used.
        seconds: wall time of the stage.
    """

    names: list[str]
    shapes: dict[str, tuple[int, int]]
    moments: dict[str, Moment] = field(default_factory=dict)
    holdout: dict[str, Moment] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    data_free: bool = True
    seconds: float = 0.0


@dataclass
class Allocation:
    """The budget split: ``costs[name]`` is the exact cost layer ``name`` may use;
    ``budget_cost`` is ``floor(budget * total dense cost)`` of all target layers."""

    costs: dict[str, int]
    budget_cost: int


def target_layers(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The linear-like modules to initialize by dotted name (default: every one).

    Raises:
        InputError: no layers, an unknown name, or a name that is not a Linear.
    """
    names = list(find_linears(model) if names is None else names)
    if not names:
        raise InputError("no linear layers to initialize")
    modules = {}
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"no module named {name!r} in the model") from None
        if not is_linear_like(mod):
            raise InputError(f"module {name!r} is a {type(mod).__name__}, not a Linear")
        modules[name] = mod
    return modules


def statistics_batches(batches: Sequence[Batch], cfg: InitConfig) -> list[Batch]:
    """The batches the statistics run over: all of them up to ``2 * cfg.moment_tokens``
    input vectors, else evenly spaced batches that hold about that many.

    Each layer's moment keeps at most ``moment_tokens`` vectors anyway; what a larger
    calibration set costs here is the forward passes. On a 135M-parameter LM, 3,000
    packed Wikipedia sentences are 75k tokens: a forward over all of them took minutes
    on 2 cores for moments that a spread-out third of them estimates as well. The
    distillation still draws from every batch.
    """
    batches = list(batches)
    if cfg.moment_tokens is None:
        return batches
    sizes = [positions(b) for b in batches]
    want = 2 * cfg.moment_tokens
    if sum(sizes) <= want:
        return batches
    per = sum(sizes) / len(sizes)
    count = max(1, min(len(batches), math.ceil(want / per)))
    step = len(batches) / count
    return [batches[int(i * step)] for i in range(count)]


def _row_cap(batches: Sequence[Batch], cfg: InitConfig) -> int | None:
    """Rows per batch that spread ``cfg.moment_tokens`` over the batches (no cap without
    a token budget or batches)."""
    if cfg.moment_tokens is None or len(batches) == 0:
        return None
    return -(-cfg.moment_tokens // len(batches))


def collect_stats(
    model: nn.Module,
    cfg: InitConfig,
    calib: Iterable[Batch] | None = None,
    holdout: Iterable[Batch] | None = None,
    names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> InitStats:
    """Stage 1: moments, held-out moments, sensitivity and whitened spectra.

    Args:
        model: the dense model (left as it is; run in eval mode for the sensitivity).
        cfg: ``data_free``, ``damping``, ``moment_tokens``, ``sensitivity_batches``, ``seed``.
        calib: fit batches; without them (or with ``cfg.data_free``) only the weights'
            own spectra are taken.
        holdout: held-out batches, whose moments judge windowed structures.
        names: dotted names of the layers (default: every linear-like module).
        progress: ``ProgressEvent``s of the phases ``"moments"``, ``"holdout"``,
            ``"sensitivity"`` and ``"spectra"``.

    Raises:
        InputError: bad layer names, or calibration batches that never reach the layers.
    """
    t0 = time.perf_counter()
    modules = target_layers(model, names)
    names = list(modules)
    data_free = cfg.data_free or calib is None

    fit_m: dict[str, Moment] = {}
    hold_m: dict[str, Moment] = {}
    weights: dict[str, float] = {}
    if not data_free:
        calib = calib if isinstance(calib, Sequence) else list(calib)
        calib = statistics_batches(calib, cfg)
        if holdout is not None:
            holdout = statistics_batches(list(holdout), cfg)
        cap = _row_cap(calib, cfg)
        fit_m = collect_moments(model, names, calib, progress, cap, phase="moments")
        if holdout is not None:
            # Held-out batches only judge structures: the fit batches' row cap serves.
            hold_m = collect_moments(model, names, holdout, progress, cap, phase="holdout")
        if all(mo.count == 0 for mo in fit_m.values()):
            raise InputError("calibration batches produced no inputs for the target layers")
        if cfg.sensitivity_batches > 0:
            if progress is not None:  # opens the phase, so its memory peak is its own
                progress(ProgressEvent("sensitivity", 0, 1))
            was_training = model.training
            model.eval()  # dropout would add its own noise to the probes
            try:
                first = calib[: cfg.sensitivity_batches]
                target = sensitivity_target(model, names, first[0])
                weights = layer_sensitivity(model, names, first, probes=2, seed=cfg.seed, target=target)
            finally:
                model.train(was_training)
            if not any(w > 0.0 for w in weights.values()):
                weights = {}  # outputs unreachable by gradients: weigh layers alike
            if progress is not None:
                progress(ProgressEvent("sensitivity", 1, 1))

    spectra, shapes = {}, {}
    for i, name in enumerate(names):
        lin = as_linear(modules[name])
        W = lin.weight.detach().to("cpu", _F64)  # (m, n)
        C = whitening_moment(fit_m.get(name), W.shape[1], cfg.damping).C  # (n, n), always factorizes
        spectra[name] = gram_spectrum(W @ cholesky(C))
        shapes[name] = (lin.out_features, lin.in_features)
        if progress is not None:
            progress(ProgressEvent("spectra", i + 1, len(names)))
    return InitStats(names, shapes, fit_m, hold_m, weights, spectra, data_free,
                     time.perf_counter() - t0)


def allocate(stats: InitStats, cfg: InitConfig) -> Allocation:
    """Stage 2: split ``floor(cfg.budget * total dense cost)`` across the layers.

    :func:`~gblr_compress.budget.greedy_allocation` works on each layer's whitened
    spectrum normalized by the layer's output energy and, when measured, weighted by the
    layer's sensitivity (how much its relative error moves the model's outputs,
    :func:`~gblr_compress.calib.layer_sensitivity`). An allocation may reach the dense
    cost: that layer then stays dense.
    """
    energies, shapes = [], []
    for name in stats.names:
        s2 = stats.spectra[name]
        total = float(s2.sum())
        weight = stats.sensitivity.get(name, 0.0) if stats.sensitivity else 1.0
        energies.append(s2 * weight / total if total > 0 else s2)
        shapes.append(stats.shapes[name])
    budget = dense_budget([m * n for m, n in shapes], cfg.budget)
    alloc = greedy_allocation(energies, shapes, budget)
    return Allocation(dict(zip(stats.names, alloc)), budget)


def init_layers_(
    model: nn.Module,
    cfg: InitConfig,
    stats: InitStats,
    allocation: Allocation,
    progress: Progress | None = None,
) -> InitResult:
    """Stage 3: replace each target layer in place by its :func:`init_layer` result.

    Layers whose allocation reaches their dense cost stay as they are (``skipped``) and
    count at their dense cost.

    Args:
        model: the model whose layers ``stats.names`` are replaced (in place).
        cfg: search settings.
        stats: :func:`collect_stats` output (moments judge and fit each layer).
        allocation: :func:`allocate` output.
        progress: ``ProgressEvent("layers", i, total)`` after each layer.

    Returns:
        An :class:`InitResult`; ``result.max_cost`` is what the GBLR layers may share.
    """
    t0 = time.perf_counter()
    names = stats.names
    modules = target_layers(model, names)
    fit_m, hold_m, weights = stats.moments, stats.holdout, stats.sensitivity
    budget = allocation.budget_cost
    result = InitResult(budget_cost=budget, data_free=stats.data_free)

    def one(i: int) -> tuple[nn.Module, LayerInit]:
        name = names[i]
        cost = allocation.costs[name]
        return init_layer(modules[name], cost, cfg, fit_m.get(name), hold_m.get(name), name)

    # Layers are independent and their searches are many small LAPACK calls that use two
    # cores poorly, so two layers run at once with one thread each (1.25x on 2 cores).
    # Coupling groups are found on the dense model, before any layer is replaced.
    groups = [] if (stats.data_free or not cfg.prune) else [
        g for g in find_groups(model) if g.kind in cfg.prune_kinds and all(n in modules for n in g.layers)
    ]
    threads = torch.get_num_threads()
    workers = max(1, min(threads, len(names)))
    built: dict[str, tuple[nn.Module, LayerInit]] = {}
    try:
        if workers > 1:
            torch.set_num_threads(1)
        with ThreadPoolExecutor(workers) as pool:
            for i, (module, rec) in enumerate(pool.map(one, range(len(names)))):
                rec.sensitivity = weights.get(names[i])
                built[names[i]] = (module, rec)
                if progress is not None:
                    progress(ProgressEvent("layers", i + 1, len(names)))
    finally:
        torch.set_num_threads(threads)
    low_rank = dict(built)  # every group's low-rank form, before any is pruned
    orders: dict[str, torch.Tensor] = {}  # each pruned group's unit order, by consumer
    for group in groups:
        built.update(choose_group_form(group, modules, low_rank, stats, allocation, cfg, orders=orders))
    bought = _spend_unit_remainders(groups, modules, low_rank, built, stats, allocation, cfg, budget, orders)
    if cfg.head_check:  # pruned heads are checked on held-out outputs against these
        result.unpruned = {g.consumer: {n: low_rank[n] for n in g.layers} for g in groups
                           if g.kind == "attention" and all(built[n][1].status == "pruned" for n in g.layers)}
        result.remainders = bought if result.unpruned else []
    for name in names:
        module, rec = built[name]
        if rec.status != "skipped":
            replace_module(model, name, module)
        result.layers[name] = rec
    result.max_cost = result.shared_cost()
    result.seconds = stats.seconds + time.perf_counter() - t0
    assert result.exact_cost <= budget, "init must meet the global budget"
    return result


def initialize_(
    model: nn.Module,
    cfg: InitConfig,
    calib: Iterable[Batch] | None = None,
    holdout: Iterable[Batch] | None = None,
    names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> InitResult:
    """Replace the target layers of ``model`` in place by initialized GBLRLinear layers:
    :func:`collect_stats`, then :func:`allocate`, then :func:`init_layers_`.

    Args:
        model: the model (modified in place).
        cfg: settings (budget, groups, damping, ...).
        calib: fit batches; activation-aware init unless ``cfg.data_free``.
        holdout: held-out batches, to judge windowed structures (recommended).
        names: dotted names of the layers (default: every linear-like module).
        progress: ``ProgressEvent``s of the phases ``"moments"``,
            ``"holdout"``, ``"sensitivity"``, ``"spectra"`` and ``"layers"``.

    Returns:
        An :class:`InitResult`; ``result.max_cost`` is what the GBLR layers may share.

    Example:
        >>> result = initialize_(model, InitConfig(budget=0.3), calib=fit, holdout=held)
        >>> result.exact_cost <= result.budget_cost
        True
    """
    stats = collect_stats(model, cfg, calib, holdout, names, progress)
    return init_layers_(model, cfg, stats, allocate(stats, cfg), progress)


def _group_score(names: Sequence[str], errors: dict[str, float | None], stats: InitStats) -> float | None:
    """Sensitivity-weighted sum of squared relative errors of a group's layers: what the
    budget split minimizes, so forms of a group compare in the split's own units."""
    total = 0.0
    for name in names:
        err = errors.get(name)
        if err is None:
            return None
        weight = stats.sensitivity.get(name, 0.0) if stats.sensitivity else 1.0
        total += weight * err * err
    return total


def _kept_low_rank(
    names: Sequence[str], built: dict[str, tuple[nn.Module, LayerInit]], note: str
) -> dict[str, tuple[nn.Module, LayerInit]]:
    """``built``'s low-rank entries for ``names``, each record's reason extended by ``note``
    (why the group is not a pruned window)."""
    out = {}
    for n in names:
        module, rec = built[n]
        rec.reason = f"{rec.reason}; {note}" if rec.reason else note
        out[n] = (module, rec)
    return out


def _score(value: float | None) -> str:
    """A group score for a reason line (None: a layer of the group had no error)."""
    return "n/a" if value is None else f"{value:.4g}"


def _unit_cost(group: CouplingGroup, modules: dict[str, nn.Module]) -> tuple[int, int]:
    """``(units, cost of one unit)`` of a coupling group's pruned form. A unit: an FFN
    hidden unit, or a key/value head with its query heads (whole grouped-query groups
    are pruned, so the kept heads still find their keys/values)."""
    lins = {n: as_linear(modules[n]) for n in group.layers}
    G, size = group.kv_group, group.unit_size
    rows = {p: G * size for p in group.producers} | {p: size for p in group.kv_producers}
    per_unit = sum(lins[p].in_features * rows[p] for p in rows) + lins[group.consumer].out_features * G * size
    return group.units // G, per_unit


def _spend_unit_remainders(
    groups: Sequence[CouplingGroup],
    modules: dict[str, nn.Module],
    low_rank: dict[str, tuple[nn.Module, LayerInit]],
    built: dict[str, tuple[nn.Module, LayerInit]],
    stats: InitStats,
    allocation: Allocation,
    cfg: InitConfig,
    budget: int,
    orders: dict[str, torch.Tensor],
) -> list[tuple[str, dict[str, tuple[nn.Module, LayerInit]]]]:
    """Give the budget that whole units leave unspent back to pruned groups, one unit at
    a time, in ``built`` (in place). Returns the units bought, in order, each as its
    group's consumer and the group's entries before it (:attr:`InitResult.remainders`).

    A pruned group keeps ``floor(allocation / unit cost)`` units, so up to one unit's
    cost of each group's share (a 384-wide head of all-MiniLM-L6-v2 costs 49,152, a
    third of a layer's attention at budget 0.5) was spent by no one, and a 3% change in
    the split decided between 2 and 3 heads: the same MiniLM kept news cosine 0.865 as a
    wrapper and 0.882 as a folder (init only), and 0.865-0.878 over seeds. Groups whose
    allocation came closest to one more unit get it first (largest remainder rounding)
    while the whole run's exact cost stays within ``budget``. Each group's unit order
    from the first pass (``orders``) is reused, so a unit more costs one refit, not a
    new selection.
    """
    slack = budget - sum(rec.exact_cost for _, rec in built.values())
    bought: list[tuple[str, dict[str, tuple[nn.Module, LayerInit]]]] = []
    pending = []
    for group in groups:
        if not all(built[n][1].status == "pruned" for n in group.layers):
            continue
        units, per_unit = _unit_cost(group, modules)
        share = sum(min(allocation.costs[n], low_rank[n][1].dense_cost) for n in group.layers)
        kept = built[group.consumer][1].rank
        if kept < units - 1:  # all units: the group would be dense
            pending.append((share / per_unit - kept, group, kept, per_unit, share))
    for _, group, kept, per_unit, share in sorted(pending, key=lambda t: -t[0]):
        if per_unit > slack:
            continue
        again = choose_group_form(group, modules, low_rank, stats, allocation, cfg,
                                  extra=(kept + 1) * per_unit - share, orders=orders)
        if again and all(rec.status == "pruned" and rec.rank == kept + 1 for _, rec in again.values()):
            bought.append((group.consumer, {n: built[n] for n in group.layers}))
            built.update(again)
            slack -= per_unit
    return bought


def choose_group_form(
    group: CouplingGroup,
    modules: dict[str, nn.Module],
    built: dict[str, tuple[nn.Module, LayerInit]],
    stats: InitStats,
    allocation: Allocation,
    cfg: InitConfig,
    extra: int = 0,
    orders: dict[str, torch.Tensor] | None = None,
) -> dict[str, tuple[nn.Module, LayerInit]]:
    """Low rank (the per-layer init in ``built``) or a pruned window for one coupling
    group (FFN hidden units, or attention heads), by error on held-out statistics at
    equal exact cost.

    The pruned form gets the group's whole allocation: ``k`` units cost ``k`` times the
    summed widths their rows and columns span (``n`` per producer row, ``m`` per
    consumer column), so ``k = floor(allocation / per_unit)``; its cost never exceeds
    the group's. The forms are compared by the sensitivity-weighted squared relative errors
    of the group's layers on the held-out moments (the fit moments without held-out
    data): a pruned producer keeps its kept rows exactly (error 0), the consumer's error
    is that of the least-squares refit (:func:`~gblr_compress.init.prune.prune_group`).

    Returns:
        ``built``'s entries for the group's layers, replaced by FrozenGBLR pruned layers
        (status ``"pruned"``) when that form wins; the low-rank records, with a reason
        saying why pruning lost, otherwise.
    """
    names = group.layers
    recs = {n: built[n][1] for n in names}
    consumer = group.consumer
    C_fit = stats.moments.get(consumer)
    if C_fit is None or C_fit.count == 0:
        return {}
    # No mean folding here: on all-MiniLM-L6-v2 at budget 0.3 (the spectra's split) it
    # raised the calibration source's cosine 0.790 -> 0.793 and lowered Wikipedia and
    # news sentences' 0.629 -> 0.603 and 0.672 -> 0.656 (a fit mean is a property of
    # the calibration text). The unit-split alternative folds it, as the anchor does.
    C_fit = C_fit.mean().to(_F64)
    C_hold = stats.holdout.get(consumer)
    C_hold = None if C_hold is None or C_hold.count == 0 else C_hold.mean().to(_F64)
    lins = {n: as_linear(modules[n]) for n in names}
    W2 = lins[consumer].weight.detach().to("cpu", _F64)  # (m, h)
    G, size = group.kv_group, group.unit_size
    units, per_unit = _unit_cost(group, modules)
    cost = sum(min(allocation.costs[n], recs[n].dense_cost) for n in names) + extra
    k = units_for_cost(cost, per_unit, units)
    if k == 0 or k == units:
        return {}
    try:
        pruned = prune_group(W2, C_fit, k, per_unit, C_hold, cfg.prune_damping, unit_size=G * size, select=cfg.prune_select,
                             order=None if orders is None else orders.get(consumer))
        if orders is not None:
            orders[consumer] = pruned.order
        failure = None if math.isfinite(pruned.fit_error) else "a non-finite refit error"
    except RuntimeError as exc:  # torch.linalg on a moment it cannot solve (a singular block)
        failure = str(exc).splitlines()[0][:120]
    if failure is not None:  # the low-rank init stands; the report says why
        return _kept_low_rank(names, built, f"pruned window not tried: {failure}")
    held = C_hold is not None and all(recs[n].heldout_error is not None or recs[n].status == "skipped"
                                      for n in names)

    def lowrank_error(n: str) -> float | None:
        rec = recs[n]
        if rec.status == "skipped":
            return 0.0
        return rec.heldout_error if held else rec.calib_error

    pruned_err = pruned.heldout_error if held else pruned.fit_error
    low = _group_score(names, {n: lowrank_error(n) for n in names}, stats)
    prn = _group_score(names, {**{n: 0.0 for n in names}, consumer: pruned_err}, stats)
    where = "held-out" if held else "fit"
    unit_name = _unit_name(group)
    if low is None or prn is None or not prn < low:
        return _kept_low_rank(names, built, f"pruned window ({k} of {units} {unit_name}) lost on {where} "
                                            f"statistics ({_score(prn)} vs {_score(low)})")
    return _pruned_entries(group, lins, recs, pruned, C_hold is not None,
                           f"pruned window: {k} of {units} {unit_name} beat low rank on {where} statistics "
                           f"({prn:.4g} vs {low:.4g})")


def _first(moment: Moment) -> torch.Tensor | None:
    """The moment's mean input in float64 (None when it was not collected)."""
    mu = moment.first()
    return None if mu is None else mu.to("cpu", _F64)


def _unit_name(group: CouplingGroup) -> str:
    return "units" if group.kind == "ffn" else ("heads" if group.kv_group == 1 else "key/value groups")


def _pruned_entries(
    group: CouplingGroup, lins: dict[str, nn.Linear], recs: dict[str, LayerInit], pruned: PrunedGroup,
    held: bool, reason: str,
) -> dict[str, tuple[nn.Module, LayerInit]]:
    """The group's layers as FrozenGBLR pruned windows with their records (``recs``:
    each layer's low-rank record, whose allocation and baseline errors they keep)."""
    names, consumer = group.layers, group.consumer
    G, size = group.kv_group, group.unit_size
    rows = {p: G * size for p in group.producers} | {p: size for p in group.kv_producers}
    tensors = {n: (n, lins[n].weight.detach().to("cpu", _F64),
                   None if lins[n].bias is None else lins[n].bias.detach().to("cpu", _F64)) for n in names}
    records = pruned_structures([(*tensors[p], rows[p]) for p in rows], tensors[consumer], pruned)
    k = int(pruned.keep.numel())
    out = {}
    for n in names:
        lin, rec = lins[n], recs[n]
        weight = lin.weight
        frozen = FrozenGBLR(records[n]).to(device=weight.device, dtype=weight.dtype)
        err = (pruned.fit_error, pruned.heldout_error) if n == consumer else (0.0, 0.0 if held else None)
        out[n] = (frozen, LayerInit(
            name=n, in_features=rec.in_features, out_features=rec.out_features, status="pruned",
            reason=reason, allocated_cost=rec.allocated_cost, exact_cost=records[n].cost, dense_cost=rec.dense_cost,
            rank=k, groups=1, calib_error=err[0], heldout_error=err[1],
            baseline_heldout_error=rec.heldout_error if rec.status != "pruned" else rec.baseline_heldout_error,
            baseline_calib_error=rec.calib_error if rec.status != "pruned" else rec.baseline_calib_error,
            seconds=rec.seconds, sensitivity=rec.sensitivity,
        ))
    return out


def unit_split_alternative(
    dense: nn.Module, cfg: InitConfig, stats: InitStats, init: InitResult
) -> dict[str, tuple[nn.Module, LayerInit]] | None:
    """A second structure for the coupled groups, split across them by units rather than
    by spectra: every FFN unit and head pruned by output energy per unit of cost across
    all groups at once (Kwon et al. 2022's global rule, the pruning anchor's), each
    group a pruned window with its least-squares refit.

    :func:`allocate` splits the budget by the layers' whitened spectra, weighted by their
    sensitivity, and each group then takes its share as low rank or as a pruned window.
    At low budgets, where most groups end up pruned, that split can be far from what
    pruning itself would choose: all-MiniLM-L6-v2 at budget 0.3, calibrated on 256
    hand-written sentences, kept 2-4 heads and 273-688 FFN units per layer (last layer's
    attention low rank); this rule keeps 1-11 heads and 344-531 units. Mean embedding
    cosine, calibration source / Wikipedia / news / WordNet sentences: 0.790 / 0.629 /
    0.672 / 0.706 with the spectra's split, 0.824 / 0.695 / 0.708 / 0.776 with this one
    (init only). The means of the dropped units are folded into the consumers' biases
    (:func:`~gblr_compress.init.prune.prune_group`'s ``mu_fit``); without that this split
    kept 0.754 / 0.483 / 0.510 / 0.691. Neither wins everywhere, so the caller takes this
    one only where it is clearly better on held-out outputs
    (:func:`~gblr_compress.pipeline.compress_prepared`).

    Args:
        dense: the dense model (the groups' weights; the init's targets by name).
        cfg: the init's settings (prune_damping).
        stats: the statistics the init ran on (fit and held-out moments).
        init: the init's result: layers outside the groups keep their form and cost,
            and the groups share what is left of ``init.budget_cost``.

    Returns:
        The groups' layers as pruned windows with their records, or None when there are
        no groups, or a group's moment is missing, or one unit per group does not fit.
    """
    modules = target_layers(dense, stats.names)
    groups = [g for g in find_groups(dense) if g.kind in cfg.prune_kinds and all(n in modules for n in g.layers)]
    if not groups or any(stats.moments.get(g.consumer) is None or stats.moments[g.consumer].count == 0
                         for g in groups):
        return None
    inside = {n for g in groups for n in g.layers}
    fixed = sum(rec.exact_cost for n, rec in init.layers.items() if n not in inside)
    pool = init.budget_cost - fixed
    lins = {n: as_linear(modules[n]) for n in inside}
    cands: list[tuple[float, int, int, int]] = []  # (energy per cost, cost, group, unit)
    kept: list[int] = []
    cost = 0
    # Each group's float64 consumer weight and moment are made again where they are
    # used rather than kept for every group: on all-mpnet-base-v2 the FFN consumers'
    # moments alone are 12 x 75 MB, held beside the init's own statistics.
    per_group = []  # (units, per_unit) of each group
    for i, g in enumerate(groups):
        units, per_unit = _unit_cost(g, modules)
        C = stats.moments[g.consumer].mean().to(_F64)
        W2 = lins[g.consumer].weight.detach().to("cpu", _F64)
        per_group.append((units, per_unit))
        energy = unit_importance(W2, C).reshape(units, -1).sum(1)
        order = keep_order(energy).tolist()
        cands += [(float(energy[u]) / per_unit, per_unit, i, u) for u in order[1:]]  # each group keeps its best
        kept.append(units)
        cost += units * per_unit
        del C, W2
    if cost - sum(c for _, c, _, _ in cands) > pool:
        return None
    cands.sort()
    removed = []
    for cand in cands:
        if cost <= pool:
            break
        removed.append(cand)
        kept[cand[2]] -= 1
        cost -= cand[1]
    for cand in sorted(removed, reverse=True):  # the slack back to the most important that fit
        if cost + cand[1] <= pool:
            kept[cand[2]] += 1
            cost += cand[1]
    out: dict[str, tuple[nn.Module, LayerInit]] = {}
    for i, g in enumerate(groups):
        units, per_unit = per_group[i]
        C = stats.moments[g.consumer].mean().to(_F64)
        W2 = lins[g.consumer].weight.detach().to("cpu", _F64)
        hold = stats.holdout.get(g.consumer)
        C_hold, mu_hold = (None, None) if hold is None or hold.count == 0 else (hold.mean().to(_F64), _first(hold))
        try:
            pruned = prune_group(W2, C, kept[i], per_unit, C_hold, cfg.prune_damping,
                                 unit_size=g.kv_group * g.unit_size, select="importance",
                                 mu_fit=_first(stats.moments[g.consumer]), mu_hold=mu_hold)
        except RuntimeError:  # a moment the refit cannot solve: no alternative
            return None
        recs = {n: init.layers[n] for n in g.layers}
        out.update(_pruned_entries(g, lins, recs, pruned, C_hold is not None,
                                   f"pruned window: {kept[i]} of {units} {_unit_name(g)} (units split across "
                                   "groups by output energy per cost)"))
    return out
