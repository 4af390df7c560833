"""The layering rules live in the lint config, and CI runs the lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (it comes with the test extra)")
    return [found]


def _lint(source: str, as_file: str) -> subprocess.CompletedProcess:
    """Lint ``source`` as if it were the repository file ``as_file`` (nothing is written)."""
    return subprocess.run(
        [*_ruff(), "check", "--no-cache", "--stdin-filename", as_file, "-"],
        input=source, capture_output=True, text=True, cwd=ROOT, timeout=60,
    )


@pytest.mark.parametrize(
    ("source", "where", "banned"),
    [
        ("import onnx\n", "gblr_compress/gaudi.py", True),
        ("from onnxruntime.quantization import quantize_dynamic\n", "gblr_compress/distill.py", True),
        ("import rich.console\n", "gblr_compress/pipeline.py", True),
        ("import click\n", "gblr_compress/export/forms.py", True),
        ("import rich\n", "gblr_compress/export/forms.py", True),
        ("import onnx\n", "gblr_compress/export/forms.py", False),
        ("import click\n", "gblr_compress/cli.py", False),
        ("import onnx\n", "tests/test_x.py", False),
    ],
)
def test_banned_imports(source: str, where: str, banned: bool) -> None:
    out = _lint(source + "\n__all__ = []\n", where)
    assert ("TID251" in out.stdout) is banned, out.stdout + out.stderr


def test_ci_runs_the_lint_before_the_tests() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ruff check" in ci and ci.index("ruff check") < ci.index("pytest")


def test_the_tree_is_lint_clean() -> None:
    out = subprocess.run([*_ruff(), "check", "--no-cache", "."], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]
