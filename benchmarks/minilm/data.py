"""The hand-written sentences under ``data/``.

- ``eval_pairs.tsv``: one line per paraphrase pair, ``sentence<TAB>paraphrase`` and an
  optional third column, a hard negative of the first sentence (shares most of its words,
  means something else).
- ``eval_extra.txt``: more evaluation sentences (distractors), one per line.
- ``calib.txt``: calibration sentences, one per line, none of them in the eval set.

Lines starting with ``#`` and blank lines are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gblr_compress.errors import InputError

__all__ = ["DATA_DIR", "EvalSet", "load_calib", "load_eval", "split_eval"]

DATA_DIR = Path(__file__).resolve().parent / "data"


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"missing data file {path}")
    return [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


@dataclass(frozen=True)
class EvalSet:
    """The evaluation pool.

    Attributes:
        sentences: every eval sentence, once (pairs, negatives, extras, in file order).
        pairs: (i, j) indices of paraphrase pairs into ``sentences``.
        negatives: (i, k) indices: ``k`` is a hard negative of ``i``.
    """

    sentences: list[str]
    pairs: list[tuple[int, int]]
    negatives: list[tuple[int, int]]


def load_eval(data_dir: Path = DATA_DIR) -> EvalSet:
    """Read the eval pool; raises InputError on a malformed line or a repeated sentence."""
    sentences: list[str] = []
    index: dict[str, int] = {}

    def add(s: str, where: str) -> int:
        s = s.strip()
        if not s:
            raise InputError(f"empty sentence in {where}")
        if s in index:
            raise InputError(f"sentence repeated in the eval set ({where}): {s!r}")
        index[s] = len(sentences)
        sentences.append(s)
        return index[s]

    pairs: list[tuple[int, int]] = []
    negatives: list[tuple[int, int]] = []
    for n, line in enumerate(_lines(data_dir / "eval_pairs.tsv"), 1):
        cols = line.split("\t")
        if len(cols) not in (2, 3):
            raise InputError(f"eval_pairs.tsv line {n}: expected 2 or 3 tab-separated columns, got {len(cols)}")
        a, b = add(cols[0], f"eval_pairs.tsv:{n}"), add(cols[1], f"eval_pairs.tsv:{n}")
        pairs.append((a, b))
        if len(cols) == 3:
            negatives.append((a, add(cols[2], f"eval_pairs.tsv:{n}")))
    for n, line in enumerate(_lines(data_dir / "eval_extra.txt"), 1):
        add(line, f"eval_extra.txt:{n}")
    return EvalSet(sentences=sentences, pairs=pairs, negatives=negatives)


def load_calib(data_dir: Path = DATA_DIR) -> list[str]:
    """Calibration sentences, in file order."""
    return [s.strip() for s in _lines(data_dir / "calib.txt")]


def split_eval(evalset: EvalSet) -> tuple[list[str], EvalSet]:
    """Halve the eval pool: every second paraphrase pair (with its hard negative) and
    every second extra sentence become extra calibration text; the rest is a smaller
    eval set, re-indexed. A pair and its negative never straddle the halves, so the
    scored half holds nothing the calibration saw.

    Returns:
        ``(calibration sentences, the scored half)``.
    """
    neg_of = dict(evalset.negatives)
    given: set[int] = set()
    in_pairs: set[int] = set()
    kept_pairs: list[tuple[int, int]] = []
    for n, (i, j) in enumerate(evalset.pairs):
        members = {i, j} | ({neg_of[i]} if i in neg_of else set())
        in_pairs |= members
        if n % 2 == 0:
            given |= members
        else:
            kept_pairs.append((i, j))
    extras = [x for x in range(len(evalset.sentences)) if x not in in_pairs]
    given.update(extras[::2])
    kept = [x for x in range(len(evalset.sentences)) if x not in given]
    pos = {x: n for n, x in enumerate(kept)}
    half = EvalSet(
        sentences=[evalset.sentences[x] for x in kept],
        pairs=[(pos[i], pos[j]) for i, j in kept_pairs],
        negatives=[(pos[i], pos[neg_of[i]]) for i, _ in kept_pairs if i in neg_of],
    )
    return [evalset.sentences[x] for x in sorted(given)], half
