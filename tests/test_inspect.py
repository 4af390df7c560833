"""``gblr-compress inspect``: reads .json and .onnx reports, one-line errors with exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner

from gblr_compress.cli import main
from gblr_compress.report import report_to_dict, write_report
from tests.test_report_schema import export_tiny, make_report, make_structure


def test_inspect_json(tmp_path: Path) -> None:
    report = make_report()
    report.notes = ["distillation: the held-out loss never fell below the init's at learning rate 0.001; "
                    "retried at 0.0002: kept step 220"]
    path = write_report(report, tmp_path / "r.json")
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    assert "Note: distillation: the held-out loss never fell below" in " ".join(res.output.split())
    assert "\x1b[" not in res.output  # not a terminal: no colour codes
    assert "enc.fc1" in res.output and "2, 2, 2" in res.output and "220" in res.output
    assert "|++++@@@@@@@@                    ++++++++|" in res.output
    res = CliRunner().invoke(main, ["inspect", str(path), "--no-heatmap"])
    assert res.exit_code == 0 and "enc.fc1" in res.output and "@@@@" not in res.output


def test_inspect_onnx(tmp_path: Path) -> None:
    _, s = make_structure("0")
    rep = make_report(s)
    path, _ = export_tiny(tmp_path / "m.onnx", {"gblr.report": json.dumps(report_to_dict(rep))})
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    row = next(l for l in res.output.splitlines() if l.strip().startswith("0 ") and "24 x 40" in l)
    assert "compressed" in row and "220" in row and "segments" in row


def _error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_inspect_bad_inputs(tmp_path: Path) -> None:
    runner = CliRunner()
    assert "file not found" in _error_line(runner.invoke(main, ["inspect", str(tmp_path / "none.json")]))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(4096))
    assert "not an ONNX model" in _error_line(runner.invoke(main, ["inspect", str(junk)]))
    junk_json = tmp_path / "junk.json"
    junk_json.write_bytes(b"\x80\x81" + os.urandom(512))
    assert "not a JSON report" in _error_line(runner.invoke(main, ["inspect", str(junk_json)]))
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    assert "not a gblr-compress report" in _error_line(runner.invoke(main, ["inspect", str(other)]))
    bare, _ = export_tiny(tmp_path / "bare.onnx", None)
    assert "no gblr.report metadata" in _error_line(runner.invoke(main, ["inspect", str(bare)]))


def test_inspect_png_needs_matplotlib(tmp_path: Path) -> None:
    path = write_report(make_report(), tmp_path / "r.json")
    res = CliRunner().invoke(main, ["inspect", str(path), "--png", str(tmp_path / "png")])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert _error_line(res) == "error: --png needs matplotlib: pip install 'gblr-compress[plot]' (matplotlib)"
        assert "enc.fc1" not in res.stdout  # failed before printing anything
        return
    assert res.exit_code == 0 and (tmp_path / "png" / "enc.fc1.png").is_file()
