"""The unit-split alternative on and off: all-MiniLM-L6-v2's sentence-embedding wrapper,
init only, calibrated on 256 sentences of one source, scored on every source.

For each budget the library call the command makes (``compress`` on the wrapper, its
held-out share from the calibration batches) runs twice, with
``InitConfig(unit_split=False)`` and with the default, and prints the mean embedding
cosine vs the dense wrapper on 400 sentences of each source
(``benchmarks/minilm/sources.py``) and whether the unit split was taken::

    PYTHONPATH=. python benchmarks/unit_split_bench.py --source suite --budgets 0.3 0.5 0.9
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import replace

import torch
from torch.nn import functional as F

from benchmarks.common import run_main
from benchmarks.minilm.model import embed, load_dense, make_batches
from benchmarks.minilm.sources import SOURCES, calib_sentences, eval_set
from gblr_compress.init import InitConfig
from gblr_compress.pipeline import CompressConfig, compress, default_distill


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=SOURCES, default="suite", help="calibration source (256 sentences)")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5, 0.9])
    args = ap.parse_args()
    torch.set_num_threads(2)
    dense, tok = load_dense()
    calib = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
             for b in make_batches(tok, calib_sentences(args.source, 256), batch_size=32)]
    evals = {es: make_batches(tok, eval_set(es, 400).sentences, batch_size=64) for es in SOURCES}
    ref = {es: embed(dense, b) for es, b in evals.items()}
    print(f"| calibration | budget | unit split | taken | {' | '.join(SOURCES)} |")
    print("| --- | --- | --- | --- |" + " --- |" * len(SOURCES))
    for budget in args.budgets:
        for on in (False, True):
            config = CompressConfig(budget=budget, seed=0, distill=replace(default_distill(), steps=0),
                                    init=InitConfig(unit_split=on))
            res = compress(copy.deepcopy(dense), config, calib=calib)
            taken = any("won on held-out outputs" in (r.reason or "") for r in res.init.layers.values())
            cos = [float(F.cosine_similarity(embed(res.model, evals[es]), ref[es]).mean()) for es in SOURCES]
            print(f"| {args.source} | {budget:g} | {'on' if on else 'off'} | {'yes' if taken else '-'} | "
                  + " | ".join(f"{c:.3f}" for c in cos) + " |", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
