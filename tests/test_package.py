"""Packaging: lean import, the console script, and README/CI agreement."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import gblr_compress
from gblr_compress.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_lean() -> None:
    code = (
        "import sys, gblr_compress\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'onnxscript', 'rich', 'click') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_version_and_help() -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["--version"])
    assert res.exit_code == 0 and gblr_compress.__version__ in res.output
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0 and "gblr-compress" in res.output


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    marker = "<!-- test-command -->"
    assert marker in readme
    block = readme.split(marker, 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    assert block and block in ci
