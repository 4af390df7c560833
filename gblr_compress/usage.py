"""Which target layers the model's outputs actually use, and which share weights.

A wrapper often carries layers its outputs never see: the usual sentence-embedding
wrapper of a HuggingFace ``BertModel`` returns the mean-pooled tokens, so the BERT
pooler is computed and thrown away (the tracer drops it from the ONNX graph). A
layer like that must not take part of the budget, and must not be compressed. A causal
LM's ``lm_head`` often *is* the token embedding (tied weights): compressing it as a
Linear would change the embedding's meaning for one of its two users. Both are found
here, on one batch, in one forward and one backward pass, before any long phase.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gblr_compress.batches import Batch, eval_mode, flatten_outputs, run_model

__all__ = ["LayerUsage", "NEVER_CALLED", "UNUSED", "find_usage", "tied_weights"]

UNUSED = "not used by the model's outputs"
# A layer no forward calls may still count: nn.MultiheadAttention reads its out_proj's
# weight directly, never calling it. Either way it is left dense.
NEVER_CALLED = "never called as a module (a parent may read its weight directly, as nn.MultiheadAttention does)"


@dataclass(frozen=True)
class LayerUsage:
    """Target layers to leave dense, with the reason, by dotted name."""

    unused: dict[str, str]
    tied: dict[str, str]

    @property
    def dense(self) -> dict[str, str]:
        """Every layer to leave dense and why (unused first)."""
        return {**self.tied, **self.unused}


def tied_weights(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Target layers whose weight is a parameter another module uses too, with the reason
    (e.g. ``"weight tied to model.embed_tokens"``)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            if p_name == "weight":
                owners.setdefault(id(p), []).append((mod_name, mod))
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        weight = getattr(modules[name], "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        # The same module reached under two names is one (shared) layer, not a tie.
        others = sorted({o for o, mod in owners.get(id(weight), []) if mod is not modules[name]})
        if others:
            out[name] = f"weight tied to {', '.join(others)}"
    return out


def find_usage(
    model: nn.Module, batch: Batch, names: Sequence[str], include_tied: bool = False
) -> LayerUsage:
    """Find the target layers the outputs do not use, and the tied ones.

    A layer is unused when one forward on ``batch`` never calls it, or when no
    floating-point output depends on what it returns (its output gets no gradient).
    The model's parameters are not changed and get no gradients.

    Args:
        model: the dense model (run in eval mode for the check, mode restored after).
        batch: one calibration batch.
        names: the target layers' dotted names.
        include_tied: the user opted in to compressing tied layers (then they are
            not reported as tied).
    """
    modules = dict(model.named_modules())
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def tap(name: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: object) -> torch.Tensor | None:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            # A zero leaf added to the output: d(outputs)/d(leaf) exists exactly when
            # something downstream reads the output, and autograd.grad on the leaves
            # alone leaves the model's weights without gradients.
            leaf = torch.zeros_like(out, requires_grad=True)
            outputs[name].append(leaf)
            return out + leaf

        return hook

    handles = [modules[n].register_forward_hook(tap(n)) for n in names]
    try:
        with eval_mode(model), torch.enable_grad():
            outs = [t for t in flatten_outputs(run_model(model, batch)) if t.requires_grad]
            leaves = [(n, t) for n in names for t in outputs[n]]
            grads: list[torch.Tensor | None] = [None] * len(leaves)
            if outs and leaves:
                total = sum(o.float().sum() for o in outs)
                grads = list(torch.autograd.grad(total, [t for _, t in leaves], allow_unused=True))
    finally:
        for h in handles:
            h.remove()
    reached = {n for (n, _), g in zip(leaves, grads) if g is not None}
    unused = {}
    for n in names:
        if not outputs[n]:
            unused[n] = NEVER_CALLED
        elif n not in reached:
            unused[n] = UNUSED
    tied = {} if include_tied else {n: r for n, r in tied_weights(model, names).items() if n not in unused}
    return LayerUsage(unused=unused, tied=tied)
