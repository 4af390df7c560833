"""Embedding fidelity of a compressed model against the dense one, on the eval set only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Fidelity", "fidelity", "paraphrase_top1", "spearman"]


def paraphrase_top1(emb: torch.Tensor, pairs: list[tuple[int, int]], exclude: list[int] | None = None) -> float:
    """Fraction of paraphrase-pair members whose nearest other sentence is the partner.

    Args:
        emb: (N, H) unit-norm embeddings of all eval sentences (the search pool).
        pairs: index pairs (i, j) into ``emb``; both directions are scored.
        exclude: indices removed from the search pool (e.g. the hard negatives).
    """
    sim = emb @ emb.T  # (N, N) cosine
    sim.fill_diagonal_(float("-inf"))  # a sentence is not its own neighbour
    if exclude:
        sim[:, exclude] = float("-inf")
    nearest = sim.argmax(1)  # (N,)
    hits = [int(nearest[i] == j) + int(nearest[j] == i) for i, j in pairs]
    return sum(hits) / (2 * len(pairs))


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


@dataclass(frozen=True)
class Fidelity:
    """How close a model's embeddings stay to the dense model's.

    Attributes:
        mean_cos: mean cosine between compressed and dense embedding of each sentence.
        min_cos: worst sentence.
        top1: paraphrase retrieval top-1 accuracy of the model itself (whole pool).
        top1_no_neg: the same with the hard negatives removed from the pool.
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
    cos = (emb * dense).sum(1) / (emb.norm(dim=1) * dense.norm(dim=1))  # (N,)
    iu = torch.triu_indices(len(emb), len(emb), offset=1)
    sims = (emb @ emb.T)[iu[0], iu[1]]  # (N*(N-1)/2,)
    dense_sims = (dense @ dense.T)[iu[0], iu[1]]
    return Fidelity(
        mean_cos=float(cos.mean()),
        min_cos=float(cos.min()),
        top1=paraphrase_top1(emb, pairs),
        top1_no_neg=paraphrase_top1(emb, pairs, exclude=negatives or []),
        spearman=spearman(sims, dense_sims),
    )
