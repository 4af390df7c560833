"""Dense weights (+ activation statistics) -> GBLR layers within a FLOP budget.

Objective (GBLR.md s.5): for a dense weight ``W (m, n)`` and the mean second moment ``C
(n, n)`` of its inputs, minimize the output error ``tr(D C D^T)`` with ``D = W - W_hat``.
With ``C = L L^T`` (Cholesky), that is ``||D L||_F^2``, so a full-width rank-R fit is the
truncated SVD of the whitened weight ``W L`` mapped back by ``L^{-1}`` (whitened SVD), and
``C = I`` gives the data-free (weight error) version.

Modules, bottom up (imports go downward only):

- :mod:`~gblr_compress.init.linalg`: regularized moments, Cholesky, top-SVD, spectra,
  relative output error (torch only).
- :mod:`~gblr_compress.init.config`: :class:`InitConfig`, :class:`LayerInit`,
  :class:`InitResult`.
- :mod:`~gblr_compress.init.search`: the window search on one weight (residual, greedy
  search, refit, gradient refinement) over :class:`~gblr_compress.structure.Block` records.
- :mod:`~gblr_compress.init.layer`: the per-layer judge :func:`init_layer` and the SVD
  baselines.
- :mod:`~gblr_compress.init.model`: the model-level stages :func:`collect_stats` ->
  :func:`allocate` -> :func:`init_layers_`, and :func:`initialize_` running all three.

The library prints nothing.
"""

from gblr_compress.init.config import InitConfig, InitResult, LayerInit
from gblr_compress.init.layer import init_layer, truncated_svd_layer, whitened_svd_layer
from gblr_compress.init.linalg import regularized_moment, relative_error
from gblr_compress.init.model import (
    Allocation,
    InitStats,
    allocate,
    collect_stats,
    init_layers_,
    initialize_,
    target_layers,
)

__all__ = [
    "InitConfig",
    "LayerInit",
    "InitResult",
    "InitStats",
    "Allocation",
    "regularized_moment",
    "relative_error",
    "truncated_svd_layer",
    "whitened_svd_layer",
    "init_layer",
    "target_layers",
    "collect_stats",
    "allocate",
    "init_layers_",
    "initialize_",
]
