"""Freezing: fix the learned structure, recover the content, swap in FrozenGBLR.

The eval-mode forward of a GBLRLinear already uses the exact rounded boxcars, so fixing
the structure changes nothing numerically; the content-only recovery then lets U, V and
bias settle after the last structure change, and :func:`freeze_` swaps every GBLRLinear
for a :class:`~gblr_compress.layer.FrozenGBLR` (dead groups dropped, factors cropped,
identical windows merged) that computes the same function without a dense weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from gblr_compress.batches import Batch
from gblr_compress.distill import DistillConfig, DistillResult, distill_, gblr_layers
from gblr_compress.layer import FrozenGBLR
from gblr_compress.progress import Progress
from gblr_compress.structure import LayerStructure
from gblr_compress.swap import replace_module

__all__ = ["recover_", "freeze_"]


def recover_(
    student: nn.Module,
    teacher: nn.Module,
    calib: Sequence[Batch],
    max_cost: int,
    config: DistillConfig,
    holdout: Sequence[Batch] = (),
    progress: Progress | None = None,
    deadline: float | None = None,
) -> DistillResult:
    """Content-only fine-tune with the structure fixed at its rounded windows.

    Runs :func:`~gblr_compress.distill.distill_` on exact boxcars with the structure
    learning rate at 0, so widths and locations cannot move and the budget holds as is.
    With held-out batches the best held-out state is kept (possibly the starting one).
    """
    # ste_fraction=1 runs every step on exact boxcars (sigma = inf).
    fixed = replace(config, structure_lr=0.0, ste_fraction=1.0)
    return distill_(student, teacher, calib, max_cost, fixed, holdout=holdout, progress=progress, phase="recover",
                    deadline=deadline)


def freeze_(model: nn.Module) -> dict[str, LayerStructure]:
    """Replace every GBLRLinear in ``model`` by its FrozenGBLR, in place.

    Returns:
        The frozen records by dotted layer name, in model order, of every compressed
        layer: the GBLRLinear layers just frozen and the FrozenGBLR layers already there
        (pruned windows are frozen by the init). This is the one record that export,
        the report and reload consume.
    """
    for name, layer in list(gblr_layers(model).items()):
        frozen = FrozenGBLR(layer.to_structure(name))
        frozen.train(layer.training)
        replace_module(model, name, frozen)
    return {name: mod.structure() for name, mod in model.named_modules() if isinstance(mod, FrozenGBLR)}
