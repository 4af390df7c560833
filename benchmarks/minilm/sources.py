"""Text sources for calibrating on one distribution and scoring on another.

Each source gives calibration sentences and an evaluation set, disjoint from each
other:

- ``suite``: the hand-written sentences of :mod:`minilm.data` (``calib.txt`` for
  calibration; the eval pool with its paraphrase pairs and hard negatives).
- ``wiki``: Wikipedia, split by article (``wiki_calib.txt`` / ``wiki_eval.txt`` of
  ``benchmarks/assets.py``); the eval set is evenly spaced over ``wiki_eval.txt``.
- ``news``: the Lee news corpus (``news.txt``), in article order: the last
  ``eval_size`` sentences (the last ~50 articles) are the eval set, calibration comes
  from the start, so no article feeds both.
- ``wordnet``: WordNet gloss examples (``wordnet.txt``), strided: calibration takes
  even positions, evaluation odd ones, both spread over the whole file.

Only ``suite`` has paraphrase pairs; the others are scored by mean/min cosine and
nearest-neighbour agreement with the dense model.
"""

from __future__ import annotations

import os
from pathlib import Path

from gblr_compress.errors import InputError

from .data import EvalSet, load_calib, load_eval

__all__ = ["SOURCES", "bench_cache", "calib_sentences", "eval_set"]

SOURCES = ("suite", "wiki", "news", "wordnet")
_FILES = {"wiki": ("wiki_calib.txt", "wiki_eval.txt"), "news": ("news.txt",), "wordnet": ("wordnet.txt",)}


def bench_cache() -> Path:
    """The asset cache of ``benchmarks/assets.py`` (``$GBLR_BENCH_CACHE`` or
    ``~/.cache/gblr-compress-bench``), without importing it."""
    return Path(os.environ.get("GBLR_BENCH_CACHE", Path.home() / ".cache" / "gblr-compress-bench"))


def _read(name: str, cache: Path | None) -> list[str]:
    path = (cache or bench_cache()) / name
    if not path.is_file():
        raise InputError(f"missing {path}; build it with: PYTHONPATH=. python -m benchmarks.assets --text")
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _check(source: str) -> None:
    if source not in SOURCES:
        raise InputError(f"unknown text source {source!r}; choose from {', '.join(SOURCES)}")


def _news_eval_start(lines: list[str], eval_size: int) -> int:
    if len(lines) <= eval_size:
        raise InputError(f"news.txt has {len(lines)} sentences, not more than the {eval_size} to score")
    return len(lines) - eval_size


def calib_sentences(source: str, n: int, eval_size: int = 400, cache: Path | None = None) -> list[str]:
    """The first ``n`` calibration sentences of ``source`` (fewer if it has fewer).

    Never overlaps :func:`eval_set` of the same source with the same ``eval_size``.
    """
    _check(source)
    if n < 1:
        raise InputError(f"need at least one calibration sentence, got {n}")
    if source == "suite":
        return load_calib()[:n]
    if source == "wiki":
        return _read("wiki_calib.txt", cache)[:n]
    if source == "news":
        lines = _read("news.txt", cache)
        return lines[: _news_eval_start(lines, eval_size)][:n]
    return _read("wordnet.txt", cache)[0::2][:n]


def eval_set(source: str, eval_size: int = 400, cache: Path | None = None) -> EvalSet:
    """The scored sentences of ``source``: the suite's eval pool (``eval_size`` is
    ignored: it is scored whole, pairs included), else ``eval_size`` sentences without
    pairs."""
    _check(source)
    if source == "suite":
        return load_eval()
    if source == "wiki":
        lines = _read("wiki_eval.txt", cache)
        step = max(1, len(lines) // eval_size)
        picked = lines[::step][:eval_size]
    elif source == "news":
        lines = _read("news.txt", cache)
        picked = lines[_news_eval_start(lines, eval_size):]
    else:
        picked = _read("wordnet.txt", cache)[1::2]
        step = max(1, len(picked) // eval_size)
        picked = picked[::step][:eval_size]
    seen: dict[str, None] = dict.fromkeys(picked)  # files are deduplicated; stay safe
    return EvalSet(sentences=list(seen), pairs=[], negatives=[])
