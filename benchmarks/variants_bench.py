"""Variants of the pipeline's settings on all-MiniLM-L6-v2, scored off the calibration source.

Each variant is the command's pipeline (the MiniLM suite's gblr rows: the command's
reordered copies training beside the calibration sentences) with ``InitConfig`` fields
overridden by a JSON object; its ``"distill"`` entry, when present, runs the command's
distillation with those ``DistillConfig`` fields overridden (``{}``: the defaults), and
without it the init is frozen as it is (``gblr-init``). Calibrated on one source's first
256 sentences, scored (mean embedding cosine vs the dense model, in PyTorch) on every
source of ``minilm.sources``: a setting is judged on the sources the calibration did not
come from.

Run from the repository root::

    PYTHONPATH=. python benchmarks/variants_bench.py --budget 0.8 --calib-source suite \\
        --variant '{}' --variant '{"damping": 0.001}' --variant '{"distill": {"lr": 0.0005}}'
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from minilm import contenders
from minilm.metrics import fidelity
from minilm.model import embed, load_dense, make_batches
from minilm.sources import SOURCES, calib_sentences, eval_set

from gblr_compress.text import COPY_LENGTH_CHOICES


def main(argv: list[str] | None = None) -> None:
    """Build and score every ``--variant``; print one line each."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.8)
    p.add_argument("--calib-source", choices=SOURCES, default="suite")
    p.add_argument("--n-calib", type=int, default=256)
    p.add_argument("--eval-size", type=int, default=400)
    p.add_argument("--vocab-share", type=float, default=None, help="the copies' vocabulary share (default: the command's)")
    p.add_argument("--copy-lengths", choices=COPY_LENGTH_CHOICES, default=None,
                   help="the copies' lengths (default: the command's)")
    p.add_argument("--no-reorder", action="store_true", help="no reordered copies (--reorder-copies 0)")
    p.add_argument("--variant", action="append", default=None,
                   help="JSON object of InitConfig fields and an optional \"distill\" object of DistillConfig "
                        "fields (repeatable; default: one run, init only, with the defaults)")
    args = p.parse_args(argv)
    from gblr_compress.distill import DistillConfig
    from gblr_compress.init import InitConfig
    from gblr_compress.pipeline import default_distill

    def settings(v: dict) -> tuple[InitConfig, DistillConfig | None]:
        init = {k: x for k, x in v.items() if k != "distill"}
        return InitConfig(**init), None if "distill" not in v else replace(default_distill(), **v["distill"])

    variants = [json.loads(v) for v in (args.variant or ["{}"])]
    for v in variants:
        settings(v)  # a bad field fails here, before the slow part
    dense, tokenizer = load_dense()
    evals = {es: eval_set(es, args.eval_size) for es in SOURCES}
    batches = {es: make_batches(tokenizer, ev.sentences, batch_size=64) for es, ev in evals.items()}
    dense_emb = {es: embed(dense, b) for es, b in batches.items()}
    sentences = calib_sentences(args.calib_source, args.n_calib, args.eval_size)
    calib = make_batches(tokenizer, sentences, batch_size=32)
    copies = 0 if args.no_reorder else contenders.set_training_texts(calib, sentences, tokenizer, args.vocab_share,
                                                                                  args.copy_lengths)[0]
    print(f"all-MiniLM-L6-v2, budget {args.budget}, calibrated on {len(sentences)} {args.calib_source} "
          f"sentences + {copies} reordered copies; mean cosine vs dense on {', '.join(SOURCES)}", flush=True)
    for v in variants:
        t0 = time.perf_counter()
        model = contenders.gblr_with(dense, calib, args.budget, *settings(v))
        seconds = time.perf_counter() - t0
        cos = {es: fidelity(embed(model, batches[es]), dense_emb[es], []).mean_cos for es in SOURCES}
        shown = " / ".join(f"{c:.3f}" for c in cos.values())
        print(f"{json.dumps(v)}: {shown} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
