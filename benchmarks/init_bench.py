"""Init quality and speed: plain SVD, whitened SVD, GBLR data-free, GBLR activation-aware.

Part 1 trains the digits MLP (a few seconds) and prints, per layer, time, exact cost and
relative output error on unseen digits of the four methods at equal allocated cost (the
greedy allocation's). Part 2 times ``initialize_`` on ``bert_small()`` (random weights,
random token batches) at default settings, moments included.

    python benchmarks/init_bench.py                 # full: 256 x 128 tokens for bert_small
    python benchmarks/init_bench.py --skip-digits   # only the bert_small timing
    python benchmarks/init_bench.py --seqs 32       # quicker timing run
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from gblr_compress.calib import collect_moments
from gblr_compress.init import (
    InitConfig,
    init_layer,
    initialize_,
    relative_error,
    truncated_svd_layer,
    whitened_svd_layer,
)
from samples.digits import TrainedDigits
from samples.models import bert_small


def _digits(budget: float) -> None:
    digits = TrainedDigits()
    model, X = digits.model, digits.X_train
    fit, held, test = [X[:1000]], [X[1000:]], [digits.X_test]
    names = ["fc1", "fc2", "fc3"]
    test_m = collect_moments(model, names, test)
    fit_m = collect_moments(model, names, fit)
    cfg = InitConfig(budget=budget)
    student = copy.deepcopy(model)
    result = initialize_(student, cfg, calib=fit, holdout=held, names=names)
    print(f"digits MLP, budget {budget}: global exact cost {result.exact_cost} <= {result.budget_cost}")
    print(f"{'layer':6} {'alloc':>7} {'method':16} {'cost':>7} {'test err':>9} {'sec':>6}")
    for name in names:
        rec = result.layers[name]
        dense = model.get_submodule(name)
        W, C = dense.weight.detach().double(), test_m[name].mean()
        rank = max(1, rec.allocated_cost // (rec.in_features + rec.out_features))
        rows = []
        t = time.perf_counter()
        svd = truncated_svd_layer(dense, rank)
        rows.append(("plain SVD", svd, time.perf_counter() - t))
        t = time.perf_counter()
        ws = whitened_svd_layer(dense, rank, fit_m[name], cfg.damping)
        rows.append(("whitened SVD", ws, time.perf_counter() - t))
        t = time.perf_counter()
        free, _ = init_layer(dense, rec.allocated_cost, InitConfig(budget=budget, data_free=True))
        rows.append(("GBLR data-free", free, time.perf_counter() - t))
        rows.append(("GBLR act-aware", student.get_submodule(name), rec.seconds))
        for label, mod, sec in rows:
            if isinstance(mod, nn.Linear):
                cost, err = mod.in_features * mod.out_features, 0.0
            else:
                cost, err = mod.exact_cost(), relative_error(W, mod.dense_weight(hard=True), C)
            print(f"{name:6} {rec.allocated_cost:7d} {label:16} {cost:7d} {err:9.4f} {sec:6.2f}")
        print(f"{'':6} act-aware status: {rec.status} {rec.reason}")


def _bert(seqs: int, length: int, budget: float, batch: int) -> None:
    torch.manual_seed(0)
    model = bert_small().eval()
    ids = torch.randint(0, 8000, (seqs, length))
    n_fit = seqs - max(1, round(seqs * 52 / 256))  # 204 fit + 52 held-out at 256 sequences
    fit = [{"input_ids": ids[i : min(i + batch, n_fit)]} for i in range(0, n_fit, batch)]
    held = [{"input_ids": ids[i : i + batch]} for i in range(n_fit, seqs, batch)]
    t = time.perf_counter()
    done: dict[str, float] = {}

    def progress(stage: str, i: int, n: int) -> None:
        if i == n:
            done[stage] = time.perf_counter() - t

    result = initialize_(model, InitConfig(budget=budget), calib=fit, holdout=held, progress=progress)
    total = time.perf_counter() - t
    layer_s = total - done["spectra"]  # layers run two at a time: wall time, not a sum
    status = {s: sum(r.status == s for r in result.layers.values()) for s in ("gblr", "lowrank", "skipped")}
    gain = [
        r.heldout_error / r.baseline_heldout_error
        for r in result.layers.values()
        if r.heldout_error is not None and r.baseline_heldout_error
    ]
    print(
        f"bert_small, {n_fit} fit + {seqs - n_fit} held-out seqs x {length} tokens "
        f"(batches of {batch}), budget {budget}, {torch.get_num_threads()} threads: "
        f"{total:.1f} s total ({done['moments']:.1f} s fit moments, "
        f"{done['holdout'] - done['moments']:.1f} s held-out moments, "
        f"{done['sensitivity'] - done['holdout']:.1f} s sensitivity, "
        f"{done['spectra'] - done['sensitivity']:.1f} s spectra, {layer_s:.1f} s layer search), "
        f"exact cost {result.exact_cost} <= "
        f"{result.budget_cost}, status {status}"
    )
    if gain:
        print(
            f"held-out error / whitened-SVD held-out error per layer: "
            f"max {max(gain):.4f}, mean {sum(gain) / len(gain):.4f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-bert", action="store_true")
    ap.add_argument("--skip-digits", action="store_true")
    args = ap.parse_args()
    if not args.skip_digits:
        _digits(args.budget)
    if not args.skip_bert:
        _bert(args.seqs, args.len, 0.3, args.batch)


if __name__ == "__main__":
    main()
