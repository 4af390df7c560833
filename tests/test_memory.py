"""Peak-memory measurement and the run estimate."""

from __future__ import annotations

import numpy as np

from gblr_compress.memory import available_bytes, estimate_bytes, peak_rss_bytes, reset_peak, statistics_bytes


def test_peak_rises_with_an_allocation_and_resets() -> None:
    reset_peak()
    before = peak_rss_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    after = peak_rss_bytes()
    assert after >= before + 48 * 2**20
    del block
    if reset_peak():  # Linux: the next figure is this phase's own peak
        assert peak_rss_bytes() < after


def test_available_is_positive() -> None:
    avail = available_bytes()
    assert avail is None or avail > 0


def test_estimate_parts() -> None:
    est = estimate_bytes(param_bytes=100, target_param_bytes=40, batch_tokens=10, target_widths=5,
                         output_bytes_per_batch=7, teacher_cache_bytes=1000, distilling=True, baseline=3)
    assert (est.models, est.trainable, est.teacher_cache, est.activations) == (200, 120, 1000, 3 * 10 * 5 * 4 + 28)
    assert est.total == 200 + 120 + 1000 + 628 + 3
    idle = estimate_bytes(100, 40, 10, 5, 7, 1000, distilling=False, baseline=0)
    assert idle.trainable == 0 and idle.teacher_cache == 0
    # A step whose activations exceed the limit runs in row chunks: the limit counts,
    # but never less than one row's share.
    capped = estimate_bytes(100, 40, 10, 5, 7, 1000, True, 3, activation_limit=400, rows=4)
    assert capped.activations == 400
    one_row = estimate_bytes(100, 40, 10, 5, 7, 1000, True, 3, activation_limit=100, rows=4)
    assert one_row.activations == 628 // 4


def test_statistics_come_before_training_unless_kept() -> None:
    # Moments: n x n float64 per layer input, fit and held-out, plus 16 matrices of the
    # widest input's size per layer built at once.
    assert statistics_bytes([4, 8], held_out=True) == 2 * (16 + 64) * 8 + 16 * 64 * 8
    assert statistics_bytes([4, 8], held_out=False) == (16 + 64) * 8 + 16 * 64 * 8
    assert statistics_bytes([4, 8], held_out=False, workers=2) == (16 + 64) * 8 + 2 * 16 * 64 * 8
    assert statistics_bytes([], held_out=True) == 0
    # The init's statistics are dropped before the distillation trains: the peak is the
    # larger of the two phases, beside the models and the process.
    est = estimate_bytes(100, 40, 10, 5, 7, 1000, True, 3, statistics=5000)
    assert est.training == 120 + 1000 + 628
    assert est.total == 200 + 3 + 5000
    small = estimate_bytes(100, 40, 10, 5, 7, 1000, True, 3, statistics=50)
    assert small.total == 200 + 3 + 1748
    # A --target-fidelity search keeps them while it trains each candidate.
    kept = estimate_bytes(100, 40, 10, 5, 7, 1000, True, 3, statistics=5000, statistics_kept=True)
    assert kept.total == 200 + 3 + 5000 + 1748
    assert "statistics" in kept.describe()


def _rss() -> int:
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_tuned_allocator_gives_freed_blocks_back() -> None:
    import os
    import sys

    import pytest

    from gblr_compress.memory import tune_allocator

    if not sys.platform.startswith("linux") or not tune_allocator():
        pytest.skip("glibc only")
    assert os.environ.get("THP_MEM_ALLOC_ENABLE")
    # 8 MiB blocks, each followed by a small block that stays: from the heap they
    # could not be given back (the live small blocks pin the heap's top); mapped on
    # their own (above the fixed 4 MiB threshold) they are unmapped when freed.
    blocks, keep = [], []
    for _ in range(40):
        blocks.append(np.ones(2**20))
        keep.append(np.ones(512))
    held = _rss()
    del blocks
    assert _rss() < held - 200 * 2**20
    assert len(keep) == 40
