"""Settings and records of the initialization: :class:`InitConfig` (validated on
construction), :class:`LayerInit` (one layer's outcome) and :class:`InitResult` (the
model's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gblr_compress.errors import ConfigError

__all__ = ["InitConfig", "LayerInit", "InitResult"]


@dataclass(frozen=True)
class InitConfig:
    """Settings of the initialization.

    Attributes:
        budget: global fraction of the dense cost, in (0, 1] (GBLR.md s.2).
        max_groups: most component groups (blocks with their own windows) per layer;
            few large blocks run fast after export. The search tries 1, 2, 4, ... and
            ``max_groups`` groups.
        data_free: ignore calibration data (``C = I``, weight error).
        damping: added to the moment's diagonal, as a fraction of its mean diagonal.
            On all-MiniLM-L6-v2 with 3k calibration tokens, 0.01 kept more than 0.1
            (held-out distillation loss 0.450 vs 0.462 at budget 0.3): the held-out
            judgement of windowed structures already guards against overfitting them.
        seed: seed of the refinement (it is deterministic given the seed).
        width_fractions: the search tries groups whose widths sum to these fractions of
            ``m + n`` (rank chosen to fill the layer's allocation).
        refine_steps: gradient steps refining widths, locations and content (0: none).
        refine_lr: Adam step of the refinement, relative to the factors' scale.
        refine_within: refine only a structure whose squared fit error is within this
            fraction above the whitened SVD's (a short descent does not close a wider
            gap, and refining every layer was a third of the init time).
        refit_sweeps: block-coordinate refits of the content on the final windows.
        min_gain: relative error reduction over the whitened SVD that the windowed
            structure must show on held-out batches to be kept.
        moment_tokens: each layer's moment uses at most about this many input vectors
            in all, evenly strided within each batch (``None``: every one). Products of
            wide inputs cost more than the forward pass itself, and neighbouring tokens
            carry little new information: on a BERT-small encoder 16k of 26k tokens
            changed held-out errors by < 0.5% relative.
        sensitivity_batches: calibration batches used to weigh each layer by how much
            its relative error moves the model's outputs
            (:func:`~gblr_compress.calib.layer_sensitivity`) before the budget is split;
            0 weighs every layer alike. Without the weights the split starves the
            layers whose relative error falls slowly with rank (on all-MiniLM-L6-v2 the
            FFN output layers got 1% of their dense cost) whatever they matter.
        prune: also try, for each FFN coupling group (:mod:`~gblr_compress.coupling`),
            pruned windows (its most important hidden units kept as full-rank blocks,
            the consumer refit by least squares) at the group's allocation, kept when
            they beat low rank on held-out statistics
            (:func:`~gblr_compress.init.model.choose_group_form`).
        prune_kinds: the coupling groups tried: ``"ffn"`` (hidden units) and
            ``"attention"`` (whole heads across Q/K/V and the output projection; with
            grouped-query attention, whole key/value groups).
        prune_damping: ridge of a pruned group's consumer refit toward plain pruning
            and of the elimination that chooses its units (the same objective,
            :func:`~gblr_compress.init.prune.ls_refit`), as a fraction of the mean
            diagonal of the units' moment. Larger than ``damping``: the refit fits
            ``m x k`` weights to the calibration moment, and trusting it less kept more
            off the calibration source. On all-MiniLM-L6-v2 (init only, sources other
            than the calibration's) 0.1 beat 0.01 by up to 0.06 at budget 0.3 from
            hand-written sentences and 0.16 at 0.5 from Wikipedia, 0.3 lost to 0.1
            everywhere; SmolLM2-135M's in-source perplexity preferred 0.01
            (``benchmarks/README.md``).
        prune_select: how the kept units are chosen: ``"obs"`` (elimination by the
            error each removal adds after the least-squares refit,
            :func:`~gblr_compress.init.prune.obs_order`) or ``"importance"``
            (``E[h_j^2] ||W2[:, j]||^2``, Kwon et al. 2022).
        unit_split: also build the coupled groups with units split across all groups
            (:func:`~gblr_compress.init.model.unit_split_alternative`) and keep it where
            it scores better on held-out outputs (needs held-out data and ``prune``).
        head_check: check each attention group the init prunes against its low-rank
            form on the model's held-out outputs, and keep the low-rank form where it
            is clearly better (:func:`~gblr_compress.pipeline.compress_prepared`;
            needs held-out data). The group score sums per-layer errors, and for
            heads, whose query and key errors pass through a softmax, it misjudged:
            all-mpnet-base-v2 at budget 0.8 (init only) calibrated on 256 hand-written
            sentences plus 2,000 WordNet examples pruned the heads of six layers and
            kept news cosine 0.759; with five of them put back by this check, 0.929.
    """

    budget: float = 0.3
    max_groups: int = 4
    data_free: bool = False
    damping: float = 0.01
    seed: int = 0
    width_fractions: tuple[float, ...] = (0.5, 0.25)
    refine_steps: int = 10
    refine_lr: float = 0.02
    refine_within: float = 0.05
    refit_sweeps: int = 1
    min_gain: float = 0.01
    moment_tokens: int | None = 16384
    sensitivity_batches: int = 1
    prune: bool = True
    prune_kinds: tuple[str, ...] = ("ffn", "attention")
    prune_damping: float = 0.1
    prune_select: str = "obs"
    unit_split: bool = True
    head_check: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ConfigError("budget", f"must be in (0, 1], got {self.budget}")
        if self.max_groups < 1:
            raise ConfigError("max_groups", f"must be >= 1, got {self.max_groups}")
        if not self.damping >= 0.0:
            raise ConfigError("damping", f"must be >= 0, got {self.damping}")
        if not all(0.0 < f < 1.0 for f in self.width_fractions):
            raise ConfigError("width_fractions", f"must be in (0, 1), got {self.width_fractions}")
        if self.refine_steps < 0 or self.refit_sweeps < 0:
            raise ConfigError("refine_steps", "and refit_sweeps must be >= 0")
        if not self.refine_lr > 0.0:
            raise ConfigError("refine_lr", f"must be > 0, got {self.refine_lr}")
        if not self.refine_within >= 0.0:
            raise ConfigError("refine_within", f"must be >= 0, got {self.refine_within}")
        if self.moment_tokens is not None and self.moment_tokens < 1:
            raise ConfigError("moment_tokens", f"must be >= 1 or None, got {self.moment_tokens}")
        if not self.prune_damping >= 0.0:
            raise ConfigError("prune_damping", f"must be >= 0, got {self.prune_damping}")
        if self.sensitivity_batches < 0:
            raise ConfigError("sensitivity_batches", f"must be >= 0, got {self.sensitivity_batches}")
        if not set(self.prune_kinds) <= {"ffn", "attention"}:
            raise ConfigError("prune_kinds", f"must be ffn and/or attention, got {self.prune_kinds}")
        if self.prune_select not in ("obs", "importance"):
            raise ConfigError("prune_select", f"must be obs or importance, got {self.prune_select!r}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ConfigError("min_gain", f"must be in [0, 1), got {self.min_gain}")


@dataclass
class LayerInit:
    """What the initialization did to one layer.

    ``status`` is ``"gblr"`` (windowed groups kept), ``"lowrank"`` (one full-width group:
    the whitened / plain truncated SVD; ``reason`` says why), ``"pruned"`` (a pruned
    window of its FFN coupling group, a FrozenGBLR from the start; ``rank`` is the kept
    units) or ``"skipped"`` (left dense; counts at its dense cost). Errors are relative output errors measured with the fit
    moment (``calib_error``) and the held-out moment (``None`` without held-out data).
    ``sensitivity`` is the layer's weight in the budget split (``None``: not measured).
    ``note`` names a numerical fault worked around (see
    :func:`~gblr_compress.init.linalg.whitening_moment`), empty when none.
    """

    name: str
    in_features: int
    out_features: int
    status: str
    reason: str
    allocated_cost: int
    exact_cost: int
    dense_cost: int
    rank: int
    groups: int
    calib_error: float | None
    heldout_error: float | None
    baseline_heldout_error: float | None
    baseline_calib_error: float | None = None
    seconds: float = 0.0
    sensitivity: float | None = None
    note: str = ""


@dataclass
class InitResult:
    """Outcome of :func:`~gblr_compress.init.initialize_`.

    Attributes:
        layers: per-layer records by dotted name, in model order.
        max_cost: exact cost the GBLRLinear layers may share (global budget minus the
            skipped layers' dense cost); distillation projects onto it.
        budget_cost: ``floor(budget * total dense cost)`` of all target layers.
        seconds: wall time of the whole initialization.
        data_free: whether the weight error (no activation statistics) was used.
        unpruned: for each attention group the init pruned (by its consumer's name),
            the group's low-rank layers ``{name: (module, record)}`` at the same
            allocation, for :attr:`InitConfig.head_check`; empty once that check ran.
        remainders: the whole units the init bought with the run's slack (remainder
            rounding), in the order bought, each as its group's consumer and the group's
            layers before that unit ``{name: (module, record)}``: the head check gives
            units back, last bought first, to make room for a low-rank form. Kept only
            while ``unpruned`` is not empty.
    """

    layers: dict[str, LayerInit] = field(default_factory=dict)
    max_cost: int = 0
    budget_cost: int = 0
    seconds: float = 0.0
    data_free: bool = True
    unpruned: dict[str, dict[str, tuple[Any, LayerInit]]] = field(default_factory=dict, repr=False, compare=False)
    remainders: list[tuple[str, dict[str, tuple[Any, LayerInit]]]] = field(default_factory=list, repr=False,
                                                                           compare=False)

    @property
    def exact_cost(self) -> int:
        """Exact cost of all target layers (skipped ones at their dense cost)."""
        return sum(rec.exact_cost for rec in self.layers.values())

    def shared_cost(self) -> int:
        """What the GBLRLinear layers may share: ``budget_cost`` less the skipped layers'
        dense cost and the pruned layers' exact cost (pruned layers are frozen already)."""
        skipped = sum(r.dense_cost for r in self.layers.values() if r.status == "skipped")
        pruned = sum(r.exact_cost for r in self.layers.values() if r.status == "pruned")
        return self.budget_cost - skipped - pruned
