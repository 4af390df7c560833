"""SmolLM2-135M: gated-FFN unit pruning + least-squares anchor, perplexity vs dense.

The question of issue 16: can structured pruning reach perplexity <= 2.0x dense at
budget 0.8 (of the compressible Linear multiply-adds, the tied lm_head excluded)?
Calibration: the first 3,000 Wikipedia calibration sentences (``wiki_calib.txt``),
packed into 128-token rows the way the command packs ``--calib-text`` for a causal LM.
Score: perplexity on 64 x 128-token windows of the held-out Wikipedia articles (the
windows ``models_bench.py`` uses), in PyTorch, float32.

Only FFN units are pruned (SmolLM2 has 9 query heads in 3 grouped-query groups: whole
groups are too coarse a unit); the statistics are one pass of the dense model, reused
for every budget and for the plain-pruning row (``--no-refit`` rows show what the
least-squares refit adds)::

    flock /tmp/gblr-cpu.lock env PYTHONPATH=. python benchmarks/smollm2_prune.py --budgets 0.8

``--calib-rows N`` keeps N packed rows evenly spaced over the 3,000 sentences (the
statistics pass is the slow part: a forward of the dense model over every row);
``--eval-rows N`` scores the first N windows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from benchmarks import assets
from benchmarks.common import run_main
from benchmarks.models_bench import _windows, perplexity_torch
from benchmarks.prune_anchor import compressible_linears, consumer_moments, linear_cost, prune_anchor_
from gblr_compress.errors import InputError
from gblr_compress.text import load_tokenizer, text_batches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8])
    ap.add_argument("--calib-lines", type=int, default=3000, help="first N Wikipedia calibration sentences")
    ap.add_argument("--calib-rows", type=int, default=None,
                    help="use this many packed rows, evenly spaced over all of them (default: all)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows of 128 tokens per calibration batch")
    ap.add_argument("--eval-rows", type=int, default=64, help="128-token held-out windows scored")
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--splits", nargs="+", default=["uniform", "global"], choices=["uniform", "global"],
                    help="budget split across layers (prune_anchor_'s split)")
    ap.add_argument("--no-refit-rows", action="store_true", help="also score plain pruning (mean folded)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    folder = assets.smollm2_dir()
    calib_file = assets.cache_dir() / "wiki_calib.txt"
    if not calib_file.is_file():
        raise InputError(f"{calib_file} missing; run: PYTHONPATH=. python -m benchmarks.assets --text")
    lines = calib_file.read_text(encoding="utf-8").splitlines()[: args.calib_lines]
    dense = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval().float()
    dense.config.use_cache = False
    tok = load_tokenizer(folder)
    calib = text_batches(lines, tok, dense, max_length=128, batch_size=args.batch_size)
    if args.calib_rows:  # evenly spaced rows over the whole packed text, re-batched
        rows_all = [{k: v[i : i + 1] for k, v in b.items()} for b in calib for i in range(len(b["input_ids"]))]
        step = max(1, len(rows_all) // args.calib_rows)
        picked = rows_all[::step][: args.calib_rows]
        calib = [{k: torch.cat([r[k] for r in picked[i : i + args.batch_size]]) for k in picked[0]}
                 for i in range(0, len(picked), args.batch_size)]
    windows = _windows(AutoTokenizer.from_pretrained(str(folder), local_files_only=True), assets.wiki_eval_text(), rows=args.eval_rows)
    names = compressible_linears(dense)
    dense_cost = linear_cost(dense, names)
    rows_tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    print(f"SmolLM2-135M: {len(names)} compressible Linears, {dense_cost:,} MAC/token; calib {len(lines)} sentences "
          f"-> {sum(len(b['input_ids']) for b in calib)} rows, {rows_tokens:,} tokens; eval {tuple(windows.shape)}",
          flush=True)
    t = time.perf_counter()
    ppl_dense = perplexity_torch(dense, windows)
    print(f"dense perplexity {ppl_dense:.2f} ({time.perf_counter() - t:.0f} s)", flush=True)
    t = time.perf_counter()
    moments = consumer_moments(dense, calib, kinds=("ffn",), forward=lambda b: dense.model(**b))
    stats_s = time.perf_counter() - t
    print(f"statistics {stats_s:.0f} s", flush=True)
    rows = []
    for budget, split in ((b, sp) for b in args.budgets for sp in args.splits):
        for refit in (True, False) if args.no_refit_rows else (True,):
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            res = prune_anchor_(model, [], int(budget * dense_cost), kinds=("ffn",), refit=refit,
                                damping=args.damping, moments=moments, split=split)
            prune_s = time.perf_counter() - t
            ppl = perplexity_torch(model, windows)
            kept = list(res.kept.values())
            row = {"budget": budget, "split": split, "refit": refit, "cost": res.cost, "ratio": res.cost / dense_cost,
                   "ppl": ppl, "ppl_dense": ppl_dense, "ppl_ratio": ppl / ppl_dense, "prune_s": prune_s,
                   "stats_s": stats_s, "ffn_kept_min": min(kept), "ffn_kept_max": max(kept),
                   "ffn_kept_mean": sum(kept) / len(kept)}
            rows.append(row)
            print(f"  B={budget} {split} refit={refit}: cost {res.cost:,} ({row['ratio']:.3f}), ppl {ppl:.2f} "
                  f"({row['ppl_ratio']:.2f}x dense), FFN units kept per layer {min(kept)}..{max(kept)} "
                  f"(mean {row['ffn_kept_mean']:.0f} of 1536)", flush=True)
            del model
    print()
    print("| budget | split | refit | exact cost (ratio) | perplexity | vs dense | FFN units kept per layer, min / mean / max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['budget']:g} | {r['split']} | {'least squares' if r['refit'] else 'none (mean folded)'} | {r['cost']:,} "
              f"({r['ratio']:.3f}) | {r['ppl']:.2f} | {r['ppl_ratio']:.2f}x | {r['ffn_kept_min']} / "
              f"{r['ffn_kept_mean']:.0f} / {r['ffn_kept_max']} |")
    print(f"dense perplexity {ppl_dense:.2f}; total {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
