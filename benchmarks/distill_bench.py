"""Init + distill + freeze on a BERT-small sized encoder: time per phase and quality.

Builds ``samples.models.bert_small()`` (6 layers, hidden 384, FFN 1536, 36 Linears;
random weights: nothing is downloaded) and 256 random token sequences of length 128 in
batches of 8, then runs :func:`gblr_compress.pipeline.compress` at its default settings
(20% of the batches held out). Prints wall time per phase and the held-out
teacher-vs-student agreement after init, after distillation and after freezing.

    python benchmarks/distill_bench.py                  # defaults: budget 0.3
    python benchmarks/distill_bench.py --steps 50       # quicker
    python benchmarks/distill_bench.py --save out/bert_small_frozen.pt
        # keeps the frozen student for `export_bench --learned` (a pickled module: load
        # only files you wrote yourself)
"""

from __future__ import annotations

import argparse
import time

import torch

from gblr_compress.distill import DistillConfig
from gblr_compress.pipeline import CompressConfig, compress
from samples.models import bert_small


def main() -> None:
    defaults = CompressConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=defaults.budget)
    ap.add_argument("--steps", type=int, default=defaults.distill.steps)
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--save", type=str, default=None, help="torch.save the frozen student here")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = bert_small().eval()
    ids = torch.randint(0, 8000, (args.seqs, args.len))
    calib = [{"input_ids": ids[i : i + args.batch]} for i in range(0, args.seqs, args.batch)]
    config = CompressConfig(budget=args.budget, distill=DistillConfig(steps=args.steps))
    t = time.perf_counter()
    result = compress(model, config, calib=calib)
    total = time.perf_counter() - t

    print(
        f"bert_small, {args.seqs} seqs x {args.len} tokens in batches of {args.batch}, "
        f"budget {args.budget}, steps {args.steps} (+{result.recovery.steps if result.recovery else 0} "
        f"recovery), {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"{'phase':10} {'seconds':>8}")
    for phase, sec in result.seconds.items():
        print(f"{phase:10} {sec:8.1f}")
    print(f"{'total':10} {total:8.1f}   (held-out agreement evaluations included)")
    cost = sum(r.cost for r in result.records.values())
    print(f"frozen exact cost {cost} <= allowed {result.max_cost}")
    print(f"\n{'held-out':10} {'rel_error':>9} {'cosine':>8}")
    for phase, q in result.quality.items():
        print(f"{phase:10} {q['rel_error']:9.4f} {q['cosine']:8.4f}")
    if args.save:
        torch.save(result.model, args.save)
        print(f"\nfrozen student saved to {args.save}")


if __name__ == "__main__":
    main()
