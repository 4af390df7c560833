"""Memory: measure the peak per phase, and estimate a run's need before it starts.

A run that cannot fit must be refused in seconds with a one-line error, not killed by
the kernel after half an hour. The estimate counts what the pipeline holds at its peak
(distillation): the teacher and the student copies of the model, the student's trainable
factors with their gradients and optimizer state, the cached teacher outputs (capped),
and the activations of one batch kept for the backward pass. It is rough: on the
all-MiniLM-L6-v2 wrapper with 2,256 calibration sentences at budget 0.5 it said 2.86 GiB
where the distillation peaked at 2.51 GiB (before the feature term tapped block outputs
instead of every layer's, and before padding was cut, 2,000 sentences at budget 0.8
peaked at 4.58 GiB against an estimate of 2.54). It refuses only runs that clearly cannot fit; the report
records the measured peak of each phase next to it, so the estimate can be checked on
every run.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MemoryEstimate", "activation_bytes", "available_bytes", "estimate_bytes", "gib", "give_back_freed", "peak_rss_bytes",
           "reset_peak", "statistics_bytes", "tune_allocator"]

# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 2**20


def gib(n: float) -> str:
    """``n`` bytes as ``"1.23 GiB"``."""
    return f"{n / 2**30:.2f} GiB"


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (since start or the last reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB elsewhere


def give_back_freed() -> None:
    """Hand memory freed by Python and torch back to the system (glibc ``malloc_trim``).

    Memory freed into glibc's heap arenas (rather than unmapped) can stay resident; the
    run calls this after dropping the moments (about 2 GB on a 135M LM) so that what it
    no longer holds is not counted against the machine during distillation. A no-op
    where glibc is not the allocator.
    """
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tune_allocator() -> bool:
    """Keep freed tensor memory from staying resident: a fixed 4 MiB glibc mmap
    threshold, and transparent huge pages for torch's large CPU buffers.

    glibc raises its mmap threshold to 32 MiB as soon as a large block is freed, so
    from then on every tensor under 32 MiB comes from the heap arenas, and a heap
    interleaved with long-lived moments cannot shrink: on SmolLM2-135M (300
    calibration sentences) RSS after the statistics was 6.05 GiB for 2.50 GiB of live
    tensors, and the distillation peaked at 8.25 GiB. A fixed threshold maps blocks
    from 4 MiB up on their own and unmaps them when freed (the same run: 4.31 GiB
    after the statistics); the page faults that costs are what torch's
    ``THP_MEM_ALLOC_ENABLE`` (2 MiB pages for buffers from 2 MiB up) wins back: the
    init took 204 s against 208 s untuned (a 1 MiB threshold without huge pages: 272 s).
    The command calls this first; an explicit ``THP_MEM_ALLOC_ENABLE`` is respected.
    Returns whether the threshold was set (False where glibc is not the allocator).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def reset_peak() -> bool:
    """Reset the high-water mark (Linux: ``/proc/self/clear_refs``), so the next
    :func:`peak_rss_bytes` is the peak of the phase that starts now. False where the
    system offers no reset (the figure is then the peak so far)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def available_bytes() -> int | None:
    """Memory this process may still take: ``MemAvailable``, capped by a cgroup limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            free = int(limit) - usage
            avail = free if avail is None else min(avail, free)
        break
    return avail


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the run needs at its peak, by part (see :func:`estimate_bytes`)."""

    models: int
    trainable: int
    teacher_cache: int
    activations: int
    baseline: int
    statistics: int = 0
    statistics_kept: bool = False

    @property
    def training(self) -> int:
        """What the distillation adds: trainable factors, teacher cache, activations."""
        return self.trainable + self.teacher_cache + self.activations

    @property
    def total(self) -> int:
        """The peak: the init's statistics and the distillation's training state come one
        after the other (the moments are dropped before it trains), unless the
        statistics are kept for more candidates (``statistics_kept``)."""
        if self.statistics_kept:
            phases = self.statistics + self.training
        else:
            phases = max(self.statistics, self.training)
        return self.models + self.baseline + phases

    def describe(self) -> str:
        """The parts, as the total adds them up (one line)."""
        fixed = ", ".join(f"{k} {gib(v)}" for k, v in (("models", self.models), ("process", self.baseline)) if v)
        train = ", ".join(f"{k} {gib(v)}" for k, v in (("trainable", self.trainable), ("teacher cache", self.teacher_cache),
                                                        ("activations", self.activations)) if v)
        training = f"training {gib(self.training)} ({train})" if train else ""
        if not self.statistics:
            return ", ".join(p for p in (fixed, train) if p)
        statistics = f"the init's statistics {gib(self.statistics)}"
        if not training:
            return f"{fixed}, {statistics}"
        joined = "plus" if self.statistics_kept else "or, after them,"
        return f"{fixed}, {statistics} {joined} {training}"


def statistics_bytes(in_features: Sequence[int], held_out: bool, workers: int = 1) -> int:
    """What the init holds at its peak besides the models: an ``n x n`` float64 second
    moment per target layer's input (layers reading the same tensor share one, so this
    is an upper bound), for the fit batches and again for the held-out ones, and each of
    the ``workers`` layers built at once works on about 16 matrices of the widest
    input's size (whitening, its inverse, the pruning order's inverse, the refits).

    all-mpnet-base-v2 at budget 0.8 from 256 sentences (72 layers, inputs 768 and 3,072
    wide, 2 workers) peaked at 3.41 GiB while the moments were collected and 6.29 GiB
    while the layers were built, from 0.86 GiB loaded; the run's estimate is 6.16 GiB there,
    the one that left the statistics out 2.60 GiB. That layer phase's peak was the
    unit-split alternative keeping every group's consumer moment at once; it makes each
    where it uses it since, and the pickled ``SentenceTransformer`` of the same model
    peaks at 5.47 GiB there (6.51 before) against an estimate of 6.32 GiB."""
    if not in_features:
        return 0
    widest = max(in_features) ** 2 * 8
    return sum(n * n * 8 for n in in_features) * (2 if held_out else 1) + 16 * max(1, workers) * widest


def activation_bytes(positions: int, target_widths: int, output_bytes: int) -> int:
    """What a training pass over ``positions`` input positions keeps for its backward:
    each target layer's input and output and about as much again around it (norms,
    activations, the GBLR intermediate), in float32, plus a few copies of the outputs
    (``output_bytes`` for those positions: softmax, log-softmax, gradient)."""
    return 3 * positions * target_widths * 4 + 4 * output_bytes


def estimate_bytes(
    param_bytes: int,
    target_param_bytes: int,
    batch_tokens: int,
    target_widths: int,
    output_bytes_per_batch: int,
    teacher_cache_bytes: int,
    distilling: bool,
    baseline: int,
    activation_limit: int = 0,
    rows: int = 1,
    statistics: int = 0,
    statistics_kept: bool = False,
) -> MemoryEstimate:
    """Estimate the peak of a run.

    Args:
        param_bytes: bytes of the model's parameters and buffers.
        target_param_bytes: bytes of the target layers' weights (the GBLR factors that
            replace them hold at most about as much, at budgets up to 1).
        batch_tokens: rows in one batch times its sequence length.
        target_widths: the sum over target layers of ``in_features + out_features``.
        output_bytes_per_batch: bytes of the model's outputs on one batch.
        teacher_cache_bytes: the cap of the cached teacher outputs.
        distilling: whether there are distillation steps (else init and export only).
        baseline: the process's resident size now (libraries loaded, the model read).
        activation_limit: bytes of activations a training step keeps at once (its rows
            run in chunks that fit, ``DistillConfig.activation_mb``); 0: whole batches.
        rows: rows of that batch (a chunk holds at least one).
        statistics: bytes of the init's activation statistics (:func:`statistics_bytes`).
        statistics_kept: whether they stay while the distillation trains (a
            ``--target-fidelity`` search builds several budgets from them).

    On top of the loaded model (in ``baseline``; on a CPU run it is also the teacher)
    come the student and, while the init builds it, its new layers beside the dense
    ones: two more copies at most; the trainable
    factors carry a gradient and two AdamW moments; the backward pass keeps each target
    layer's input and output and about as much again around it (norms, activations,
    the GBLR intermediate), in float32, for the tokens of one batch; the loss holds a
    few copies of the outputs (softmax, log-softmax, gradient).
    """
    models = 2 * param_bytes
    trainable = 3 * target_param_bytes if distilling else 0
    activations = activation_bytes(batch_tokens, target_widths, output_bytes_per_batch)
    if activation_limit > 0:
        activations = min(activations, max(activation_limit, activations // max(rows, 1)))
    cache = teacher_cache_bytes if distilling else 0
    return MemoryEstimate(models, trainable, cache, activations, baseline, statistics, statistics_kept)
