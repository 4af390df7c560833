"""Progress of a run: the one event type every stage reports, and the phase names.

The library prints nothing. Each long stage calls ``progress(ProgressEvent(...))``
after each unit of work (a batch, a layer, a step); the CLI draws bars from the events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PHASES", "Progress", "ProgressEvent"]

# Every phase a run reports, in run order, with the label a person reads.
PHASES: dict[str, str] = {
    "moments": "activation statistics",
    "holdout": "held-out statistics",
    "sensitivity": "layer sensitivity",
    "spectra": "spectra",
    "layers": "init (per layer)",
    "refit": "refit of pruned layers",
    "distill": "distillation",
    "retry": "distillation at a fifth of the step",
    "recover": "recovery (content only)",
    "export": "export + verification",
    "search": "target search (candidates)",
}


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units of ``phase`` are finished.

    Attributes:
        phase: one of :data:`PHASES`.
        done, total: units finished and in all (``total`` 0: unknown).
        loss: training loss of the last step (distillation phases).
        cost, max_cost: exact cost of the compressed layers and its bound (distillation).
        heldout: held-out loss, on steps where it was measured.
    """

    phase: str
    done: int
    total: int
    loss: float | None = None
    cost: int | None = None
    max_cost: int | None = None
    heldout: float | None = None


Progress = Callable[[ProgressEvent], None]
