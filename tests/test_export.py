"""ONNX export: ORT-vs-torch parity, exact parameter counts, dynamic axes, metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from gblr_compress.errors import InputError
from gblr_compress.export import VerificationError, export_onnx, plan_layer, verify_onnx
from gblr_compress.layer import FrozenGBLR, GBLRLayerConfig, GBLRLinear
from gblr_compress.structure import Block, LayerStructure
from samples.models import TinyEncoder
from tests.conftest import random_gblr

FORMS = ["segments", "grid", "vpad", "lowrank", "auto"]


def _block(m: int, n: int, rows: tuple[int, int], cols: tuple[int, int], r: int, gen) -> Block:
    return Block(
        rows[0], rows[1], cols[0], cols[1],
        torch.randn(rows[1], r, generator=gen), torch.randn(r, cols[1], generator=gen),
    )


def _structures(gen: torch.Generator) -> dict[str, LayerStructure]:
    m, n = 24, 40
    mk = lambda blocks, bias=True: LayerStructure(  # noqa: E731
        n, m, blocks, torch.randn(m, generator=gen) if bias else None, name="lin"
    )
    return {
        "wrapping": mk([_block(m, n, (20, 10), (30, 20), 3, gen), _block(m, n, (2, 8), (35, 9), 2, gen)]),
        "overlapping": mk(
            [_block(m, n, (0, 16), (0, 24), 2, gen), _block(m, n, (8, 12), (10, 20), 3, gen),
             _block(m, n, (4, 6), (0, 40), 1, gen)]
        ),
        "single": mk([_block(m, n, (5, 7), (11, 13), 4, gen)], bias=False),
        "full_width": mk([_block(m, n, (0, 24), (0, 40), 5, gen)]),
        "full_rows": mk([_block(m, n, (0, 24), (k * 10, 14), 2, gen) for k in range(4)]),
        "dead": mk([]),
        "dead_no_bias": mk([], bias=False),
    }


def _layer_params(proto: onnx.ModelProto, name: str) -> tuple[int, list[tuple[int, ...]]]:
    """Float initializer entries under the layer's prefix and their shapes."""
    prefix = f"gblr/{name}/"
    inits = [t for t in proto.graph.initializer if t.name.startswith(prefix) and t.data_type != onnx.TensorProto.INT64]
    return sum(int(np.prod(t.dims)) for t in inits), [tuple(t.dims) for t in inits]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", list(_structures(torch.Generator().manual_seed(0))))
def test_layer_parity_and_params(tmp_path, case: str, form: str) -> None:
    s = _structures(torch.Generator().manual_seed(0))[case]
    model = nn.Sequential(FrozenGBLR(s))
    x = torch.randn(3, 5, s.in_features)
    res = export_onnx(model, x, tmp_path / "m.onnx", form=form)
    assert res.ort_ok and res.max_abs_diff <= res.tolerance
    (lay,) = res.layers
    proto = onnx.load(str(tmp_path / "m.onnx"))
    params, shapes = _layer_params(proto, "0")
    bias = 0 if s.bias is None else s.out_features
    assert params == lay.params + bias
    assert lay.exact_cost == s.cost
    if lay.form in ("segments", "grid") or not s.blocks:
        assert lay.params == s.cost and not lay.zero_padded
    assert lay.zero_padded == (lay.params > s.cost)
    # never a dense (m, n) weight for a compressed layer
    m, n = s.out_features, s.in_features
    assert (n, m) not in shapes and (m, n) not in shapes
    ops = {node.op_type for node in proto.graph.node}
    assert "ScatterND" not in ops and "ScatterElements" not in ops
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    # the output really depends on the layer (not a constant): compare on a fresh input
    x2 = torch.randn(2, 7, s.in_features)
    assert verify_onnx(tmp_path / "m.onnx", model, x2) <= 1e-4 * max(1.0, model(x2).abs().max().item())


def _compress_all_linears(model: nn.Module, gen: torch.Generator, K: int = 3, r: int = 2) -> None:
    """Replace every nn.Linear by a FrozenGBLR with random windows (float32)."""
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                g = random_gblr(child.out_features, child.in_features, K, r, gen, dead=1, dtype=torch.float32)
                with torch.no_grad():
                    g.U.mul_(0.2)
                    g.V.mul_(0.2)
                setattr(mod, child_name, g.eval().to_frozen(f"{name}.{child_name}".lstrip(".")))


@pytest.fixture(scope="module")
def encoder_export(tmp_path_factory):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = TinyEncoder(vocab=50, hidden=32, layers=2, heads=4, ffn=64, max_len=32, classes=None).eval()
    _compress_all_linears(model, gen)
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    path = tmp_path_factory.mktemp("enc") / "enc.onnx"
    res = export_onnx(
        model, {"input_ids": ids, "attention_mask": mask}, path,
        metadata={"gblr.report": json.dumps({"budget": 0.3})},
    )
    return model, path, res


def test_encoder_parity_dict_inputs_and_metadata(encoder_export) -> None:
    model, path, res = encoder_export
    assert res.ort_ok and res.max_abs_diff <= res.tolerance and res.opset >= 18
    assert len(res.layers) == 12 and res.layers[0].name == "layers.0.q"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 18
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    meta = {p.key: p.value for p in proto.metadata_props}
    structure = json.loads(meta["gblr.structure"])
    assert [d["name"] for d in structure] == [lay.name for lay in res.layers]
    by_name = dict(model.named_modules())
    assert all(d["cost"] == by_name[d["name"]].cost for d in structure)
    assert json.loads(meta["gblr.report"]) == {"budget": 0.3}
    assert {n.op_type for n in proto.graph.node}.isdisjoint({"ScatterND", "ScatterElements"})
    # node names carry the module path, so a viewer shows which layer a node belongs to
    assert any(n.name.startswith("gblr/layers.1.fc2/") for n in proto.graph.node)


def test_encoder_dynamic_axes_in_one_session(encoder_export) -> None:
    model, path, _ = encoder_export
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for B, T in [(1, 4), (3, 17), (5, 32)]:
        ids = torch.randint(0, 50, (B, T))
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, T // 2 :] = 0
        (got,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).numpy()
        assert got.shape == (B, T, 32)
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_tuple_and_dict_outputs(tmp_path) -> None:
    gen = torch.Generator().manual_seed(5)
    layer = random_gblr(12, 20, 2, 2, gen, dtype=torch.float32).eval().to_frozen("p")

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = layer

        def forward(self, a: torch.Tensor, b: torch.Tensor):
            return {"sum": self.p(a) + b, "raw": self.p(a)}

    res = export_onnx(Two(), (torch.randn(4, 20), torch.randn(4, 12)), tmp_path / "t.onnx")
    proto = onnx.load(str(tmp_path / "t.onnx"))
    assert [o.name for o in proto.graph.output] == ["sum", "raw"]
    assert [i.name for i in proto.graph.input] == ["input_0", "input_1"]
    assert res.ort_ok


def test_verification_error_on_mismatch(tmp_path) -> None:
    gen = torch.Generator().manual_seed(6)
    model = nn.Sequential(random_gblr(16, 16, 2, 2, gen, dtype=torch.float32).eval().to_frozen("a"))
    x = torch.randn(2, 3, 16)
    export_onnx(model, x, tmp_path / "v.onnx")
    with torch.no_grad():
        model[0].U[0].add_(1.0)
    with pytest.raises(VerificationError, match="max abs diff") as err:
        verify_onnx(tmp_path / "v.onnx", model, x)
    assert "\n" not in str(err.value) and isinstance(err.value, RuntimeError)


def test_failed_verification_writes_no_file(tmp_path, monkeypatch) -> None:
    import gblr_compress.export.onnx_export as ex

    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(random_gblr(8, 8, 1, 1, gen, dtype=torch.float32).eval().to_frozen("a"))

    def broken(*args, **kwargs):
        raise VerificationError("max abs diff 1 > tolerance 0.0001")

    monkeypatch.setattr(ex, "compare", broken)
    with pytest.raises(VerificationError):
        export_onnx(model, torch.randn(2, 8), tmp_path / "w.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_input_raises_input_error(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(InputError):
        export_onnx(model, [1, 2], tmp_path / "x.onnx")
    with pytest.raises(InputError):
        export_onnx(model, torch.randn(2, 4), tmp_path / "x.onnx", opset=13)
    with pytest.raises(InputError):
        export_onnx(model, torch.randn(2, 4), tmp_path / "x.onnx", form="bogus")
    with pytest.raises(InputError):
        export_onnx(model, torch.randn(2, 4), tmp_path / "missing" / "x.onnx")


def test_auto_prefers_plain_pair_for_full_width_and_segments_for_windows() -> None:
    gen = torch.Generator().manual_seed(0)
    s = _structures(gen)
    assert plan_layer(s["full_width"]).form in ("segments", "lowrank")
    assert plan_layer(s["full_width"]).params == s["full_width"].cost  # exact either way
    m, n = 1536, 384
    blocks = [_block(m, n, (k * 384, 768), (k * 96, 192), 46, gen) for k in range(4)]
    windowed = LayerStructure(n, m, blocks, None)
    assert plan_layer(windowed).form in ("segments", "vpad")


def test_metadata_can_carry_the_verified_result(tmp_path) -> None:
    """The steps let a caller put figures that only verification knows into the file."""
    from gblr_compress.export import build_onnx, save_onnx, verify_graph
    from gblr_compress.export.metadata import read_metadata

    layer = GBLRLinear.from_linear(nn.Linear(12, 10), GBLRLayerConfig(2, 2)).eval().to_frozen("fc")
    graph = build_onnx(layer, torch.randn(3, 12))
    parity = verify_graph(graph, layer)
    assert not (tmp_path / "m.onnx").exists()  # nothing is written before save
    note = f"diff={parity.max_abs_diff is not None}:{len(graph.layers)}"
    out = save_onnx(graph, tmp_path / "m.onnx", {"gblr.report": note}, parity)
    assert out.ort_ok and out.max_abs_diff == parity.max_abs_diff
    assert read_metadata(out.path)["gblr.report"] == "diff=True:1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left
