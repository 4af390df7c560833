"""Pruned windows vs low rank off the calibration distribution, on the MiniLM wrapper.

all-MiniLM-L6-v2 inside the sentence-embedding wrapper (as ``models_bench``'s
``minilm-wrapper`` case), calibrated on the first ``--calib-lines`` Wikipedia sentences
(``wiki_calib.txt``, tokenized as ``--calib-text`` does), scored on the first 400 news
sentences (another source): mean cosine of the compressed model's embeddings vs the dense
model's, in PyTorch (the ONNX export computes the same function; ``models_bench`` checks
that path). Per budget it runs the library's ``compress`` with pruning off (low rank
only: the tool before pruned windows) and on (the default settings; ``--prune refit``
adds the sequential refit), init only (``--steps 0``) and with the
command's default distillation (100 steps), and prints the forms the init chose.

Usage::

    PYTHONPATH=. flock /tmp/gblr-cpu.lock python benchmarks/shifted_bench.py \\
        [--budgets 0.9 0.8 0.5] [--steps 0 100] [--calib-lines 256]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

from benchmarks import assets
from benchmarks.minilm.model import SentenceEncoder
from gblr_compress.distill import DistillConfig
from gblr_compress.init import InitConfig
from gblr_compress.pipeline import CompressConfig, compress
from gblr_compress.text import load_tokenizer, read_texts, text_batches


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Embeddings ``(N, H)`` of ``texts``, 32 at a time, truncated at 128 tokens."""
    out = []
    for i in range(0, len(texts), 32):
        enc = tokenizer(texts[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    return torch.cat(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.9, 0.8, 0.5])
    ap.add_argument("--steps", nargs="+", type=int, default=[0, 100])
    ap.add_argument("--prune", nargs="+", choices=["off", "on", "imp", "refit"], default=None,
                    help="off: low rank only (the tool before pruned windows); on: pruned windows (the "
                         "default settings, units chosen by OBS elimination); imp: units chosen by "
                         "importance instead; refit: on, plus the sequential refit (CompressConfig.refit). "
                         "Default: off on")
    ap.add_argument("--calib-lines", type=int, default=256)
    ap.add_argument("--eval-lines", type=int, default=400)
    args = ap.parse_args()
    if args.prune is None:
        args.prune = ["off", "on"]

    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(2)
    folder = assets.minilm_dir()
    dense = SentenceEncoder(AutoModel.from_pretrained(str(folder), local_files_only=True)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    calib_txt = assets.cache_dir() / "wiki_calib.txt"
    calib = text_batches(read_texts(calib_txt)[: args.calib_lines], load_tokenizer(folder), dense)
    news = [s for s in (assets.cache_dir() / "news.txt").read_text().splitlines() if s.strip()][: args.eval_lines]
    ref = embed(dense, hf_tok, news)
    print(f"calibration: first {args.calib_lines} lines of {calib_txt.name} ({len(calib)} batches); "
          f"evaluation: first {len(news)} lines of news.txt")
    print("| budget | prune | steps | news mean cos | min cos | forms (layers) | exact cost / budget | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for budget in args.budgets:
        for steps in args.steps:
            for prune in args.prune:
                init = InitConfig(prune=prune != "off", prune_select="importance" if prune == "imp" else "obs")
                cfg = CompressConfig(budget=budget, init=init,
                                     refit=prune == "refit", distill=DistillConfig(steps=steps))
                t = time.perf_counter()
                res = compress(dense, cfg, calib=calib)
                secs = time.perf_counter() - t
                got = embed(res.model, hf_tok, news)
                cos = nn.functional.cosine_similarity(got, ref, dim=1)
                forms = Counter(r.status for r in res.init.layers.values())
                cost = sum(r.cost for r in res.records.values())
                budget_cost = res.init.budget_cost
                print(f"| {budget} | {prune} | {steps} | {float(cos.mean()):.4f} | {float(cos.min()):.3f} | "
                      f"{', '.join(f'{k} {v}' for k, v in sorted(forms.items()))} | "
                      f"{cost / max(budget_cost, 1) * budget:.4f} | {secs:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
