"""Export a model with FrozenGBLR layers to plain ONNX, in four visible steps.

``plan`` (a form per compressed layer, :mod:`~gblr_compress.export.forms`) ->
``trace`` (torch's exporter with one placeholder node per layer,
:mod:`~gblr_compress.export.trace`) -> ``build`` (each placeholder replaced by its exact
sliced-GEMM subgraph; the custom domain disappears, so onnxruntime needs no custom ops)
-> ``verify`` (onnxruntime against PyTorch, :mod:`~gblr_compress.export.verify`) ->
``save`` (atomic, with metadata). :func:`build_onnx`, :func:`verify_graph` and
:func:`save_onnx` are the steps; :func:`export_onnx` runs them all. A caller that must
put figures measured by the verification into the file's metadata (the product's
report) runs the steps itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from gblr_compress.errors import InputError
from gblr_compress.export.forms import FORMS, LayerPlan, emit_layer, plan_layer
from gblr_compress.export.shrink import ShrunkLayer, shrink_pruned
from gblr_compress.export.trace import DOMAIN, ModelCall, compressed_layers, trace_model
from gblr_compress.export.verify import compare, reference
from gblr_compress.files import atomic_path
from gblr_compress.structure import LayerStructure

__all__ = [
    "ExportResult",
    "LayerExport",
    "OnnxGraph",
    "Parity",
    "build_onnx",
    "export_onnx",
    "save_onnx",
    "verify_graph",
]

# protobuf cannot serialize a message over 2 GiB; stay clear of it with some headroom.
_EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass
class LayerExport:
    """What was emitted for one compressed layer.

    Attributes:
        name: dotted module path in the model.
        form: the emitted form (``segments``, ``vpad``, ``lowrank``, ``dense``, or
            ``pruned``: a layer of a pruned group emitted as a smaller ``nn.Linear``, see
            :mod:`~gblr_compress.export.shrink`).
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


@dataclass(frozen=True)
class Parity:
    """ORT-vs-PyTorch agreement: the largest absolute output difference and its bound."""

    max_abs_diff: float
    tolerance: float


@dataclass
class OnnxGraph:
    """A built, not yet saved, ONNX model and what it was built from.

    Attributes:
        proto: the graph with every compressed layer emitted as standard ops.
        call: the example inputs (names, order, keyword or positional).
        reference: PyTorch's outputs on those inputs (what verification compares with).
        layers: one :class:`LayerExport` per compressed layer, in graph order.
        opset: the default-domain opset.
    """

    proto: onnx.ModelProto
    call: ModelCall
    reference: list[torch.Tensor]
    layers: list[LayerExport]
    opset: int

    @property
    def external_data(self) -> bool:
        """Whether the weights must go to a ``.data`` file beside the model."""
        return _too_big(self.proto)


@dataclass
class ExportResult:
    """Outcome of :func:`export_onnx` / :func:`save_onnx`.

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


def _replace_placeholders(
    proto: onnx.ModelProto, structures: list[LayerStructure], plans: list[LayerPlan]
) -> list[int]:
    """Swap each placeholder node for its subgraph; return the layer indices in graph order."""
    graph = proto.graph
    new_nodes, seen, stored = [], [], set()
    for node in graph.node:
        if node.domain != DOMAIN:
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
    kept = [op for op in proto.opset_import if op.domain != DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return seen


def _np_dtype(s: LayerStructure) -> np.dtype:
    t = s.blocks[0].U if s.blocks else (s.bias if s.bias is not None else torch.zeros(()))
    return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype)


def _layer_exports(structures: list[LayerStructure], plans: list[LayerPlan], order: list[int]) -> list[LayerExport]:
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


def build_onnx(
    model: nn.Module,
    example_inputs: Any,
    *,
    opset: int = 18,
    input_names: list[str] | None = None,
    dynamic_axes: dict | None = None,
    form: str = "auto",
) -> OnnxGraph:
    """Plan, trace and build the ONNX graph of ``model`` in memory (nothing is written).

    Args:
        model: an ``nn.Module`` containing FrozenGBLR submodules anywhere (run in eval mode).
        example_inputs: a Tensor, a tuple of Tensors, or a dict of Tensors (keyword args).
        opset: default-domain opset, >= 18.
        input_names: names of the graph inputs; default: dict keys, or ``input_0..``.
        dynamic_axes: as in ``torch.onnx.export``; default: axes 0 and 1 (batch, seq) of
            every input of rank >= 2, axis 0 of rank-1 inputs.
        form: ``"auto"`` (cost model per layer) or ``"sliced"``/``"segments"``,
            ``"vpad"``, ``"lowrank"`` for every layer.

    Raises:
        InputError: bad arguments (inputs, opset, form, outputs the graph cannot carry).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if opset < 18:
        raise InputError(f"opset must be >= 18, got {opset}")
    if form not in ("auto", "sliced", *FORMS):
        raise InputError(f"unknown form {form!r}; expected auto, sliced or one of {', '.join(FORMS)}")
    call = ModelCall(example_inputs, input_names)

    was_training = model.training
    model.eval()
    try:
        ref_out, out_names = call.run(model)
        # Fully pruned groups become smaller nn.Linear layers (traced as plain MatMuls);
        # the graph is checked against ``model`` itself, so the shrink is verified too.
        view, shrunk = (model, []) if form != "auto" else shrink_pruned(model, lambda m: call.run(m)[0], ref_out)
        named = compressed_layers(view)
        structures = []
        for name, layer in named:
            s = layer.structure()
            s.name = name  # the module path is the name a graph viewer and a report show
            structures.append(s)
        try:
            plans = [plan_layer(s, form) for s in structures]  # plan
        except ValueError as exc:  # a forced form this structure cannot take (dense on overlapping rows)
            raise InputError(f"form {form!r}: {exc}") from None
        proto = trace_model(view, call, [layer for _, layer in named], out_names, opset, dynamic_axes)
    finally:
        model.train(was_training)
    order = _replace_placeholders(proto, structures, plans)  # build
    order = list(dict.fromkeys(order))  # first call of each layer, graph order
    if sorted(order) != list(range(len(named))):
        raise RuntimeError("some compressed layers were not reached by the traced graph")
    layers = _layer_exports(structures, plans, order) + _shrunk_exports(model, shrunk)
    records = [structures[i].to_dict() for i in order] + [_structure(model, s.name).to_dict() for s in shrunk]
    for k, v in {
        "gblr.structure": json.dumps(records),
        "gblr.export": json.dumps([{"name": le.name, "form": le.form, "params": le.params} for le in layers]),
    }.items():
        proto.metadata_props.add(key=k, value=v)
    if not _too_big(proto):  # a larger one is checked from its file (see _write)
        onnx.checker.check_model(proto, full_check=True)
    return OnnxGraph(proto, call, ref_out, layers, opset)


def _structure(model: nn.Module, name: str) -> LayerStructure:
    s = model.get_submodule(name).structure()
    s.name = name
    return s


def _shrunk_exports(model: nn.Module, shrunk: list[ShrunkLayer]) -> list[LayerExport]:
    """Export records of the layers of pruned groups emitted as smaller nn.Linear layers
    (form ``"pruned"``: the pruned units are gone from the graph)."""
    out = []
    for s in shrunk:
        structure = _structure(model, s.name)
        out.append(LayerExport(name=s.name, form="pruned", params=s.params, exact_cost=structure.cost,
                               dense_cost=structure.dense_cost, zero_padded=s.params > structure.cost, bias=s.bias))
    return out


def _too_big(proto: onnx.ModelProto) -> bool:
    # The in-memory checker serializes the proto, which protobuf refuses past 2 GiB;
    # such models are checked from the file (see _write).
    return sum(len(t.raw_data) or t.ByteSize() for t in proto.graph.initializer) > _EXTERNAL_DATA_BYTES


def _write(proto: onnx.ModelProto, path: Path, external: bool) -> None:
    if external:
        # save_model moves the weights out of the proto it is given, in place: a copy
        # keeps the graph whole for the next write (verification first, then the output).
        whole = onnx.ModelProto()
        whole.CopyFrom(proto)
        onnx.save_model(whole, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=path.name + ".data")
        onnx.checker.check_model(str(path), full_check=True)
    else:
        onnx.save_model(proto, str(path))


def _write_external(proto: onnx.ModelProto, path: Path) -> None:
    """Write a model with external data as ``path`` + ``path.data``, each renamed into
    place from a temporary folder beside them (the model refers to its data by the
    final name, so both are written under it there); nothing is left on failure."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _write(proto, tmp / path.name, True)
        os.replace(tmp / (path.name + ".data"), path.with_name(path.name + ".data"))
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_graph(graph: OnnxGraph, model: nn.Module, verify_inputs: Any = None) -> Parity:
    """Run the built graph in onnxruntime and compare it with ``model``.

    Args:
        graph: from :func:`build_onnx`.
        model: the PyTorch model it was built from.
        verify_inputs: inputs of the same kind as the example inputs (default: those,
            with the reference outputs computed at build time).

    Raises:
        VerificationError: the ONNX output differs from PyTorch beyond
            ``1e-4 * max(1, max |reference|)``.
    """
    if verify_inputs is None:
        call, ref = graph.call, graph.reference
    else:
        call = graph.call.like(verify_inputs)
        ref = reference(model, call)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        _write(graph.proto, path, graph.external_data)
        diff, tol = compare(path, call, ref)
    return Parity(diff, tol)


def save_onnx(
    graph: OnnxGraph,
    path: str | Path,
    metadata: dict[str, str] | None = None,
    parity: Parity | None = None,
) -> ExportResult:
    """Write ``graph`` to ``path`` atomically (temp file + rename), with ``metadata``.

    Models whose weights exceed ~1.8 GB store them in ``<path>.data`` (external data).

    Raises:
        InputError: the folder does not exist, or metadata is not str -> str.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"output directory does not exist: {path.parent}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError("metadata must map str keys to str values")
    for k, v in (metadata or {}).items():
        _set_prop(graph.proto, k, v)
    external = graph.external_data
    if external:
        _write_external(graph.proto, path)
    else:
        with atomic_path(path) as tmp:
            _write(graph.proto, tmp, external)
    result = ExportResult(path=path, layers=list(graph.layers), opset=graph.opset, external_data=external)
    if parity is not None:
        result.max_abs_diff, result.tolerance, result.ort_ok = parity.max_abs_diff, parity.tolerance, True
    return result


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
) -> ExportResult:
    """Export ``model`` to a standard ONNX file; each FrozenGBLR becomes a sliced-GEMM subgraph.

    Runs :func:`build_onnx`, :func:`verify_graph` (when ``verify``) and :func:`save_onnx`.

    Args:
        model: an ``nn.Module`` containing FrozenGBLR submodules anywhere (run in eval mode).
        example_inputs: a Tensor, a tuple of Tensors, or a dict of Tensors (keyword args).
        path: the ``.onnx`` file; written atomically (temp file + rename).
        opset, input_names, dynamic_axes, form: see :func:`build_onnx`.
        metadata: extra ``metadata_props`` (str -> str), e.g. ``{"gblr.report": json}``.
        verify: run the model in onnxruntime and compare with PyTorch before writing.
        verify_inputs: inputs for verification (same kind as ``example_inputs``);
            default: ``example_inputs``.

    Returns:
        An :class:`ExportResult` with per-layer forms and real parameter counts.

    Raises:
        InputError: bad arguments (inputs, opset, form, metadata, output folder).
        VerificationError: the ONNX output differs from PyTorch; no file is written then.

    Example:
        >>> result = export_onnx(model.eval(), torch.randn(2, 16, 384), "model.onnx")
        >>> result.max_abs_diff < result.tolerance
        True
    """
    t0 = time.perf_counter()
    path = Path(path)
    if not path.parent.is_dir():  # before the work, not after it
        raise InputError(f"output directory does not exist: {path.parent}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError("metadata must map str keys to str values")
    graph = build_onnx(model, example_inputs, opset=opset, input_names=input_names,
                       dynamic_axes=dynamic_axes, form=form)
    parity = verify_graph(graph, model, verify_inputs) if verify else None
    result = save_onnx(graph, path, metadata, parity)
    result.seconds = time.perf_counter() - t0
    return result

