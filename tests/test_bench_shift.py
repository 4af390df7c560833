"""The MiniLM generalization mode's model-free parts: text sources, NN-agreement
metrics, the shift tables (no real model loaded: fast)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks.minilm.metrics import fidelity, nn_hits, paired
from benchmarks.minilm.shift import paired_rows, render_paired, render_shift, run_shift, shifted_means
from benchmarks.minilm.sources import calib_sentences, eval_set
from gblr_compress.errors import InputError


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    for name, n in (("wiki_calib.txt", 300), ("wiki_eval.txt", 200), ("news.txt", 500), ("wordnet.txt", 900)):
        (tmp_path / name).write_text("".join(f"{name} sentence number {i}.\n" for i in range(n)))
    return tmp_path


@pytest.mark.parametrize("source", ["suite", "wiki", "news", "wordnet"])
def test_calibration_and_eval_sentences_are_disjoint(source: str, cache: Path) -> None:
    calib = calib_sentences(source, 10_000, eval_size=100, cache=cache)
    ev = eval_set(source, eval_size=100, cache=cache)
    assert calib and ev.sentences and not set(calib) & set(ev.sentences)
    if source != "suite":
        assert len(ev.sentences) == 100 and not ev.pairs
    else:
        assert ev.pairs  # the suite keeps its paraphrase pairs


def test_news_eval_is_the_tail_and_wordnet_is_strided(cache: Path) -> None:
    news = eval_set("news", eval_size=100, cache=cache).sentences
    assert news[0] == "news.txt sentence number 400." and len(calib_sentences("news", 10_000, 100, cache)) == 400
    wn = calib_sentences("wordnet", 3, cache=cache)
    assert wn == [f"wordnet.txt sentence number {i}." for i in (0, 2, 4)]


def test_bad_source_or_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown text source"):
        calib_sentences("reddit", 5)
    with pytest.raises(InputError, match="benchmarks.assets"):
        eval_set("wiki", cache=tmp_path)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def test_nn_hits_and_paired_without_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    dense = _unit(torch.randn(50, 16, generator=g))
    assert bool(nn_hits(dense, dense).all())
    near = _unit(dense + 0.01 * torch.randn(50, 16, generator=g))
    far = _unit(dense + 1.0 * torch.randn(50, 16, generator=g))
    assert nn_hits(near, dense).double().mean() > nn_hits(far, dense).double().mean()
    p = paired(near, far, dense, pairs=[])
    assert p.d_mean_cos > 0 and p.ci_mean_cos[0] > 0 and p.a_only > p.b_only
    f = fidelity(near, dense, pairs=[])
    assert f.top1 == float(nn_hits(near, dense).double().mean()) and f.top1_no_neg != f.top1_no_neg  # NaN


class _Tok:
    """A stand-in tokenizer: one token per word, ids by hashing."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [[hash(w) % 97 + 1 for w in t.split()][:max_length] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}

    def get_vocab(self) -> dict[str, int]:
        return {f"word{chr(97 + i % 26)}{chr(97 + i // 26)}": i for i in range(97)}


class _Bag(torch.nn.Module):
    """Mean of token embeddings plus ``noise`` times a fixed random direction per token."""

    def __init__(self, noise: float) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = torch.randn(100, 8, generator=g)
        self.extra = torch.randn(100, 8, generator=g) * noise

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).float()
        h = ((self.emb + self.extra)[input_ids] * m).sum(1) / m.sum(1)
        return _unit(h)


def test_run_shift_scores_every_source_and_pairs_the_reference(cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("GBLR_BENCH_CACHE", str(cache))
    noise = {"gblr-init": 0.1, "prune-anchor": 0.5}

    def build(name, dense, calib, budget):
        return _Bag(noise[name]), int(budget * 1000)

    plan = [("gblr-init", 0.5), ("prune-anchor", 0.5)]
    rows, embs, dense_emb = run_shift(_Bag(0.0), _Tok(), build, plan, ["wiki", "news"], ["wiki", "news"],
                                      n_calib=20, eval_size=60, log=lambda _m: None)
    assert len(rows) == 4 and set(rows[0]["by_eval"]) == {"wiki", "news"}
    ind, out = shifted_means(rows[0])
    assert 0 < ind <= 1 and 0 < out <= 1
    table = render_shift(rows, 1000, ["wiki", "news"])
    assert table.count("\n") == 5 and "**" in table
    versus = paired_rows(rows, embs, dense_emb, {"wiki": [], "news": []})
    assert [v["versus"] for v in versus] == ["prune-anchor", "prune-anchor"]
    assert all(v["by_eval"][es]["d_mean_cos"] > 0 for v in versus for es in ("wiki", "news"))
    assert "gblr-init vs prune-anchor" in render_paired(versus, ["wiki", "news"])


def test_training_texts_add_the_commands_copies_and_general_sentences() -> None:
    from benchmarks.minilm.contenders import _training_extra, set_training_texts
    from benchmarks.minilm.model import make_batches
    from gblr_compress.job import GENERAL_FILL
    from gblr_compress.text import general_texts

    sentences = [f"the cat number {i} sat on the mat and it was a dog" for i in range(40)]
    calib = make_batches(_Tok(), sentences, batch_size=8)
    copies, added = set_training_texts(calib, sentences, _Tok(), general=True)
    fit = 32  # the last fifth of the 5 batches is held out
    assert copies == 2 and added == GENERAL_FILL - fit
    with_copies = sum(len(b["input_ids"]) for b in _training_extra(calib))
    # The general sentences are the command's (same count, same seed), batched last.
    tail = _training_extra(calib)[-math.ceil(added / 32):]
    assert sum(len(b["input_ids"]) for b in tail) == added and with_copies > added
    assert torch.equal(tail[0]["input_ids"], make_batches(_Tok(), general_texts(added, 0)[:32])[0]["input_ids"])
    assert set_training_texts(calib, sentences, _Tok(), general=False) == (2, 0)
    assert set_training_texts(calib, sentences, _Tok(), general=True, reorder=False) == (0, added)
    assert sum(len(b["input_ids"]) for b in _training_extra(calib)) == added
