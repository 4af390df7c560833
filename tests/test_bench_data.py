"""The MiniLM benchmark's data files and its model-free parts (SVD baselines, metrics).

The real model is not loaded here (it is an optional extra); these tests stay fast.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.minilm.baselines import (
    LowRankLinear,
    asvd_layer,
    collect_activation_stats,
    rank_for_budget,
    truncated_svd_layer,
    whitened_svd_layer,
)
from benchmarks.minilm.data import DATA_DIR, load_calib, load_eval, split_eval
from benchmarks.minilm.metrics import (
    fidelity,
    mcnemar_p,
    paired,
    paraphrase_hits,
    paraphrase_margins,
    paraphrase_top1,
    spearman,
)
from gblr_compress.errors import InputError


def test_eval_set_is_well_formed() -> None:
    ev = load_eval()
    assert len(ev.sentences) >= 300 and len(ev.pairs) >= 100 and len(ev.negatives) >= 50
    assert len(set(ev.sentences)) == len(ev.sentences)
    for i, j in ev.pairs + ev.negatives:
        assert i != j and 0 <= i < len(ev.sentences) and 0 <= j < len(ev.sentences)
    # Every sentence is a real sentence: starts upper-case, ends with punctuation.
    for s in ev.sentences:
        assert s[0].isupper() and s[-1] in ".?!", s
        assert len(s.split()) >= 4, s


def test_calib_is_separate_from_eval() -> None:
    ev, calib = load_eval(), load_calib()
    assert len(calib) == 256 and len(set(calib)) == 256
    assert not set(calib) & set(ev.sentences)
    lower = {s.lower().rstrip(".?!") for s in ev.sentences}
    assert not {s.lower().rstrip(".?!") for s in calib} & lower


def test_split_eval_keeps_pairs_and_negatives_whole() -> None:
    ev = load_eval()
    extra, half = split_eval(ev)
    assert not set(extra) & set(half.sentences)
    assert len(extra) + len(half.sentences) == len(ev.sentences)
    assert len(half.pairs) == len(ev.pairs) // 2 and abs(len(extra) - len(half.sentences)) <= 4
    # The scored half's pairs and negatives are the originals, re-indexed.
    originals = {(ev.sentences[i], ev.sentences[j]) for i, j in ev.pairs}
    assert {(half.sentences[i], half.sentences[j]) for i, j in half.pairs} <= originals
    negatives = {(ev.sentences[i], ev.sentences[k]) for i, k in ev.negatives}
    assert {(half.sentences[i], half.sentences[k]) for i, k in half.negatives} <= negatives
    kept_queries = {half.sentences[i] for i, _ in half.pairs}
    assert len(half.negatives) == sum(ev.sentences[i] in kept_queries for i, _ in ev.negatives)


def test_every_tsv_line_has_two_or_three_columns() -> None:
    lines = [ln for ln in (DATA_DIR / "eval_pairs.tsv").read_text().splitlines() if ln and not ln.startswith("#")]
    assert all(len(ln.split("\t")) in (2, 3) for ln in lines)


def test_bad_pairs_file_is_an_input_error(tmp_path) -> None:
    (tmp_path / "eval_pairs.tsv").write_text("only one column\n")
    (tmp_path / "eval_extra.txt").write_text("")
    with pytest.raises(InputError, match="columns"):
        load_eval(tmp_path)


def test_rank_for_budget_meets_the_exact_cost() -> None:
    for m, n in [(384, 384), (1536, 384), (384, 1536)]:
        for b in (0.5, 0.3):
            r = rank_for_budget(m, n, b)
            assert r * (m + n) <= b * m * n < (r + 1) * (m + n)
    assert rank_for_budget(384, 384, 0.5) == 96
    with pytest.raises(InputError):
        rank_for_budget(10, 10, 1.5)


def _layer_and_inputs(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(48, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 48, generator=g))
    # Anisotropic inputs: a few columns carry most of the energy.
    x = torch.randn(2000, 48, generator=g) * torch.linspace(0.05, 3.0, 48)  # (N, 48)
    return lin, x


def test_truncated_svd_is_eckart_young_and_keeps_bias() -> None:
    lin, x = _layer_and_inputs()
    low = truncated_svd_layer(lin, 8)
    assert isinstance(low, LowRankLinear) and low.rank == 8 and low.exact_cost() == 8 * (32 + 48)
    w_hat = low.second.weight @ low.first.weight  # (32, 48)
    s = torch.linalg.svdvals(lin.weight.detach())
    err = torch.linalg.matrix_norm(lin.weight.detach() - w_hat)
    assert torch.isclose(err, s[8:].norm(), rtol=1e-4)
    assert torch.equal(low.second.bias, lin.bias)
    assert torch.allclose(low(x[:5]), x[:5] @ w_hat.T + lin.bias, atol=1e-4)


def test_activation_aware_svds_beat_plain_svd_on_the_output_error() -> None:
    lin, x = _layer_and_inputs()
    gram = x.double().T @ x.double() / len(x)  # (48, 48)
    ref = lin(x).detach()

    def out_err(layer: nn.Module) -> float:
        return float((layer(x).detach() - ref).norm())

    plain = out_err(truncated_svd_layer(lin, 8))
    whitened = out_err(whitened_svd_layer(lin, 8, gram, damping=1e-6))
    scaled = out_err(asvd_layer(lin, 8, x.abs().mean(0), alpha=0.5))
    assert whitened < scaled < plain
    # Whitened SVD is optimal for ||X (W - W_r)^T||: equals the tail of the whitened spectrum.
    chol = torch.linalg.cholesky(gram)
    tail = torch.linalg.svdvals(lin.weight.detach().double() @ chol)[8:].norm() * len(x) ** 0.5
    assert whitened == pytest.approx(float(tail), rel=1e-3)


def test_activation_stats_ignore_padding() -> None:
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.fc = nn.Linear(6, 4)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(input_ids)).mean(1)

    toy = Toy()
    ids = torch.tensor([[1, 2, 3], [4, 0, 0]])
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}
    unpadded = [{"input_ids": ids[:1], "attention_mask": torch.ones(1, 3, dtype=torch.long)},
                {"input_ids": ids[1:, :1], "attention_mask": torch.ones(1, 1, dtype=torch.long)}]
    a = collect_activation_stats(toy, {"fc": toy.fc}, [padded])
    b = collect_activation_stats(toy, {"fc": toy.fc}, unpadded)
    assert a.tokens == b.tokens == 4
    assert torch.allclose(a.gram["fc"], b.gram["fc"]) and torch.allclose(a.mean_abs["fc"], b.mean_abs["fc"])


def test_metrics_on_known_embeddings() -> None:
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.1], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.1, 1.0, 0.1]]), dim=1)
    assert paraphrase_top1(emb, [(0, 1), (2, 3)]) == 1.0
    assert paraphrase_top1(emb, [(0, 2), (1, 3)]) == 0.0
    # Removing the true neighbours from the pool turns misses into hits.
    assert paraphrase_top1(emb, [(0, 2)], exclude=[1, 3]) == 1.0
    a = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert spearman(a, a * 2 + 1) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    fid = fidelity(emb, emb, [(0, 1), (2, 3)], negatives=[3])
    assert fid.mean_cos == pytest.approx(1.0) and fid.spearman == pytest.approx(1.0) and fid.top1 == 1.0


def test_margins_are_positive_exactly_for_hits() -> None:
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(12, 5, generator=gen), dim=1)
    pairs = [(0, 1), (2, 3), (4, 5), (6, 7)]
    m = paraphrase_margins(emb, pairs)
    assert torch.equal(m > 0, paraphrase_hits(emb, pairs))
    # Query 0 -> 1: its partner's similarity minus the best other one, by hand.
    sims = emb[0] @ emb.T
    rival = max(float(sims[k]) for k in range(12) if k not in (0, 1))
    assert float(m[0]) == pytest.approx(float(sims[1]) - rival)


def test_paired_comparison() -> None:
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.1], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.1, 1.0, 0.1]]), dim=1)
    swapped = emb[[2, 1, 0, 3]]  # sentences 0 and 2 trade places: every query misses
    got = paired(emb, swapped, emb, [(0, 1), (2, 3)])
    assert (got.a_only, got.b_only) == (4, 0) and got.d_top1 == pytest.approx(1.0)
    assert got.d_mean_cos > 0 and got.ci_mean_cos[0] <= got.d_mean_cos <= got.ci_mean_cos[1]
    same = paired(emb, emb, emb, [(0, 1), (2, 3)])
    assert (same.a_only, same.b_only, same.p_top1) == (0, 0, 1.0) and same.ci_mean_cos == (0.0, 0.0)
    # Sign test: 10 discordant queries all one way is p = 2 / 2^10; 5 to 5 is no evidence.
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024) and mcnemar_p(5, 5) == 1.0


def test_template_text_is_one_family_for_calibration_and_others_for_evaluation(tmp_path) -> None:
    """benchmarks/template_text.py: distinct sentences, the same for the same seed, and
    no calibration sentence shares the evaluation templates' words or the suite's lines."""
    from benchmarks.template_text import CALIB_COUNT, EVAL_COUNT, main, template_texts

    calib, evaluation = template_texts()
    assert (len(calib), len(set(calib)), len(evaluation), len(set(evaluation))) == (CALIB_COUNT,) * 2 + (EVAL_COUNT,) * 2
    assert template_texts() == (calib, evaluation) and template_texts(seed=8) != (calib, evaluation)
    assert all(" is " in s and s.endswith(".") for s in calib)  # one family: "<who> is <doing> <what> [where]."
    words = {w.strip(".?").lower() for s in calib for w in s.split()}
    assert not words & {"committee", "announced", "budget", "why", "report", "election", "honestly"}
    assert not set(calib) & set(load_calib())
    assert main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "template_calib.txt").read_text(encoding="utf-8").splitlines() == calib
    assert (tmp_path / "template_eval.txt").read_text(encoding="utf-8").splitlines() == evaluation
