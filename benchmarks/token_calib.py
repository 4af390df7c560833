"""Calibration given as token batches (``--calib calib.pt``) against the same sentences
given as text (``--calib-text``), through the command, on the MiniLM sentence-embedding
wrapper as a user pickles it.

The wrapper (:func:`~benchmarks.models_bench.pickled_minilm_wrapper`: the ``BertModel``
of :func:`assets.minilm_dir` in a sentence-embedding wrapper, so its
``config._name_or_path`` is that folder) and the
calibration sentences (default: the MiniLM suite's 256 hand-written ones) saved as
token batches of 32 rows, as a user tokenizes them. Per budget, the command runs on:

- ``tokens``: ``--calib calib.pt`` (no ``--tokenizer``: the command finds the one in
  the folder the wrapped model was loaded from, decodes the batches to text and
  calibrates as ``--calib-text`` does);
- ``tokens-kept``: the same with ``--keep-calib-tokens`` (the batches as given);
- ``text``: ``--calib-text`` with ``--tokenizer``.

Each file's embedding is scored against the dense wrapper's on the news and Wikipedia
sentences :mod:`benchmarks.st_score` uses (mean / min cosine): neither is the
calibration source.

Usage::

    PYTHONPATH=. python benchmarks/token_calib.py [--budgets 0.8 0.5] [--variants tokens tokens-kept text]
        [--calib-file benchmarks/minilm/data/calib.txt] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from benchmarks.common import run_main
from benchmarks.models_bench import _embeddings_onnx, _embeddings_torch, encoder_fidelity, pickled_minilm_wrapper
from benchmarks.st_score import sources

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("tokens", "tokens-kept", "text")


def _texts(path: Path) -> list[str]:
    return [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip() and not t.startswith("#")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--calib-file", type=Path, default=ROOT / "benchmarks" / "minilm" / "data" / "calib.txt")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="token-calib-"))
    work.mkdir(parents=True, exist_ok=True)
    folder, tok, dense, wrapper = pickled_minilm_wrapper(work, "wrapper.pt")
    texts = _texts(args.calib_file)
    calib_txt, calib_pt = work / "calib.txt", work / "calib.pt"
    calib_txt.write_text("\n".join(texts) + "\n", encoding="utf-8")
    batches = []
    for i in range(0, len(texts), 32):
        enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    torch.save(batches, calib_pt)
    scored = sources()
    with torch.no_grad():
        ref = {k: _embeddings_torch(dense, tok, v, True) for k, v in scored.items()}
    data = {"tokens": ["--calib", str(calib_pt)], "tokens-kept": ["--calib", str(calib_pt), "--keep-calib-tokens"],
            "text": ["--calib-text", str(calib_txt), "--tokenizer", str(folder)]}
    print(f"{len(texts)} calibration sentences from {args.calib_file}; {len(batches)} token batches; work {work}")
    print(f"{'budget':>6}  {'variant':<12} {'news mean / min':>16} {'wiki mean / min':>16} {'wall s':>7}  notes")
    for b in args.budgets:
        for v in args.variants:
            out = work / f"{v}_{b}.onnx"
            cmd = [str(Path(sys.executable).with_name("gblr-compress")), str(wrapper), "--budget", str(b),
                   "-o", str(out), "--quiet", "--trust-checkpoint", *data[v]]
            t = time.perf_counter()
            # The wrapper's class is importable from the repository root.
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                print(f"{b:>6}  {v:<12} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
                continue
            report = json.loads(out.with_name(out.stem + ".report.json").read_text())
            fid = {k: encoder_fidelity(ref[k], _embeddings_onnx(out, tok, s, True)) for k, s in scored.items()}
            decoded = any("decoded to" in n for n in report.get("notes", []))
            print(f"{b:>6}  {v:<12} {fid['news']['mean_cos']:>8.4f} / {fid['news']['min_cos']:.3f}"
                  f" {fid['wiki']['mean_cos']:>8.4f} / {fid['wiki']['min_cos']:.3f} {wall:>7.0f}  "
                  f"{'decoded; ' if decoded else ''}general texts {report['source'].get('general_texts', 0)}",
                  flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
