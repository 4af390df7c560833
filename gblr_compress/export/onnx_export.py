"""Export a model with FrozenGBLR layers to plain ONNX and check it against PyTorch.

Route: during ``torch.onnx.export`` (TorchScript exporter) every FrozenGBLR runs through
a placeholder autograd Function whose ``symbolic`` emits one ``gblr::GBLRLinear`` node
carrying the layer's index, so the rest of the model is exported by torch as usual and
the layer's factors never enter the traced graph. Each placeholder is then replaced by
the exact sliced-GEMM subgraph chosen in :mod:`gblr_compress.export.forms`; the custom
domain disappears, so onnxruntime needs no custom ops.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from torch import nn

from gblr_compress.errors import InputError
from gblr_compress.export.forms import FORMS, LayerPlan, emit_layer, plan_layer
from gblr_compress.layer import FrozenGBLR
from gblr_compress.structure import LayerStructure

__all__ = ["ExportResult", "LayerExport", "VerificationError", "export_onnx", "verify_onnx"]

_DOMAIN = "gblr"
_PLACEHOLDER = "GBLRLinear"
# protobuf cannot serialize a message over 2 GiB; stay clear of it with some headroom.
_EXTERNAL_DATA_BYTES = 1_800_000_000


class VerificationError(RuntimeError):
    """The exported ONNX model does not reproduce the PyTorch model (one-line message)."""


@dataclass
class LayerExport:
    """What was emitted for one compressed layer.

    Attributes:
        name: dotted module path in the model.
        form: the emitted form (``segments``, ``vpad`` or ``lowrank``).
        params: real weight parameters stored for the layer (bias excluded).
        exact_cost: the frozen exact cost; ``params == exact_cost`` for exact forms.
        dense_cost: ``m * n`` of the dense layer it replaces.
        zero_padded: True when the form stores zero padding (``params > exact_cost``).
        bias: number of bias parameters stored (``m`` or 0).
    """

    name: str
    form: str
    params: int
    exact_cost: int
    dense_cost: int
    zero_padded: bool
    bias: int


@dataclass
class ExportResult:
    """Outcome of :func:`export_onnx`.

    Attributes:
        path: the written ``.onnx`` file.
        layers: one :class:`LayerExport` per compressed layer, in graph order.
        max_abs_diff: ORT-vs-PyTorch parity on the verification inputs (None if skipped).
        tolerance: the bound ``max_abs_diff`` was checked against (None if skipped).
        ort_ok: True when verification passed, None when it was skipped.
        opset: the default-domain opset of the file.
        seconds: wall time of the whole export.
        external_data: True when weights were written to ``<path>.data``.
    """

    path: Path
    layers: list[LayerExport] = field(default_factory=list)
    max_abs_diff: float | None = None
    tolerance: float | None = None
    ort_ok: bool | None = None
    opset: int = 18
    seconds: float = 0.0
    external_data: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (for reports)."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# ------------------------------------------------------------------ input handling
def _normalize_inputs(
    example_inputs: Any, input_names: list[str] | None
) -> tuple[tuple[torch.Tensor, ...], list[str], bool]:
    """Tensors in call order, their names, and whether they are keyword arguments."""
    if isinstance(example_inputs, torch.Tensor):
        tensors, keys, as_kwargs = (example_inputs,), None, False
    elif isinstance(example_inputs, (tuple, list)):
        tensors, keys, as_kwargs = tuple(example_inputs), None, False
    elif isinstance(example_inputs, dict):
        keys = [str(k) for k in example_inputs]
        tensors, as_kwargs = tuple(example_inputs.values()), True
    else:
        raise InputError(
            f"example inputs must be a Tensor, a tuple of Tensors or a dict, got {type(example_inputs).__name__}"
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
    return tensors, names, as_kwargs


def _flatten_outputs(out: Any) -> tuple[list[torch.Tensor], list[str]]:
    if isinstance(out, torch.Tensor):
        return [out], ["output_0"]
    if isinstance(out, (tuple, list)):
        items = list(out)
        names = [f"output_{i}" for i in range(len(items))]
    elif isinstance(out, dict):
        items, names = list(out.values()), [str(k) for k in out]
    else:
        raise InputError(f"model output must be a Tensor, tuple/list or dict of Tensors, got {type(out).__name__}")
    if not all(isinstance(t, torch.Tensor) for t in items):
        raise InputError("every model output must be a Tensor (nested outputs are not supported)")
    return items, names


class _Flat(nn.Module):
    """Positional tensors in, a flat tuple of tensors out (what the exporter wants)."""

    def __init__(self, model: nn.Module, keys: list[str] | None) -> None:
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.keys, args))) if self.keys else self.model(*args)
        return tuple(_flatten_outputs(out)[0])


def _run_torch(model: nn.Module, tensors, names, as_kwargs) -> tuple[list[torch.Tensor], list[str]]:
    with torch.no_grad():
        out = model(**dict(zip(names, tensors))) if as_kwargs else model(*tensors)
    return _flatten_outputs(out)


# ------------------------------------------------------------------- placeholder op
# The layers being exported, by placeholder index; set only inside ``_Swapped``. The
# TorchScript exporter cannot pass a Module through an autograd Function, so it gets
# an int and looks the layer up here.
_ACTIVE: list[FrozenGBLR] = []


class _Placeholder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: int) -> torch.Tensor:
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
    def symbolic(g, x, index: int):
        layer = _ACTIVE[index]
        y = g.op(f"{_DOMAIN}::{_PLACEHOLDER}", x, index_i=index, name_s=layer.name)
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
            layer.forward = (lambda x, i=i: _Placeholder.apply(x, i))  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            del layer.forward
        _ACTIVE.clear()


# ------------------------------------------------------------------------ export
def _default_dynamic_axes(tensors, names) -> dict[str, dict[int, str]]:
    axes = {}
    for t, name in zip(tensors, names):
        if t.dim() >= 2:
            axes[name] = {0: "batch", 1: "seq"}
        elif t.dim() == 1:
            axes[name] = {0: "batch"}
    return axes


def _replace_placeholders(
    proto: onnx.ModelProto, structures: list[LayerStructure], plans: list[LayerPlan]
) -> list[int]:
    """Swap each placeholder node for its subgraph; return the layer indices in graph order."""
    graph = proto.graph
    new_nodes, seen, stored = [], [], set()
    for node in graph.node:
        if node.domain != _DOMAIN:
            new_nodes.append(node)
            continue
        index = next(a.i for a in node.attribute if a.name == "index")
        s, plan = structures[index], plans[index]
        calls = seen.count(index)  # a shared layer called again: new nodes, same weights
        prefix = f"gblr/{s.name}" + (f"/call{calls + 1}" if calls else "")
        nodes, inits, params = emit_layer(
            s, plan, node.input[0], node.output[0], prefix, _np_dtype(s), init_prefix=f"gblr/{s.name}"
        )
        if params != plan.params:  # the record of real parameters must be the emitted one
            raise AssertionError(f"{s.name}: emitted {params} params, planned {plan.params}")
        new_nodes.extend(nodes)
        graph.initializer.extend(t for t in inits if t.name not in stored)
        stored.update(t.name for t in inits)
        seen.append(index)
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [op for op in proto.opset_import if op.domain != _DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return seen


def _np_dtype(s: LayerStructure) -> np.dtype:
    t = s.blocks[0].U if s.blocks else (s.bias if s.bias is not None else torch.zeros(()))
    return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype)


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in proto.graph.initializer)


def _compressed_layers(model: nn.Module) -> list[tuple[str, FrozenGBLR]]:
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, FrozenGBLR)]


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    opset: int = 18,
    input_names: list[str] | None = None,
    dynamic_axes: dict | None = None,
    metadata: dict[str, str] | None = None,
    form: str = "auto",
    verify: bool = True,
    verify_inputs: Any = None,
    metadata_after: Callable[[ExportResult], dict[str, str]] | None = None,
) -> ExportResult:
    """Export ``model`` to a standard ONNX file; each FrozenGBLR becomes a sliced-GEMM subgraph.

    Args:
        model: an ``nn.Module`` containing FrozenGBLR submodules anywhere (run in eval mode).
        example_inputs: a Tensor, a tuple of Tensors, or a dict of Tensors (keyword args).
        path: the ``.onnx`` file; written atomically (temp file + rename). Models whose
            weights exceed ~1.8 GB store them in ``<path>.data`` (external data).
        opset: default-domain opset, >= 18.
        input_names: names of the graph inputs; default: dict keys, or ``input_0..``.
        dynamic_axes: as in ``torch.onnx.export``; default: axes 0 and 1 (batch, seq) of
            every input of rank >= 2, axis 0 of rank-1 inputs.
        metadata: extra ``metadata_props`` (str -> str), e.g. ``{"gblr.report": json}``.
        form: ``"auto"`` (cost model per layer) or ``"sliced"``/``"segments"``,
            ``"vpad"``, ``"lowrank"`` for every layer.
        verify: run the file in onnxruntime and compare with the PyTorch model.
        metadata_after: called with the finished result (parity, forms) before the file
            is renamed into place; the metadata it returns is stored too (e.g. a report
            that includes the verification figures).
        verify_inputs: inputs for verification (same kind as ``example_inputs``);
            default: ``example_inputs``.

    Returns:
        An :class:`ExportResult` with per-layer forms and real parameter counts.

    Raises:
        InputError: bad arguments (inputs, opset, form, metadata).
        VerificationError: the ONNX output differs from PyTorch beyond
            ``1e-4 * max(1, max |reference|)``; no file is written then.

    Example:
        >>> result = export_onnx(model.eval(), torch.randn(2, 16, 384), "model.onnx")
        >>> result.max_abs_diff < result.tolerance
        True
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if opset < 18:
        raise InputError(f"opset must be >= 18, got {opset}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError("metadata must map str keys to str values")
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"output directory does not exist: {path.parent}")
    if form not in ("auto", "sliced", *FORMS):
        raise InputError(f"unknown form {form!r}; expected auto, sliced or one of {', '.join(FORMS)}")
    tensors, names, as_kwargs = _normalize_inputs(example_inputs, input_names)

    named = _compressed_layers(model)
    structures = []
    for name, layer in named:
        s = layer.structure()
        s.name = name  # the module path is the name a graph viewer and a report show
        structures.append(s)
    plans = [plan_layer(s, form) for s in structures]

    was_training = model.training
    model.eval()
    try:
        ref_out, out_names = _run_torch(model, tensors, names, as_kwargs)
        axes = dynamic_axes if dynamic_axes is not None else _default_dynamic_axes(tensors, names)
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "traced.onnx"
            wrapper = _Flat(model, names if as_kwargs else None)
            with _Swapped([layer for _, layer in named]), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper,
                    tensors,
                    str(raw),
                    dynamo=False,
                    opset_version=opset,
                    input_names=names,
                    output_names=out_names,
                    dynamic_axes=axes,
                    custom_opsets={_DOMAIN: 1} if named else None,
                    do_constant_folding=True,
                )
            proto = onnx.load(str(raw))
        order = _replace_placeholders(proto, structures, plans)
        order = list(dict.fromkeys(order))  # first call of each layer, graph order
        if sorted(order) != list(range(len(named))):
            raise RuntimeError("some compressed layers were not reached by the traced graph")

        meta = {
            "gblr.structure": json.dumps([structures[i].to_dict() for i in order]),
            "gblr.export": json.dumps(
                [{"name": structures[i].name, "form": plans[i].form, "params": plans[i].params} for i in order]
            ),
        }
        meta.update(metadata or {})
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)

        external = _initializer_bytes(proto) > _EXTERNAL_DATA_BYTES
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp_name)
        try:
            if external:
                onnx.save_model(
                    proto, str(tmp_path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=path.name + ".data",
                )
                onnx.checker.check_model(str(tmp_path), full_check=True)
            else:
                onnx.checker.check_model(proto, full_check=True)
                onnx.save_model(proto, str(tmp_path))
            result = ExportResult(path=path, opset=opset, external_data=external)
            if verify:
                if verify_inputs is None:
                    v_tensors, v_ref = tensors, ref_out
                else:
                    v_tensors, v_names, _ = _normalize_inputs(verify_inputs, names if as_kwargs else None)
                    v_ref, _ = _run_torch(model, v_tensors, names, as_kwargs)
                diff, tol = _compare(tmp_path, v_tensors, names, v_ref)
                result.max_abs_diff, result.tolerance, result.ort_ok = diff, tol, True
            result.layers = _layer_exports(structures, plans, order)
            if metadata_after is not None:
                # Figures only known now (parity, forms) go into the file before it
                # becomes visible under its final name.
                for k, v in metadata_after(result).items():
                    _set_prop(proto, k, v)
                onnx.save_model(proto, str(tmp_path))
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)
    finally:
        model.train(was_training)

    result.seconds = time.perf_counter() - t0
    return result


def _layer_exports(structures: list, plans: list, order: list[int]) -> list[LayerExport]:
    """Per-layer export records in graph order."""
    return [
        LayerExport(
            name=structures[i].name,
            form=plans[i].form,
            params=plans[i].params,
            exact_cost=structures[i].cost,
            dense_cost=structures[i].dense_cost,
            zero_padded=plans[i].params > structures[i].cost,
            bias=0 if structures[i].bias is None else structures[i].out_features,
        )
        for i in order
    ]


def _set_prop(proto: onnx.ModelProto, key: str, value: str) -> None:
    """Set one metadata_props entry, replacing an existing one with the same key."""
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    proto.metadata_props.add(key=key, value=value)


# ------------------------------------------------------------------- verification
def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _compare(path: Path, tensors, names, ref: list[torch.Tensor]) -> tuple[float, float]:
    sess = _session(path)
    feeds_all = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
    # The exporter drops inputs the graph does not use; feed only the ones it kept.
    feeds = {i.name: feeds_all[i.name] for i in sess.get_inputs()}
    got = sess.run(None, feeds)
    if len(got) != len(ref):
        raise VerificationError(f"ONNX model returns {len(got)} outputs, PyTorch {len(ref)}")
    diff, scale = 0.0, 1.0
    for g, r in zip(got, ref):
        r = r.detach().cpu().double().numpy()
        if g.shape != r.shape:
            raise VerificationError(f"ONNX output shape {g.shape} != PyTorch {r.shape}")
        if r.size:
            diff = max(diff, float(np.max(np.abs(g.astype(np.float64) - r))))
            scale = max(scale, float(np.max(np.abs(r))))
    tol = 1e-4 * scale
    if not diff <= tol:  # also catches NaN
        raise VerificationError(
            f"ONNX model differs from PyTorch: max abs diff {diff:.3g} > tolerance {tol:.3g}"
        )
    return diff, tol


def verify_onnx(path: str | Path, model: nn.Module, inputs: Any) -> float:
    """Run ``path`` in onnxruntime on ``inputs`` and compare with ``model``.

    Args:
        path: an ONNX file written by :func:`export_onnx` (input names as exported).
        model: the PyTorch model (its FrozenGBLR layers compute the reference).
        inputs: a Tensor, tuple of Tensors (named ``input_0..``) or dict keyed by input name.

    Returns:
        The max absolute difference over all outputs.

    Raises:
        VerificationError: the difference exceeds ``1e-4 * max(1, max |reference|)``.
        InputError: the file does not exist or the inputs are malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}")
    tensors, names, as_kwargs = _normalize_inputs(inputs, None)
    was_training = model.training
    model.eval()
    try:
        ref, _ = _run_torch(model, tensors, names, as_kwargs)
    finally:
        model.train(was_training)
    return _compare(path, tensors, names, ref)[0]
