"""Calibration from text: read a text file, tokenize it with the model's tokenizer.

Users have sentences, not token tensors. ``--calib-text FILE`` takes one text per line
(``.txt``) or JSON lines with a ``text`` field (``.jsonl``), tokenizes them with the
tokenizer of the model's HuggingFace folder (or ``--tokenizer DIR``, or the one a pickled
model carries as its ``tokenizer`` attribute), and makes the
batches the model's ``forward`` takes: ``input_ids``, ``attention_mask`` and, when the
forward accepts it, ``token_type_ids``. Encoders get one text per row, padded to the
longest in its batch (rows are grouped by length within runs of a few batches, so
little compute goes to padding while the file's order still decides which texts come
late, e.g. the held-out share); causal LMs get the texts packed into fixed-length rows (each text
followed by the end-of-text token), so no compute goes to padding.

``transformers`` (or, for a folder with a ``tokenizer.json``, ``tokenizers`` alone) is
optional: without either, the error says how to install it. Nothing is downloaded.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gblr_compress.adapter import DictCall, find_tokenizer
from gblr_compress.batches import token_ids, token_mask
from gblr_compress.checkpoint import short_reason
from gblr_compress.errors import InputError
from gblr_compress.pooling import SentencePooling

__all__ = [
    "COPY_LENGTH_CHOICES",
    "JSONL_SUFFIXES",
    "TEXT_SUFFIXES",
    "TextTokenizer",
    "SHORT_WORDS",
    "VARIED_WORDS",
    "carried_tokenizer",
    "copy_varies",
    "forward_inputs",
    "GENERAL_TEXTS",
    "general_texts",
    "looks_english",
    "is_causal_lm",
    "load_tokenizer",
    "mix_vocabulary",
    "read_texts",
    "reordered_copy",
    "run_copy",
    "reorder_words",
    "vocabulary_words",
    "text_row_sources",
    "text_batches",
    "varied_counts",
]

_INSTALL = "pip install transformers tokenizers"
# Files read as JSON lines (a "text" field each), and the suffixes named text files have.
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt", *JSONL_SUFFIXES)
TABLE_SUFFIXES = (".csv", ".tsv")  # refused: their lines are rows of columns, not texts
# The general English sentences shipped in the package (data/general_english.txt,
# WordNet 3.0 usage examples under its license, data/WORDNET_LICENSE.txt).
_GENERAL_FILE = Path(__file__).resolve().parent / "data" / "general_english.txt"
GENERAL_TEXTS = 2000


def read_texts(path: str | os.PathLike) -> list[str]:
    """The texts in ``path``: one per non-blank line (``.txt``, or any other suffix but
    a table's), or the ``text`` field of each JSON line (``.jsonl`` / ``.ndjson``).

    Raises:
        InputError: missing or unreadable file, a ``.csv`` / ``.tsv`` table, bad JSON
            line, no texts.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"calibration text file not found: {p}")
    if p.suffix.lower() in TABLE_SUFFIXES:
        # Read as lines, a table's header and other columns would become texts.
        raise InputError(f"{p} is a table: write its text column to a .txt file (one text per line) "
                         "or a .jsonl file ({\"text\": ...} per line)")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{p} is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror}") from None
    texts: list[str] = []
    jsonl = p.suffix.lower() in JSONL_SUFFIXES
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{p}:{i}: not a JSON line ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InputError(f"{p}:{i}: each JSON line needs a string field \"text\"")
            if row["text"].strip():
                texts.append(row["text"].strip())
        else:
            texts.append(line.strip())
    if not texts:
        raise InputError(f"{p} holds no texts")
    return texts


@dataclass
class TextTokenizer:
    """A tokenizer reduced to what calibration needs.

    Attributes:
        encode: ``encode(text, special) -> ids`` (``special``: add the model's special
            tokens, e.g. ``[CLS] ... [SEP]``).
        pad_id: id used for padding.
        eos_id: end-of-text id placed between packed texts (None: none known).
        vocab_size: number of ids the tokenizer can produce.
        source: the folder it came from (for messages).
        words: the whole words of its vocabulary (:func:`vocabulary_words`), sorted.
        decode: ``decode(ids) -> text``, special tokens left out (None: not known).
    """

    encode: Any
    pad_id: int
    eos_id: int | None
    vocab_size: int
    source: str
    words: tuple[str, ...] = ()
    decode: Any = None


def general_texts(count: int, seed: int = 0) -> list[str]:
    """``count`` of the package's general English sentences (at most
    :data:`GENERAL_TEXTS`), a seeded sample in the file's order: short everyday
    sentences over the whole vocabulary of WordNet's usage examples, which train beside
    a narrow calibration file (:attr:`~gblr_compress.job.Job.general_text`).

    Raises:
        InputError: ``count`` is negative or above what the package ships, or the file
            is missing from the installation.
    """
    if count < 0 or count > GENERAL_TEXTS:
        raise InputError(f"--general-text must be in [0, {GENERAL_TEXTS}] (the sentences the package ships), "
                         f"got {count}")
    if count == 0:
        return []
    try:
        lines = [s for s in _GENERAL_FILE.read_text(encoding="utf-8").splitlines() if s.strip()]
    except OSError as exc:
        raise InputError(f"the package's general English sentences are missing ({_GENERAL_FILE}): "
                         f"{short_reason(exc)}; reinstall gblr-compress or pass --general-text 0") from None
    picked = sorted(torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed))[:count].tolist())
    return [lines[i] for i in picked]


# Function words of English: a text holding one of them is taken for English text.
_ENGLISH_WORDS = frozenset("the a an of and to in is are was it that for on with as this by".split())


def looks_english(texts: Sequence[str]) -> bool:
    """Whether at least half of ``texts`` hold a common English function word, the test
    the automatic :attr:`~gblr_compress.job.Job.general_text` makes before adding English
    sentences to calibration text (another language, code or tabular text gets none)."""
    if not texts:
        return False
    hits = sum(1 for t in texts if _ENGLISH_WORDS.intersection(w.strip(".,;:!?\"'()").lower() for w in t.split()))
    return 2 * hits >= len(texts)


def reorder_words(texts: Sequence[str], seed: int = 0, counts: Sequence[int] | None = None) -> list[str]:
    """The words of ``texts`` shuffled across all of them, dealt back into texts of the
    same word counts (or of ``counts``, which must sum to the number of words): the
    shift probe of ``--target-fidelity``, and the reordered copies that train beside
    text calibration (:attr:`~gblr_compress.job.Job.reorder_copies`).

    Held-out texts from the calibration file share its templates, topics and phrasing,
    so a file's fidelity on them says little about text unlike it: all-MiniLM-L6-v2
    calibrated on 256 templated sentences kept held-out cosine 0.980 at budget 0.9 +
    int8 and 0.948 / 0.953 on news / Wikipedia sentences (2.3-2.6x the loss). The same
    words in an order no calibration text had keep the vocabulary and the lengths and
    drop the rest: there the probe read 0.964 (benchmarks/README.md, "Shift probe").
    It narrows the gap, it does not close it. Trained on as copies, the same text kept
    0.010-0.015 more cosine on news / Wikipedia / WordNet sentences at budgets 0.9-0.7.
    """
    words = [w for t in texts for w in t.split()]
    if counts is None:
        counts = [n for n in (len(t.split()) for t in texts) if n]
    if sum(counts) != len(words) or any(n < 1 for n in counts):
        raise ValueError(f"counts must be positive and sum to the {len(words)} words")
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [words[i] for i in order]
    out, start = [], 0
    for n in counts:
        out.append(" ".join(shuffled[start : start + n]))
        start += n
    return out


# Word counts of a length-varied copy (varied_counts): log-uniform over this range, from
# shorter than most hand-written sentences to three Wikipedia sentences (22 words each on
# average), so that positions and contexts the file's own lengths never reach are in the
# statistics.
VARIED_WORDS = (4, 60)
# With --copy-lengths auto, texts averaging fewer words than this (the geometric middle
# of VARIED_WORDS, which a log-uniform draw falls below half the time) get the varied copy.
SHORT_WORDS = math.sqrt(VARIED_WORDS[0] * VARIED_WORDS[1])
# What Job.copy_lengths may be (copy_varies).
COPY_LENGTH_CHOICES = ("auto", "varied", "same")


def varied_counts(total: int, seed: int = 0) -> list[int]:
    """Word counts summing to ``total``, each drawn log-uniformly from
    :data:`VARIED_WORDS` (the last one whatever is left): the lengths of a length-varied
    reordered copy (:func:`reordered_copy`).

    Short texts are all the positions a templated file trains: all-MiniLM-L6-v2
    calibrated on 256 hand-written sentences of 6-14 words, at budget 0.8, kept news /
    Wikipedia sentence cosine (22 words on average) 0.930 / 0.939 with two copies at the
    file's lengths and 0.942 / 0.948 with the second copy's lengths varied, short WordNet
    sentences 0.968 / 0.967; all-mpnet-base-v2, a model this was not chosen on, news
    0.780 -> 0.804 (benchmarks/README.md, "Length-varied copies").
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    gen = torch.Generator().manual_seed(seed)
    lo, hi = math.log(VARIED_WORDS[0]), math.log(VARIED_WORDS[1])
    counts, left = [], total
    while left > 0:
        n = int(round(math.exp(lo + (hi - lo) * float(torch.rand((), generator=gen)))))
        counts.append(min(n, left))
        left -= counts[-1]
    return counts


# Markers that byte-level BPE (GPT-2: "Ġ") and SentencePiece ("▁") put on a token that
# starts a word; WordPiece marks the other tokens instead ("##ing").
_WORD_START = ("\u0120", "\u2581")


def vocabulary_words(vocab: Mapping[str, int] | Sequence[str]) -> tuple[str, ...]:
    """The whole words of a tokenizer vocabulary, sorted: ASCII letters only, two or
    more, with a word-start marker stripped. Where the vocabulary marks word starts (in
    more than a tenth of its tokens), only marked tokens count: the others are word
    pieces. WordPiece continuations (``##...``) never count."""
    tokens = list(vocab)
    marked = sum(t[:1] in _WORD_START for t in tokens) > len(tokens) // 10
    words = set()
    for t in tokens:
        if t.startswith("##"):
            continue
        if marked:
            if t[:1] not in _WORD_START:
                continue
            t = t[1:]
        if len(t) >= 2 and t.isascii() and t.isalpha():
            words.add(t)
    return tuple(sorted(words))


def mix_vocabulary(texts: Sequence[str], words: Sequence[str], share: float, seed: int = 0) -> list[str]:
    """``texts`` with each word replaced, with probability ``share``, by a word drawn
    uniformly from ``words`` (a tokenizer's, :func:`vocabulary_words`); word counts kept.

    A calibration file's words are a small part of what a model reads: with half the
    reordered copies' (:func:`reorder_words`) words drawn from its vocabulary,
    all-MiniLM-L6-v2 at budget 0.8 kept 0.003-0.008 more cosine on sentences of three
    other sources when calibrated on 256 hand-written sentences, and 0.007-0.014 more
    from 256 Wikipedia sentences (benchmarks/README.md, "vocabulary words in the copies").
    all-mpnet-base-v2 lost 0.08 news cosine with them, so the command leaves them off
    unless ``--vocab-share`` asks.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if share == 0.0 or not words:
        return list(texts)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in texts:
        ws = t.split()
        hit = (torch.rand(len(ws), generator=gen) < share).tolist()
        draw = torch.randint(len(words), (len(ws),), generator=gen).tolist()
        out.append(" ".join(words[j] if h else w for w, h, j in zip(ws, hit, draw)))
    return out


def reordered_copy(texts: Sequence[str], words: Sequence[str], share: float, seed: int,
                   varied: bool = False) -> list[str]:
    """One reordered copy of the training texts (:attr:`~gblr_compress.job.Job.reorder_copies`):
    their words reordered across texts (:func:`reorder_words`) and dealt into texts of
    their own lengths, or of varied lengths (:func:`varied_counts`) with ``varied``, then
    ``share`` of them replaced by ``words`` (:func:`mix_vocabulary`), all drawn from
    ``seed``."""
    total = sum(len(t.split()) for t in texts)
    counts = varied_counts(total, seed) if varied else None
    return mix_vocabulary(reorder_words(texts, seed, counts), words, share, seed)


def run_copy(texts: Sequence[str], words: Sequence[str], share: float, run_seed: int, k: int,
             lengths: str) -> tuple[list[str], bool]:
    """Reordered copy ``k`` (0, 1, ...) of a run seeded ``run_seed`` and whether it has
    varied lengths: :func:`reordered_copy` of ``texts`` drawn from ``run_seed + 1 + k``
    (copy 0 must not repeat the seed the run's own shuffles draw from), at the lengths
    :func:`copy_varies` gives copy ``k``. The command's copies and the benchmarks' come
    from here, so a benchmark trains on what the command would."""
    varied = copy_varies(k, lengths, texts)
    return reordered_copy(texts, words, share, run_seed + 1 + k, varied=varied), varied


def copy_varies(k: int, lengths: str, texts: Sequence[str] = ()) -> bool:
    """Whether reordered copy ``k`` (0, 1, ...) of a run, made from ``texts``, has
    varied lengths: with ``lengths`` ``"varied"`` every second copy does (the first
    keeps the file's lengths, which is what short hand-written test sentences look
    like); with ``"auto"`` only when the texts average fewer words than
    :data:`SHORT_WORDS`; with ``"same"`` none.

    Varied lengths add what a file of short texts lacks, and cost a file of long ones:
    all-MiniLM-L6-v2 calibrated on 256 Wikipedia sentences (22 words on average) at
    budget 0.5 lost 0.007-0.011 cosine on every source scored with them, where from
    256 hand-written sentences (9.3 words) it gained up to 0.009 (benchmarks/README.md,
    "Length-varied copies")."""
    if lengths not in COPY_LENGTH_CHOICES:
        raise ValueError(f"lengths must be one of {COPY_LENGTH_CHOICES}, got {lengths!r}")
    if lengths == "same" or k % 2 == 0:
        return False
    if lengths == "varied":
        return True
    words = sum(len(t.split()) for t in texts)
    return 0 < words < SHORT_WORDS * max(1, sum(1 for t in texts if t.split()))


def load_tokenizer(folder: str | os.PathLike) -> TextTokenizer:
    """The tokenizer saved in a HuggingFace folder (local files only, no remote code).

    Raises:
        InputError: the folder has no tokenizer, or neither transformers nor tokenizers
            is installed (the message says how to install them).
    """
    p = Path(folder)
    if not p.is_dir():
        raise InputError(f"tokenizer folder not found: {p}")
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # OSError, ValueError, ... from a folder without one
            raise InputError(f"no usable tokenizer in {p}: {type(exc).__name__}: {short_reason(exc)}") from None
        return _from_transformers(tok, str(p))
    if not (p / "tokenizer.json").is_file():
        raise InputError(f"tokenizing text needs `{_INSTALL}` (and a tokenizer in {p})")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError(f"tokenizing text needs `{_INSTALL}`") from None
    tok = Tokenizer.from_file(str(p / "tokenizer.json"))
    return TextTokenizer(
        encode=lambda text, special: tok.encode(text, add_special_tokens=special).ids,
        pad_id=_special_id(p, tok, "pad_token") or 0,
        eos_id=_special_id(p, tok, "eos_token"),
        vocab_size=tok.get_vocab_size(),
        source=str(p),
        words=vocabulary_words(tok.get_vocab()),
        decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True),
    )


def carried_tokenizer(model: nn.Module) -> TextTokenizer | None:
    """The tokenizer the model carries as a ``tokenizer`` attribute (a pickled
    sentence-transformers model, a wrapper that keeps its tokenizer), or None
    (:func:`~gblr_compress.adapter.find_tokenizer`)."""
    tok = find_tokenizer(model)
    return None if tok is None else _from_transformers(tok, f"the model's own ({type(tok).__name__})")


def _from_transformers(tok: Any, source: str) -> TextTokenizer:
    """A HuggingFace tokenizer object reduced to a :class:`TextTokenizer`."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TextTokenizer(
        encode=lambda text, special: list(tok(text, add_special_tokens=special)["input_ids"]),
        pad_id=int(pad if pad is not None else 0),
        eos_id=None if tok.eos_token_id is None else int(tok.eos_token_id),
        vocab_size=len(tok),
        source=source,
        words=vocabulary_words(tok.get_vocab()),
        decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True),
    )


# A HuggingFace Hub model id ("sentence-transformers/all-MiniLM-L6-v2", "gpt2").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def named_tokenizer(model: nn.Module, cache_dir: str | os.PathLike | None = None) -> TextTokenizer | None:
    """The tokenizer of the name a HuggingFace model inside ``model`` was loaded by (its
    ``config._name_or_path``, which a whole-model pickle or a wrapper of one remembers):
    saved in that local folder, or, for a Hub model id, in the local HuggingFace cache
    (``cache_dir``, default: the usual one; local files only, nothing is downloaded).
    None when neither holds one."""
    for mod in model.modules():
        name = getattr(getattr(mod, "config", None), "_name_or_path", None)
        if not isinstance(name, str) or not name:
            continue
        folder = Path(name).expanduser()
        if folder.is_dir():
            try:
                return load_tokenizer(folder)
            except InputError:
                continue
        elif _HUB_ID.match(name):
            tok = _cached_tokenizer(name, cache_dir)
            if tok is not None:
                return tok
    return None


def _cached_tokenizer(name: str, cache_dir: str | os.PathLike | None) -> TextTokenizer | None:
    """The tokenizer of Hub model ``name`` in the local HuggingFace cache, or None."""
    try:
        import transformers
    except ImportError:
        return None
    try:
        where = None if cache_dir is None else str(cache_dir)
        tok = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False, cache_dir=where)
    except Exception:  # not in the cache (OSError), or a tokenizer that cannot load here
        return None
    return _from_transformers(tok, f"{name} in the local HuggingFace cache")


# Decoded rows must tokenize back to their ids, or the text is not what the batches
# hold (a sentence pair's two segments read as one text, another tokenizer's ids).
DECODE_MATCH = 0.9


def decode_token_batches(batches: Sequence[Any], tokenizer: TextTokenizer) -> list[str] | None:
    """The texts of token batches (dicts whose ``input_ids`` are a 2-D integer tensor;
    ``attention_mask`` where given says which positions count): one text per row,
    special tokens left out, empty rows dropped. None when a batch is not such a dict,
    an id is outside the tokenizer's vocabulary, the tokenizer cannot decode, or fewer
    than :data:`DECODE_MATCH` of the rows tokenize back to their own ids (with or
    without the special tokens)."""
    if tokenizer.decode is None or not batches:
        return None
    texts, same, rows = [], 0, 0
    for batch in batches:
        ids = token_ids(batch) if isinstance(batch, Mapping) else None
        if ids is None:
            return None
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= tokenizer.vocab_size):
            return None
        mask = token_mask(batch)
        keep = mask.tolist() if mask is not None and mask.shape == ids.shape else None
        for i, row in enumerate(ids.tolist()):
            if keep is not None:
                row = [t for t, m in zip(row, keep[i]) if m]
            try:
                text = " ".join(str(tokenizer.decode(row)).split())
                same += row in (list(tokenizer.encode(text, True)), list(tokenizer.encode(text, False)))
            except Exception:  # a tokenizer that fails on these ids: the batches stay tokens
                return None
            rows += 1
            if text:
                texts.append(text)
    return texts if texts and same >= DECODE_MATCH * rows else None


def _special_id(folder: Path, tok: Any, key: str) -> int | None:
    """A special token's id from ``tokenizer_config.json`` (tokenizers-only path)."""
    cfg = folder / "tokenizer_config.json"
    try:
        value = json.loads(cfg.read_text()).get(key) if cfg.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def forward_inputs(model: nn.Module) -> list[str]:
    """Names of the keyword arguments ``model.forward`` takes (``**kwargs`` not included);
    for a load-time wrapper (:class:`~gblr_compress.adapter.DictCall`,
    :class:`~gblr_compress.pooling.SentencePooling`), the token inputs its model reads."""
    if isinstance(model, (DictCall, SentencePooling)):
        return list(model.input_names)
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is (or wraps) a causal language model: its texts are packed."""
    for mod in model.modules():
        config = getattr(mod, "config", None)
        if type(mod).__name__.endswith("ForCausalLM") or getattr(config, "is_decoder", False):
            return True
    return False


def text_batches(
    texts: Sequence[str],
    tokenizer: TextTokenizer,
    model: nn.Module,
    max_length: int = 128,
    batch_size: int | None = None,
    pack: bool | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Token batches for ``model`` from ``texts``.

    Args:
        texts: the calibration texts, in order.
        tokenizer: from :func:`load_tokenizer`.
        model: the model the batches are for (its forward's argument names decide the
            keys; its embedding size checks that the tokenizer fits it).
        max_length: tokens per row (encoders: truncation length; packed: row length).
        batch_size: rows per batch (None: 32, or 8 for packed rows: a causal LM's logits
            span its vocabulary, 49,152 floats a token on SmolLM2, so its rows cost far
            more memory and time in the distillation than an encoder's).
        pack: pack texts into full rows (default: only for causal LMs).

    Returns:
        Batches ``{"input_ids": (B, T) int64, "attention_mask": (B, T) int64}``, plus
        ``token_type_ids`` (zeros) when the forward takes it.

    Raises:
        InputError: bad sizes, a forward that takes no ``input_ids``, a tokenizer whose
            ids do not fit the model's embedding, or texts too short to fill one row.
    """
    if max_length < 2:
        raise InputError(f"max_length must be >= 2, got {max_length}")
    pack = is_causal_lm(model) if pack is None else pack
    if batch_size is None:
        batch_size = _PACKED_BATCH if pack else _ROWS_BATCH
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    names = forward_inputs(model)
    if "input_ids" not in names:
        # A forward annotated as taking one dict (sentence-transformers') is wrapped at
        # load time (adapter.DictCall); one argument here is a tensor or an unannotated
        # dict, which a text batch (keyword token tensors) cannot call.
        hint = ("wrap it in a module whose forward(input_ids, attention_mask) calls it and returns the "
                "output to keep, and save that" if len(names) == 1 else "give --calib FILE instead")
        raise InputError(
            f"the model's forward takes ({', '.join(names) or 'no named arguments'}), not input_ids: "
            f"text calibration needs a forward(input_ids, attention_mask, ...); {hint}"
        )
    vocab = _embedding_rows(model)
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise InputError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model embeds "
            f"{vocab}: it is not this model's tokenizer (give the right one with --tokenizer DIR)"
        )
    rows = _packed_rows(texts, tokenizer, max_length) if pack else \
        [ids for _, ids in _grouped_rows(texts, tokenizer, max_length, batch_size)]
    top = max(max(r) for r in rows)
    if vocab is not None and top >= vocab:
        raise InputError(
            f"tokenizer {tokenizer.source} produced token id {top}, outside the model's {vocab} "
            "embeddings: it is not this model's tokenizer (give the right one with --tokenizer DIR)"
        )
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(chunk), width), dtype=torch.int64)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r, dtype=torch.int64)
            mask[j, : len(r)] = 1
        batch = {"input_ids": ids}
        if "attention_mask" in names:
            batch["attention_mask"] = mask
        if "token_type_ids" in names:
            batch["token_type_ids"] = torch.zeros_like(ids)
        batches.append(batch)
    return batches


_GROUP_BATCHES = 8  # batches whose rows are sorted by length together
_ROWS_BATCH, _PACKED_BATCH = 32, 8  # text_batches' default rows per batch, unpacked / packed


def text_row_sources(texts: Sequence[str], tokenizer: TextTokenizer, max_length: int = 128,
                     batch_size: int | None = None) -> list[int]:
    """The index in ``texts`` of each row of the unpacked :func:`text_batches` (same
    arguments), in batch order: which texts a share of the batches holds (the rows of
    similar length are grouped, so the last batches are not exactly the last texts)."""
    return [i for i, _ in _grouped_rows(texts, tokenizer, max_length, batch_size or _ROWS_BATCH)]


def _grouped_rows(texts: Sequence[str], tokenizer: TextTokenizer, max_length: int,
                  batch_size: int) -> list[tuple[int, list[int]]]:
    """(text index, token ids) of each unpacked row, sorted by length within consecutive
    runs of ``_GROUP_BATCHES`` batches.

    Padding to the longest row of a batch wastes about half the compute on sentences of
    mixed length (measured: 52% of the tokens of 2,256 Wikipedia sentences in batches of
    32); sorting within runs of a few batches removes most of it. The runs keep the file's
    order at a coarse scale: the last batches hold texts from the file's last run
    (:func:`text_row_sources` says which).
    """
    rows = _text_rows(texts, tokenizer, max_length)
    span = batch_size * _GROUP_BATCHES
    out: list[tuple[int, list[int]]] = []
    for i in range(0, len(rows), span):
        out.extend(sorted(rows[i : i + span], key=lambda r: len(r[1])))  # stable: ties keep file order
    return out


def _text_rows(texts: Sequence[str], tokenizer: TextTokenizer, max_length: int) -> list[tuple[int, list[int]]]:
    rows = []
    for k, t in enumerate(texts):
        ids = tokenizer.encode(t, True)
        if len(ids) > max_length:  # keep the closing special token, as truncation does
            ids = ids[: max_length - 1] + ids[-1:]
        if ids:
            rows.append((k, ids))
    return rows


def _packed_rows(texts: Sequence[str], tokenizer: TextTokenizer, max_length: int) -> list[list[int]]:
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer.encode(t, False))
        if tokenizer.eos_id is not None:
            stream.append(tokenizer.eos_id)
    full = len(stream) // max_length
    if full == 0:
        raise InputError(
            f"the texts hold {len(stream)} tokens, fewer than one packed row of --max-length {max_length}"
        )
    # The tail shorter than a row is dropped: every packed row is real text, no padding.
    return [stream[i * max_length : (i + 1) * max_length] for i in range(full)]


def _embedding_rows(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (the largest nn.Embedding, so position
    embeddings are not mistaken for it), if it has one."""
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes) if sizes else None
