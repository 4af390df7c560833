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
    block = _readme_command(marker)
    assert block and block in ci


def _readme_command(marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    assert marker in readme
    return readme.split(marker, 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()


def test_readme_main_command_runs() -> None:
    """The README's sample command, minus its venv set-up, against this interpreter."""
    import re
    import subprocess
    import sys

    steps = _readme_command("<!-- main-command -->").split(" && ")
    assert steps[0].startswith("python3 -m venv .venv") and "pip install" in steps[1]
    # placeholders first: sys.executable may itself end in .venv/bin/python (CI)
    cmd = " && ".join(steps[2:]).replace(".venv/bin/gblr-compress", "@CLI@")
    cmd = cmd.replace(".venv/bin/python", "@PY@")
    cmd = cmd.replace("@CLI@", f"{sys.executable} -m gblr_compress").replace("@PY@", sys.executable)
    run = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r"dense \(PyTorch\) ([0-9.]+) -> compressed \(onnxruntime\) ([0-9.]+)", run.stdout)
    assert found, run.stdout[-2000:]
    dense, compressed = float(found.group(1)), float(found.group(2))
    assert dense > 0.9 and compressed >= dense - 0.03
