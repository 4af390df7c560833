"""The compression pipeline: statistics -> budget split + init -> distill -> recover -> freeze.

``compress`` takes a dense model and calibration batches and returns a frozen student
(every compressed layer a :class:`~gblr_compress.layer.FrozenGBLR`) plus everything the
report needs. It never modifies the model it is given and prints nothing; the CLI draws
progress from the ``progress`` callback.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from gblr_compress.batches import Batch, move_batch, split_batches
from gblr_compress.calib import augment_tokens
from gblr_compress.budget import project_widths_
from gblr_compress.distill import (
    DistillConfig,
    DistillProgress,
    DistillResult,
    agreement,
    distill_,
    gblr_layers,
)
from gblr_compress.errors import InputError
from gblr_compress.freeze import freeze_, recover_
from gblr_compress.init import InitConfig, InitResult, allocate, collect_stats, init_layers_
from gblr_compress.structure import LayerStructure
from gblr_compress.swap import find_linears, replace_module

__all__ = [
    "CompressConfig",
    "CompressResult",
    "Progress",
    "compress",
    "distill_and_recover",
    "split_batches",
]

# progress(phase, done, total, info): phases "moments", "holdout", "sensitivity", "spectra",
# "layers" (init), "distill", "recover" (info: loss, cost, max_cost, heldout).
Progress = Callable[[str, int, int, Mapping[str, float]], None]


@dataclass(frozen=True)
class CompressConfig:
    """What to compress and how hard to try.

    Attributes:
        budget: global fraction of the target layers' dense multiply-adds, in (0, 1].
        steps: distillation steps (0: init + freeze only).
        lr: peak learning rate of the distilled content (U, V, bias).
        structure_lr: peak learning rate of block widths and locations.
        seed: makes the whole run reproducible.
        data_free: initialize from the weights alone (calibration data, when given, is
            still used for distillation and held-out figures).
        max_blocks: most component groups (blocks) per layer; few run fast.
        include: glob patterns of layer names to compress (default: every Linear).
        exclude: glob patterns of layer names to leave dense.
        holdout_fraction: share of the calibration batches held out (never trained on)
            to pick the best state and report agreement.
        recovery_steps: content-only steps after the structure is fixed
            (default: a quarter of ``steps``).
        overcomplete: with distillation, initialize at ``overcomplete * budget`` with each
            layer's rank split over up to ``max_blocks`` groups, and let the proximal
            projection prune to the budget (the structure then has room to move).
            Off by default: the first projection onto the budget cuts every group's
            widths at once, and on all-MiniLM-L6-v2 at budget 0.5 ``overcomplete=1.5``
            ended at 0.811 eval embedding cosine against 0.878 without it.
        augment: share of the inner tokens resampled in augmented copies of token-id
            calibration batches used for distillation (0: none; float inputs are never
            augmented), see :func:`~gblr_compress.calib.augment_tokens`. Held-out
            batches stay real. Copies are made only when ``steps`` is at least 4 times
            the number of fit batches (each would be seen 4+ times).
        augment_copies: most augmented copies of each fit batch (fewer when the steps
            would not draw each batch about twice).
        loss: distillation loss on the model outputs: ``"auto"`` (KL on a single 2-D
            output, taken as classifier logits; normalized MSE otherwise), ``"mse"``
            (use it for 2-D outputs that are embeddings, not logits) or ``"kl"``.
        device: where init and distillation run (``cpu`` or ``cuda``).
    """

    budget: float = 0.3
    steps: int = 100
    lr: float = 1e-3
    structure_lr: float = 1e-2
    seed: int = 0
    data_free: bool = False
    max_blocks: int = 4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    holdout_fraction: float = 0.2
    recovery_steps: int | None = None
    overcomplete: float = 1.0
    augment: float = 0.2
    augment_copies: int = 4
    loss: str = "auto"
    device: str = "cpu"

    @property
    def logits(self) -> bool:
        """Whether held-out agreement may score argmax top-1: ``--loss mse`` says a 2-D
        output is an embedding, where an argmax means nothing."""
        return self.loss != "mse"

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not 0.0 < float(self.budget) <= 1.0:
            raise InputError(f"--budget must be in (0, 1], got {self.budget}")
        if self.steps < 0:
            raise InputError(f"--steps must be >= 0, got {self.steps}")
        if not (self.lr > 0 and self.structure_lr >= 0):
            raise InputError(f"--lr must be > 0, got {self.lr}")
        if self.max_blocks < 1:
            raise InputError(f"--max-blocks must be >= 1, got {self.max_blocks}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise InputError(f"holdout fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.loss not in ("auto", "mse", "kl"):
            raise InputError(f"--loss must be auto, mse or kl, got {self.loss!r}")
        if not 0.0 <= self.augment < 1.0:
            raise InputError(f"--augment must be in [0, 1), got {self.augment}")
        if self.augment_copies < 0:
            raise InputError(f"augment copies must be >= 0, got {self.augment_copies}")
        if not self.overcomplete >= 1.0:
            raise InputError(f"overcomplete must be >= 1, got {self.overcomplete}")
        if self.recovery_steps is not None and self.recovery_steps < 0:
            raise InputError(f"recovery steps must be >= 0, got {self.recovery_steps}")


@dataclass
class CompressResult:
    """Everything a compression run produced.

    Attributes:
        model: the frozen student (compressed layers are FrozenGBLR), eval mode.
        records: the frozen structure of each compressed layer, by dotted name.
        targets: names of all target layers (compressed and skipped).
        init: the initialization record (allocation, per-layer status and errors).
        distill: the distillation record (None when ``steps == 0``).
        recovery: the content-only recovery record (None when skipped).
        quality: held-out teacher-vs-student agreement after each phase
            (``"init"``, ``"distilled"``, ``"frozen"``), see
            :func:`~gblr_compress.distill.agreement`; empty without held-out data.
        seconds: wall time per phase.
        max_cost: exact cost the compressed layers were allowed (skipped layers excluded).
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


def compress(
    model: nn.Module,
    config: CompressConfig = CompressConfig(),
    calib: Sequence[Batch] | None = None,
    progress: Progress | None = None,
) -> CompressResult:
    """Compress the Linear layers of ``model`` to the global budget (the model is not modified).

    Args:
        model: the dense model; its forward takes a tensor, a tuple or a dict of tensors.
        config: budget, steps, layers and the rest (:class:`CompressConfig`).
        calib: calibration batches (each one forward call's input). Without them the
            init is data-free and there is no distillation.
        progress: ``progress(phase, done, total, info)`` callback.

    Returns:
        A :class:`CompressResult` whose ``model`` is the frozen student.

    Example:
        >>> result = compress(model, CompressConfig(budget=0.3, steps=100), calib=batches)
        >>> sum(r.cost for r in result.records.values()) <= result.max_cost
        True
    """
    seconds: dict[str, float] = {}
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    teacher = copy.deepcopy(model).to(device).eval()
    student = copy.deepcopy(model).to(device).eval()
    targets = find_linears(student, config.include or None, config.exclude or None)
    if not targets:
        raise InputError("the model has no Linear layers to compress (check --include/--exclude)")

    fit: list[Batch] = []
    held: list[Batch] = []
    if calib:
        fit, held = split_batches([move_batch(b, device) for b in calib], config.holdout_fraction)

    init_progress = None if progress is None else (lambda stage, i, n: progress(stage, i, n, {}))
    distilling = config.steps > 0 and bool(fit)
    t0 = time.perf_counter()
    init_cfg = InitConfig(
        budget=min(1.0, config.budget * config.overcomplete) if distilling else config.budget,
        max_groups=config.max_blocks,
        data_free=config.data_free or not fit,
        seed=config.seed,
    )
    # Statistics of the dense layers -> the budget split -> each layer searched and swapped.
    stats = collect_stats(student, init_cfg, fit or None, held or None, targets, init_progress)
    allocation = allocate(stats, init_cfg)
    init = init_layers_(student, init_cfg, stats, allocation, init_progress)
    dense_total = sum(rec.dense_cost for rec in init.layers.values())
    skipped_dense = sum(r.dense_cost for r in init.layers.values() if r.status == "skipped")
    max_cost = math.floor(config.budget * dense_total) - skipped_dense
    if max_cost < 0:  # only possible when over-complete init kept too many layers dense
        raise InputError(f"budget {config.budget} is too small for the layers left dense")
    if distilling and config.overcomplete > 1.0:
        _split_for_pruning(student, config.max_blocks)
    project_widths_(list(gblr_layers(student).values()), max_cost)
    seconds["init"] = time.perf_counter() - t0
    quality: dict[str, dict[str, float]] = {}
    if held:
        quality["init"] = agreement(student.eval(), teacher, held, config.logits)

    distilled = recovery = None
    compressed = [n for n, rec in init.layers.items() if rec.status != "skipped"]
    if distilling and compressed:
        distilled, recovery = distill_and_recover(
            student, teacher, fit, held, max_cost, config, progress, seconds, quality
        )

    t0 = time.perf_counter()
    records = freeze_(student)
    student.eval()
    seconds["freeze"] = time.perf_counter() - t0
    if held:
        quality["frozen"] = agreement(student, teacher, held, config.logits)
    cost = sum(r.cost for r in records.values())
    if cost > max_cost:  # the projection guarantees this; a breach is a bug, not bad input
        raise RuntimeError(f"frozen cost {cost} exceeds the budget's {max_cost}")
    return CompressResult(student, records, targets, init, distilled, recovery, quality,
                          seconds, max_cost)


def _copies(config: CompressConfig, fit_batches: int) -> int:
    """Augmented copies per fit batch: only when data is scarce, i.e. when the steps
    would draw each real batch 4 times or more, and then no more than keeps every batch
    (real or copy) drawn about twice, so the cached teacher outputs still get reused.
    Copies only widen what is trained on; the best state is still picked on the real
    held-out batches."""
    if fit_batches == 0:
        return 0
    return max(0, min(config.augment_copies, config.steps // (2 * fit_batches) - 1))


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
) -> tuple[DistillResult, DistillResult | None]:
    """The distillation phases of :func:`compress` on a student whose target layers are
    GBLRLinear: ``config.steps`` proximal distillation steps, then the content-only
    recovery, both on ``fit`` plus its augmented copies (``config.augment``).
    ``config.structure_lr=0`` keeps the structure fixed throughout.

    Args:
        student: trained in place; left with GBLRLinear layers (not frozen).
        teacher: the dense model.
        fit: batches trained on; ``held``: held-out batches (may be empty).
        max_cost: exact cost the GBLR layers share.
        config: steps, learning rates, seed, loss and recovery steps.
        progress: ``progress(phase, done, total, info)`` with phases ``"distill"``,
            ``"recover"``.
        seconds: wall time per phase is added here when given.
        quality: held-out agreement after distillation (``"distilled"``) is added here
            when given and there are held-out batches.

    Returns:
        ``(distillation record, recovery record or None when it has no steps)``.
    """
    seconds = {} if seconds is None else seconds
    t0 = time.perf_counter()
    fit = list(fit) + augment_tokens(fit, config.augment, _copies(config, len(fit)), config.seed)
    dcfg = DistillConfig(steps=config.steps, lr=config.lr, structure_lr=config.structure_lr,
                         seed=config.seed, loss=config.loss)
    distilled = distill_(student, teacher, fit, max_cost, dcfg, holdout=held,
                         progress=_relay_steps("distill", progress))
    seconds["distill"] = time.perf_counter() - t0
    if held and quality is not None:
        quality["distilled"] = agreement(student.eval(), teacher, held, config.logits)
    recovery = None
    rsteps = config.steps // 4 if config.recovery_steps is None else config.recovery_steps
    if rsteps > 0:
        t0 = time.perf_counter()
        rcfg = DistillConfig(steps=rsteps, lr=config.lr * 0.3, seed=config.seed + 1, loss=config.loss,
                             eval_every=max(1, min(20, rsteps)))
        recovery = recover_(student, teacher, fit, max_cost, rcfg, holdout=held,
                            progress=_relay_steps("recover", progress))
        seconds["recover"] = time.perf_counter() - t0
    return distilled, recovery


def _split_for_pruning(model: nn.Module, max_blocks: int) -> None:
    """Split each GBLR layer's groups into up to ``max_blocks`` lower-rank groups."""
    for name, layer in list(gblr_layers(model).items()):
        per = max_blocks // layer.num_groups
        while per > 1 and layer.rank // per < 1:
            per -= 1
        if per > 1:
            replace_module(model, name, layer.split_groups(layer.num_groups * per))


def _relay_steps(phase: str, progress: Progress | None) -> Callable[[DistillProgress], None] | None:
    if progress is None:
        return None

    def relay(p: DistillProgress) -> None:
        info = {"loss": p.loss, "cost": p.cost, "max_cost": p.max_cost}
        if p.heldout is not None:
            info["heldout"] = p.heldout
        progress(phase, p.step, p.steps, info)

    return relay
