"""Calibration text from one family of templates, and evaluation text from others.

Issue 16's case calibrates on 256 sentences from one family of sentence templates and
scores on 300 sentences built from other templates. The suite's
``benchmarks/minilm/data/calib.txt`` is hand-written and varied; this writes a narrower
file, so that a run can be checked on the issue's kind of data without tuning to it:

- ``template_calib.txt``: 256 distinct sentences of one family ("A man is cutting an
  onion in the kitchen.": who, what is being done, to what, where), words drawn with a
  fixed seed;
- ``template_eval.txt``: 300 distinct sentences from four other templates (past-tense
  reports, questions, opinions, requests) over other words.

Neither shares a template or a content word list with the other, with the suite's
sentences, or with the news and Wikipedia text the other scripts score on.

Command::

    PYTHONPATH=. python benchmarks/template_text.py [--out DIR]

(default DIR: the asset cache, ``benchmarks.minilm.sources.bench_cache``). Then, e.g.::

    gblr-compress st.pt --budget 0.8 -o out.onnx --calib-text DIR/template_calib.txt
    PYTHONPATH=. python benchmarks/st_score.py out.onnx --also DIR/template_eval.txt
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from benchmarks.common import run_main
from benchmarks.minilm.sources import bench_cache

CALIB_COUNT = 256
EVAL_COUNT = 300

_WHO = ["a man", "a woman", "the boy", "the girl", "an old man", "a young woman", "the chef", "a teacher",
        "the doctor", "a child", "two men", "a dog", "the cat", "a musician", "the farmer"]
_DOING = ["is playing", "is cutting", "is riding", "is eating", "is washing", "is carrying", "is painting",
          "is holding", "is throwing", "is slicing", "is reading", "is cleaning"]
_WHAT = ["a guitar", "an onion", "a horse", "a bicycle", "a ball", "a piece of bread", "a carrot", "a book",
         "the car", "a potato", "a fence", "a flute", "a box", "the window"]
_WHERE = ["in the kitchen", "on the street", "in a park", "near the river", "on the stage", "in the garden",
          "at the beach", "in the field", ""]

_SUBJECT = ["The committee", "My neighbour", "Our manager", "The scientists", "Her brother", "The city council",
            "A local artist", "The students"]
_DID = ["announced", "rejected", "postponed", "celebrated", "criticized", "approved", "discovered", "organized"]
_THING = ["the new budget", "a surprising result", "the annual festival", "a plan for the harbour",
          "the school merger", "an unusual fossil", "the charity concert", "the road repairs"]
_WHEN = ["last week", "on Monday", "after a long debate", "earlier this year", "despite the weather",
         "without warning"]
_TOPIC = ["the election", "rising rents", "the museum", "electric cars", "the football season",
          "public transport", "the heat wave", "online privacy"]


def _distinct(make, count: int, rng: random.Random) -> list[str]:
    """``count`` distinct sentences from ``make(rng)``, in the order drawn."""
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(make(rng))
    return list(seen)


def _calib_sentence(rng: random.Random) -> str:
    where = rng.choice(_WHERE)
    s = f"{rng.choice(_WHO)} {rng.choice(_DOING)} {rng.choice(_WHAT)}" + (f" {where}" if where else "") + "."
    return s[0].upper() + s[1:]


def _eval_sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"{rng.choice(_SUBJECT)} {rng.choice(_DID)} {rng.choice(_THING)} {rng.choice(_WHEN)}."
    if kind == 1:
        return f"Why did {rng.choice(_SUBJECT).lower()} decide to discuss {rng.choice(_TOPIC)} {rng.choice(_WHEN)}?"
    if kind == 2:
        return f"I honestly think that {rng.choice(_TOPIC)} matters more than {rng.choice(_TOPIC)} this year."
    return f"Please send the report about {rng.choice(_TOPIC)} to {rng.choice(_SUBJECT).lower()} before Friday."


def template_texts(seed: int = 7) -> tuple[list[str], list[str]]:
    """``(calibration sentences, evaluation sentences)``: one template family, then four
    others; the same lists for the same seed."""
    rng = random.Random(seed)
    return _distinct(_calib_sentence, CALIB_COUNT, rng), _distinct(_eval_sentence, EVAL_COUNT, rng)


def write_files(out: Path) -> dict[Path, int]:
    """Write ``template_calib.txt`` and ``template_eval.txt`` (:func:`template_texts`)
    into ``out``; returns each path with its number of sentences."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, lines in zip(("template_calib.txt", "template_eval.txt"), template_texts()):
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        written[out / name] = len(lines)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder to write the two files to (default: the asset cache)")
    args = ap.parse_args(argv)
    for path, count in write_files(args.out or bench_cache()).items():
        print(f"{count:4d} sentences  {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
