"""Pure math: Gaudi masks, boxcar windows and exact costs (GBLR.md sections 2-3).

This module imports only torch. Everything above it (layers, init, export, report)
takes its window and cost arithmetic from here, so a figure is computed in one place.

Conventions:
    * A window over an axis of length ``n`` is ``(start, width)`` in integers, with
      ``0 <= start < n`` and ``0 <= width <= n``; it covers ``start, start+1, ...,
      start+width-1`` modulo ``n`` (cyclic, so it may wrap past the end).
    * Structural parameters are fractions: ``w = width / n``, ``l = start / n``.
    * Rounding is half-up (``floor(x + 0.5)``), the same in every function here, so a
      straight-through mask, a frozen window and a cost always agree.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "gaudi_mask",
    "boxcar_mask",
    "round_width",
    "round_start",
    "window_indices",
    "window_slices",
    "component_cost",
    "is_full_rank",
]


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    # torch.round is half-to-even; half-up keeps ties stable between modules.
    return torch.floor(x + 0.5)


def _snap(x: torch.Tensor, n: int, tol: float) -> torch.Tensor:
    grid = _round_half_up(x * n)
    near = (x * n - grid).abs() <= tol
    return x + torch.where(near, grid / n - x, torch.zeros_like(x)).detach()


def round_width(w: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """Integer width (as int64) of fractional widths ``w`` on an axis of length ``n``.

    Args:
        w: fractional widths, any shape; values outside [0, 1] are clamped.
        n: axis length, or a float64 tensor of lengths broadcasting with ``w``.

    Returns:
        ``round(clamp(w, 0, 1) * n)`` as an int64 tensor of the same shape.
    """
    return _round_half_up(w.detach().double().clamp(0.0, 1.0) * n).long()


def round_start(l: torch.Tensor, n: int) -> torch.Tensor:
    """Integer start (int64, in ``[0, n)``) of fractional locations ``l`` (cyclic)."""
    return torch.remainder(_round_half_up(l.detach().double() * n), n).long()


def gaudi_mask(
    widths: torch.Tensor,
    locations: torch.Tensor,
    n: int,
    sigma: float | torch.Tensor | None = None,
    round_ste: bool = False,
) -> torch.Tensor:
    """Batched Gaudi masks: smooth (finite sigma) or exact (sigma=None) cyclic boxcars.

    ``M[k] = w sinc(kw)/sinc(k/n) * exp(-k^2/(2 sigma^2)) * exp(i(pi k(1/n - w) - 2 pi k l))``
    for ``k = 0..n//2``, and ``mask = irfft(M, n, norm="forward")``.

    Args:
        widths: ``(K,)`` fractional widths in [0, 1] (clamped).
        locations: ``(K,)`` fractional locations (cyclic; any real value).
        n: length of the masked axis.
        sigma: Gaussian low-pass width in frequency bins; ``None`` or ``inf`` gives the
            exact boxcar (for integer ``w*n`` and ``l*n``).
        round_ste: straight-through rounding: the forward pass uses ``round(w*n)/n`` and
            ``round(l*n)/n`` while gradients flow to the continuous values.

    Returns:
        ``(K, n)`` masks in the dtype of ``widths`` (float32 or float64); computed in
        float64 internally.

    Example:
        >>> gaudi_mask(torch.tensor([0.5]), torch.tensor([0.75]), 4).round()
        tensor([[1., 0., 0., 1.]])
    """
    if widths.shape != locations.shape or widths.dim() != 1:
        raise ValueError(
            f"widths and locations must both be (K,), got {tuple(widths.shape)} "
            f"and {tuple(locations.shape)}"
        )
    out_dtype = widths.dtype if widths.is_floating_point() else torch.get_default_dtype()
    # The phase 2*pi*k*l loses ~1e-4 in float32 for n in the hundreds; masks are only
    # (K, n), so computing them in float64 is cheap and keeps the boxcar limit exact.
    dtype = torch.float64
    w = widths.to(dtype).clamp(0.0, 1.0)
    loc = locations.to(dtype)
    if round_ste:
        w = w + (_round_half_up(w * n) / n - w).detach()
        loc = loc + (_round_half_up(loc * n) / n - loc).detach()
    else:
        # A fraction like 100/385 is not exact in float32; its error, amplified by the
        # kernel's edge, breaks the exact boxcar limit. Snap values that are integers up to
        # the input's precision (straight-through, so gradients are unchanged).
        tol = 4.0 * n * torch.finfo(out_dtype).eps
        w = _snap(w, n, tol)
        loc = _snap(loc, n, tol)
    k = torch.arange(n // 2 + 1, device=w.device, dtype=dtype)  # (F,)
    w_ = w[:, None]  # (K, 1)
    l_ = loc[:, None]  # (K, 1)
    amp = w_ * torch.sinc(k * w_) / torch.sinc(k / n)  # (K, F): Dirichlet kernel / n
    if sigma is not None:
        s = torch.as_tensor(sigma, dtype=dtype, device=w.device)
        if bool(torch.isfinite(s)):
            amp = amp * torch.exp(-(k * k) / (2.0 * s * s))
    phase = math.pi * k * (1.0 / n - w_) - 2.0 * math.pi * k * l_  # (K, F)
    spec = torch.complex(amp * torch.cos(phase), amp * torch.sin(phase))  # (K, F)
    return torch.fft.irfft(spec, n=n, norm="forward").to(out_dtype)  # (K, n)


def boxcar_mask(starts: torch.Tensor, widths: torch.Tensor, n: int) -> torch.Tensor:
    """Exact 0/1 cyclic boxcars from integer windows, by index arithmetic (no FFT).

    Args:
        starts: ``(K,)`` integer starts.
        widths: ``(K,)`` integer widths in ``[0, n]``.
        n: axis length.

    Returns:
        ``(K, n)`` float mask with ones on ``(start + j) % n`` for ``j < width``.
    """
    idx = torch.arange(n, device=starts.device)  # (n,)
    offset = torch.remainder(idx[None, :] - starts[:, None], n)  # (K, n)
    return (offset < widths[:, None]).to(torch.get_default_dtype())


def window_indices(start: int, width: int, n: int) -> list[int]:
    """Indices covered by the cyclic window ``(start, width)`` in window order."""
    return [(start + j) % n for j in range(width)]


def window_slices(start: int, width: int, n: int) -> list[tuple[int, int]]:
    """The cyclic window as at most two half-open ``(lo, hi)`` ranges, in window order.

    A window that wraps past the end becomes ``[(start, n), (0, rest)]``; this is the
    form the frozen layer and the ONNX export slice with.
    """
    if width <= 0:
        return []
    if width >= n:
        # A full-width window starting mid-axis still covers everything, in rotated order.
        return [(start, n), (0, start)] if start else [(0, n)]
    end = start + width
    if end <= n:
        return [(start, end)]
    return [(start, n), (0, end - n)]


def component_cost(row_width: int, col_width: int, rank: int) -> int:
    """Exact multiply-adds per input vector of one rank-``rank`` block.

    ``min(rank * (row_width + col_width), row_width * col_width)``, or 0 when either
    width is 0 (a dead component). A block whose factored form costs at least its dense
    form is stored and exported dense (GBLR.md section 7): a pruned window (all kept
    units of a layer, full rank) costs ``rows * cols``, not ``rank * (rows + cols)``.
    """
    if row_width <= 0 or col_width <= 0 or rank <= 0:
        return 0
    rw, cw = int(row_width), int(col_width)
    return min(int(rank) * (rw + cw), rw * cw)


def is_full_rank(row_width: int, col_width: int, rank: int) -> bool:
    """Whether a block is cheaper stored dense than factored (``rank * (rows + cols) >=
    rows * cols``): its cost is then ``rows * cols`` and the export emits one dense
    MatMul for it."""
    return row_width > 0 and col_width > 0 and rank * (row_width + col_width) >= row_width * col_width
