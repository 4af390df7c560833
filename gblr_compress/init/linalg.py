"""Linear algebra of the init: regularized moments, Cholesky, top singular triplets,
spectra and the relative output error (GBLR.md s.5). Imports only torch.

For a dense weight ``W (m, n)`` and the mean second moment ``C (n, n)`` of its inputs,
the output error of ``W_hat`` is ``tr(D C D^T)`` with ``D = W - W_hat``; with
``C = L L^T`` (Cholesky) that is ``||D L||_F^2``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:  # only the type: the moments are collected by calib
    from gblr_compress.calib import Moment

__all__ = [
    "regularized_moment",
    "Whitening",
    "whitening_moment",
    "cholesky",
    "solve_each",
    "top_svd",
    "gram_spectrum",
    "relative_error",
    "ErrorMeter",
]

_F64 = torch.float64


def regularized_moment(moment: Moment | None, n: int, damping: float) -> torch.Tensor:
    """``(n, n)`` float64 mean second moment plus ``damping * mean(diag)`` on the diagonal.

    ``None`` (data-free) or an all-zero moment gives the identity. A tiny floor (1e-8 of the
    mean diagonal) is always added so a singular moment (dead feature, fewer samples than
    features) still has a Cholesky factor when ``damping`` is 0.
    """
    if moment is None:
        return torch.eye(n, dtype=_F64)
    C = moment.mean().to(_F64)
    C = 0.5 * (C + C.T)  # (n, n): float sums may leave it slightly asymmetric
    scale = float(C.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0.0:
        return torch.eye(n, dtype=_F64)
    return C + (max(damping, 0.0) + 1e-8) * scale * torch.eye(n, dtype=_F64)


class Whitening(NamedTuple):
    """The moment an init whitens with, and what had to be done to get one.

    Attributes:
        C: ``(n, n)`` float64, positive definite (its Cholesky factor exists).
        note: empty, or the fault worked around (one line, for the report).
        data_free: True when the moment was unusable (its errors would not be finite)
            and ``C`` is the identity; all-zero inputs also whiten with the identity,
            but their moment still measures errors (all 0).
    """

    C: torch.Tensor
    note: str
    data_free: bool


def whitening_moment(moment: Moment | None, n: int, damping: float) -> Whitening:
    """:func:`regularized_moment` that never fails to whiten.

    A rank-deficient moment (dead features, fewer input vectors than features, float
    round-off) whose Cholesky factorization fails is damped further, 1e-10 up to 1 times
    its mean diagonal, until it factorizes; a moment that is not finite (inputs that
    overflow) or still does not factorize is replaced by the identity, i.e. the layer
    gets the data-free init. ``note`` says which happened.
    """
    eye = torch.eye(n, dtype=_F64)
    if moment is None:
        return Whitening(eye, "", True)
    if not bool(torch.isfinite(moment.xtx).all()):
        return Whitening(eye, "activation moment is not finite (inputs overflow): data-free init", True)
    scale = float(moment.mean().diagonal().mean())  # regularized_moment's identity cases, named
    if scale == 0.0:  # the moment is right (every output error is 0), it just cannot whiten
        return Whitening(eye, "the layer's inputs are all zero: data-free init", False)
    if scale < 0.0:
        return Whitening(eye, "activation moment is not positive semi-definite: data-free init", True)
    C = regularized_moment(moment, n, damping)
    if int(torch.linalg.cholesky_ex(C)[1]) == 0:
        return Whitening(C, "", False)
    scale = float(C.diagonal().abs().mean()) or 1.0
    for p in range(-10, 1):
        damped = C + (10.0**p) * scale * eye
        if int(torch.linalg.cholesky_ex(damped)[1]) == 0:
            return Whitening(damped, f"singular activation moment: damped by 1e{p} of its mean diagonal", False)
    return Whitening(eye, "activation moment is not positive semi-definite: data-free init", True)


def cholesky(C: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor; adds growing jitter if ``C`` is numerically not PD."""
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) == 0:
        return L
    scale = float(C.diagonal().abs().mean()) or 1.0
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    for p in range(-10, 1):
        L, info = torch.linalg.cholesky_ex(C + (10.0**p) * scale * eye)
        if int(info) == 0:
            return L
    raise RuntimeError("activation moment is not positive semi-definite")


def solve_each(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A^-1 B`` for a stack ``A (k, s, s)``, ``B (k, s, c)``, one matrix at a time.

    torch's batched LU runs each matrix's LAPACK ``getrf`` inside its own parallel loop;
    with MKL (the CPU wheels of torch 2.13) and 2 threads that nesting hangs for
    ``s >= ~160`` (``mkl_thread_team_ctxt_get_task_internal``, after ``DLASWP``
    "parameter 6" errors; a torch.linalg.solve of a (3, 192, 192) stack never returns),
    and where it returns, it can return garbage pivots ("Pivots given to lu_solve must
    all be >= 1"). Unbatched solves do not nest; a coupling group has few units (OBS
    selection of three 192-wide units took 0.6 s this way).
    """
    return torch.stack([torch.linalg.solve(a, b) for a, b in zip(A, B)]) if len(A) else A.new_zeros(B.shape)


def top_svd(Z: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``r`` singular triplets ``P (a, r), S (r,), Qh (r, b)`` of ``Z (a, b)``.

    Uses the eigendecomposition of the Gram matrix of the smaller side: much faster than a
    full SVD of a wide matrix on CPU, and accurate for the leading triplets that a
    truncation keeps. Triplets past the rank of ``Z`` come back as zeros.
    """
    a, b = Z.shape
    r = max(0, min(r, a, b))
    if r == 0:
        return Z.new_zeros(a, 0), Z.new_zeros(0), Z.new_zeros(0, b)
    if a <= b:
        evals, evecs = torch.linalg.eigh(Z @ Z.T)  # (a,), (a, a) ascending
        P = evecs[:, -r:].flip(1)  # (a, r)
        S = evals[-r:].flip(0).clamp_min(0.0).sqrt()  # (r,)
        proj = P.T @ Z  # (r, b) = S Qh
        tol = S.max() * max(a, b) * torch.finfo(Z.dtype).eps * 10 if S.numel() else 0.0
        inv = torch.where(S > tol, 1.0 / S.clamp_min(1e-300), torch.zeros_like(S))
        Qh = proj * inv[:, None]
        S = torch.where(S > tol, S, torch.zeros_like(S))
        return P, S, Qh
    Q, S, Ph = top_svd(Z.T, r)
    return Ph.T, S, Q.T


def gram_spectrum(Z: torch.Tensor) -> torch.Tensor:
    """All squared singular values of ``Z`` in descending order (Gram of the small side)."""
    gram = Z @ Z.T if Z.shape[0] <= Z.shape[1] else Z.T @ Z
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, C: torch.Tensor | None) -> float:
    """``sqrt(tr(D C D^T) / tr(W C W^T))`` with ``D = W - W_hat``: relative output error.

    ``C = None`` means the identity (relative Frobenius weight error). When the layer's
    output energy is zero (e.g. its inputs are always zero) the error is 0.
    """
    W, D = W.detach().to(_F64), (W - W_hat).detach().to(_F64)
    if C is None:
        num, den = float((D * D).sum()), float((W * W).sum())
    else:
        num, den = float(((D @ C) * D).sum()), float(((W @ C) * W).sum())
    if not den > 0.0:
        return 0.0
    return math.sqrt(max(num, 0.0) / den)


class ErrorMeter:
    """:func:`relative_error` against one moment (``None``: identity), with the
    denominator computed once and each named candidate evaluated once."""

    def __init__(self, W: torch.Tensor, C: torch.Tensor | None) -> None:
        self.W, self.C = W, C
        self.den = float((W * W).sum()) if C is None else float(((W @ C) * W).sum())
        self.cache: dict[str, float] = {}

    def __call__(self, key: str, W_hat: torch.Tensor) -> float:
        if key not in self.cache:
            D = self.W - W_hat  # (m, n)
            num = float((D * D).sum()) if self.C is None else float(((D @ self.C) * D).sum())
            ok = self.den > 0.0
            self.cache[key] = math.sqrt(max(num, 0.0) / self.den) if ok else 0.0
        return self.cache[key]
