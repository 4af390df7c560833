"""Embedding fidelity of a compressed model against the dense one, on the eval set only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Fidelity", "Paired", "fidelity", "nn_hits", "paired", "paired_hits", "paraphrase_hits", "paraphrase_margins", "paraphrase_top1", "spearman"]


def paraphrase_hits(emb: torch.Tensor, pairs: list[tuple[int, int]], exclude: list[int] | None = None) -> torch.Tensor:
    """Per query, whether a pair member's nearest other sentence is its partner.

    Args:
        emb: (N, H) unit-norm embeddings of all eval sentences (the search pool).
        pairs: index pairs (i, j) into ``emb``; both directions are queries.
        exclude: indices removed from the search pool (e.g. the hard negatives).

    Returns:
        (2 * len(pairs),) bool: ``i -> j`` for every pair, then ``j -> i``.
    """
    sim = emb @ emb.T  # (N, N) cosine
    sim.fill_diagonal_(float("-inf"))  # a sentence is not its own neighbour
    if exclude:
        sim[:, exclude] = float("-inf")
    nearest = sim.argmax(1)  # (N,)
    i, j = torch.tensor(pairs).T
    return torch.cat([nearest[i] == j, nearest[j] == i])


def paraphrase_margins(emb: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Per query (same order as :func:`paraphrase_hits`), the similarity to the partner
    minus the best similarity to any other sentence: positive exactly for a hit, and
    how far a compressed model's similarities may move before the answer flips.

    ``emb`` must be unit-norm ``(N, H)``."""
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    i, j = torch.tensor(pairs).T
    queries, partners = torch.cat([i, j]), torch.cat([j, i])
    true = sim[queries, partners]
    rival = sim[queries].clone()
    rival[torch.arange(len(queries)), partners] = float("-inf")
    return true - rival.max(1).values


def paraphrase_top1(emb: torch.Tensor, pairs: list[tuple[int, int]], exclude: list[int] | None = None) -> float:
    """Fraction of paraphrase-pair members whose nearest other sentence is the partner
    (see :func:`paraphrase_hits`)."""
    return float(paraphrase_hits(emb, pairs, exclude).double().mean())


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..N-1 (float64); ties among float similarities are vanishingly rare."""
    r = torch.empty_like(x, dtype=torch.float64)
    r[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally long 1-D tensors."""
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def _cos(emb: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Cosine between each row of ``emb`` and the same row of ``dense``, ``(N,)``."""
    return (emb * dense).sum(1) / (emb.norm(dim=1) * dense.norm(dim=1))


@dataclass(frozen=True)
class Fidelity:
    """How close a model's embeddings stay to the dense model's.

    Attributes:
        mean_cos: mean cosine between compressed and dense embedding of each sentence.
        min_cos: worst sentence.
        top1: paraphrase retrieval top-1 accuracy of the model itself (whole pool);
            for an eval set without pairs, nearest-neighbour agreement with dense.
        top1_no_neg: the same with the hard negatives removed from the pool (NaN
            without pairs).
        spearman: rank correlation of all pairwise similarities (i < j), vs dense.
    """

    mean_cos: float
    min_cos: float
    top1: float
    top1_no_neg: float
    spearman: float


def fidelity(
    emb: torch.Tensor, dense: torch.Tensor, pairs: list[tuple[int, int]], negatives: list[int] | None = None
) -> Fidelity:
    """All metrics of ``emb`` (N, H) against the dense embeddings ``dense`` (N, H).

    ``negatives`` are the hard-negative indices, left out of the pool for ``top1_no_neg``.
    """
    cos = _cos(emb, dense)  # (N,)
    iu = torch.triu_indices(len(emb), len(emb), offset=1)
    sims = (emb @ emb.T)[iu[0], iu[1]]  # (N*(N-1)/2,)
    dense_sims = (dense @ dense.T)[iu[0], iu[1]]
    return Fidelity(
        mean_cos=float(cos.mean()),
        min_cos=float(cos.min()),
        top1=paraphrase_top1(emb, pairs) if pairs else float(nn_hits(emb, dense).double().mean()),
        top1_no_neg=paraphrase_top1(emb, pairs, exclude=negatives or []) if pairs else float("nan"),
        spearman=spearman(sims, dense_sims),
    )


@dataclass(frozen=True)
class Paired:
    """Model A against model B on the same eval sentences and queries.

    Attributes:
        d_top1: top-1 of A minus top-1 of B.
        a_only, b_only: queries only A (only B) answers right; the rest agree.
        p_top1: exact two-sided McNemar p-value of ``a_only`` vs ``b_only`` (the chance
            of a split at least this uneven if A and B were equally good).
        d_mean_cos: mean cosine to dense of A minus that of B.
        ci_mean_cos: 95% paired-bootstrap interval of ``d_mean_cos`` over sentences.
    """

    d_top1: float
    a_only: int
    b_only: int
    p_top1: float
    d_mean_cos: float
    ci_mean_cos: tuple[float, float]


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar (sign test on the discordant queries)."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def nn_hits(emb: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Per sentence, whether its nearest other sentence under ``emb`` is the one under
    the dense embeddings ``dense`` (both ``(N, H)`` unit rows): retrieval agreement,
    for eval sets without paraphrase pairs. ``(N,)`` bool."""
    sim, ref = emb @ emb.T, dense @ dense.T  # (N, N)
    sim.fill_diagonal_(float("-inf"))
    ref.fill_diagonal_(float("-inf"))
    return sim.argmax(1) == ref.argmax(1)


def paired_hits(
    hits_a: torch.Tensor,
    hits_b: torch.Tensor,
    cos_a: torch.Tensor,
    cos_b: torch.Tensor,
    resamples: int = 2000,
    seed: int = 0,
) -> Paired:
    """:class:`Paired` from per-query hits ``(Q,)`` bool and per-sentence cosines to
    dense ``(N,)`` of two models (McNemar on the hits, paired bootstrap on the cosines)."""
    a_only, b_only = int((hits_a & ~hits_b).sum()), int((hits_b & ~hits_a).sum())
    diff = (cos_a - cos_b).double()  # (N,)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(diff), (resamples, len(diff)), generator=gen)
    boot = diff[idx].mean(1).sort().values
    lo, hi = boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]
    return Paired(
        d_top1=(a_only - b_only) / len(hits_a),
        a_only=a_only,
        b_only=b_only,
        p_top1=mcnemar_p(a_only, b_only),
        d_mean_cos=float(diff.mean()),
        ci_mean_cos=(float(lo), float(hi)),
    )


def paired(
    emb_a: torch.Tensor,
    emb_b: torch.Tensor,
    dense: torch.Tensor,
    pairs: list[tuple[int, int]],
    resamples: int = 2000,
    seed: int = 0,
) -> Paired:
    """Paired comparison of two compressed models' embeddings ``(N, H)`` of the same
    sentences: is A's lead over B on top-1 and mean cosine more than the eval set's
    sampling noise? Without ``pairs``, the hits are nearest-neighbour agreement with
    dense (:func:`nn_hits`)."""
    if pairs:
        hits_a, hits_b = paraphrase_hits(emb_a, pairs), paraphrase_hits(emb_b, pairs)
    else:
        hits_a, hits_b = nn_hits(emb_a, dense), nn_hits(emb_b, dense)
    return paired_hits(hits_a, hits_b, _cos(emb_a, dense), _cos(emb_b, dense), resamples, seed)
