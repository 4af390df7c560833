"""What limits quality on all-MiniLM-L6-v2: calibration data, and top-1's thin margins.

Three measurements at one budget, for gblr-calibrated and whitened-svd+distill (built
with the library call, as ``minilm_bench.py --cli-budgets`` without budgets does):

1. **Calibration size**: the first 64, 128, ... calibration sentences, scored on the
   whole eval pool.
2. **More real data, scored fairly**: half of the eval pool (every second paraphrase
   pair with its hard negative, every second extra sentence) joins the calibration
   set; both models are scored on the other half only, against the same models
   calibrated on the calibration set alone.
3. **Top-1 margins** (whole pool, full calibration set): for each query the dense
   model answers right, its margin (similarity to the paraphrase minus the best rival);
   how far each compressed model moves the margins (RMS), and how many right answers it
   loses per margin band.

Run from the repository root (the ``bench`` extra installed, see benchmarks/README.md)::

    PYTHONPATH=. python benchmarks/minilm_data.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import torch
from minilm import contenders
from minilm.contenders import CONTENDERS
from minilm.data import load_calib, load_eval, split_eval
from minilm.metrics import fidelity, paraphrase_margins
from minilm.model import embed, load_dense, make_batches
from torch.nn import functional as F

from benchmarks.common import run_main

ROWS = ("gblr-calibrated", "whitened-svd+distill")
BANDS = ((0.0, 0.02), (0.02, 0.05), (0.05, 0.1), (0.1, 2.0))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=0.5, help="cost ratio B")
    p.add_argument("--sizes", type=int, nargs="*", default=[64, 128],
                   help="smaller calibration sets tried (first N sentences); the whole set is always run")
    p.add_argument("--seed", type=int, default=0, help="seed of gblr-compress's init and distillation")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this file")
    return p.parse_args(argv)


def by_band(dense_m: torch.Tensor, selected: torch.Tensor) -> list[int]:
    """Per band of dense margin (so dense-right queries only), how many are ``selected``."""
    return [int(((dense_m > lo) & (dense_m <= hi) & selected).sum()) for lo, hi in BANDS]


def margin_rows(dense_m: torch.Tensor, model_m: torch.Tensor) -> dict:
    """How a model's margins differ from dense: RMS change, and per band of dense margin
    (dense-right queries only) the right answers lost; plus dense-wrong answers gained."""
    right = dense_m > 0
    return {
        "rms_change": float((model_m - dense_m).pow(2).mean().sqrt()),
        "lost_by_band": by_band(dense_m, model_m <= 0),
        "gained": int((~right & (model_m > 0)).sum()),
        "hits": int((model_m > 0).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    contenders.SEED = args.seed
    t_start = time.perf_counter()
    dense, tokenizer = load_dense()
    evalset, calib_sentences = load_eval(), load_calib()
    extra, half = split_eval(evalset)
    sizes = sorted({n for n in args.sizes if 0 < n < len(calib_sentences)} | {len(calib_sentences)})
    pools = {
        "whole": (evalset, make_batches(tokenizer, evalset.sentences, batch_size=64)),
        "half": (half, make_batches(tokenizer, half.sentences, batch_size=64)),
    }
    dense_emb = {k: embed(dense, b) for k, (_, b) in pools.items()}
    negs = {k: [n for _, n in e.negatives] for k, (e, _) in pools.items()}
    print(f"all-MiniLM-L6-v2 at B={args.budget:g}: eval pool {len(evalset.sentences)} sentences "
          f"({len(evalset.pairs)} pairs), half {len(half.sentences)} ({len(half.pairs)} pairs); "
          f"extra calibration from the other half {len(extra)} sentences", flush=True)

    runs: list[dict] = []
    for pool, (e, _) in pools.items():  # dense top-1 on each pool, the ceiling of the rows below
        fid = fidelity(dense_emb[pool], dense_emb[pool], e.pairs, negs[pool])
        runs.append({"name": "dense", "calib": "-", "sentences": 0, "pool": pool, **asdict(fid), "build_s": 0.0})
    margins: dict[str, torch.Tensor] = {}

    def build(name: str, sentences: list[str], label: str, scored: tuple[str, ...]) -> None:
        calib = make_batches(tokenizer, sentences, batch_size=32)
        t0 = time.perf_counter()
        student = CONTENDERS[name](dense, calib, args.budget).eval()
        build_s = time.perf_counter() - t0
        for pool in scored:
            e, batches = pools[pool]
            emb = embed(student, batches)
            fid = fidelity(emb, dense_emb[pool], e.pairs, negs[pool])
            runs.append({"name": name, "calib": label, "sentences": len(sentences), "pool": pool,
                         **asdict(fid), "build_s": build_s})
            print(f"  {name}, calib {label} ({len(sentences)}), {pool} pool: mean cos {fid.mean_cos:.3f}, "
                  f"top-1 {fid.top1:.3f} ({build_s:.0f} s)", flush=True)
            if pool == "whole" and label == "all":
                margins[name] = paraphrase_margins(F.normalize(emb, dim=1), e.pairs)

    for n in sizes:
        full = n == len(calib_sentences)
        for name in ROWS:
            build(name, calib_sentences[:n], "all" if full else f"first {n}", ("whole", "half") if full else ("whole",))
    for name in ROWS:
        build(name, calib_sentences + extra, "all + other half", ("half",))

    dense_m = paraphrase_margins(F.normalize(dense_emb["whole"], dim=1), evalset.pairs)
    right = dense_m > 0
    band_counts = by_band(dense_m, right)
    mrows = {name: margin_rows(dense_m, m) for name, m in margins.items()}

    print()
    print(render_runs(runs))
    print()
    print(render_margins(band_counts, int(right.sum()), len(dense_m), mrows))
    total = time.perf_counter() - t_start
    print(f"\n{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"{date.today().isoformat()}; total {total:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"budget": args.budget, "seed": args.seed, "runs": runs,
                                         "dense_bands": band_counts, "margins": mrows, "seconds": total}, indent=1))
    return 0


def render_runs(runs: list[dict]) -> str:
    """Markdown table, one line per (calibration set, contender, scored pool)."""
    head = "| calibration | sentences | scored on | contender | mean cos | min cos | top-1 | Spearman |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in runs:
        lines.append(f"| {r['calib']} | {r['sentences'] or '-'} | {r['pool']} pool | {r['name']} | {r['mean_cos']:.3f} | "
                     f"{r['min_cos']:.3f} | {r['top1']:.3f} | {r['spearman']:.3f} |")
    return "\n".join(lines)


def render_margins(band_counts: list[int], right: int, queries: int, rows: dict[str, dict]) -> str:
    """Markdown table: dense-right queries per margin band, and what each model loses."""
    bands = [f"({lo:g}, {hi:g}]" if hi < 1 else f"> {lo:g}" for lo, hi in BANDS]
    head = ("| right answers: dense has / a model loses, by dense margin | margin RMS change | "
            + " | ".join(bands) + " | dense misses gained | hits |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    lines.append(f"| dense ({right} of {queries} queries right) | - | " + " | ".join(str(c) for c in band_counts)
                 + f" | - | {right} |")
    for name, r in rows.items():
        lines.append(f"| {name}: lost | {r['rms_change']:.3f} | " + " | ".join(str(c) for c in r["lost_by_band"])
                     + f" | {r['gained']} | {r['hits']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
