"""Sequential least-squares refit of pruned consumers on the compressed model's own inputs.

The init refits a pruned window's consumer (the FFN down layer, the attention output
projection) on the *dense* model's hidden units. In the compressed model, the kept units
see inputs that earlier compressed layers already changed. Here each pruned consumer, in
model order, is refit in closed form so that, on the student's own kept units ``z = [h_S;
1]``, it reproduces the teacher's output ``t = W2 h + b2`` of that layer:

    [W2' b2'] = (E[t z^T] + d X0) (E[z z^T] + d I)^-1

with ``X0`` the current weight and bias (regularization toward the init, ``d`` a damping
fraction of the mean diagonal), so the pruned units' mean is folded into the bias as
well. The moments of one layer need one pass over the batches, stopped right after that
layer in both models (a forward pre-hook raises), and layers go one after another, so
each refit sees the earlier ones' effect. A refit is kept only when it lowers the layer's
error on held-out batches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gblr_compress.batches import Batch, real_positions, run_model, token_mask
from gblr_compress.layer import FrozenGBLR
from gblr_compress.progress import Progress, ProgressEvent

__all__ = ["RefitResult", "refit_consumers_"]

_F64 = torch.float64


class _Stop(Exception):
    """Raised by a hook once the layer of interest has been seen: the rest of the forward
    pass is not needed."""


@dataclass
class RefitResult:
    """Per refit layer: held-out relative error of its output vs the teacher's, before
    and after (``None`` without held-out batches), and whether the refit was kept."""

    layers: dict[str, dict[str, float | bool | None]] = field(default_factory=dict)
    seconds: float = 0.0


def _capture(student: nn.Module, teacher: nn.Module, name: str, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(student input, teacher input)`` of layer ``name`` on ``batch``, real positions
    only, as ``(N, n)`` float64 (the forward passes stop at the layer)."""
    got: dict[str, torch.Tensor] = {}
    mask = token_mask(batch)

    def hook_for(key: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            got[key] = real_positions(x.detach(), mask).reshape(-1, x.shape[-1]).to("cpu", torch.float32)
            raise _Stop

        return hook

    for key, model in (("s", student), ("t", teacher)):
        handle = model.get_submodule(name).register_forward_pre_hook(hook_for(key))
        try:
            run_model(model, batch)
        except _Stop:
            pass
        finally:
            handle.remove()
    return got["s"], got["t"]


@torch.no_grad()
def _moments(student: nn.Module, teacher: nn.Module, name: str, batches: Sequence[Batch], width: int,
             W2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``E[z z^T]`` ``(c+1, c+1)``, ``E[t z^T]`` ``(m, c+1)``, ``E[t t^T]`` trace, count."""
    c = width
    zz = torch.zeros(c + 1, c + 1, dtype=_F64)
    tz = torch.zeros(W2.shape[0], c + 1, dtype=_F64)
    tt, count = 0.0, 0
    W2f, b2f = W2.float(), b2.float()
    for batch in batches:
        hs, ht = _capture(student, teacher, name, batch)
        z = torch.cat([hs[:, :c], torch.ones(hs.shape[0], 1)], 1)  # (N, c+1)
        t = ht @ W2f.T + b2f  # (N, m): the teacher's output of this layer
        # Batch products in float32 (2x faster GEMMs); the sums, where error builds, in float64.
        zz += (z.T @ z).double()
        tz += (t.T @ z).double()
        tt += float((t.double() * t.double()).sum())
        count += z.shape[0]
    n = max(count, 1)
    return zz / n, tz / n, torch.tensor(tt / n), count


def _error(X: torch.Tensor, zz: torch.Tensor, tz: torch.Tensor, tt: torch.Tensor) -> float:
    """Relative error ``E||t - X z||^2 / E||t||^2`` from the moments."""
    num = float(tt) - 2.0 * float((X * tz).sum()) + float(((X @ zz) * X).sum())
    return max(num, 0.0) / max(float(tt), 1e-30)


@torch.no_grad()
def refit_consumers_(
    student: nn.Module,
    teacher: nn.Module,
    names: Sequence[str],
    fit: Sequence[Batch],
    held: Sequence[Batch] = (),
    damping: float = 0.01,
    progress: Progress | None = None,
) -> RefitResult:
    """Refit the pruned consumers ``names`` of ``student`` in place, in the given order
    (model order: each refit sees the earlier ones), against ``teacher`` (dense).

    Each layer must be a :class:`~gblr_compress.layer.FrozenGBLR` with one block reading
    columns ``[0, c)`` at full row width (a pruned consumer) and the teacher's layer an
    ``nn.Linear`` of the same shape. The block's dense factor and the bias are replaced;
    windows and cost do not change.

    Args:
        student, teacher: the models (run in eval mode, under ``no_grad``).
        names: dotted names of the pruned consumers.
        fit: batches the refit is fit on.  held: batches that judge it (kept only when
            its held-out error is lower; without them every refit is kept).
        damping: the ridge toward the current weight, a fraction of the mean diagonal
            of ``E[z z^T]``.
        progress: ``ProgressEvent("refit", i, total)`` after each layer.
    """
    t0 = time.perf_counter()
    result = RefitResult()
    s_mode, t_mode = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        for i, name in enumerate(names):
            layer, dense = student.get_submodule(name), teacher.get_submodule(name)
            if not isinstance(layer, FrozenGBLR) or len(layer.U) != 1 or layer.bias is None:
                continue
            (rs, rw, cs, cw), U, V = layer.windows[0], layer.U[0], layer.V[0]
            if (rs, rw, cs) != (0, layer.out_features, 0) or layer.identity_side(0) != "V":
                continue  # not a pruned consumer (W, I): e.g. a pruned producer (I, W)
            W2 = dense.weight.detach().to("cpu", _F64)
            b2 = (dense.bias.detach() if dense.bias is not None else torch.zeros(W2.shape[0])).to("cpu", _F64)
            X0 = torch.cat([(U.detach() @ V.detach()).to("cpu", _F64), layer.bias.detach().to("cpu", _F64)[:, None]], 1)
            zz, tz, tt, _ = _moments(student, teacher, name, fit, cw, W2, b2)
            d = damping * float(torch.diagonal(zz).mean()) + 1e-12
            A = zz + d * torch.eye(cw + 1, dtype=_F64)
            X = torch.linalg.solve(A, (tz + d * X0).T).T  # (m, c+1): A symmetric
            rec: dict[str, float | bool | None] = {"before": None, "after": None, "kept": True}
            if held:
                hz, ht_, htt, _ = _moments(student, teacher, name, held, cw, W2, b2)
                rec["before"], rec["after"] = _error(X0, hz, ht_, htt), _error(X, hz, ht_, htt)
                rec["kept"] = rec["after"] < rec["before"]
            if rec["kept"]:
                # The block is (W, I): the refit weight goes into U, the bias separately.
                layer.U[0].copy_(X[:, :cw].to(U.device, U.dtype))
                layer.bias.copy_(X[:, cw].to(layer.bias.device, layer.bias.dtype))
            result.layers[name] = rec
            if progress is not None:
                progress(ProgressEvent("refit", i + 1, len(names)))
    finally:
        student.train(s_mode)
        teacher.train(t_mode)
    result.seconds = time.perf_counter() - t0
    return result

