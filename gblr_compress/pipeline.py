"""The compression pipeline: init -> distill -> recover -> freeze, then export + report.

``compress`` takes a dense model and calibration batches and returns a frozen student
(every compressed layer a :class:`~gblr_compress.layer.FrozenGBLR`) plus everything the
report needs. It never modifies the model it is given and prints nothing; the CLI draws
progress from the ``progress`` callback.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from gblr_compress.calib import Batch, augment_tokens, move_batch
from gblr_compress.checkpoint import (
    LoadedModel,
    check_inputs_fit,
    load_calib,
    load_model,
    parse_input_spec,
    synthetic_inputs,
    vocab_hint,
)
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
from gblr_compress.export import ExportResult, export_onnx
from gblr_compress.freeze import freeze_, recover_
from gblr_compress.init import InitConfig, InitResult, allocate, collect_stats, init_layers_
from gblr_compress.report import CompressionReport, LayerReport, report_to_dict, write_report
from gblr_compress.structure import LayerStructure
from gblr_compress.swap import find_linears, replace_module

__all__ = [
    "CompressConfig",
    "CompressResult",
    "Job",
    "JobResult",
    "Progress",
    "build_report",
    "compress",
    "default_report_path",
    "distill_and_recover",
    "run_job",
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


def _leading_size(batch: Batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    sizes = {v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim()}
    return sizes.pop() if len(sizes) == 1 else 1


def _chunk(batch: Batch, lo: int, hi: int) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    if isinstance(batch, Mapping):
        return {k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in batch.items()}
    return type(batch)(v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() else v for v in batch)


def split_batches(
    batches: Sequence[Batch], fraction: float, min_batches: int = 8
) -> tuple[list[Batch], list[Batch]]:
    """Split calibration batches into (fit, holdout).

    Few large batches (e.g. one tensor of 1000 samples) are first cut along their
    leading axis into at least ``min_batches`` pieces, so both parts get data and the
    distillation gets several steps' worth of distinct batches. The held-out part is the
    last ``ceil(fraction * count)`` batches (none when ``fraction`` is 0 or only one
    batch exists).
    """
    batches = list(batches)
    if 0 < len(batches) < min_batches:
        pieces: list[Batch] = []
        per = math.ceil(min_batches / len(batches))
        for b in batches:
            size = _leading_size(b)
            step = max(1, math.ceil(size / per))
            pieces.extend(_chunk(b, lo, min(lo + step, size)) for lo in range(0, size, step))
        batches = pieces
    held = math.ceil(fraction * len(batches)) if fraction > 0 and len(batches) > 1 else 0
    return batches[: len(batches) - held], batches[len(batches) - held :]


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


# ====================================================================== file job
@dataclass(frozen=True)
class Job:
    """One run of the product: a checkpoint in, an ONNX file and a report out.

    Attributes:
        model: checkpoint path (see :func:`gblr_compress.checkpoint.load_model`).
        output: the ``.onnx`` path to write.
        factory: ``package.module:function`` building the architecture for a
            state_dict / safetensors checkpoint (the safe path: nothing is unpickled).
        calib: calibration file (``.pt`` / ``.npz``); else the bundle's, else synthetic.
        input_spec: e.g. ``input_ids:int64[8,128],attention_mask:int64[8,128]``, for
            synthetic inputs when there is no calibration data.
        report: report path (default: next to the output, ``<stem>.report.json``).
        opset: ONNX opset.
        verify: compare the ONNX model with the PyTorch student in onnxruntime.
        synthetic_batches: how many synthetic batches to make without real data.
        config: the compression settings.
    """

    model: str
    output: str
    factory: str | None = None
    calib: str | None = None
    input_spec: str | None = None
    report: str | None = None
    opset: int = 18
    verify: bool = True
    synthetic_batches: int = 16
    config: CompressConfig = CompressConfig()


@dataclass
class JobResult:
    """What :func:`run_job` wrote and measured."""

    report: CompressionReport
    compress: CompressResult
    export: ExportResult
    report_path: Path
    warnings: list[str] = field(default_factory=list)


def default_report_path(output: str | Path) -> Path:
    """``model.onnx`` -> ``model.report.json`` in the same folder."""
    out = Path(output)
    return out.with_name(out.stem + ".report.json")


def _check_output(path: Path, inputs: Sequence[str | None]) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder is not writable: {parent}")
    if path.is_dir():
        raise InputError(f"output path is a folder: {path}")
    for given in inputs:
        if given and Path(given).resolve() == path.resolve():
            raise InputError(f"output would overwrite an input file: {path}")


def _calibration(job: Job, loaded: LoadedModel, warnings: list[str]) -> tuple[list[Batch], bool]:
    """Calibration batches and whether they are synthetic."""
    if job.calib:
        return load_calib(job.calib), False
    if loaded.calib:
        return list(loaded.calib), False
    if job.input_spec:
        spec = parse_input_spec(job.input_spec)
    elif loaded.example_inputs is not None:
        spec = _spec_like(loaded.example_inputs)
    else:
        raise InputError(
            "no inputs to run the model on: give --calib FILE, --input-spec SPEC, "
            "or a bundle with example_inputs"
        )
    warnings.append(
        "no calibration data: using synthetic inputs; real data (--calib) gives much better results"
    )
    batches = synthetic_inputs(spec, job.synthetic_batches, job.config.seed, vocab_hint(loaded.model))
    return batches, True


def _spec_like(batch: Batch) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    if isinstance(batch, torch.Tensor):
        return {"0": (batch.dtype, tuple(batch.shape))}
    if isinstance(batch, Mapping):
        return {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()}
    return {str(i): (v.dtype, tuple(v.shape)) for i, v in enumerate(batch)}


def _layer_reports(result: CompressResult, exported: ExportResult | None) -> list[LayerReport]:
    forms = {} if exported is None else {le.name: le for le in exported.layers}
    layers = []
    for name in result.targets:
        rec = result.init.layers[name]
        frozen = result.records.get(name)
        le = forms.get(name)
        layers.append(
            LayerReport(
                name=name,
                in_features=rec.in_features,
                out_features=rec.out_features,
                status="compressed" if frozen is not None else "skipped",
                reason=rec.reason or ("window search kept" if rec.status == "gblr" else ""),
                dense_cost=rec.dense_cost,
                allocated_cost=rec.allocated_cost,
                structure=None if frozen is None else frozen.to_dict(),
                init_kind=rec.status,
                calib_error=rec.calib_error,
                heldout_error=rec.heldout_error,
                baseline_heldout_error=rec.baseline_heldout_error,
                export_form=None if le is None else le.form,
                export_params=None if le is None else le.params,
                sensitivity=rec.sensitivity,
            )
        )
    return layers


def build_report(
    job: Job,
    loaded: LoadedModel,
    result: CompressResult,
    exported: ExportResult | None,
    seconds: Mapping[str, float],
    synthetic: bool,
    calib_batches: int,
) -> CompressionReport:
    """The :class:`~gblr_compress.report.CompressionReport` of a finished run."""
    cfg = job.config
    settings = {
        "budget": cfg.budget, "steps": cfg.steps, "lr": cfg.lr, "structure_lr": cfg.structure_lr,
        "seed": cfg.seed, "data_free": cfg.data_free, "max_blocks": cfg.max_blocks,
        "include": list(cfg.include), "exclude": list(cfg.exclude),
        "holdout_fraction": cfg.holdout_fraction, "augment": cfg.augment,
        "augment_copies": cfg.augment_copies, "loss": cfg.loss, "opset": job.opset, "verify": job.verify,
        "device": cfg.device,
    }
    parity = None
    if exported is not None and exported.max_abs_diff is not None:
        parity = {"max_abs_diff": exported.max_abs_diff, "tolerance": exported.tolerance, "ok": bool(exported.ort_ok)}
    return CompressionReport(
        source={
            "model": str(job.model), "format": loaded.source_format, "calib": job.calib,
            "calib_batches": calib_batches, "synthetic_calib": synthetic,
        },
        settings=settings,
        layers=_layer_reports(result, exported),
        quality=result.quality,
        parity=parity,
        seconds=dict(seconds),
        outputs={"onnx": str(job.output), "report": str(job.report or default_report_path(job.output))},
        model_params={
            "dense": sum(p.numel() for p in loaded.model.parameters()),
            "compressed": sum(p.numel() for p in result.model.parameters()),
        },
    )


def run_job(job: Job, progress: Progress | None = None) -> JobResult:
    """Load, compress, export, verify and report: the whole product as one call.

    Outputs are written atomically; when a later step fails, files this run wrote are
    removed, so a failure never leaves a model without its report. The input files are
    only read.

    Raises:
        InputError: anything the user can fix (paths, formats, data that does not fit).
        VerificationError: the ONNX model does not match the PyTorch student.
    """
    t_start = time.perf_counter()
    out = Path(job.output)
    report_path = Path(job.report) if job.report else default_report_path(out)
    _check_output(out, [job.model, job.calib])
    _check_output(report_path, [job.model, job.calib, job.output])
    seconds: dict[str, float] = {}
    warnings: list[str] = []

    t0 = time.perf_counter()
    loaded = load_model(job.model, job.factory)
    calib, synthetic = _calibration(job, loaded, warnings)
    if not calib:
        raise InputError("the calibration data holds no batches")
    check_inputs_fit(loaded.model, calib[0])
    example = loaded.example_inputs if loaded.example_inputs is not None else calib[0]
    seconds["load"] = time.perf_counter() - t0

    result = compress(loaded.model, job.config, calib, progress)
    seconds.update(result.seconds)

    def final_report(exported: ExportResult) -> dict[str, str]:
        seconds["export"] = time.perf_counter() - t_export
        seconds["total"] = time.perf_counter() - t_start
        rep = build_report(job, loaded, result, exported, seconds, synthetic, len(calib))
        holder["report"] = rep
        return {"gblr.report": json.dumps(report_to_dict(rep))}

    holder: dict[str, CompressionReport] = {}
    t_export = time.perf_counter()
    if progress is not None:
        progress("export", 0, 1, {})
    exported = export_onnx(result.model, example, out, opset=job.opset, verify=job.verify,
                           metadata_after=final_report)
    if progress is not None:
        progress("export", 1, 1, {})
    try:
        write_report(holder["report"], report_path)
    except BaseException:
        out.unlink(missing_ok=True)  # never leave a model without its report
        raise
    return JobResult(holder["report"], result, exported, report_path, warnings)
