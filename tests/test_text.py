"""Text calibration: reading text files, a tokenizer built here, batches per model kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gblr_compress.errors import InputError
from gblr_compress.text import (
    SHORT_WORDS,
    VARIED_WORDS,
    copy_varies,
    forward_inputs,
    is_causal_lm,
    load_tokenizer,
    mix_vocabulary,
    read_texts,
    reorder_words,
    reordered_copy,
    run_copy,
    text_batches,
    varied_counts,
    vocabulary_words,
)

tokenizers = pytest.importorskip("tokenizers")

WORDS = "the a cat dog sat ran on under mat log big small red blue and then".split()


def _sentences(n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
            for k in torch.randint(3, 12, (n,), generator=g)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer trained in memory, saved as a HuggingFace folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_sentences(200), trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]", "eos_token": "</s>",
        "unk_token": "[UNK]",
    }))
    return d


class Encoder(nn.Module):
    def __init__(self, vocab: int = 40) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.emb(input_ids))


class TinyForCausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.head = nn.Linear(8, 40)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.emb(input_ids))


def test_read_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first line\n\n  second line  \n")
    assert read_texts(tmp_path / "a.txt") == ["first line", "second line"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert read_texts(tmp_path / "b.jsonl") == ["one", "two"]


@pytest.mark.parametrize(("name", "content", "match"), [
    ("missing.txt", None, "not found"),
    ("empty.txt", "\n \n", "no texts"),
    ("bad.jsonl", '{"text": "ok"}\n{oops\n', r"bad.jsonl:2: not a JSON line"),
    ("field.jsonl", '{"body": "x"}\n', 'field "text"'),
])
def test_bad_text_files(tmp_path: Path, name: str, content: str | None, match: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=match):
        read_texts(tmp_path / name)


def test_encoder_batches_pad_per_batch_and_follow_forward(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    texts = _sentences(10)
    batches = text_batches(texts, tok, Encoder(), max_length=6, batch_size=4)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert set(batches[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    b = batches[0]
    assert b["input_ids"].shape[1] <= 6 and b["input_ids"].dtype == torch.int64
    cls, sep = tok.encode("", True)  # [CLS] [SEP]
    lengths = b["attention_mask"].sum(1)
    for row, n in zip(b["input_ids"], lengths):
        assert row[0] == cls and row[n - 1] == sep  # truncation keeps the closing token
        assert (row[n:] == tok.pad_id).all()


def test_causal_lm_rows_are_packed_full(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    model = TinyForCausalLM()
    assert is_causal_lm(model) and not is_causal_lm(Encoder())
    batches = text_batches(_sentences(30), tok, model, max_length=16, batch_size=3)
    assert set(batches[0]) == {"input_ids", "attention_mask"}  # no token_type_ids in its forward
    assert all(b["input_ids"].shape[1] == 16 and bool(b["attention_mask"].all()) for b in batches)
    flat = torch.cat([b["input_ids"].flatten() for b in batches])
    assert (flat == tok.eos_id).any()  # texts are separated by the end-of-text token


def test_tokenizer_errors(tok_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(tok_dir)
    with pytest.raises(InputError, match="not this model's tokenizer"):
        text_batches(_sentences(4), tok, Encoder(vocab=10))
    with pytest.raises(InputError, match="not input_ids"):
        text_batches(_sentences(4), tok, nn.Linear(3, 3))

    class DictForward(nn.Module):  # sentence-transformers' forward(features): one dict
        def forward(self, features: dict) -> torch.Tensor:
            return features["input_ids"].float()

    class TwoTensors(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    with pytest.raises(InputError, match=r"takes \(features\).*wrap it in a module whose forward\(input_ids"):
        text_batches(_sentences(4), tok, DictForward())
    with pytest.raises(InputError, match=r"takes \(x, y\).*give --calib FILE"):
        text_batches(_sentences(4), tok, TwoTensors())
    with pytest.raises(InputError, match="fewer than one packed row"):
        text_batches(["the cat"], tok, TinyForCausalLM(), max_length=64)
    with pytest.raises(InputError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(InputError, match="tokenizer"):
        load_tokenizer(tmp_path)  # a folder without a tokenizer


def test_forward_inputs() -> None:
    assert forward_inputs(Encoder()) == ["input_ids", "attention_mask", "token_type_ids"]


def test_tokenizers_alone_and_neither(tok_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    full = load_tokenizer(tok_dir)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails: not installed
    alone = load_tokenizer(tok_dir)
    text = "the cat sat on the mat"
    assert alone.encode(text, True) == full.encode(text, True)
    assert (alone.pad_id, alone.eos_id) == (full.pad_id, full.eos_id)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(InputError, match="pip install transformers"):
        load_tokenizer(tok_dir)


def test_reorder_words_keeps_words_and_lengths() -> None:
    texts = ["the cat sat on the mat", "a dog ran", "", "it was big and red today"]
    out = reorder_words(texts, seed=3)
    kept = [t for t in texts if t.split()]
    assert [len(t.split()) for t in out] == [len(t.split()) for t in kept]  # same word counts, blank dropped
    assert sorted(w for t in out for w in t.split()) == sorted(w for t in texts for w in t.split())
    assert out == reorder_words(texts, seed=3)  # the seed fixes it
    assert out != kept  # the order is new
    assert reorder_words([], seed=0) == []


def test_reorder_words_deals_into_given_counts() -> None:
    texts = ["the cat sat on the mat", "a dog ran", "it was big and red today"]
    out = reorder_words(texts, seed=3, counts=[2, 10, 3])
    assert [len(t.split()) for t in out] == [2, 10, 3]
    assert sorted(w for t in out for w in t.split()) == sorted(w for t in texts for w in t.split())
    # The same shuffle as at the texts' own lengths, dealt differently.
    assert " ".join(out) == " ".join(reorder_words(texts, seed=3))
    with pytest.raises(ValueError, match="sum to the 15 words"):
        reorder_words(texts, seed=3, counts=[2, 3])
    with pytest.raises(ValueError, match="positive"):
        reorder_words(texts, seed=3, counts=[0, 15])


def test_varied_counts_span_short_to_long_texts() -> None:
    lo, hi = VARIED_WORDS
    counts = varied_counts(20_000, seed=1)
    assert sum(counts) == 20_000
    assert all(lo <= n <= hi for n in counts[:-1]) and 1 <= counts[-1] <= hi
    # Log-uniform: about as many texts below the geometric middle as above it.
    mid = (lo * hi) ** 0.5
    below = sum(n < mid for n in counts) / len(counts)
    assert 0.4 < below < 0.6
    assert varied_counts(20_000, seed=1) == counts and varied_counts(20_000, seed=2) != counts
    assert varied_counts(0) == [] and sum(varied_counts(3, seed=0)) == 3
    with pytest.raises(ValueError):
        varied_counts(-1)


def test_every_second_copy_varies_its_lengths() -> None:
    assert [copy_varies(k, "varied") for k in range(4)] == [False, True, False, True]
    assert not any(copy_varies(k, "same") for k in range(4))
    with pytest.raises(ValueError, match="lengths"):
        copy_varies(1, "long")
    # auto: only texts shorter on average than the varied range's geometric middle.
    assert 15 < SHORT_WORDS < 16
    short, long_ = ["one two three four five six seven eight nine"] * 4, [" ".join(["w"] * 22)] * 4
    assert [copy_varies(k, "auto", short) for k in range(4)] == [False, True, False, True]
    assert not any(copy_varies(k, "auto", long_) for k in range(4))
    assert not copy_varies(1, "auto", [])
    texts = ["one two three", "four five", "six seven eight nine"] * 10
    same, varied = reordered_copy(texts, (), 0.0, 5), reordered_copy(texts, (), 0.0, 5, varied=True)
    assert [len(t.split()) for t in same] == [len(t.split()) for t in texts]
    assert [len(t.split()) for t in varied] == varied_counts(90, 5)
    assert " ".join(same) == " ".join(varied)  # the same words in the same order, dealt anew


def test_run_copy_k_draws_from_its_own_seed_at_its_own_lengths() -> None:
    texts = ["one two three", "four five", "six seven eight nine"] * 10
    words = ("cat", "dog")
    for k in range(4):
        copy, varied = run_copy(texts, words, 0.3, 7, k, "varied")
        assert varied == copy_varies(k, "varied", texts)
        assert copy == reordered_copy(texts, words, 0.3, 7 + 1 + k, varied=varied)
    # copy 0 does not repeat the run's own seed, and copies differ from each other
    assert run_copy(texts, words, 0.3, 7, 0, "same")[0] != reordered_copy(texts, words, 0.3, 7)
    assert run_copy(texts, words, 0.3, 7, 0, "same")[0] != run_copy(texts, words, 0.3, 7, 2, "same")[0]


def test_vocabulary_words_are_whole_words_of_each_vocabulary_kind() -> None:
    # WordPiece marks continuations; byte-level BPE and SentencePiece mark word starts,
    # and their unmarked tokens are pieces of words.
    wordpiece = {"[CLS]": 0, "the": 1, "##ing": 2, "cat": 3, "a": 4, "caf\u00e9": 5, "x2": 6, "dog": 7}
    assert vocabulary_words(wordpiece) == ("cat", "dog", "the")
    bpe = ["\u0120the", "\u0120Cat", "ing", "\u0120a", "<s>", "\u0120dog", "er", "\u01201999"]
    assert vocabulary_words(bpe) == ("Cat", "dog", "the")
    assert vocabulary_words(["\u2581over", "\u2581the", "lap"]) == ("over", "the")


def test_mix_vocabulary_replaces_a_share_of_words() -> None:
    texts = _sentences(200)
    words = tuple(f"w{i}" for i in range(50))
    out = mix_vocabulary(texts, words, 0.5, seed=1)
    assert [len(t.split()) for t in out] == [len(t.split()) for t in texts]
    pairs = [(a, b) for t, o in zip(texts, out, strict=True) for a, b in zip(t.split(), o.split(), strict=True)]
    replaced = [b for a, b in pairs if a != b]
    assert set(replaced) <= set(words)
    assert 0.4 < len(replaced) / len(pairs) < 0.6
    assert out == mix_vocabulary(texts, words, 0.5, seed=1)  # the seed fixes it
    assert mix_vocabulary(texts, words, 0.0) == texts and mix_vocabulary(texts, (), 0.5) == texts
    assert all(w in words for t in mix_vocabulary(texts, words, 1.0) for w in t.split())
    with pytest.raises(ValueError):
        mix_vocabulary(texts, words, 1.5)


def test_the_command_offers_exactly_the_copy_length_choices() -> None:
    # cli.py stays free of torch, so it spells the choices out; they must be text.py's.
    from gblr_compress.cli import compress_cmd
    from gblr_compress.job import COPY_LENGTHS
    from gblr_compress.text import COPY_LENGTH_CHOICES

    option = next(p for p in compress_cmd.params if p.name == "copy_lengths")
    assert tuple(option.type.choices) == COPY_LENGTH_CHOICES
    assert option.default == COPY_LENGTHS  # the command's default is the library's
