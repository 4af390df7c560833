"""The report schema: JSON round-trip, derived totals from the structures, atomic write,
loading from .json and .onnx, malformed input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from gblr_compress.errors import InputError
from gblr_compress.layer import GBLRLayerConfig, GBLRLinear
from gblr_compress.report import (
    CompressionReport,
    LayerReport,
    load_report,
    report_from_dict,
    report_to_dict,
    write_report,
)
from gblr_compress.structure import LayerStructure


def make_structure(name: str = "enc.fc1") -> tuple[GBLRLinear, LayerStructure]:
    """A 24 x 40 layer with three rank-2 blocks; the first wraps on both axes."""
    g = GBLRLinear.from_linear(nn.Linear(40, 24), GBLRLayerConfig(num_groups=3, rank=2))
    with torch.no_grad():
        g.widths[0] = torch.tensor([0.5, 1.0, 0.25])  # rows: 12, 24, 6
        g.locations[0] = torch.tensor([0.75, 0.0, 0.25])  # starts 18, 0, 6
        g.widths[1] = torch.tensor([0.5, 0.2, 1.0])  # cols: 20, 8, 40
        g.locations[1] = torch.tensor([0.8, 0.1, 0.0])  # starts 32, 4, 0
    return g, g.eval().to_structure(name)


def make_report(structure: LayerStructure | None = None) -> CompressionReport:
    """A report with one compressed (real structure) and one skipped layer."""
    s = structure if structure is not None else make_structure()[1]
    return CompressionReport(
        source={"model": "m.pt", "format": "module", "calib": None, "calib_batches": 4, "synthetic_calib": True},
        settings={"budget": 0.3, "steps": 100, "lr": 1e-3, "seed": 0},
        layers=[
            LayerReport(
                name=s.name, in_features=40, out_features=24, status="compressed",
                reason="window search kept", dense_cost=960, allocated_cost=300,
                structure=s.to_dict(), init_kind="gblr", calib_error=0.11, heldout_error=0.125,
                baseline_heldout_error=0.2, export_form="segments", export_params=s.cost, sensitivity=0.75,
            ),
            LayerReport(
                name="head", in_features=24, out_features=10, status="skipped",
                reason="too small to pay off", dense_cost=240, init_kind="skipped",
            ),
        ],
        quality={
            "init": {"rel_error": 0.2, "cosine": 0.97, "top1": 0.9},
            "frozen": {"rel_error": 0.1, "cosine": 0.993},
        },
        parity={"max_abs_diff": 2e-6, "tolerance": 1e-4, "ok": True},
        seconds={"load": 0.1, "init": 1.2, "distill": 5.0, "total": 6.5},
        outputs={"onnx": "out/m.onnx", "report": "out/m.json"},
        model_params={"dense": 1234, "compressed": 800},
    )


def test_derived_costs_come_from_the_structure() -> None:
    g, s = make_structure()
    rep = make_report(s)
    fc1, head = rep.layers
    # Blocks: 12x20, 24x8, 6x40, all rank 2 -> 2*(32 + 32 + 46) = 220.
    assert fc1.cost == s.cost == g.exact_cost() == 220
    assert (fc1.blocks, fc1.total_rank) == (3, 6)
    assert head.cost == 240 and head.blocks == 0
    assert rep.linear_dense_cost == 1200 and rep.linear_cost == 460
    assert rep.budget_cost == 360  # floor(0.3 * 1200)
    assert rep.achieved == pytest.approx(460 / 1200)
    assert rep.budget_share(fc1) == pytest.approx(220 / 360)
    assert (rep.compressed_count, rep.skipped_count) == (1, 1)


def test_dict_round_trip_recomputes_totals() -> None:
    rep = make_report()
    d = report_to_dict(rep)
    assert d["version"] == 1 and d["totals"]["linear_cost"] == 460 and d["totals"]["budget_cost"] == 360
    assert d["totals"]["layers"]["enc.fc1"] == {"cost": 220, "blocks": 3, "rank": 6, "share": pytest.approx(220 / 360)}
    back = report_from_dict(json.loads(json.dumps(d)))
    assert report_to_dict(back) == d
    assert back.layers[0].sensitivity == 0.75 and back.layers[1].sensitivity is None
    # Reports written before the field existed still load.
    old = json.loads(json.dumps(d))
    del old["layers"][0]["sensitivity"]
    assert report_from_dict(old).layers[0].sensitivity is None
    # Tampered figures in the JSON do not change anything derived.
    d["layers"][0]["structure"]["cost"] = 1
    d["layers"][0]["structure"]["blocks"][0]["cost"] = 1
    d["totals"]["linear_cost"] = 7
    again = report_from_dict(d)
    assert again.layers[0].cost == 220 and again.linear_cost == 460
    assert report_to_dict(again)["totals"]["linear_cost"] == 460


def test_file_round_trip_and_atomic_write(tmp_path: Path) -> None:
    rep = make_report()
    path = write_report(rep, tmp_path / "r.json")
    assert load_report(path) == rep
    assert json.loads(path.read_text())["totals"]["achieved"] == pytest.approx(460 / 1200)
    assert os.listdir(tmp_path) == ["r.json"]
    # A value JSON cannot hold fails before anything is in place: no file, no temp file.
    bad = make_report()
    bad.quality["init"]["cosine"] = float("nan")
    with pytest.raises(ValueError):
        write_report(bad, tmp_path / "bad.json")
    assert os.listdir(tmp_path) == ["r.json"]
    # An existing report is not damaged by a failed overwrite.
    with pytest.raises(ValueError):
        write_report(bad, path)
    assert load_report(path) == rep and os.listdir(tmp_path) == ["r.json"]
    with pytest.raises(InputError, match="output directory"):
        write_report(rep, tmp_path / "missing" / "r.json")


def test_failed_replace_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(make_report(), tmp_path / "r.json")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(version=2), "unsupported report version 2"),
        (lambda d: d.pop("layers"), "not a gblr-compress report"),
        (lambda d: d["layers"][0].update(status="maybe"), "status must be"),
        (lambda d: d["layers"][0].update(structure=None), "has no structure"),
        (lambda d: d["layers"][0]["structure"]["blocks"][0].update(rows=[99, 2]), "out of range"),
        (lambda d: d["layers"][0]["structure"]["blocks"][0].pop("rank"), "a block needs"),
        (lambda d: d["layers"][0].update(in_features="forty"), "wrong type"),
        (lambda d: d["layers"][1].update(dense_cost=7), "dense_cost"),
        (lambda d: d["layers"][0].update(sensitivity="high"), "wrong type"),
        (lambda d: d.update(settings=[1]), "'settings' must be an object"),
    ],
)
def test_malformed_reports_are_input_errors(mutate, message: str) -> None:
    d = report_to_dict(make_report())
    mutate(d)
    with pytest.raises(InputError, match=message) as info:
        report_from_dict(d)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="expected a JSON object"):
        report_from_dict([1, 2])


def test_load_report_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        load_report(tmp_path / "nope.json")
    junk = tmp_path / "junk.json"
    junk.write_bytes(os.urandom(256) + b"\xff\xfe")
    with pytest.raises(InputError, match="not a JSON report"):
        load_report(junk)
    text = tmp_path / "t.json"
    text.write_text("{not json")
    with pytest.raises(InputError, match="not a JSON report"):
        load_report(text)
    junk_onnx = tmp_path / "junk.onnx"
    junk_onnx.write_bytes(b"\x00\x01\x02garbage" * 50)
    with pytest.raises(InputError, match="not an ONNX model"):
        load_report(junk_onnx)


def export_tiny(path: Path, metadata: dict[str, str] | None) -> tuple[Path, LayerStructure]:
    """A tiny model with one FrozenGBLR exported to ONNX with ``metadata``."""
    g, s = make_structure("0")
    model = nn.Sequential(g.to_frozen("0"), nn.ReLU(), nn.Linear(24, 10)).eval()
    from gblr_compress.export import export_onnx

    res = export_onnx(model, torch.randn(3, 40), path, metadata=metadata)
    assert res.ort_ok
    return path, s


def test_load_report_from_onnx_metadata(tmp_path: Path) -> None:
    _, s = make_structure("0")
    rep = make_report(s)
    path, s2 = export_tiny(tmp_path / "tiny.onnx", {"gblr.report": json.dumps(report_to_dict(rep))})
    loaded = load_report(path)
    assert loaded == rep and loaded.layers[0].cost == s2.cost == 220
    bare, _ = export_tiny(tmp_path / "bare.onnx", None)
    with pytest.raises(InputError, match="no gblr.report metadata"):
        load_report(bare)
