"""The product's job: load -> compress -> export -> verify -> report -> save.

:func:`run_job` is what the ``gblr-compress`` command runs: files in, an ONNX file and a
report out. The compression itself is :func:`gblr_compress.pipeline.compress`; this
module adds everything around it that touches files: loading the checkpoint and the
calibration data, the export and its verification, the report, and writing both
outputs atomically (a failure leaves neither).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from gblr_compress.text import TextTokenizer

from gblr_compress.batches import Batch, flatten_outputs, graph_outputs, leading_size, positions, split_batches
from gblr_compress.calibration import calibration_batches, check_inputs_fit, load_calib
from gblr_compress.checkpoint import LoadedModel, load_model
from gblr_compress.deploy import Bench, int8_check, timer
from gblr_compress.distill import agreement
from gblr_compress.errors import FidelityError, InputError
from gblr_compress.export import (
    ExportResult,
    LayerExport,
    OnnxGraph,
    Parity,
    VerificationError,
    build_onnx,
    save_onnx,
    verify_graph,
)
from gblr_compress.export.half import EXPORT_DTYPES, HALF_TOLERANCE, export_dtype_for, to_float16
from gblr_compress.export.measure import onnx_fidelity
from gblr_compress.export.quantize import copy_with_metadata
from gblr_compress.export.trace import ModelCall
from gblr_compress.layer import FrozenGBLR
from gblr_compress.memory import (
    MemoryEstimate,
    available_bytes,
    estimate_bytes,
    gib,
    peak_rss_bytes,
    reset_peak,
    statistics_bytes,
)
from gblr_compress.numerics import (
    batches_to_float32,
    check_declared_size,
    check_finite_batches,
    check_finite_model,
    check_finite_outputs,
    to_float32,
)
from gblr_compress.pipeline import CompressConfig, CompressResult, compress
from gblr_compress.pooling import transformer_folder
from gblr_compress.progress import Progress, ProgressEvent
from gblr_compress.report import REPORT_METADATA_KEY, CompressionReport, LayerReport, report_to_dict, write_report
from gblr_compress.swap import find_linears, linear_shape

__all__ = [
    "Job",
    "JobInputs",
    "JobResult",
    "build_report",
    "candidate_cost",
    "default_report_path",
    "deploy_bench",
    "load_inputs",
    "run_job",
    "write_outputs",
]


# The share of each reordered copy's words drawn from the tokenizer's vocabulary
# (Job.vocab_share); off by default. all-MiniLM-L6-v2 kept more with 0.5 at every budget
# from both sources measured (0.3, 0.5 and 1.0 all beat 0 at budget 0.8), but
# all-mpnet-base-v2 at budget 0.8 from 256 hand-written sentences lost news cosine
# 0.780 -> 0.702 with 0.5 (benchmarks/README.md, "vocabulary words in the copies"):
# a default that costs a second model 0.08 waits until that is understood.
VOCAB_SHARE = 0.0
# Whether every second reordered copy is dealt into texts of varied lengths
# (Job.copy_lengths, gblr_compress.text.copy_varies): "auto" does for files of short
# texts, where it gained, and not for long ones, where it lost (see copy_varies).
COPY_LENGTHS = "auto"
# The auto rule of Job.general_text: the package's general English sentences fill the
# training texts up to this many. Measured on the pickled MiniLM wrapper from 256
# hand-written sentences (a file of templates), news cosine: 0.959 -> 0.967 at budget
# 0.8, 0.868 -> 0.893 at 0.5, 0.802 -> 0.845 at 0.3 (in the distillation only, ninth
# session); all-mpnet-base-v2 at 0.8 0.867 -> 0.925 in the statistics and the
# distillation (benchmarks/README.md, "general English sentences", "pruned heads").
GENERAL_FILL = 2000


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
        calib_text: calibration texts (``.txt``: one per line; ``.jsonl``: a ``text``
            field per line), tokenized with ``tokenizer`` (see :mod:`gblr_compress.text`).
        tokenizer: folder holding the tokenizer (default: the model folder itself, or the
            tokenizer a pickled model carries, :func:`~gblr_compress.text.carried_tokenizer`).
        max_length: tokens per text row (truncation; packed row length for causal LMs).
        batch_size: rows per calibration batch made from text (None: 32, or 8 for a
            causal LM, see :func:`~gblr_compress.text.text_batches`).
        max_memory_gb: the memory the run may use (default: what the machine has
            available); a run estimated to need more is refused before the work.
        trust_checkpoint: the user trusts a pickled checkpoint (a whole module or a
            bundle): its load warns that it runs code from the file unless this is set.
        min_fidelity: the least held-out cosine between the compressed and the dense
            model's outputs (the report's ``quality.frozen.cosine``) that may be
            written; below it (or when ORT parity fails) :class:`FidelityError` is
            raised and nothing is written.
        force: write the outputs even when the fidelity gate or ORT parity fails; the
            report's ``gate`` says so.
        quantize: ``"int8"``: the written file is the compressed graph quantized by
            onnxruntime's dynamic int8 quantization (see :mod:`gblr_compress.deploy`);
            None: float.
        int8_tolerance: the most held-out mean cosine the int8 file may lose against
            the float file (int8 cannot match the float graph to ``1e-4``).
        export_dtype: the written file's float type: ``"float32"`` (default),
            ``"float16"``, or ``"checkpoint"`` (the checkpoint's own: float16 for a
            float16 checkpoint, float32 otherwise; bfloat16 is refused). The work is
            float32 either way; see :mod:`gblr_compress.export.half`.
        timing_rounds: interleaved onnxruntime rounds timing the candidates.
        heldout: held-out data (``.pt`` / ``.npz`` like ``calib``, or ``.txt`` /
            ``.jsonl`` texts tokenized like ``calib_text``): what every held-out figure
            is measured on (the init's choice of forms, the distillation's best state,
            the report's quality, ``min_fidelity``, the ``--target-fidelity`` search),
            instead of the last ``holdout_fraction`` of the calibration batches; every
            calibration batch then trains. Text from the source the model will serve,
            unlike the calibration text, makes those figures say what users will see.
        shift_probe: with ``calib_text`` and no ``heldout``, also measure each
            ``--target-fidelity`` candidate on the shift probe (the held-out texts'
            words reordered across texts, :func:`~gblr_compress.text.reorder_words`)
            and decide on the lower of the two cosines.
        reorder_copies: with ``calib_text``, copies of the texts the run trains on
            (those outside the held-out share), each with the words reordered across
            texts (:func:`~gblr_compress.text.reorder_words`, a seed per copy), added to
            the training batches only (statistics and distillation; never held out).
            None (auto): as many copies, up to 2, as keep the training texts within
            :data:`REORDER_TEXTS` (2 below 334 training texts, 1 up to 500, none above),
            and none for a causal LM (unmeasured there). Measured on all-MiniLM-L6-v2 from 256
            templated sentences: text unlike them kept more (README.md, "Reordered
            copies").
        vocab_share: the share of each reordered copy's words replaced by words drawn
            from the tokenizer's vocabulary (:func:`~gblr_compress.text.mix_vocabulary`);
            0 keeps the calibration text's words.
        copy_lengths: ``"varied"``: every second reordered copy is dealt into texts of
            4-60 words (:func:`~gblr_compress.text.varied_counts`), so the statistics
            see lengths the file lacks; ``"auto"``: so when the training texts average
            fewer than :data:`~gblr_compress.text.SHORT_WORDS` (15.5) words; ``"same"``:
            every copy keeps the file's lengths.
        general_text: with ``calib_text``, how many of the package's general English
            sentences (:func:`~gblr_compress.text.general_texts`, WordNet usage
            examples) train beside the file's texts, in the init's statistics and the
            distillation, never held out (all-mpnet-base-v2 at 0.8 kept news cosine
            0.925 with them in the statistics, 0.899 in the distillation only, once
            pruned heads were checked on held-out outputs). None (auto): as many as
            bring the training texts to :data:`GENERAL_FILL` (none from that many on),
            none for a causal LM (unmeasured there) and none when fewer than half of
            the training texts hold a common English word
            (:func:`~gblr_compress.text.looks_english`). 0: off, for a model that
            serves text unlike English sentences.
        keep_calib_tokens: use ``calib``'s token batches as given. Off (the default), an
            encoder's token batches are decoded to text with the tokenizer that
            ``calib_text`` would use (found without ``tokenizer`` too: carried by the
            model, or that of the folder or cached Hub model its HuggingFace model was
            loaded from) and calibrate as ``calib_text`` does, with reordered copies and
            general English sentences beside them (:func:`_decoded_calibration`).
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
    calib_text: str | None = None
    tokenizer: str | None = None
    max_length: int = 128
    batch_size: int | None = None
    max_memory_gb: float | None = None
    trust_checkpoint: bool = False
    min_fidelity: float | None = None
    force: bool = False
    quantize: str | None = None
    int8_tolerance: float = 0.02
    export_dtype: str = "float32"
    timing_rounds: int = 9
    heldout: str | None = None
    shift_probe: bool = True
    reorder_copies: int | None = None
    vocab_share: float = VOCAB_SHARE
    copy_lengths: str = COPY_LENGTHS
    general_text: int | None = None
    keep_calib_tokens: bool = False
    config: CompressConfig = field(default_factory=CompressConfig)


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


def _layer_reports(
    result: CompressResult, exported: Sequence[LayerExport], shapes: Mapping[str, tuple[int, int]]
) -> list[LayerReport]:
    forms = {le.name: le for le in exported}
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
                note=rec.note,
            )
        )
    for name, reason in result.left_dense.items():
        m, n = shapes[name]
        layers.append(LayerReport(name=name, in_features=n, out_features=m, status="excluded",
                                  reason=reason, dense_cost=m * n, init_kind="skipped"))
    return layers


def _shapes(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of the named Linear-like layers."""
    modules = dict(model.named_modules())
    return {n: linear_shape(modules[n]) for n in names}


class _PhasePeaks:
    """Passes progress events on, and records the resident-set peak of each phase: the
    high-water mark is read and reset when the next phase's first event arrives."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.peak: dict[str, int] = {}
        self.phase: str | None = None
        reset_peak()

    def close(self, name: str | None = None) -> None:
        """End the running phase; ``name`` labels work done outside any event phase
        (loading). Work after a phase's last event (freezing after the recovery) counts
        in that phase."""
        label = self.phase or name
        if label is not None:
            self.peak[label] = max(self.peak.get(label, 0), peak_rss_bytes())
        self.phase = None
        reset_peak()

    def __call__(self, event: ProgressEvent) -> None:
        if event.phase != self.phase:
            self.close()
            self.phase = event.phase
        if self.progress is not None:
            self.progress(event)


def _disable_kv_cache(model: nn.Module) -> None:
    """Turn off the KV cache of HuggingFace models inside ``model`` (in memory only)."""
    for mod in model.modules():
        config = getattr(mod, "config", None)
        if getattr(config, "use_cache", False):  # only HF configs carry the flag
            config.use_cache = False


# The auto rule of Job.reorder_copies: copies while the training texts stay within this
# many. A copy costs what its texts cost in the statistics and the distillation; the
# gains were measured on 256-sentence files, and 2,000 real sentences kept news cosine
# 0.90 at budget 0.5 without copies, so large files keep their run time.
REORDER_TEXTS = 1000
REORDER_MAX_COPIES = 2


@dataclass
class TextData:
    """What :func:`_text_calibration` makes of a text file."""

    batches: list[Batch]
    probe: list[Batch] | None = None  # the shift probe (Job.shift_probe)
    extra: list[Batch] = field(default_factory=list)  # reordered copies (Job.reorder_copies)
    copies: int = 0
    varied: int = 0  # of which dealt into varied lengths (Job.copy_lengths)
    texts: int = 0  # texts in the file
    general: list[Batch] = field(default_factory=list)  # general English sentences (Job.general_text)
    general_texts: int = 0  # how many made those batches


# Fewer calibration texts than this get a warning: all-MiniLM-L6-v2 at budget 0.5 kept
# mean cosine 0.778 / 0.861 / 0.879 from 64 / 128 / 256 sentences (benchmarks/minilm_data.py).
FEW_TEXTS = 128


def shift_probing(job: Job) -> bool:
    """Whether a ``--target-fidelity`` search of ``job`` decides on the shift probe too
    (:attr:`Job.shift_probe`): text calibration whose held-out share is its own."""
    return bool(job.shift_probe and job.calib_text and not job.heldout and job.config.holdout_fraction > 0)


def reorder_copy_count(requested: int | None, fit_texts: int, causal: bool) -> int:
    """How many reordered copies of ``fit_texts`` training texts a run adds:
    ``requested`` (:attr:`Job.reorder_copies`), or the auto rule when it is None."""
    if requested is not None:
        return requested
    if causal or fit_texts == 0:
        return 0
    return max(0, min(REORDER_MAX_COPIES, REORDER_TEXTS // fit_texts - 1))


def general_text_count(requested: int | None, fit: Sequence[str], causal: bool) -> int:
    """How many of the package's general English sentences a run training on the texts
    ``fit`` adds: ``requested`` (:attr:`Job.general_text`), or the auto rule when it is
    None (none for a causal LM, nor for texts that do not look English)."""
    if requested is not None:
        return requested
    from gblr_compress.text import GENERAL_TEXTS, looks_english

    if causal or not looks_english(fit):
        return 0
    return max(0, min(GENERAL_TEXTS, GENERAL_FILL - len(fit)))


def split_texts(texts: Sequence[str], batches: Sequence[Batch], holdout_fraction: float,
                sources: Sequence[int] | None) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): the texts behind the batches
    :func:`~gblr_compress.pipeline.prepare` trains on and holds out when it holds out
    the last ``holdout_fraction`` of ``batches``, made from ``texts``. ``sources``: each
    row's text (:func:`~gblr_compress.text.text_row_sources`) for unpacked rows; None
    for packed rows, split in proportion (they follow the file's order)."""
    rows = sum(leading_size(b) for b in batches)
    held_rows = sum(leading_size(b) for b in split_batches(batches, holdout_fraction)[1])
    if sources is not None:
        held = set(sources[len(sources) - held_rows:]) if held_rows else set()
        return [t for i, t in enumerate(texts) if i not in held], [texts[i] for i in sorted(held)]
    cut = len(texts) - math.ceil(len(texts) * held_rows / max(1, rows))
    return list(texts[:cut]), list(texts[cut:])


def _text_tokenizer(job: Job, loaded: LoadedModel) -> TextTokenizer | None:
    """The tokenizer that text calibration uses: ``--tokenizer``, else the model
    folder's, else one the pickled model carries, else the one of the local folder or
    cached Hub model a HuggingFace model inside it was loaded from
    (:func:`~gblr_compress.text.named_tokenizer`); None when there is none."""
    from gblr_compress.text import carried_tokenizer, load_tokenizer, named_tokenizer

    if job.tokenizer is not None:
        return load_tokenizer(job.tokenizer)
    if Path(job.model).is_dir():
        # A sentence-transformers folder may keep its base model and tokenizer in a
        # subfolder (``0_Transformer``), as older ones do.
        return load_tokenizer(transformer_folder(Path(job.model)))
    # A pickled model may carry its tokenizer (sentence-transformers does).
    return carried_tokenizer(loaded.model) or named_tokenizer(loaded.model)


@dataclass
class DecodedCalibration:
    """``--calib``'s token batches as texts (:func:`_decoded_calibration`)."""

    texts: list[str]
    tokenizer: TextTokenizer  # the one that decoded them, and tokenizes them again
    note: str  # the report's note saying so


def _decoded_calibration(job: Job, loaded: LoadedModel, batches: Sequence[Batch]) -> DecodedCalibration | None:
    """``--calib``'s token batches (``batches``, read once by the caller) as texts, when
    they can be calibrated on as ``--calib-text`` would be: an encoder (not a causal LM),
    token batches (``input_ids``), a tokenizer found (:func:`_text_tokenizer`) whose
    vocabulary holds every id, and ``job.keep_calib_tokens`` off. None otherwise: the
    batches are used as given.

    Text calibration adds what the batches alone lack: reordered copies of the training
    texts and general English sentences beside them. The MiniLM sentence-embedding
    wrapper from 256 hand-written sentences as 8 token batches kept news / Wikipedia
    cosine 0.951 / 0.953 at budget 0.8 and 0.864 / 0.862 at 0.5 on the batches as
    given, 0.966 / 0.971 and 0.902 / 0.908 decoded (benchmarks/token_calib.py)."""
    from gblr_compress.text import decode_token_batches, is_causal_lm

    if job.keep_calib_tokens or is_causal_lm(loaded.model):
        return None
    if not any(isinstance(b, dict) and "input_ids" in b for b in batches):
        return None
    try:
        tokenizer = _text_tokenizer(job, loaded)
    except InputError:  # --tokenizer or the model folder without a usable one: use the tokens
        tokenizer = None
    texts = None if tokenizer is None else decode_token_batches(batches, tokenizer)
    if texts is None:
        return None
    note = (f"--calib's token batches were decoded to {len(texts)} texts with the tokenizer from "
            f"{tokenizer.source} and calibrate as --calib-text would (reordered copies, general English "
            "sentences); --keep-calib-tokens uses the batches as given")
    return DecodedCalibration(texts, tokenizer, note)


def _text_calibration(job: Job, loaded: LoadedModel, path: str | None = None,
                      option: str = "--calib-text", probe: bool = False, copies: bool = False,
                      decoded: DecodedCalibration | None = None) -> TextData:
    """Batches tokenized from ``decoded``'s texts with its tokenizer, else from ``path``
    (default: ``job.calib_text``) with :func:`_text_tokenizer`'s; with ``probe`` the
    shift probe's batches: the words of the texts in the held-out batches, reordered
    (None when they make no batch); with ``copies`` the reordered copies of the texts
    the run trains on (:func:`split_texts`), a ``job.vocab_share`` of their words drawn
    from the tokenizer's vocabulary, every second one at varied lengths as
    ``job.copy_lengths`` says (:func:`~gblr_compress.text.copy_varies`)."""
    from gblr_compress.text import (
        general_texts,
        is_causal_lm,
        read_texts,
        reorder_words,
        run_copy,
        text_batches,
        text_row_sources,
    )

    if decoded is not None:
        texts, tokenizer = decoded.texts, decoded.tokenizer
    else:
        texts, tokenizer = read_texts(job.calib_text if path is None else path), _text_tokenizer(job, loaded)
    if tokenizer is None:
        raise InputError(f"{option} needs the model's tokenizer: give --tokenizer DIR "
                         "(a HuggingFace folder holding it)")

    def batches_of(some: Sequence[str]) -> list[Batch]:
        return text_batches(some, tokenizer, loaded.model, job.max_length, job.batch_size)

    data = TextData(batches_of(texts), texts=len(texts))
    if not (probe or copies):
        return data
    causal = is_causal_lm(loaded.model)
    fit, held = list(texts), []
    if not job.heldout and job.config.holdout_fraction > 0:  # the held-out share is the file's own
        sources = None if causal else text_row_sources(texts, tokenizer, job.max_length, job.batch_size)
        fit, held = split_texts(texts, data.batches, job.config.holdout_fraction, sources)
    if probe and held:
        try:
            data.probe = batches_of(reorder_words(held, job.config.seed))
        except InputError:  # too few words for one packed row: no probe
            data.probe = None
    if copies:
        for k in range(reorder_copy_count(job.reorder_copies, len(fit), causal)):
            copy, varied = run_copy(fit, tokenizer.words, job.vocab_share, job.config.seed, k, job.copy_lengths)
            try:
                data.extra += batches_of(copy)
            except InputError:  # too few words for one packed row
                break
            data.copies += 1
            data.varied += varied
        general = general_texts(general_text_count(job.general_text, fit, causal), job.config.seed)
        if general:
            try:
                data.general = batches_of(general)
            except InputError:  # too few words for one packed row
                pass
            else:
                data.general_texts = len(general)
    return data


def _heldout_batches(job: Job, loaded: LoadedModel) -> list[Batch]:
    """The batches of ``job.heldout``: texts tokenized like the calibration text, or a
    ``.pt`` / ``.npz`` file read like ``--calib``."""
    from gblr_compress.text import TEXT_SUFFIXES  # text.py needs no transformers to import

    assert job.heldout is not None
    if Path(job.heldout).suffix.lower() in TEXT_SUFFIXES:
        held = _text_calibration(job, loaded, job.heldout, "--heldout").batches
    else:
        held = load_calib(job.heldout)
    if not held:
        raise InputError("the held-out data (--heldout) holds no batches")
    return held


def held_batches(job: Job, inputs: JobInputs) -> list[Batch]:
    """The batches every held-out figure is measured on: ``--heldout``'s, else the last
    ``holdout_fraction`` of the calibration batches (the split
    :func:`~gblr_compress.pipeline.prepare` makes)."""
    if inputs.held is not None:
        return list(inputs.held)
    return split_batches(inputs.calib, job.config.holdout_fraction)[1]


def _memory_limit(job: Job) -> int | None:
    """Bytes the run may use: ``job.max_memory_gb``, else what the machine has available."""
    return available_bytes() if job.max_memory_gb is None else int(job.max_memory_gb * 2**30)


def _check_memory(
    job: Job, model: nn.Module, calib: Sequence[Batch], outputs: object, search: bool = False
) -> tuple[MemoryEstimate, int | None]:
    """Estimate the run's peak and refuse it (one line, exit 2) when it cannot fit.
    ``search``: a ``--target-fidelity`` search, which keeps the init's statistics while
    it builds each candidate."""
    targets = find_linears(model, job.config.include or None, job.config.exclude or None)
    modules = dict(model.named_modules())
    param_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    weights = [modules[n].weight for n in targets]
    target_bytes = sum(w.numel() * 4 for w in weights)  # factors train in float32
    widths = sum(sum(w.shape) for w in weights)
    biggest = max(calib, key=positions)
    tokens = positions(biggest)
    out_bytes = sum(t.numel() * 4 for t in flatten_outputs(outputs))
    distilling = job.config.distill.steps > 0
    data_free = job.config.init.data_free
    held_out = job.heldout is not None or job.config.holdout_fraction > 0
    # The init builds as many layers at once as torch has threads (init_layers_); the
    # CPUs this process may use bound that without starting torch's thread pool here.
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                  len(weights))
    stats = 0 if data_free else statistics_bytes([w.shape[1] for w in weights], held_out, workers)
    estimate = estimate_bytes(param_bytes, target_bytes, tokens, widths, out_bytes,
                              int(job.config.distill.teacher_cache_mb * 2**20), distilling, peak_rss_bytes(),
                              int(job.config.distill.activation_mb * 2**20), leading_size(biggest),
                              statistics=stats, statistics_kept=search)
    limit = _memory_limit(job)
    if limit is not None and estimate.total > limit:
        raise InputError(
            f"this run needs about {gib(estimate.total)} ({estimate.describe()}) but "
            f"{gib(limit)} is available: lower --teacher-cache-mb or --batch-size, --exclude "
            "large layers, or run on a larger machine"
        )
    return estimate, limit


def build_report(
    job: Job,
    loaded: LoadedModel,
    result: CompressResult,
    exported: Sequence[LayerExport],
    parity: Parity | None,
    seconds: Mapping[str, float],
    synthetic: bool,
    calib_batches: int,
    reorder_copies: int = 0,
    varied_copies: int = 0,
    general_texts: int = 0,
) -> CompressionReport:
    """The :class:`~gblr_compress.report.CompressionReport` of a finished run."""
    # The config itself, so the report cannot drift from what ran; the job's own
    # export settings beside it.
    settings = {**job.config.settings(), "opset": job.opset, "verify": job.verify}
    checked = None if parity is None else {
        "max_abs_diff": parity.max_abs_diff, "tolerance": parity.tolerance, "ok": True,
    }
    return CompressionReport(
        source={
            "model": str(job.model), "format": loaded.source_format, "calib": job.calib or job.calib_text,
            "calib_batches": calib_batches, "synthetic_calib": synthetic, "heldout": job.heldout,
            "reorder_copies": reorder_copies,
            "vocab_share": job.vocab_share if reorder_copies else 0.0,
            "copy_lengths": job.copy_lengths, "varied_copies": varied_copies, "general_texts": general_texts,
        },
        settings=settings,
        layers=_layer_reports(result, exported, _shapes(loaded.model, result.left_dense)),
        quality=result.quality,
        parity=checked,
        seconds=dict(seconds),
        outputs={"onnx": str(job.output), "report": str(job.report or default_report_path(job.output))},
        model_params={
            "dense": sum(p.numel() for p in loaded.model.parameters()),
            # A pruned window's identity factor is never exported (see identity_params).
            "compressed": sum(p.numel() for p in result.model.parameters())
            - sum(m.identity_params() for m in result.model.modules() if isinstance(m, FrozenGBLR)),
        },
    )


def _general_notes(count: int) -> list[str]:
    """The note saying the run also trained on the package's general English sentences."""
    if not count:
        return []
    return [f"trained also on {count} general English sentences shipped with the package (WordNet usage "
            "examples: in the init's statistics and the distillation, never held out); --general-text 0 trains "
            "on the calibration text alone"]


def _distill_notes(result: CompressResult) -> list[str]:
    """One line per distillation phase that stopped on a numerical fault, did not train
    for want of time, ran again at a smaller step, or ran as many of its data-scaled
    steps as the measured step time allowed."""
    notes = []
    for label, record in (("distillation", result.distill), ("recovery", result.recovery)):
        if record is None:
            continue
        if record.skipped:
            notes.append(f"{label} skipped: {record.skipped}; the student is the init "
                         "(a longer --time-budget lets it run)")
        if record.cut:
            notes.append(f"{label} stopped early: {record.cut}; kept its best held-out state (step "
                         f"{record.best_step}), and no recovery ran after it (a longer --time-budget lets it train)")
        if record.stopped:
            notes.append(f"{label} stopped: {record.stopped}; restored the best state (step {record.best_step})")
        if record.retried:
            notes.append(f"{label}: {record.retried}")
        if record.timed:
            notes.append(f"{label}: {record.timed}; that count follows the machine's speed, so another run "
                         "may run another number of steps and write another file (--steps N runs exactly N)")
    return notes


def _check_numerics(job: Job, loaded: LoadedModel) -> tuple[str | None, str]:
    """Refuse weights larger than memory or not finite, and an export dtype the
    checkpoint cannot have; a half-precision model is computed in float32.

    Returns:
        The note saying the model was cast (its float batches must be cast too), else
        None; and the dtype the file is written in (``"float32"`` / ``"float16"``).
    """
    check_declared_size(loaded.model, [], _memory_limit(job))
    check_finite_model(loaded.model)
    half = to_float32(loaded.model)
    try:
        dtype = export_dtype_for(job.export_dtype, half or "float32")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if half is None:
        return None, dtype
    return f"the checkpoint is {half}: it is compressed in float32 and the ONNX model is {dtype}", dtype


def _gate(job: Job, report: CompressionReport, failed_parity: VerificationError | None) -> None:
    """The fidelity gate: raise :class:`FidelityError` (nothing is written) when the
    held-out cosine is below ``job.min_fidelity`` or parity failed, unless forced; the
    report's ``gate`` records the check."""
    if job.min_fidelity is None and failed_parity is None:
        return
    cosine = report.quality.get("frozen", {}).get("cosine")
    fidelity_ok = job.min_fidelity is None or (cosine is not None and cosine >= job.min_fidelity)
    passed = fidelity_ok and failed_parity is None
    report.gate = {"min_fidelity": job.min_fidelity, "cosine": cosine, "parity_ok": failed_parity is None,
                   "passed": passed, "forced": not passed and job.force}
    if passed or job.force:
        return
    if failed_parity is not None:
        raise failed_parity
    rel = report.quality.get("frozen", {}).get("rel_error")
    if cosine is None:
        raise FidelityError(f"fidelity gate: no held-out data to measure the cosine against the minimum "
                            f"{job.min_fidelity}; nothing written", forceable=True)
    raise FidelityError(
        f"fidelity gate: held-out cosine vs the dense model {cosine:.4f} is below the minimum "
        f"{job.min_fidelity} (relative error {rel:.4f}); nothing written", forceable=True)


@dataclass
class JobInputs:
    """What :func:`load_inputs` read and checked: the model, its data, the run's clocks."""

    loaded: LoadedModel
    calib: list[Batch]
    synthetic: bool
    example: Batch
    estimate: MemoryEstimate
    available: int | None
    out: Path
    report_path: Path
    peaks: _PhasePeaks
    t_start: float
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    cast: str | None = None
    dtype: str = "float32"
    held: list[Batch] | None = None  # --heldout's batches (None: a share of the calibration batches)
    probe: list[Batch] | None = None  # the shift probe's batches (Job.shift_probe)
    extra: list[Batch] = field(default_factory=list)  # training-only batches (Job.reorder_copies)
    reorder_copies: int = 0
    varied_copies: int = 0
    general_texts: int = 0  # the package's general English sentences (Job.general_text)
    general: list[Batch] = field(default_factory=list)  # their batches: they train (statistics and distillation)
    decoded: str | None = None  # the note saying --calib's tokens were decoded to text (Job.keep_calib_tokens)


def load_inputs(job: Job, progress: Progress | None = None,
                warn: Callable[[str], None] | None = None, probe: bool = False) -> JobInputs:
    """The first part of every job: check the outputs, load the model and its data, and
    refuse (before any long phase) what cannot work: data that does not fit, outputs a
    graph cannot carry, a run that cannot fit in memory.

    ``warn`` gets each warning when it arises (they are also collected in
    :attr:`JobInputs.warnings`). ``probe``: also make the shift probe's batches when
    :func:`shift_probing` (only a ``--target-fidelity`` search scores on them).

    Raises:
        InputError: anything the user can fix (NaN / Inf in weights or data too).
    """
    t_start = time.perf_counter()
    out = Path(job.output)
    report_path = Path(job.report) if job.report else default_report_path(out)
    if job.calib and job.calib_text:
        raise InputError("give calibration data once: --calib FILE or --calib-text FILE, not both")
    if job.quantize not in (None, "int8"):
        raise InputError(f"--quantize must be int8, got {job.quantize!r}")
    if job.export_dtype not in EXPORT_DTYPES:
        raise InputError(f"--export-dtype must be one of {', '.join(EXPORT_DTYPES)}, got {job.export_dtype!r}")
    if job.quantize and job.export_dtype == "float16":
        raise InputError("--export-dtype float16 and --quantize int8 do not combine: int8 replaces the float weights")
    _check_output(out, [job.model, job.calib, job.calib_text, job.heldout])
    _check_output(report_path, [job.model, job.calib, job.calib_text, job.heldout, job.output])
    seconds: dict[str, float] = {}
    warnings: list[str] = []

    def _warn(text: str) -> None:
        warnings.append(text)
        if warn is not None:
            warn(text)

    peaks = _PhasePeaks(progress)  # every event passes through it to the caller's progress

    t0 = time.perf_counter()
    pickle_note = None if job.trust_checkpoint else "pass --trust-checkpoint to silence this"
    loaded = load_model(job.model, job.factory, warn=None if pickle_note is None else
                        (lambda text: _warn(f"{text}; {pickle_note}")), note=_warn)
    cast, dtype = _check_numerics(job, loaded)
    if cast:
        _warn(cast)
    # A causal LM returns its KV cache next to the logits; the deployed graph returns
    # the logits only, and the cache is no distillation target.
    _disable_kv_cache(loaded.model)
    probe_batches, extra, copies, varied, general, general_count = None, [], 0, 0, [], 0
    if job.reorder_copies is not None and job.reorder_copies < 0:
        raise InputError(f"--reorder-copies must be >= 0, got {job.reorder_copies}")
    if not 0.0 <= job.vocab_share <= 1.0:
        raise InputError(f"--vocab-share must be in [0, 1], got {job.vocab_share}")
    from gblr_compress.text import COPY_LENGTH_CHOICES  # text.py needs no transformers to import

    if job.copy_lengths not in COPY_LENGTH_CHOICES:
        raise InputError(f"--copy-lengths must be one of {', '.join(COPY_LENGTH_CHOICES)}, got {job.copy_lengths!r}")
    given = load_calib(job.calib) if job.calib else None  # read once: decoded, or used as given
    decoded = None if given is None else _decoded_calibration(job, loaded, given)  # the report's notes say so
    if job.calib_text or decoded is not None:
        # Decoded token batches make no shift probe: the search that uses it turns the
        # reordered copies off for --calib-text only (target.search_job).
        text = _text_calibration(job, loaded, probe=probe and shift_probing(job), copies=True, decoded=decoded)
        calib, probe_batches, extra, copies, varied = text.batches, text.probe, text.extra, text.copies, text.varied
        general, general_count = text.general, text.general_texts
        synthetic = False
        if text.texts < FEW_TEXTS:
            _warn(f"only {text.texts} calibration texts: quality falls with fewer (all-MiniLM-L6-v2 at budget "
                  "0.5 kept mean cosine 0.778 from 64 sentences, 0.879 from 256); a few hundred or more "
                  "are recommended")
    elif given is not None:
        calib, synthetic = given, False
    else:
        calib, synthetic = calibration_batches(None, loaded, job.input_spec, job.synthetic_batches,
                                               job.config.seed, warnings)
    if not calib:
        raise InputError("the calibration data holds no batches")
    held = None
    if job.heldout:
        if synthetic:
            raise InputError("--heldout needs real calibration data to train on: give --calib or --calib-text")
        held = _heldout_batches(job, loaded)
    if cast:
        calib = batches_to_float32(calib)
        held = None if held is None else batches_to_float32(held)
        if loaded.example_inputs is not None:
            loaded.example_inputs = batches_to_float32([loaded.example_inputs])[0]
    check_declared_size(loaded.model, [*calib, *(held or []), *extra, *general], _memory_limit(job))
    check_finite_batches(calib)
    if held is not None:
        check_finite_batches(held, "held-out data (--heldout)")
        check_inputs_fit(loaded.model, held[0], "held-out data (--heldout)")
    if loaded.example_inputs is not None:
        check_finite_batches([loaded.example_inputs], "the bundle's example_inputs:")
    # Everything that can refuse the model or its inputs runs now, on one batch, before
    # the first long phase: the data fits, the outputs are what a graph can carry, and
    # the run fits in memory.
    outputs = check_inputs_fit(loaded.model, calib[0])
    check_finite_outputs(outputs)
    try:
        graph_outputs(outputs)
    except InputError as exc:
        raise InputError(f"the model's outputs cannot be exported: {exc}") from None
    estimate, available = _check_memory(job, loaded.model, calib, outputs, search=probe)
    example = loaded.example_inputs if loaded.example_inputs is not None else calib[0]
    seconds["load"] = time.perf_counter() - t0
    peaks.close("load")
    return JobInputs(loaded, list(calib), synthetic, example, estimate, available, out, report_path,
                     peaks, t_start, seconds, warnings, cast, dtype, held, probe_batches, extra, copies, varied,
                     general_count, general, None if decoded is None else decoded.note)


def deploy_bench(job: Job, inputs: JobInputs, dense_cost: int, probe: bool = False) -> Bench:
    """A :class:`~gblr_compress.deploy.Bench` for the job's candidates: the dense model,
    the held-out batches (the same split :func:`~gblr_compress.pipeline.compress` holds
    out), the example input and the job's timing rounds; with ``probe``, the shift
    probe's batches too (when the run has them)."""
    return Bench(inputs.loaded.model.eval(), held_batches(job, inputs), inputs.example, job.config.logits,
                 job.opset, dense_cost,
                 timer=timer(job.timing_rounds), probe=list(inputs.probe or []) if probe else [])


def candidate_cost(result: CompressResult) -> int:
    """Exact cost of the budgeted layers: compressed at their structure's cost, skipped
    ones at their dense cost (the report's ``linear_cost``)."""
    skipped = sum(r.dense_cost for r in result.init.layers.values() if r.status == "skipped")
    return sum(r.cost for r in result.records.values()) + skipped


def write_outputs(
    job: Job,
    inputs: JobInputs,
    result: CompressResult,
    layers: Sequence[LayerExport],
    parity: Parity | None,
    graph: OnnxGraph | None = None,
    chosen_file: Path | None = None,
    bench: Bench | None = None,
    deploy: Mapping[str, Any] | None = None,
    failed_parity: VerificationError | None = None,
) -> JobResult:
    """The last part of every job: the report (inside the ONNX file and beside it) and
    both files written atomically; a failure leaves neither.

    Args:
        graph: the float graph to write; or ``chosen_file``: a file to copy (an int8
            file, or a candidate of the target search).
        bench: its candidates go to the report (the chosen one marked already).
        deploy: the report's ``deploy`` record.
        failed_parity: the ORT parity failure, if any: the fidelity gate decides
            (:class:`FidelityError`, nothing written, unless ``job.force``).
    """
    seconds = inputs.seconds
    out, report_path = inputs.out, inputs.report_path
    # The report holds the verification figures and the time of the whole run, and it
    # travels inside the ONNX file: build it before the file is written.
    seconds["total"] = time.perf_counter() - inputs.t_start
    inputs.peaks.close("export")
    report = build_report(job, inputs.loaded, result, layers, parity, seconds, inputs.synthetic, len(inputs.calib),
                          inputs.reorder_copies, inputs.varied_copies, inputs.general_texts)
    report.memory = {"estimate": inputs.estimate.total, "available": inputs.available, "peak": dict(inputs.peaks.peak)}
    if bench is not None:
        report.candidates = bench.candidates()
    report.deploy = dict(deploy or {})
    report.notes = ([inputs.cast] if inputs.cast else []) + ([inputs.decoded] if inputs.decoded else []) + _general_notes(inputs.general_texts) + _distill_notes(result)
    if failed_parity is not None:  # NaN is no JSON number: a NaN difference is reported as null
        diff = failed_parity.max_abs_diff
        report.parity = {"max_abs_diff": diff if diff is not None and math.isfinite(diff) else None,
                         "tolerance": failed_parity.tolerance, "ok": False}
    _gate(job, report, failed_parity)
    metadata = {REPORT_METADATA_KEY: json.dumps(report_to_dict(report))}
    exported = None
    try:
        if chosen_file is not None:
            copy_with_metadata(chosen_file, out, metadata)
            exported = ExportResult(path=out, layers=list(layers), opset=job.opset)
            if parity is not None:
                exported.max_abs_diff, exported.tolerance, exported.ort_ok = parity.max_abs_diff, parity.tolerance, True
        else:
            assert graph is not None, "write_outputs needs a graph or a file"
            exported = save_onnx(graph, out, metadata, parity)
        exported.seconds = seconds.get("export", 0.0)
        write_report(report, report_path)
    except BaseException:  # an error or an interrupt (SIGINT, SIGTERM)
        out.unlink(missing_ok=True)  # never leave a model without its report
        if exported is not None and exported.external_data:
            out.with_name(out.name + ".data").unlink(missing_ok=True)
        raise
    return JobResult(report, result, exported, report_path, inputs.warnings)


def _quantized(job: Job, inputs: JobInputs, result: CompressResult, graph: OnnxGraph) -> tuple[Bench, dict[str, Any]]:
    """``--quantize int8``: the verified float graph and its int8 file as candidates,
    the int8 file's fidelity checked against its tolerance, both timed against dense."""
    bench = deploy_bench(job, inputs, sum(r.dense_cost for r in result.init.layers.values()))
    try:
        fl = bench.add_float(result.model, job.config.budget, candidate_cost(result),
                             result.distill is not None, result, graph)
        q = bench.add_int8(fl)
        problem = int8_check(fl.candidate.fidelity, q.candidate.fidelity, job.int8_tolerance)
        if problem is not None:
            # Not forceable: --force writes what the gate or parity refused; the
            # tolerance has its own option, and the message names it.
            raise FidelityError(problem)
        bench.time_all()
    except BaseException:
        bench.close()
        raise
    q.candidate.chosen = True
    assert bench.quantization is not None
    deploy = {
        "quantization": bench.quantization.to_dict(),
        "int8_tolerance": job.int8_tolerance,
        "choice": f"--quantize int8: the int8 file (held-out cosine {q.candidate.cosine:.4f}, "
                  f"float {fl.candidate.cosine:.4f})",
        "timing": {"rounds": job.timing_rounds, "input": input_shapes(inputs.example)},
    }
    return bench, deploy


def _half(job: Job, inputs: JobInputs, result: CompressResult, graph: OnnxGraph,
          folder: Path) -> tuple[Path, dict[str, Any]]:
    """``--export-dtype float16``: the verified float32 graph converted to float16 in
    ``folder``; the float16 file's held-out fidelity against the dense model, checked
    against the float32 model's (the frozen student, which its graph matches to
    ``1e-4``) within :data:`HALF_TOLERANCE`.

    Raises:
        FidelityError: the float16 file loses more than the tolerance (not forceable).
    """
    held = held_batches(job, inputs)
    dense = inputs.loaded.model.eval()
    f16_path = folder / "float16.onnx"
    half = to_float16(graph.proto)
    save_onnx(OnnxGraph(half.proto, graph.call, graph.reference, graph.layers, graph.opset), f16_path)
    fid32 = agreement(result.model.eval(), dense, held, job.config.logits)
    fid16 = onnx_fidelity(f16_path, dense, held, job.config.logits)
    lost = fid32["cosine"] - fid16["cosine"]
    if not lost <= HALF_TOLERANCE:  # also catches NaN
        raise FidelityError(
            f"the float16 file loses {lost:.4f} of held-out cosine against the float32 graph "
            f"({fid16['cosine']:.4f} vs {fid32['cosine']:.4f}; tolerance {HALF_TOLERANCE}): values leave "
            "float16's range; export float32 (the default)"
        )
    deploy = {"export_dtype": {**half.to_dict(), "heldout_float32": fid32, "heldout_float16": fid16,
                               "tolerance": HALF_TOLERANCE}}
    return f16_path, deploy


def input_shapes(batch: Batch) -> dict[str, list[int]]:
    """Each input's shape, by graph input name (what the candidates were timed on)."""
    call = ModelCall(batch)
    return {n: list(t.shape) for n, t in zip(call.names, call.tensors)}


def run_job(job: Job, progress: Progress | None = None, warn: Callable[[str], None] | None = None) -> JobResult:
    """Load, compress, export, verify and report: the whole product as one call.

    Outputs are written atomically; when a later step fails, files this run wrote are
    removed, so a failure never leaves a model without its report. The input files are
    only read. With ``job.quantize`` the written file is the int8 one, and the report
    lists the float and the int8 file as candidates, with their measured trade-off.
    ``warn`` gets each warning when it arises (they are also collected in
    :attr:`JobResult.warnings`).

    Raises:
        InputError: anything the user can fix (paths, formats, data that does not fit,
            NaN / Inf in weights or data).
        FidelityError: the ONNX model does not match the PyTorch student
            (:class:`~gblr_compress.export.verify.VerificationError`) or the held-out
            cosine is below ``job.min_fidelity``: nothing is written unless
            ``job.force``; the int8 (float16) file loses more than its tolerance against
            the float32 one: nothing is written, ``job.force`` or not.
    """
    inputs = load_inputs(job, progress, warn)
    peaks, seconds = inputs.peaks, inputs.seconds
    # The job owns the loaded model: it is the teacher, not copied (read-only after).
    result = compress(inputs.loaded.model, job.config, inputs.calib, peaks, share_teacher=True, held=inputs.held,
                      extra_fit=inputs.extra + inputs.general)
    seconds.update(result.seconds)
    peaks.close("freeze")

    t0 = time.perf_counter()
    peaks(ProgressEvent("export", 0, 1))
    graph = build_onnx(result.model, inputs.example, opset=job.opset)
    parity, failed_parity = None, None
    try:
        parity = verify_graph(graph, result.model) if job.verify else None
    except VerificationError as exc:
        failed_parity = exc  # the gate decides: exit 3, or written and marked when forced
    bench, deploy, chosen = None, None, None
    half_dir = None
    try:
        if job.quantize == "int8" and failed_parity is None:
            bench, deploy = _quantized(job, inputs, result, graph)
            entry = bench.entry(job.config.budget, True, result.distill is not None)
            chosen = None if entry is None else entry.path
        elif inputs.dtype == "float16" and failed_parity is None:
            half_dir = tempfile.TemporaryDirectory(prefix="gblr-half-")
            chosen, deploy = _half(job, inputs, result, graph, Path(half_dir.name))
        peaks(ProgressEvent("export", 1, 1))
        seconds["export"] = time.perf_counter() - t0
        return write_outputs(job, inputs, result, graph.layers, parity, graph, chosen, bench, deploy, failed_parity)
    finally:
        if bench is not None:
            bench.close()
        if half_dir is not None:
            half_dir.cleanup()
