"""The compress command end to end, on every checkpoint format, and its bad-input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from gblr_compress.cli import main
from tests.cli_models import NoLinear, small_mlp

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "4", "--budget", "0.3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = small_mlp().eval()
    calib = [torch.randn(16, 32) @ torch.diag(torch.linspace(0.1, 3, 32)) for _ in range(6)]
    paths = {
        "module": d / "module.pt",
        "bundle": d / "bundle.pt",
        "safetensors": d / "state.safetensors",
        "state_dict": d / "state.pt",
        "calib": d / "calib.pt",
        "npz": d / "calib.npz",
        "nolinear": d / "nolinear.pt",
        "badcalib": d / "badcalib.pt",
        "junk": d / "junk.pt",
        "truncated": d / "truncated.pt",
    }
    torch.save(model, paths["module"])
    torch.save({"model": model, "example_inputs": calib[0][:2], "calib": calib}, paths["bundle"])
    save_file(model.state_dict(), str(paths["safetensors"]))
    torch.save(model.state_dict(), paths["state_dict"])
    torch.save(calib, paths["calib"])
    np.savez(paths["npz"], torch.cat(calib).numpy())
    torch.save(NoLinear(), paths["nolinear"])
    torch.save([torch.randn(4, 7)], paths["badcalib"])
    paths["junk"].write_bytes(os.urandom(2000))
    paths["truncated"].write_bytes(paths["module"].read_bytes()[:700])
    return paths


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "fmt, extra",
    [
        ("module", ["--calib", "calib"]),
        ("bundle", []),
        ("safetensors", ["--factory", "tests.cli_models:small_mlp", "--calib", "npz"]),
        ("state_dict", ["--factory", "tests.cli_models:small_mlp", "--input-spec", "float32[8,32]"]),
    ],
)
def test_compress_each_format(files, tmp_path, fmt, extra, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # factories are imported from the working directory
    extra = [str(files[e]) if e in files else e for e in extra]
    out = tmp_path / "m.onnx"
    code, text = _run([str(files[fmt]), *FAST, "-o", str(out), *extra])
    assert code == 0, text
    report = json.loads((tmp_path / "m.report.json").read_text())
    totals = report["totals"]
    assert totals["linear_cost"] <= totals["budget_cost"]
    assert report["parity"]["ok"] and report["source"]["format"] in fmt
    assert report["source"]["synthetic_calib"] == (fmt == "state_dict")
    # Every run here has (real or synthetic) calibration data: the split was weighted.
    assert all(layer["sensitivity"] > 0 for layer in report["layers"])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape == (3, 5)
    if fmt == "state_dict":
        assert "synthetic inputs" in text


def test_json_summary_and_inspect_on_outputs(files, tmp_path) -> None:
    out = tmp_path / "m.onnx"
    code, text = _run([str(files["bundle"]), *FAST, "-o", str(out), "--json"])
    assert code == 0, text
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["parity"]["ok"] and summary["outputs"]["onnx"] == str(out)
    for target in (out, tmp_path / "m.report.json"):
        code, text = _run(["inspect", str(target), "--no-heatmap"])
        assert code == 0 and "fc1" in text, text


def test_steps_zero_and_data_free(files, tmp_path) -> None:
    code, text = _run([str(files["bundle"]), "--budget", "0.2", "--steps", "0", "--data-free", "-o", str(tmp_path / "m.onnx"), "--quiet"])
    assert code == 0, text
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["settings"]["init"]["data_free"] and "distill" not in report["seconds"]
    assert all(layer["sensitivity"] is None for layer in report["layers"])


@pytest.mark.parametrize(
    "case, args, needle",
    [
        ("missing", ["{tmp}/nope.pt"], "nope.pt"),
        ("junk", ["{junk}"], "checkpoint"),
        ("truncated", ["{truncated}"], ""),
        ("nolinear", ["{nolinear}"], "Linear"),
        ("budget0", ["{bundle}", "--budget", "0"], "budget"),
        ("budget15", ["{bundle}", "--budget", "1.5"], "budget"),
        ("budgetabc", ["{bundle}", "--budget", "abc"], "budget"),
        ("badcalib", ["{module}", "--calib", "{badcalib}"], "does not fit"),
        ("unwritable", ["{bundle}", "-o", "{tmp}/no/such/dir/m.onnx"], "folder"),
        ("factory", ["{safetensors}", "--factory", "no_such_pkg.mod:fn"], "factory"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_no_output(files, tmp_path, case, args, needle) -> None:
    fill = {k: str(v) for k, v in files.items()} | {"tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in args]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "m.onnx")]
    if "--budget" not in argv:
        argv += ["--budget", "0.3"]
    result = CliRunner().invoke(main, [*argv, "--steps", "2"])
    assert result.exit_code == 2, (case, result.output)
    # A pickled MODEL is announced by one warning line before it is loaded (it runs
    # code from the file); the error itself is one line.
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert needle.lower() in lines[0].lower(), lines[0]
    assert not list(tmp_path.glob("m.*"))


def test_real_subprocess_with_exit_codes(files, tmp_path) -> None:
    exe = [sys.executable, "-m", "gblr_compress"]
    out = tmp_path / "m.onnx"
    ok = subprocess.run([*exe, str(files["bundle"]), *FAST, "-o", str(out)], cwd=ROOT,
                        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert ok.returncode == 0, ok.stderr
    assert out.exists() and "Budget" in ok.stdout and "\x1b[" not in ok.stdout
    # --trust-checkpoint silences the pickle warning: stderr is the error line alone.
    bad = subprocess.run([*exe, str(files["junk"]), "--budget", "0.3", "-o", str(tmp_path / "x.onnx"),
                          "--trust-checkpoint"],
                         cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    originals = {p: p.read_bytes() for p in (files["bundle"],)}
    assert all(p.read_bytes() == b for p, b in originals.items())


def test_huggingface_directory(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "tiny")
    out = tmp_path / "m.onnx"
    code, text = _run([str(tmp_path / "tiny"), *FAST, "-o", str(out),
                       "--input-spec", "input_ids:int64[2,16],attention_mask:int64[2,16]"])
    assert code == 0, text
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["source"]["format"] == "huggingface" and report["parity"]["ok"]
    assert report["totals"]["compressed"] >= 1


def test_report_settings_are_the_config_that_ran(files, tmp_path) -> None:
    """No drift: the report's settings are asdict of the config (plus the job's export
    settings), whatever flags set it."""
    from gblr_compress.distill import DistillConfig
    from gblr_compress.init import InitConfig
    from gblr_compress.pipeline import CompressConfig

    code, text = _run([str(files["bundle"]), *FAST, "--seed", "3", "--max-blocks", "2", "--lr", "0.002",
                       "-o", str(tmp_path / "m.onnx"), "--quiet"])
    assert code == 0, text
    report = json.loads((tmp_path / "m.report.json").read_text())
    expected = CompressConfig(budget=0.3, seed=3, init=InitConfig(max_groups=2),
                              distill=DistillConfig(steps=4, lr=0.002)).settings()
    assert report["settings"] == {**expected, "opset": 18, "verify": True}


def test_default_steps_scale_with_the_data_and_explicit_steps_are_exact(files, tmp_path) -> None:
    """Without --steps the run takes the product's default (100 steps, more with many
    calibration batches); --steps N is exactly N steps."""
    from gblr_compress.pipeline import default_distill

    code, text = _run([str(files["bundle"]), "--budget", "0.3", "-o", str(tmp_path / "d.onnx"), "--quiet"])
    assert code == 0, text
    settings = json.loads((tmp_path / "d.report.json").read_text())["settings"]["distill"]
    assert (settings["steps"], settings["epochs"]) == (default_distill().steps, default_distill().epochs) == (100, 5.0)
    code, text = _run([str(files["bundle"]), *FAST, "-o", str(tmp_path / "e.onnx"), "--quiet"])
    assert code == 0, text
    settings = json.loads((tmp_path / "e.report.json").read_text())["settings"]["distill"]
    assert (settings["steps"], settings["epochs"]) == (4, 0.0)


def test_field_errors_name_the_flag(files, tmp_path) -> None:
    code, text = _run([str(files["bundle"]), "--budget", "0.3", "--lr", "-1", "-o", str(tmp_path / "m.onnx")])
    assert code == 2 and "--lr" in text and "\n" == text[-1] and text.count("\n") == 1


def test_heldout_file_is_what_the_heldout_figures_measure(files, tmp_path) -> None:
    # Held-out inputs of another scale than the calibration: the report's held-out cosine
    # is the written file's on them, and with --min-fidelity the gate reads that figure.
    torch.manual_seed(5)
    held = [torch.randn(16, 32) * 4.0 for _ in range(3)]
    torch.save(held, tmp_path / "held.pt")
    out = tmp_path / "m.onnx"
    code, text = _run([str(files["module"]), "--calib", str(files["calib"]), "--heldout", str(tmp_path / "held.pt"),
                       *FAST, "-o", str(out), "--quiet", "--trust-checkpoint"])
    assert code == 0, text
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["source"]["heldout"] == str(tmp_path / "held.pt")
    dense = torch.load(files["module"], weights_only=False).eval()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.cat(held)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(got).double(), dense(x).double(), dim=-1)
    assert abs(float(cos.mean()) - report["quality"]["frozen"]["cosine"]) < 1e-4
    # Without real calibration data there is nothing to train on beside it.
    code, text = _run([str(files["state_dict"]), "--factory", "tests.cli_models:small_mlp", "--input-spec",
                       "float32[8,32]", "--heldout", str(tmp_path / "held.pt"), *FAST, "-o", str(tmp_path / "s.onnx")])
    assert code == 2 and "--heldout needs real calibration data" in text, text
    assert not (tmp_path / "s.onnx").exists()


def test_torch_transformer_encoder_runs_its_layers_as_modules(tmp_path) -> None:
    # nn.TransformerEncoderLayer's fused eval path would bypass the compressed Linears
    # (their weight reads as the dense matrix) and cannot be exported: the run turns it off.
    # Its nn.MultiheadAttention calls none of its projections: they become called Linears.
    from tests.cli_models import TorchEncoder

    torch.manual_seed(0)
    model = TorchEncoder().eval()
    torch.save(model, tmp_path / "enc.pt")
    out = tmp_path / "enc.onnx"
    result = CliRunner().invoke(main, [str(tmp_path / "enc.pt"), *FAST, "--input-spec", "x:int64[8,12]",
                                       "-o", str(out), "--trust-checkpoint"])
    assert result.exit_code == 0, result.output
    assert "2 nn.MultiheadAttention module(s) run as explicit attention" in result.output
    report = json.loads((tmp_path / "enc.report.json").read_text())
    layers = {l["name"]: l for l in report["layers"]}
    names = [f"enc.layers.{i}.{n}" for i in (0, 1)
             for n in ("linear1", "linear2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.out_proj")]
    assert {layers[n]["status"] for n in names} <= {"compressed", "skipped"}
    assert any(layers[n]["status"] == "compressed" for n in names if "self_attn" in n)
    assert report["parity"]["ok"]
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting is back
    assert isinstance(torch.load(tmp_path / "enc.pt", weights_only=False).enc.layers[0].self_attn,
                      torch.nn.MultiheadAttention)  # the user's file is untouched
    # the deployed graph computes what the user's model does, on inputs of its own shape
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randint(0, 50, (3, 9))
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(got), want, dim=-1).mean() > 0.8
