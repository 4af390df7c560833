"""The compression pipeline: statistics -> budget split + init -> distill -> recover -> freeze.

``compress`` takes a dense model and calibration batches and returns a frozen student
(every compressed layer a :class:`~gblr_compress.layer.FrozenGBLR`) plus everything the
report needs. It never modifies the model it is given and prints nothing; the CLI draws
progress from the ``progress`` events.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from gblr_compress.batches import Batch, eval_mode, flatten_outputs, move_batch, run_model, split_batches, token_mask
from gblr_compress.budget import project_widths_
from gblr_compress.calib import augment_tokens
from gblr_compress.distill import (
    DistillConfig,
    DistillResult,
    agreement,
    distill_,
    gblr_layers,
    heldout_subset,
    row_errors,
    uses_kl,
)
from gblr_compress.errors import ConfigError, InputError
from gblr_compress.freeze import freeze_, recover_
from gblr_compress.init import InitConfig, InitResult, InitStats, LayerInit, allocate, collect_stats, init_layers_
from gblr_compress.init.model import statistics_batches, unit_split_alternative
from gblr_compress.memory import give_back_freed
from gblr_compress.progress import Progress
from gblr_compress.refit import RefitResult, refit_consumers_
from gblr_compress.structure import LayerStructure
from gblr_compress.swap import find_linears, replace_module
from gblr_compress.usage import find_usage, tied_weights

__all__ = [
    "CompressConfig",
    "RecoverConfig",
    "CompressResult",
    "Progress",
    "Prepared",
    "compress",
    "compress_prepared",
    "default_distill",
    "distill_and_recover",
    "prepare",
    "split_batches",
]

# A distillation that never beats the init on held-out data runs once more from the
# init at this fraction of its learning rate (_retry_smaller_step).
RETRY_LR_FACTOR = 0.2
# The first distillation gives up (DistillConfig.give_up) once this share of its steps
# has run without beating the init, when the smaller step follows. Where it never beat
# the init its steps were all thrown away: all-MiniLM-L6-v2 at budget 0.8 from 256
# sentences of one template family, its held-out loss at lr 1e-3 read 3.8x the init's
# after half the steps and 1.10x at the end; MPNet-base at 0.8, 2.6x and 2.2x
# (benchmarks/README.md, "The first distillation gives up").
RETRY_GIVE_UP = 0.5


@dataclass(frozen=True)
class RecoverConfig:
    """How the content-only recovery after distillation derives from the distillation.

    The recovery is defined relative to the distillation (when on, a quarter of its
    steps at 0.3 of its learning rate), so the rule is what is configured, and
    :meth:`derive` turns it into the :class:`~gblr_compress.distill.DistillConfig` that
    runs.

    Off by default: in every run measured on real models (all-MiniLM-L6-v2 as a wrapper
    and as a folder at budgets 0.5 and 0.8, MPNet-base at 0.5, SmolLM2-135M at 0.8) its
    best held-out state was the one it started from, so it added 15-20% to the
    distillation's time (115 s on MPNet-base) and nothing else. The distillation already
    ends on exact boxcar windows (``DistillConfig.ste_fraction``).

    Attributes:
        steps: content-only steps (0, the default: none; None: a quarter of the
            distillation steps).
        lr_scale: the recovery's peak learning rate as a fraction of the distillation's.
        eval_every: held-out evaluation period (at most the steps).
    """

    steps: int | None = 0
    lr_scale: float = 0.3
    eval_every: int = 20

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 0:
            raise ConfigError("steps", f"must be >= 0, got {self.steps}")
        if not self.lr_scale > 0:
            raise ConfigError("lr_scale", f"must be > 0, got {self.lr_scale}")
        if self.eval_every < 1:
            raise ConfigError("eval_every", f"must be >= 1, got {self.eval_every}")

    def derive(self, distill: DistillConfig) -> DistillConfig:
        """The recovery's settings: its own seed (``distill.seed + 1``), the same loss
        and feature term, the same held-out share and teacher cache, the other settings at
        their defaults."""
        steps = distill.steps // 4 if self.steps is None else self.steps
        return DistillConfig(steps=steps, lr=distill.lr * self.lr_scale, seed=distill.seed + 1,
                             loss=distill.loss, layer_weight=distill.layer_weight,
                             features=distill.features, eval_every=max(1, min(self.eval_every, steps)),
                             heldout_tokens=distill.heldout_tokens,
                             teacher_cache_mb=distill.teacher_cache_mb, activation_mb=distill.activation_mb,
                             min_steps=distill.min_steps // 4)  # a quarter of the steps, a quarter of the floor


def default_distill() -> DistillConfig:
    """The command's distillation settings (``CompressConfig``'s default)."""
    # The product's default: 100 steps (the loop's own is 200), more with many
    # calibration batches (5 passes over them) while the loop stays within 3 minutes.
    return DistillConfig(steps=100, epochs=5.0, give_up=RETRY_GIVE_UP)


@dataclass(frozen=True)
class CompressConfig:
    """What to compress and how hard to try: the run's own settings plus one config
    per stage (``init``, ``distill``, ``recover``), each validated where it is defined.

    ``budget`` and ``seed`` are the run's; the stage configs take them over on
    construction (``init.budget``, ``init.seed`` and ``distill.seed`` are set from them),
    so ``dataclasses.asdict`` of a config is exactly what ran. The report's settings are
    that dict.

    Attributes:
        budget: global fraction of the target layers' dense multiply-adds, in (0, 1].
        seed: makes the whole run reproducible (the recovery uses ``seed + 1``).
        include: glob patterns of layer names to compress (default: every Linear).
        exclude: glob patterns of layer names to leave dense.
        compress_tied: also compress layers whose weight is tied to another module
            (an ``lm_head`` sharing the token embedding); off: they stay dense, and the
            report says why. Compressing one unties it, so the model stays correct.
        holdout_fraction: share of the calibration batches held out (never trained on)
            to pick the best state and report agreement.
        overcomplete: with distillation, initialize at ``overcomplete * budget`` with each
            layer's rank split over up to ``init.max_groups`` groups, and let the
            proximal projection prune to the budget (the structure then has room to
            move). Off by default: the first projection onto the budget cuts every
            group's widths at once, and on all-MiniLM-L6-v2 at budget 0.5
            ``overcomplete=1.5`` ended at 0.811 eval embedding cosine against 0.878
            without it.
        augment: share of the inner tokens resampled in augmented copies of token-id
            calibration batches used for distillation (0: none; float inputs are never
            augmented), see :func:`~gblr_compress.calib.augment_tokens`. Held-out
            batches stay real. Copies are made only when the distillation steps are at
            least 4 times the number of fit batches (each would be seen 4+ times).
        augment_copies: most augmented copies of each fit batch (fewer when the steps
            would not draw each batch about twice).
        device: where init and distillation run (``cpu`` or ``cuda``).
        time_budget: seconds the whole compression may take (init, distillation,
            recovery; not loading or export). The init always runs whole; the
            distillation then gets what is left (80% of it when a recovery is
            configured, which gets the rest), timing its first steps and keeping only
            the steps that fit. None (the
            default): every configured step runs, however long it takes.
        refit: after the init, refit each pruned consumer (FFN down layer, attention
            output projection) in closed form on the compressed model's own inputs
            against the teacher's output of that layer, in model order, kept where it
            lowers the held-out error (:func:`~gblr_compress.refit.refit_consumers_`).
            Off by default: on all-MiniLM-L6-v2 with 64 Wikipedia sentences at budget
            0.8 no refit lowered its layer's held-out error (7 of 7 rejected) and the
            passes took 212 s (on a loaded 2-core machine).
        retry: a distillation whose best held-out state is the init runs once more
            from the init at :data:`RETRY_LR_FACTOR` of its learning rate
            (:func:`distill_and_recover`). The ``--target-fidelity`` search turns it
            off (:func:`~gblr_compress.target.search_job`).
        init: the initialization (:class:`~gblr_compress.init.InitConfig`;
            ``max_groups`` is the most blocks per layer, ``data_free`` ignores the
            activation statistics).
        distill: the distillation (:class:`~gblr_compress.distill.DistillConfig`:
            steps, learning rates, loss, teacher cache); ``steps=0``: init + freeze only.
        recover: how the content-only recovery derives from ``distill``.
    """

    budget: float = 0.3
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    compress_tied: bool = False
    holdout_fraction: float = 0.2
    overcomplete: float = 1.0
    augment: float = 0.2
    augment_copies: int = 4
    device: str = "cpu"
    time_budget: float | None = None
    refit: bool = False
    retry: bool = True
    init: InitConfig = field(default_factory=InitConfig)
    distill: DistillConfig = field(default_factory=default_distill)
    recover: RecoverConfig = field(default_factory=RecoverConfig)

    @property
    def logits(self) -> bool:
        """Whether held-out agreement may score argmax top-1: ``loss="mse"`` says a 2-D
        output is an embedding, where an argmax means nothing."""
        return self.distill.loss != "mse"

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not 0.0 < float(self.budget) <= 1.0:
            raise ConfigError("budget", f"must be in (0, 1], got {self.budget}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError("holdout_fraction", f"must be in [0, 1), got {self.holdout_fraction}")
        if not 0.0 <= self.augment < 1.0:
            raise ConfigError("augment", f"must be in [0, 1), got {self.augment}")
        if self.augment_copies < 0:
            raise ConfigError("augment_copies", f"must be >= 0, got {self.augment_copies}")
        if not self.overcomplete >= 1.0:
            raise ConfigError("overcomplete", f"must be >= 1, got {self.overcomplete}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError("time_budget", f"must be > 0 seconds, got {self.time_budget}")
        # The stages take the run's budget and seed, so the config says what ran.
        object.__setattr__(self, "init", replace(self.init, budget=float(self.budget), seed=self.seed))
        object.__setattr__(self, "distill", replace(self.distill, seed=self.seed))

    def settings(self) -> dict[str, Any]:
        """``dataclasses.asdict`` of the config, JSON-ready (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))


@dataclass
class CompressResult:
    """Everything a compression run produced.

    Attributes:
        model: the frozen student (compressed layers are FrozenGBLR), eval mode.
        records: the frozen structure of each compressed layer, by dotted name.
        targets: names of the target layers compressed or tried (skipped by the init).
        init: the initialization record (allocation, per-layer status and errors).
        distill: the distillation record (None when ``steps == 0``).
        recovery: the content-only recovery record (None when skipped).
        quality: held-out teacher-vs-student agreement after each phase
            (``"init"``, ``"distilled"``, ``"frozen"``), see
            :func:`~gblr_compress.distill.agreement`; empty without held-out data.
        seconds: wall time per phase.
        max_cost: exact cost the compressed layers were allowed (skipped layers excluded).
        left_dense: target layers left dense before the init and kept out of the
            budget, with the reason (not used by the outputs, weight tied).
        refit: the refit of pruned consumers (None when nothing was pruned or refit).
    """

    model: nn.Module
    records: dict[str, LayerStructure]
    targets: list[str]
    init: InitResult
    distill: DistillResult | None
    recovery: DistillResult | None
    quality: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    max_cost: int = 0
    left_dense: dict[str, str] = field(default_factory=dict)
    refit: RefitResult | None = None


@dataclass
class Prepared:
    """What every compression of one model shares, computed once: the dense copies,
    the target layers, the fit / held-out split and the activation statistics. The
    target-fidelity search compresses one :class:`Prepared` at many budgets.

    Attributes:
        teacher: the dense model (eval mode, on the run's device).
        dense: a dense copy each compression deep-copies its student from.
        usable: the target layers that may be compressed.
        left_dense: target layers left dense and out of the budget, with the reason.
        fit, held: calibration batches trained on / held out (on the device).
        stats: :func:`~gblr_compress.init.collect_stats` of the dense layers.
        started: ``time.perf_counter()`` when preparation began (the time budget's start).
    """

    teacher: nn.Module
    dense: nn.Module
    usable: list[str]
    left_dense: dict[str, str]
    fit: list[Batch]
    held: list[Batch]
    stats: InitStats | None
    started: float


def _init_config(config: CompressConfig, distilling: bool, data: bool) -> InitConfig:
    """The run's init: over-complete while distilling, data-free without data."""
    return replace(
        config.init,
        budget=min(1.0, config.budget * config.overcomplete) if distilling else config.budget,
        data_free=config.init.data_free or not data,
        # An over-complete init is pruned to the budget by the width projection, which
        # cannot move frozen pruned windows: they would keep the over-complete cost.
        prune=config.init.prune and not (distilling and config.overcomplete > 1.0),
    )


def prepare(
    model: nn.Module,
    config: CompressConfig = CompressConfig(),
    calib: Sequence[Batch] | None = None,
    progress: Progress | None = None,
    share_teacher: bool = False,
    held: Sequence[Batch] | None = None,
    extra_fit: Sequence[Batch] = (),
) -> Prepared:
    """The budget-independent first half of :func:`compress`: copies of the model, the
    target layers, the layers left dense, the fit / held-out split and the statistics.

    ``share_teacher``: on a CPU run, ``model`` itself is the teacher instead of a copy
    (it is put in eval mode and its parameters stop requiring grad; no value changes),
    for a caller that owns the model (the job): one model's size less in memory, 540 MB
    on a 135M-parameter LM.

    ``held``: held-out batches from elsewhere (e.g. text from the source the model will
    serve): every calibration batch trains and these decide what held-out data decides
    (the init's form choice, the distillation's best state, the quality figures).
    None: the last ``config.holdout_fraction`` of ``calib`` is held out.

    ``extra_fit``: batches that only train (statistics and distillation), added after
    the split so none is ever held out: the job's reordered copies of the fit texts
    (:attr:`~gblr_compress.job.Job.reorder_copies`) and the package's general English
    sentences (:attr:`~gblr_compress.job.Job.general_text`).

    Raises:
        InputError: no Linear layers to compress, or none that may be compressed.
    """
    t_start = time.perf_counter()
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    shared = share_teacher and device.type == "cpu"  # .to(cuda) would move the caller's model
    teacher = (model if shared else copy.deepcopy(model)).to(device).eval()
    dense = copy.deepcopy(model).to(device).eval()
    targets = find_linears(dense, config.include or None, config.exclude or None)
    if not targets:
        raise InputError("the model has no Linear layers to compress (check include/exclude)")

    fit: list[Batch] = []
    heldout: list[Batch] = []
    if calib and held is not None:
        fit, heldout = [move_batch(b, device) for b in calib], [move_batch(b, device) for b in held]
    elif calib:
        fit, heldout = split_batches([move_batch(b, device) for b in calib], config.holdout_fraction)
    if fit:
        fit += [move_batch(b, device) for b in extra_fit]

    # Layers the outputs never use, and tied ones, stay dense and out of the budget.
    if fit:
        left_dense = find_usage(dense, fit[0], targets, include_tied=config.compress_tied).dense
    else:  # without data only ties can be seen
        left_dense = {} if config.compress_tied else tied_weights(dense, targets)
    usable = [n for n in targets if n not in left_dense]
    if not usable:
        raise InputError("none of the model's Linear layers can be compressed: "
                         + "; ".join(f"{n}: {r}" for n, r in left_dense.items()))
    # The statistics do not depend on the budget, only on the data and the settings.
    init_cfg = _init_config(config, False, bool(fit))
    stats = collect_stats(dense, init_cfg, fit or None, heldout or None, usable, progress)
    return Prepared(teacher, dense, usable, left_dense, fit, heldout, stats, t_start)


def compress(
    model: nn.Module,
    config: CompressConfig = CompressConfig(),
    calib: Sequence[Batch] | None = None,
    progress: Progress | None = None,
    share_teacher: bool = False,
    held: Sequence[Batch] | None = None,
    extra_fit: Sequence[Batch] = (),
) -> CompressResult:
    """Compress the Linear layers of ``model`` to the global budget (the model's values
    are not modified; with ``share_teacher`` it serves as the teacher, see :func:`prepare`).

    :func:`prepare` (statistics) then :func:`compress_prepared` (budget split, init,
    distillation, freeze).

    Args:
        model: the dense model; its forward takes a tensor, a tuple or a dict of tensors.
        config: budget, steps, layers and the rest (:class:`CompressConfig`).
        calib: calibration batches (each one forward call's input). Without them the
            init is data-free and there is no distillation.
        progress: gets a :class:`~gblr_compress.progress.ProgressEvent` per unit of work.
        share_teacher, held, extra_fit: see :func:`prepare`.

    Returns:
        A :class:`CompressResult` whose ``model`` is the frozen student.

    Example:
        >>> result = compress(model, CompressConfig(budget=0.3, distill=DistillConfig(steps=100)), calib=batches)
        >>> sum(r.cost for r in result.records.values()) <= result.max_cost
        True
    """
    return compress_prepared(prepare(model, config, calib, progress, share_teacher, held, extra_fit), config,
                             progress, release_stats=True)


def compress_prepared(prep: Prepared, config: CompressConfig, progress: Progress | None = None,
                      release_stats: bool = False) -> CompressResult:
    """The budget's half of :func:`compress` on a :class:`Prepared` model (left as it
    is, so it can be compressed again at another budget): budget split + init ->
    distill -> recover -> freeze. ``config`` must be the one ``prep`` was made with,
    up to ``budget`` and the distillation settings. ``release_stats`` makes this the
    last use of ``prep``: ``prep.dense`` becomes the student itself instead of being
    copied, and ``prep.stats`` is dropped after the init, so the distillation carries
    neither a spare model nor the moments."""
    seconds: dict[str, float] = {}
    deadline = None if config.time_budget is None else prep.started + config.time_budget
    torch.manual_seed(config.seed)
    teacher, fit, held = prep.teacher, prep.fit, prep.held
    student = prep.dense if release_stats else copy.deepcopy(prep.dense)

    distilling = config.distill.steps > 0 and bool(fit)
    t0 = time.perf_counter()
    init_cfg = _init_config(config, distilling, bool(fit))
    stats_seconds = prep.stats.seconds
    # The budget split -> each layer searched and swapped.
    allocation = allocate(prep.stats, init_cfg)
    init = init_layers_(student, init_cfg, prep.stats, allocation, progress)
    del allocation
    alternative = None
    if held and init_cfg.prune and init_cfg.unit_split and not init_cfg.data_free:
        alternative = unit_split_alternative(teacher, init_cfg, prep.stats, init)
    if release_stats:
        # The moments (an n x n float64 matrix per layer input, fit and held-out) are
        # done with: on a 135M-parameter LM they are about 2 GB the distillation does
        # not need.
        prep.stats = None
        give_back_freed()
    if init.unpruned and held:
        _keep_better_heads(student, teacher, init, held, config, deadline)
    init.unpruned, init.remainders = {}, []
    if alternative:  # scored once the moments are gone: the teacher cache takes their place
        _keep_better_split(student, teacher, init, alternative, held, config)
    del alternative
    dense_total = sum(rec.dense_cost for rec in init.layers.values())
    skipped_dense = sum(r.dense_cost for r in init.layers.values() if r.status == "skipped")
    max_cost = math.floor(config.budget * dense_total) - skipped_dense
    if max_cost < 0:  # only possible when over-complete init kept too many layers dense
        raise InputError(f"budget {config.budget} is too small for the layers left dense")
    if distilling and config.overcomplete > 1.0:
        _split_for_pruning(student, config.init.max_groups)
    # Pruned windows are frozen by the init at their exact cost; the GBLR layers share the rest.
    pruned_cost = sum(r.exact_cost for r in init.layers.values() if r.status == "pruned")
    gblr_max = max_cost - pruned_cost
    project_widths_(list(gblr_layers(student).values()), gblr_max)
    seconds["init"] = stats_seconds + time.perf_counter() - t0
    refit = None
    consumers = [n for n, r in init.layers.items() if r.status == "pruned"]
    if config.refit and consumers and fit:
        t0 = time.perf_counter()
        # The statistics' batches (about 2 x moment_tokens tokens) serve: one pass per layer.
        refit = refit_consumers_(student, teacher, consumers, statistics_batches(fit, init_cfg),
                                 statistics_batches(held, init_cfg) if held else (), init_cfg.damping, progress)
        seconds["refit"] = time.perf_counter() - t0
    quality: dict[str, dict[str, float]] = {}
    if held:
        quality["init"] = agreement(student.eval(), teacher, _quality_batches(held, config), config.logits)

    distilled = recovery = None
    # Pruned windows train too (content only: their windows are fixed by the init).
    compressed = [n for n, rec in init.layers.items() if rec.status in ("gblr", "lowrank", "pruned")]
    if deadline is not None and time.perf_counter() >= deadline:
        distilling = False  # the time budget went to the init: freeze what it built
    if distilling and compressed:
        distilled, recovery = distill_and_recover(
            student, teacher, fit, held, gblr_max, config, progress, seconds, quality, deadline
        )
        give_back_freed()  # the optimizer's moments and the teacher cache, before the export

    t0 = time.perf_counter()
    records = freeze_(student)
    student.eval()
    seconds["freeze"] = time.perf_counter() - t0
    if held:
        quality["frozen"] = agreement(student, teacher, _quality_batches(held, config), config.logits)
    cost = sum(r.cost for r in records.values())
    if cost > max_cost:  # the projection guarantees this; a breach is a bug, not bad input
        raise RuntimeError(f"frozen cost {cost} exceeds the budget's {max_cost}")
    return CompressResult(student, records, list(prep.usable), init, distilled, recovery, quality,
                          seconds, max_cost, dict(prep.left_dense), refit)


def _keep_better_split(
    student: nn.Module, teacher: nn.Module, init: InitResult,
    alternative: dict[str, tuple[nn.Module, LayerInit]], held: Sequence[Batch], config: CompressConfig,
) -> bool:
    """Swap the coupled groups' alternative structure
    (:func:`~gblr_compress.init.unit_split_alternative`) into ``student`` and ``init``
    when it is clearly better on the held-out batches; else leave both as they were.
    Returns whether it was swapped in.

    Decided on the model's outputs, not the per-layer statistics (those are what the
    init's own split optimizes, and what misjudged budget 0.3 on all-MiniLM-L6-v2), row
    by row (:func:`~gblr_compress.distill.row_errors`: ``1 - cosine`` of the outputs, the
    report's fidelity, or the KL divergence of logits), and only when the paired mean
    gain is more than twice its standard error. The held-out rows come from the
    calibration text, and a small edge there did not carry to other text: the MiniLM
    wrapper at budget 0.9 with 256 Wikipedia sentences kept 0.9889 vs 0.9878 held-out
    cosine with the unit split and 0.006-0.014 less on sentences of other articles,
    news and WordNet; at 0.3 on the suite's hand-written sentences it gained 0.03-0.07
    on all of them."""
    batches = _quality_batches(held, config)
    current = {n: student.get_submodule(n) for n in alternative}
    errors: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    kl = None
    with eval_mode(student), eval_mode(teacher), torch.no_grad():
        for b in batches:
            t_out = run_model(teacher, b)
            kl = uses_kl(t_out, config.distill.loss) if kl is None else kl
            for alt in (False, True):
                for n, module in (((n, m) for n, (m, _) in alternative.items()) if alt else current.items()):
                    replace_module(student, n, module)
                errors[alt].append(row_errors(run_model(student, b), t_out, token_mask(b), kl,
                                              config.distill.temperature))
    gain, se, n = _paired_gain(errors[False], errors[True])  # > 0: the unit split is better
    if not gain > 2.0 * se:
        for name, module in current.items():
            replace_module(student, name, module)
        return False
    what = "KL" if kl else "1 - cosine"
    before, after = float(torch.cat(errors[False]).mean()), float(torch.cat(errors[True]).mean())
    for name, (_, rec) in alternative.items():
        rec.reason = (f"{rec.reason}; won on held-out outputs ({what} {after:.4g} vs {before:.4g} for the "
                      f"budget split, over {n} rows)")
        init.layers[name] = rec
    init.max_cost = init.shared_cost()
    if init.exact_cost > init.budget_cost:  # the alternative is built within it; a breach is a bug
        raise RuntimeError(f"the unit split's cost {init.exact_cost} exceeds the budget's {init.budget_cost}")
    return True


# The head check runs the model once per pruned attention group, on held-out batches of
# about this many input positions (an eighth of a second on all-MiniLM-L6-v2 here, a few
# seconds on a 135M-parameter LM), and keeps the teacher's outputs on them in memory up
# to this size (else runs the teacher again for each check).
HEAD_CHECK_TOKENS = 4096
HEAD_CHECK_CACHE_BYTES = 256 * 2**20


def _paired_gain(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[float, float, int]:
    """``(mean, standard error, rows)`` of the per-row error drop from ``before`` to
    ``after`` (> 0: ``after`` is better)."""
    gain = torch.cat(before) - torch.cat(after)
    n = gain.numel()
    se = float(gain.std()) / math.sqrt(n) if n > 1 else math.inf
    return float(gain.mean()), se, n


def _keep_better_heads(
    student: nn.Module, teacher: nn.Module, init: InitResult, held: Sequence[Batch], config: CompressConfig,
    deadline: float | None,
) -> list[str]:
    """Put back the low-rank form of each attention group the init pruned
    (``init.unpruned``) where the model's held-out outputs are clearly better with it,
    one group at a time in model order (each judged with the groups before it as
    decided); ``student`` and ``init`` are updated in place. Returns the consumers of
    the groups put back.

    The init chooses a group's form by a sum of per-layer errors on held-out moments.
    For heads that sum misjudges: a query or key error passes through the softmax, and
    a dropped head's share of the output is gone for every token alike. On
    all-mpnet-base-v2 at budget 0.8, calibrated on 256 hand-written sentences plus
    2,000 WordNet examples, the score pruned the heads of six layers (four from the
    256 alone), and the init's news cosine fell 0.803 -> 0.759. Judged as
    :func:`_keep_better_split` judges (row errors of the outputs, a paired mean gain of
    more than twice its standard error); a check that would pass ``deadline`` is not
    started.

    The init's remainder rounding spends the slack that whole units leave on more whole
    units (:attr:`~gblr_compress.init.InitResult.remainders`), so a group's low-rank
    form may no longer fit beside them. The check then gives other groups' units back,
    last bought first, until it fits, and judges the low-rank heads with those units
    gone; kept, they stay gone. On the pickled all-mpnet-base-v2 SentenceTransformer
    at budget 0.8, calibrated on 256 hand-written sentences, layer 0's heads were never
    checked for want of room, and the init kept news / Wikipedia cosine 0.852 / 0.888
    where the same model as a folder kept 0.922 / 0.930; with units given back both
    keep 0.932-0.933 / 0.939 (benchmarks/README.md)."""
    batches = heldout_subset(_quality_batches(held, config), HEAD_CHECK_TOKENS)
    with eval_mode(teacher), torch.no_grad():
        first = run_model(teacher, batches[0])
    kl = uses_kl(first, config.distill.loss)
    # The teacher's outputs are kept for all the checks unless they are large (an LM's
    # logits over 8k positions are 1.6 GB): then each check runs the teacher again.
    size = sum(t.numel() * t.element_size() for t in flatten_outputs(first)) * len(batches)
    cached = [first] if size <= HEAD_CHECK_CACHE_BYTES else None
    del first

    def target(i: int) -> Any:
        if cached is not None and i < len(cached):
            return cached[i]
        with eval_mode(teacher), torch.no_grad():
            out = run_model(teacher, batches[i])
        if cached is not None:
            cached.append(out)
        return out

    def errors() -> list[torch.Tensor]:
        with eval_mode(student), torch.no_grad():
            return [row_errors(run_model(student, b), target(i), token_mask(b), kl, config.distill.temperature)
                    for i, b in enumerate(batches)]

    t0 = time.perf_counter()
    current = errors()
    per_check = time.perf_counter() - t0
    restored = []
    # Units the init bought with the run's slack, by consumer (insertion order: the order
    # bought); each may be given back once to make room for a group's low-rank form.
    bought = dict(init.remainders)
    for consumer, low_rank in init.unpruned.items():
        if deadline is not None and time.perf_counter() + per_check >= deadline:
            break
        bought.pop(consumer, None)  # this group's own unit goes with its pruned window
        # A group's low-rank form has its allocation, but the init's remainder rounding
        # may have spent part of it on other groups' whole units: those give theirs back,
        # last bought first, until it fits.
        room = init.budget_cost - init.exact_cost - _cost_change(init, low_rank)
        givers: list[str] = []
        for other in reversed(list(bought)):
            if room >= 0:
                break
            room -= _cost_change(init, bought[other])
            givers.append(other)
        if room < 0:
            _add_reason(init, low_rank, "its low-rank form was not checked on held-out outputs (it does not fit "
                                        "the budget)")
            continue
        back = {n: entry for other in givers for n, entry in bought[other].items()}
        trial_modules = {n: module for n, (module, _) in (low_rank | back).items()}
        kept = {n: student.get_submodule(n) for n in trial_modules}
        for n, module in trial_modules.items():
            replace_module(student, n, module)
        trial = errors()
        gain, se, rows = _paired_gain(current, trial)
        what = "KL" if kl else "1 - cosine"
        before_err, after_err = float(torch.cat(current).mean()), float(torch.cat(trial).mean())
        units_back = f", {len(givers)} other groups' remainder units given back" if givers else ""
        if not gain > 2.0 * se:
            for n, module in kept.items():
                replace_module(student, n, module)
            _add_reason(init, low_rank, f"held on held-out outputs ({what} {before_err:.4g} vs {after_err:.4g} "
                                        f"low rank{units_back}, over {rows} rows)")
            continue
        init.layers.update({n: rec for n, (_, rec) in (low_rank | back).items()})
        for other in givers:
            _add_reason(init, bought.pop(other), f"one unit fewer: its remainder unit made room for the low-rank "
                                                 f"heads of {consumer}")
        _add_reason(init, low_rank, f"kept low rank: the heads' pruned window lost on held-out outputs "
                                    f"({what} {before_err:.4g} vs {after_err:.4g} low rank{units_back}, "
                                    f"over {rows} rows)")
        current = trial
        restored.append(consumer)
    init.unpruned, init.remainders = {}, []
    init.max_cost = init.shared_cost()
    if init.exact_cost > init.budget_cost:  # the low-rank forms had the same allocation; a breach is a bug
        raise RuntimeError(f"the low-rank heads' cost {init.exact_cost} exceeds the budget's {init.budget_cost}")
    return restored


def _cost_change(init: InitResult, entries: dict[str, tuple[Any, LayerInit]]) -> int:
    """How much ``init``'s exact cost would change with ``entries`` (``{name: (module,
    record)}``) in place of its records for those layers."""
    return sum(rec.exact_cost - init.layers[n].exact_cost for n, (_, rec) in entries.items())


def _add_reason(init: InitResult, group: dict[str, Any], note: str) -> None:
    """Extend the records of ``group``'s layers in ``init`` by ``note``."""
    for n in group:
        rec = init.layers[n]
        rec.reason = f"{rec.reason}; {note}" if rec.reason else note


def _quality_batches(held: Sequence[Batch], config: CompressConfig) -> list[Batch]:
    """The held-out batches the report's agreement figures are measured on: the ones the
    distillation scores (about ``config.distill.heldout_tokens`` positions, all of them
    for a few hundred sentences). Each measurement runs teacher and student on them,
    three times a run: on all 19 held-out batches of a 135M LM that was 5 minutes."""
    return heldout_subset(held, config.distill.heldout_tokens)


def _copies(config: CompressConfig, fit_batches: int) -> int:
    """Augmented copies per fit batch: only when data is scarce, i.e. when the steps
    would draw each real batch 4 times or more, and then no more than keeps every batch
    (real or copy) drawn about twice, so the cached teacher outputs still get reused.
    Copies only widen what is trained on; the best state is still picked on the real
    held-out batches."""
    if fit_batches == 0:
        return 0
    return max(0, min(config.augment_copies, config.distill.steps // (2 * fit_batches) - 1))


def distill_and_recover(
    student: nn.Module,
    teacher: nn.Module,
    fit: Sequence[Batch],
    held: Sequence[Batch],
    max_cost: int,
    config: CompressConfig,
    progress: Progress | None = None,
    seconds: dict[str, float] | None = None,
    quality: dict[str, dict[str, float]] | None = None,
    deadline: float | None = None,
) -> tuple[DistillResult, DistillResult | None]:
    """The distillation phases of :func:`compress` on a student whose target layers are
    GBLRLinear: ``config.distill`` proximal distillation steps, then the content-only
    recovery, both on ``fit`` plus its augmented copies (``config.augment``).
    ``config.distill.structure_lr=0`` keeps the structure fixed throughout. A
    distillation that never beats the init on ``held`` runs once more from the init at
    :data:`RETRY_LR_FACTOR` of its learning rate, within the same deadline, unless
    ``config.retry`` is off (``DistillResult.retried`` says so); with the retry on, the
    first run stops once ``config.distill.give_up`` of its steps (the command's
    :data:`RETRY_GIVE_UP`) have not beaten the init.

    Args:
        student: trained in place; left with GBLRLinear layers (not frozen).
        teacher: the dense model.
        fit: batches trained on; ``held``: held-out batches (may be empty).
        max_cost: exact cost the GBLR layers share.
        config: steps, learning rates, seed, loss and recovery steps.
        progress: gets the ``"distill"``, ``"retry"`` and ``"recover"`` phases' events.
        seconds: wall time per phase is added here when given.
        quality: held-out agreement after distillation (``"distilled"``) is added here
            when given and there are held-out batches.
        deadline: a ``time.perf_counter()`` time both phases must end by (the
            distillation takes all of the time left, or 80% of it when a recovery is
            configured, see ``CompressConfig.time_budget``).

    Returns:
        ``(distillation record, recovery record or None when it has no steps)``.
    """
    seconds = {} if seconds is None else seconds
    t0 = time.perf_counter()
    fit = list(fit) + augment_tokens(fit, config.augment, _copies(config, len(fit)), config.seed)
    rcfg = config.recover.derive(config.distill)
    share = 0.8 if rcfg.steps > 0 else 1.0  # a recovery, when configured, gets the rest
    d_deadline = None if deadline is None else t0 + share * max(0.0, deadline - t0)
    # Giving up early only saves time when a smaller step follows; without the retry
    # the run's late steps are all it has.
    first = config.distill if config.retry else replace(config.distill, give_up=0.0)
    distilled = distill_(student, teacher, fit, max_cost, first, holdout=held,
                         progress=progress, deadline=d_deadline)
    if config.retry and _no_gain(distilled) and (d_deadline is None or time.perf_counter() < d_deadline):
        distilled = _retry_smaller_step(student, teacher, fit, held, max_cost, config.distill, distilled,
                                        progress, d_deadline)
    seconds["distill"] = time.perf_counter() - t0
    if distilled.skipped or distilled.cut:
        # A recovery step costs as much as a distillation step, so it would not fit
        # either (SmolLM2 at --time-budget 660: the distillation stopped after its 3
        # timed steps, then a recovery ran 197 s to the deadline and raised the run's
        # memory peak, and its best state was where it started).
        if distilled.cut and held and quality is not None:
            quality["distilled"] = agreement(student.eval(), teacher, _quality_batches(held, config), config.logits)
        return distilled, None
    if held and quality is not None:
        quality["distilled"] = agreement(student.eval(), teacher, _quality_batches(held, config), config.logits)
    recovery = None
    if rcfg.steps > 0 and (deadline is None or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        recovery = recover_(student, teacher, fit, max_cost, rcfg, holdout=held,
                            progress=progress, deadline=deadline)
        seconds["recover"] = time.perf_counter() - t0
    return distilled, recovery


def _no_gain(result: DistillResult) -> bool:
    """Whether a distillation trained to its end (or gave up, ``DistillConfig.give_up``)
    and its best held-out state was still the one it started from (no evaluation after a
    step beat it). One stopped on a numerical fault is not run again: the report says
    why it stopped."""
    return (result.steps > 0 and result.best_step == 0 and result.heldout_before is not None
            and not (result.skipped or result.cut or result.stopped))


def _retry_smaller_step(
    student: nn.Module, teacher: nn.Module, fit: Sequence[Batch], held: Sequence[Batch], max_cost: int,
    dcfg: DistillConfig, first: DistillResult, progress: Progress | None, deadline: float | None,
) -> DistillResult:
    """A second distillation from the init (where ``first`` left the student) at
    :data:`RETRY_LR_FACTOR` times its step, when the first one never beat the init on
    the held-out batches; its own best held-out state is kept (the init again if it
    does not beat it either).

    At mild budgets the init is close and a step of ``dcfg.lr`` overshoots it: on
    all-MiniLM-L6-v2 at budget 0.8 from 256 hand-written sentences the default
    distillation kept the init (held-out loss never lower), and a fifth of the step
    lowered it and raised the Wikipedia / news / WordNet cosine 0.952 / 0.952 / 0.969
    -> 0.958 / 0.958 / 0.972 (benchmarks/README.md). The decision uses only the run's
    held-out batches, and costs a second distillation only where the first gained
    nothing (and the first stops where it has gained nothing by ``dcfg.give_up`` of its
    steps). The second run never gives up: its late steps are the last ones there are.
    """
    lr = dcfg.lr * RETRY_LR_FACTOR
    # Not given the steps the first run gave up: on MPNet-base at 0.8 a second run of
    # 140 steps instead of 100 kept its last step and lost (held-out cosine 0.930 vs
    # 0.937, news 0.915 vs 0.928) where MiniLM gained 0.001 (benchmarks/README.md).
    cfg = replace(dcfg, lr=lr, give_up=0.0)
    again = distill_(student, teacher, fit, max_cost, cfg, holdout=held,
                     progress=progress, phase="retry", deadline=deadline)
    if first.gave_up:
        why = f"at learning rate {dcfg.lr:g} {first.gave_up}, so that run stopped; "
    else:
        why = f"the held-out loss never fell below the init's at learning rate {dcfg.lr:g}; "
    if again.skipped:  # the time left was too short: the first run (at the init) stands
        first.retried = why + f"a second run at {lr:g} did not fit the time budget ({again.skipped})"
        return first
    again.seconds += first.seconds
    again.timed = again.timed or first.timed  # the first run's step count followed the clock too
    again.retried = why + f"retried at {lr:g}: " + (f"kept step {again.best_step}" if again.best_step > 0
                                                    else "kept the init")
    return again


def _split_for_pruning(model: nn.Module, max_blocks: int) -> None:
    """Split each GBLR layer's groups into up to ``max_blocks`` lower-rank groups."""
    for name, layer in list(gblr_layers(model).items()):
        per = max_blocks // layer.num_groups
        while per > 1 and layer.rank // per < 1:
            per -= 1
        if per > 1:
            replace_module(model, name, layer.split_groups(layer.num_groups * per))
