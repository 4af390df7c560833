"""--export-dtype: the written file in float16 (or the checkpoint's own dtype), converted
by onnxruntime's float16 converter and checked on held-out data
(gblr_compress/export/half.py, job._half)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gblr_compress.cli import main
from gblr_compress.export.half import HALF_TOLERANCE, export_dtype_for

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """Linear layers around the ops a transformer's graph holds (LayerNorm, GELU, softmax),
    so the converter meets more than MatMul."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ln, self.b, self.c = nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(torch.nn.functional.gelu(self.a(x)))
        return torch.softmax(self.c(torch.relu(self.b(h)) + h), dim=-1)


def _bundle(tmp: Path, dtype: torch.dtype) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = Block().to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 32, generator=gen).to(dtype) for _ in range(6)]
    path = tmp / "bundle.pt"
    torch.save({"model": model, "calib": calib}, path)
    return path, model


def _cli(args: list[str]) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, [*args, "--trust-checkpoint", "--quiet", "--steps", "2"])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def _input_type(path: Path) -> str:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].type


@pytest.mark.parametrize("flag", ["float16", "checkpoint"])
def test_a_float16_file_is_written_checked_and_runs_in_onnxruntime(tmp_path, flag) -> None:
    bundle, dense = _bundle(tmp_path, torch.float16)
    out = tmp_path / "m.onnx"
    code, lines = _cli([str(bundle), "--budget", "0.4", "-o", str(out), "--export-dtype", flag])
    assert code == 0, lines
    proto = onnx.load(str(out))
    floats = [t for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats)
    assert _input_type(out) == "tensor(float16)"
    report = json.loads(out.with_name("m.report.json").read_text())
    record = report["deploy"]["export_dtype"]
    assert record["dtype"] == "float16" and record["tolerance"] == HALF_TOLERANCE
    lost = record["heldout_float32"]["cosine"] - record["heldout_float16"]["cosine"]
    assert lost <= HALF_TOLERANCE
    assert any("float16" in n and "ONNX model is float16" in n for n in report["notes"])
    # The file runs on the user's float16 inputs and agrees with the dense model.
    x = torch.randn(5, 32).half()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.dtype == np.float16 and np.isfinite(got).all()
    ref = dense.float()(x.float()).detach().numpy()
    cos = (got.astype(np.float64) * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.mean() > 0.9


def test_checkpoint_dtype_of_a_float32_model_is_float32(tmp_path) -> None:
    bundle, _ = _bundle(tmp_path, torch.float32)
    out = tmp_path / "m.onnx"
    code, lines = _cli([str(bundle), "--budget", "0.4", "-o", str(out), "--export-dtype", "checkpoint"])
    assert code == 0, lines
    assert _input_type(out) == "tensor(float)"
    assert "export_dtype" not in json.loads(out.with_name("m.report.json").read_text())["deploy"]


@pytest.mark.parametrize("args, needle", [
    (["--export-dtype", "checkpoint"], "bfloat16"),
    (["--export-dtype", "float16", "--quantize", "int8"], "do not combine"),
])
def test_refused_before_the_work_with_one_line(tmp_path, args, needle) -> None:
    bundle, _ = _bundle(tmp_path, torch.bfloat16 if needle == "bfloat16" else torch.float32)
    out = tmp_path / "m.onnx"
    code, lines = _cli([str(bundle), "--budget", "0.4", "-o", str(out), *args])
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not out.exists() and not out.with_name("m.report.json").exists()


def test_export_dtype_rule() -> None:
    assert export_dtype_for("float32", "float16") == "float32"
    assert export_dtype_for("float16", "float32") == "float16"
    assert export_dtype_for("checkpoint", "float16") == "float16"
    assert export_dtype_for("checkpoint", "float32") == "float32"
    with pytest.raises(ValueError, match="bfloat16"):
        export_dtype_for("checkpoint", "bfloat16")
