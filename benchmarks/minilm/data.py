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

__all__ = ["DATA_DIR", "EvalSet", "load_calib", "load_eval"]

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
