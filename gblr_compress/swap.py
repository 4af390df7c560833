"""Find the layers to compress by dotted module name, and replace modules in place.

Module names are the dotted paths of ``model.named_modules()`` (``encoder.0.fc1``);
``--include`` / ``--exclude`` patterns are shell globs on those names.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

__all__ = ["is_linear_like", "as_linear", "block_modules", "find_linears", "last_block", "linear_shape", "replace_module"]


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and HuggingFace GPT-2 style ``Conv1D`` (a transposed Linear)."""
    if isinstance(module, nn.Linear):
        return True
    # Conv1D is matched by shape, not import, so transformers stays optional. The name
    # comes first: a GBLR layer's ``weight`` is made anew on each read.
    if type(module).__name__ != "Conv1D":
        return False
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear-like module, without copying it."""
    rows, cols = module.weight.shape
    return (int(rows), int(cols)) if isinstance(module, nn.Linear) else (int(cols), int(rows))


@torch.no_grad()
def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same function as a linear-like module."""
    if isinstance(module, nn.Linear):
        return module
    weight = module.weight  # Conv1D: (in, out), y = x @ W + b
    out = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None)
    out = out.to(device=weight.device, dtype=weight.dtype)
    out.weight.copy_(weight.T)
    if module.bias is not None:
        out.bias.copy_(module.bias)
    return out


def find_linears(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Dotted names of the linear-like modules selected by the glob patterns.

    A model that wraps the one the user brought at load time (a sentence-transformers
    folder's pooling, a one-dict forward) names the wrapped model's layers with a prefix
    (its ``wrapped_prefix``, ``"model."``); a pattern then matches a name with or without
    it, so ``encoder.layer.*`` selects what it selects in the plain folder.

    Args:
        model: the model to search.
        include: keep only names matching one of these globs (default: all).
        exclude: drop names matching one of these globs.

    Returns:
        Names in ``named_modules`` order.

    Example:
        >>> find_linears(model, include=["encoder.*"], exclude=["*.o"])
    """
    prefix = str(getattr(model, "wrapped_prefix", "") or "")

    def matches(name: str, patterns: Sequence[str]) -> bool:
        bare = name[len(prefix):] if prefix and name.startswith(prefix) else None
        return any(fnmatchcase(name, p) or (bare is not None and fnmatchcase(bare, p)) for p in patterns)

    names = []
    for name, module in model.named_modules():
        if not name or not is_linear_like(module):
            continue
        if include and not matches(name, include):
            continue
        if exclude and matches(name, exclude):
            continue
        names.append(name)
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``name`` inside ``model``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)  # works for Sequential/ModuleList children too ("0", "1")
    return old


def block_modules(model: nn.Module, layer_names: Sequence[str]) -> list[str]:
    """The children of every ``nn.ModuleList`` that hold at least one of ``layer_names``
    (each transformer layer of a BERT or Llama stack), in model order, outermost only
    (a block holding a ModuleList of experts counts once); empty for a plain MLP."""
    blocks = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        for child_name, _ in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if any(n.startswith(full + ".") for n in layer_names):
                blocks.append(full)
    return [b for b in blocks if not any(b.startswith(o + ".") for o in blocks if o != b)]


def last_block(model: nn.Module, layer_names: Sequence[str]) -> str | None:
    """The last of :func:`block_modules`, when every one of ``layer_names`` sits in a
    block (a transformer stack's last layer); None otherwise."""
    blocks = block_modules(model, layer_names)
    if not blocks or not all(any(n.startswith(b + ".") for b in blocks) for n in layer_names):
        return None
    return blocks[-1]
