"""Report rendering: the rich summary and inspect text, and PNG layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from gblr_compress.errors import InputError
from gblr_compress.report import render_inspect, render_summary, write_pngs
from tests.test_report_schema import make_report


def test_render_summary_text() -> None:
    console = Console(record=True, width=120, force_terminal=False)
    render_summary(make_report(), console)
    out = console.export_text()
    assert "\x1b[" not in out
    assert "Layers: 1 compressed, 1 skipped (of 2 linear layers)" in out
    assert "linear multiply-adds / token     1,200         460  0.38x" in out
    assert "whole-model params               1,234         800  0.65x" in out
    assert "requested 30.0% of linear cost (360 multiply-adds), achieved 38.33% (460)" in out
    assert "frozen  0.9930     0.1000      -" in out and "init    0.9700     0.2000  90.0%" in out
    assert "ONNX Runtime parity: ok (max abs diff 2e-06, tolerance 0.0001)" in out
    assert "6.5s" in out and "onnx: out/m.onnx" in out and "report: out/m.json" in out


def test_render_inspect_text() -> None:
    console = Console(record=True, width=120, force_terminal=False)
    rep = make_report()
    render_inspect(rep, console)
    out = console.export_text()
    assert "\x1b[" not in out
    row = next(l for l in out.splitlines() if l.strip().startswith("enc.fc1") and "24 x 40" in l)
    for cell in ("compressed", "2, 2, 2", "12x20", "220", "61.1%", "0.125 / 0.200", "1.00", "segments"):
        assert cell in row
    head = next(l for l in out.splitlines() if l.strip().startswith("head "))
    assert "10 x 24" in head and "skipped" in head and "240" in head
    assert "head: skipped: too small to pay off" in out
    assert "|++++@@@@@@@@                    ++++++++|" in out
    assert out.count("+" + "-" * 40 + "+") == 2  # one framed heatmap (the skipped layer has none)
    plain = Console(record=True, width=120, force_terminal=False)
    render_inspect(rep, plain, heatmaps=False)
    text = plain.export_text()
    assert "@@@@" not in text and "enc.fc1" in text and "2, 2, 2" in text


def test_write_pngs(tmp_path: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="--png needs matplotlib"):
            write_pngs(make_report(), tmp_path)
        pytest.skip("matplotlib not installed")
    paths = write_pngs(make_report(), tmp_path / "png")
    assert [p.name for p in paths] == ["enc.fc1.png"] and paths[0].read_bytes()[:4] == b"\x89PNG"


def test_inspect_names_the_shared_prefix_once() -> None:
    from dataclasses import replace

    from gblr_compress.report.render import common_prefix

    assert common_prefix(["model.0.enc.fc1", "model.0.head"]) == "model.0."
    assert common_prefix(["enc.fc1", "head"]) == "" and common_prefix(["a.b.c"]) == ""
    assert common_prefix(["m.a", "m.a.b"]) == "m."  # never a name shown empty
    rep = make_report()
    rep.layers = [replace(l, name=f"wrapper.model.{l.name}") for l in rep.layers]
    console = Console(record=True, width=120, force_terminal=False)
    render_inspect(rep, console, heatmaps=False)
    out = console.export_text()
    assert "names after 'wrapper.model.'" in out
    row = next(l for l in out.splitlines() if l.strip().startswith("enc.fc1") and "24 x 40" in l)
    assert "compressed" in row
    # The lines below the table keep whole names.
    assert "wrapper.model.head: skipped: too small to pay off" in out
