"""Trace a model to ONNX with one placeholder node per compressed layer.

During ``torch.onnx.export`` (TorchScript exporter) every FrozenGBLR runs through a
placeholder autograd Function whose ``symbolic`` emits one ``gblr::GBLRLinear`` node
carrying the layer's index, so the rest of the model is exported by torch as usual and
the layer's factors never enter the traced graph. :mod:`gblr_compress.export.build`
then replaces each placeholder with its sliced-GEMM subgraph.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from gblr_compress.batches import Batch, graph_outputs, run_model
from gblr_compress.errors import InputError
from gblr_compress.layer import FrozenGBLR

__all__ = ["DOMAIN", "ModelCall", "compressed_layers", "trace_model"]

DOMAIN = "gblr"
_PLACEHOLDER = "GBLRLinear"


class ModelCall:
    """How the model is called: its input tensors in call order, their graph names, and
    whether they are keyword arguments (a dict batch) or positional ones."""

    def __init__(self, example_inputs: Any, input_names: list[str] | None = None) -> None:
        if isinstance(example_inputs, torch.Tensor):
            tensors, keys, as_kwargs = (example_inputs,), None, False
        elif isinstance(example_inputs, (tuple, list)):
            tensors, keys, as_kwargs = tuple(example_inputs), None, False
        elif isinstance(example_inputs, dict):
            keys = [str(k) for k in example_inputs]
            tensors, as_kwargs = tuple(example_inputs.values()), True
        else:
            raise InputError(
                "example inputs must be a Tensor, a tuple of Tensors or a dict, "
                f"got {type(example_inputs).__name__}"
            )
        if not tensors:
            raise InputError("example inputs are empty")
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise InputError(f"every example input must be a Tensor, got {type(t).__name__}")
        names = list(input_names) if input_names is not None else (keys or [f"input_{i}" for i in range(len(tensors))])
        if len(names) != len(tensors) or len(set(names)) != len(names):
            raise InputError(f"input_names {names} must be {len(tensors)} distinct names, one per input")
        if as_kwargs and input_names is not None and names != keys:
            raise InputError("input_names must match the dict keys of the example inputs")
        self.tensors: tuple[torch.Tensor, ...] = tensors
        self.names: list[str] = names
        self.as_kwargs: bool = as_kwargs

    def like(self, inputs: Any) -> ModelCall:
        """Other inputs of the same kind, named like these (for verification)."""
        return ModelCall(inputs, self.names if self.as_kwargs else None)

    def run(self, model: nn.Module) -> tuple[list[torch.Tensor], list[str]]:
        """The model's outputs on these inputs (no grad) and their graph names."""
        with torch.no_grad():
            return graph_outputs(run_model(model, self.batch))

    @property
    def batch(self) -> Batch:
        """The inputs as a batch: a dict under the input names, or the positional tuple."""
        return dict(zip(self.names, self.tensors)) if self.as_kwargs else self.tensors


class _Flat(nn.Module):
    """Positional tensors in, a flat tuple of tensors out (what the exporter wants)."""

    def __init__(self, model: nn.Module, keys: list[str] | None) -> None:
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = dict(zip(self.keys, args)) if self.keys else args
        return tuple(graph_outputs(run_model(self.model, batch))[0])


# The layers being exported, by placeholder index; set only inside ``_Swapped``. The
# TorchScript exporter cannot pass a Module through an autograd Function, so it gets
# an int and looks the layer up here.
_ACTIVE: list[FrozenGBLR] = []


class _Placeholder(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: int) -> torch.Tensor:
        # Real values keep the rest of the trace valid; the tracer must not record the
        # layer's own ops (its parameters would become constants of the graph).
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            with torch.no_grad():
                return FrozenGBLR.forward(_ACTIVE[index], x)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g: Any, x: Any, index: int) -> Any:
        layer = _ACTIVE[index]
        y = g.op(f"{DOMAIN}::{_PLACEHOLDER}", x, index_i=index, name_s=layer.name)
        try:  # tell the exporter's shape inference the output shape (..., m)
            sizes = x.type().varyingSizes()
            if sizes is not None:
                y.setType(x.type().with_sizes(list(sizes[:-1]) + [layer.out_features]))
        except (AttributeError, RuntimeError):
            pass
        return y


class _Swapped:
    """Context manager routing every FrozenGBLR forward through the placeholder."""

    def __init__(self, layers: list[FrozenGBLR]) -> None:
        self.layers = layers

    def __enter__(self) -> None:
        _ACTIVE[:] = self.layers
        for i, layer in enumerate(self.layers):
            layer.forward = lambda x, i=i: _Placeholder.apply(x, i)  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            del layer.forward
        _ACTIVE.clear()


def _default_dynamic_axes(call: ModelCall) -> dict[str, dict[int, str]]:
    axes = {}
    for t, name in zip(call.tensors, call.names):
        if t.dim() >= 2:
            axes[name] = {0: "batch", 1: "seq"}
        elif t.dim() == 1:
            axes[name] = {0: "batch"}
    return axes


def _broadcast_mask(mu: Any) -> Callable[..., torch.Tensor]:
    """transformers' ``sdpa_mask`` evaluated by broadcasting instead of ``torch.vmap``.

    transformers' mask functions are elementwise in (batch, head, q, kv) indices, so
    calling one on index tensors shaped to broadcast gives the same (B, 1, Q, KV)
    boolean mask; unlike vmap, the tracer records it with dynamic sizes.
    """

    def sdpa_mask(batch_size: int, cache_position: torch.Tensor, kv_length: int, kv_offset: int = 0,
                  mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
                  **_kwargs: Any) -> torch.Tensor:
        fn = mask_function if mask_function is not None else mu.causal_mask_function
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
        if padding is not None:
            fn = mu.and_masks(fn, mu.padding_mask_function(padding))
        device = cache_position.device
        b = torch.arange(batch_size, device=device)[:, None, None, None]
        h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
        q = cache_position[None, None, :, None]
        kv = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
        return fn(b, h, q, kv).expand(batch_size, 1, cache_position.shape[0], kv_length)

    return sdpa_mask


@contextlib.contextmanager
def _traceable_masks() -> Iterator[None]:
    """Let TorchScript trace HuggingFace causal models (Llama, ...) with dynamic shapes.

    transformers 4.x builds attention masks with ``torch.vmap``, which the TorchScript
    tracer cannot record (it fails with ``unordered_map::at``, or bakes the sequence
    length in). :func:`_broadcast_mask` computes the same masks and stands in while
    tracing; everything is put back after. Nothing happens when transformers is not
    loaded.
    """
    mu = sys.modules.get("transformers.masking_utils")
    if mu is None or not hasattr(mu, "AttentionMaskInterface") or not hasattr(mu, "sdpa_mask"):
        yield
        return
    if "cache_position" not in inspect.signature(mu.sdpa_mask).parameters:
        # transformers 5 takes (batch_size, q_length, kv_length, ...) and broadcasts
        # index tensors itself unless asked for vmap: it traces as it is.
        yield
        return
    mapping = mu.AttentionMaskInterface._global_mapping
    saved_fn, saved_map = mu.sdpa_mask, dict(mapping)
    patched = _broadcast_mask(mu)
    mu.sdpa_mask = patched  # eager_mask calls the module-level sdpa_mask
    mapping["sdpa"] = patched
    try:
        yield
    finally:
        mu.sdpa_mask = saved_fn
        mapping.clear()
        mapping.update(saved_map)


def compressed_layers(model: nn.Module) -> list[tuple[str, FrozenGBLR]]:
    """Every FrozenGBLR in ``model`` with its dotted name, in module order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, FrozenGBLR)]


def trace_model(
    model: nn.Module,
    call: ModelCall,
    layers: list[FrozenGBLR],
    out_names: list[str],
    opset: int,
    dynamic_axes: dict | None = None,
) -> onnx.ModelProto:
    """Trace ``model`` (eval mode) to an ONNX graph with one placeholder per layer.

    Args:
        model: the model; ``layers`` are its FrozenGBLR modules, placeholder ``i`` is
            ``layers[i]``.
        call: the example inputs.
        out_names: names of the graph outputs.
        opset: default-domain opset.
        dynamic_axes: as in ``torch.onnx.export``; default: axes 0 and 1 (batch, seq)
            of every input of rank >= 2, axis 0 of rank-1 inputs.
    """
    axes = dynamic_axes if dynamic_axes is not None else _default_dynamic_axes(call)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "traced.onnx"
        wrapper = _Flat(model, call.names if call.as_kwargs else None)
        with _Swapped(layers), _traceable_masks(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                call.tensors,
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=call.names,
                output_names=out_names,
                dynamic_axes=axes,
                custom_opsets={DOMAIN: 1} if layers else None,
                do_constant_folding=True,
            )
        return onnx.load(str(raw))
