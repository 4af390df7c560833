"""What ``--target-fidelity`` decides on, against what a user sees: each candidate the
search can build (init only or distilled, float or int8) scored both ways on the
all-MiniLM-L6-v2 sentence-embedding wrapper.

- held-out: mean cosine vs the dense model in onnxruntime on the calibration file's
  held-out share, or on ``--heldout`` text from a third source with ``--heldout-source
  wordnet`` (:class:`gblr_compress.deploy.Bench`);
- shift probe: the same on the held-out texts' words reordered across texts (without
  ``--heldout``; :func:`gblr_compress.text.reorder_words`); the search compares the
  lower of the two with F;
- shifted: the same file's embeddings on news sentences (another source), and on the
  ``--also-score`` sources, vs the dense PyTorch wrapper.

Calibration: the first ``--calib-lines`` sentences of ``--calib-source`` (Wikipedia, or
the MiniLM suite's hand-written templated sentences), tokenized as ``--calib-text``
does. The candidates are built with the search's own calls
(``prepare`` once, ``compress_prepared`` per budget), so the held-out column is the
search's figure exactly.

Usage (heavy: run alone)::

    PYTHONPATH=. python benchmarks/target_gap.py [--budgets 0.9 0.8 0.7 0.6 0.5] [--distilled 0.8 0.7] \\
        [--calib-source suite --calib-lines 256] [--also-score wiki wordnet]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from benchmarks import assets
from benchmarks.common import run_main
from benchmarks.minilm.model import SentenceEncoder
from benchmarks.minilm.sources import calib_sentences, eval_set
from benchmarks.models_bench import _embeddings_onnx, _embeddings_torch, encoder_fidelity
from gblr_compress.job import Job, candidate_cost, deploy_bench, load_inputs
from gblr_compress.pipeline import CompressConfig, compress_prepared, prepare
from gblr_compress.target import search_job


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.9, 0.8, 0.7, 0.6, 0.5],
                    help="init-only candidates")
    ap.add_argument("--distilled", nargs="*", type=float, default=[0.8, 0.7],
                    help="budgets also built with the default distillation")
    ap.add_argument("--calib-lines", type=int, default=2000)
    ap.add_argument("--calib-source", choices=["wiki", "suite"], default="wiki")
    ap.add_argument("--also-score", nargs="*", choices=["wiki", "wordnet", "suite"], default=[],
                    help="more sources scored besides news (mean cosine)")
    ap.add_argument("--eval-lines", type=int, default=400)
    ap.add_argument("--heldout-source", choices=["none", "wordnet"], default="none",
                    help="decide on --heldout text from this source (none: the calibration's held-out share)")
    ap.add_argument("--heldout-lines", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModel, AutoTokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = assets.minilm_dir()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        dense = SentenceEncoder(AutoModel.from_pretrained(str(folder), local_files_only=True)).eval()
        wrapper = work / "minilm_wrapper.pt"
        torch.save(dense, wrapper)
        calib_txt = work / "calib.txt"
        calib = (assets.wiki_split()[0] if args.calib_source == "wiki"
                 else calib_sentences("suite", args.calib_lines))[: args.calib_lines]
        calib_txt.write_text("\n".join(calib) + "\n")
        scored = {"news": assets.news_sentences()[: args.eval_lines]}
        scored.update({s: eval_set(s, args.eval_lines).sentences for s in args.also_score})
        refs = {s: _embeddings_torch(dense, tokenizer, t, True) for s, t in scored.items()}

        heldout = None
        if args.heldout_source == "wordnet":
            heldout = work / "heldout.txt"
            heldout.write_text("\n".join(assets.wordnet_spread(args.heldout_lines)) + "\n")
        job = Job(model=str(wrapper), output=str(work / "out.onnx"), calib_text=str(calib_txt),
                  tokenizer=str(folder), trust_checkpoint=True, config=CompressConfig(),
                  heldout=None if heldout is None else str(heldout))
        job = search_job(job)  # the job as the search runs it (no reordered copies with the probe)
        inputs = load_inputs(job, probe=True)
        t0 = time.perf_counter()
        prep = prepare(inputs.loaded.model, job.config, inputs.calib, share_teacher=True, held=inputs.held,
                       extra_fit=inputs.extra)
        print(f"statistics: {time.perf_counter() - t0:.0f} s")
        dense_cost = sum(m * n for m, n in prep.stats.shapes.values())
        bench = deploy_bench(job, inputs, dense_cost, probe=True)
        plan = [(b, False) for b in args.budgets] + [(b, True) for b in args.distilled]
        try:
            for budget, distilled in plan:
                distill = job.config.distill if distilled else replace(job.config.distill, steps=0)
                t0 = time.perf_counter()
                result = compress_prepared(prep, replace(job.config, budget=budget, distill=distill))
                built = time.perf_counter() - t0
                entry = bench.add_float(result.model, budget, candidate_cost(result), distilled, result)
                for e in (entry, bench.add_int8(entry)):
                    got = {s: encoder_fidelity(refs[s], _embeddings_onnx(e.path, tokenizer, t, True))["mean_cos"]
                           for s, t in scored.items()}
                    c = e.candidate
                    rows.append((budget, distilled, c.int8, c.cosine, c.probe_cosine, got, built))
                    print(f"budget {budget} distilled {distilled} int8 {c.int8}: held-out {c.cosine:.4f} "
                          f"probe {c.probe_cosine} {got} (built in {built:.0f} s)", flush=True)
        finally:
            bench.close()

    held_note = ("20% held out" if args.heldout_source == "none"
                 else f"held-out: {args.heldout_lines} {args.heldout_source} examples (--heldout)")
    source = "Wikipedia" if args.calib_source == "wiki" else "hand-written (suite)"
    print(f"\ncalibration {len(calib)} {source} sentences ({held_note}), shifted: "
          + ", ".join(f"{len(t)} {s}" for s, t in scored.items()) + " sentences\n")
    names = list(scored)
    print("| budget | distilled | int8 | held-out cosine | shift-probe cosine | searched on (lower) | "
          + " | ".join(f"{s} cosine" for s in names) + " | worst - searched | build s |")
    print("| --- " * (8 + len(names)) + "|")
    for b, d, q, h, p, got, secs in rows:
        searched = h if p is None else min(h, p)
        cells = " | ".join(f"{got[s]:.4f}" for s in names)
        print(f"| {b} | {'yes' if d else 'no'} | {'yes' if q else 'no'} | {h:.4f} | "
              f"{'-' if p is None else f'{p:.4f}'} | {searched:.4f} | {cells} | {min(got.values()) - searched:+.4f} | "
              f"{secs:.0f} |")
    return 0


if __name__ == "__main__":
    run_main(main)
