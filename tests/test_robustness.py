"""The fidelity gate (exit 3), interrupts (exit 130 / 143, nothing left behind),
reproducibility (one seed, one graph, one report) and safe loading (no pickle on the
safetensors + --factory path, never trust_remote_code)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import gblr_compress.export.onnx_export as onnx_export
import gblr_compress.job as job_mod
from gblr_compress.checkpoint import load_model
from gblr_compress.cli import main
from gblr_compress.export.verify import VerificationError
from gblr_compress.signals import Terminated
from tests.cli_models import small_mlp

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "tests.cli_models:small_mlp"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("robust")
    torch.manual_seed(0)
    model = small_mlp().eval()
    calib = [torch.randn(16, 32) @ torch.diag(torch.linspace(0.1, 3, 32)) for _ in range(6)]
    paths = {"bundle": d / "bundle.pt", "safetensors": d / "state.safetensors", "state": d / "state.pt",
             "calib": d / "calib.pt"}
    torch.save({"model": model, "calib": calib}, paths["bundle"])
    save_file(model.state_dict(), str(paths["safetensors"]))
    torch.save(model.state_dict(), paths["state"])
    torch.save(calib, paths["calib"])
    return paths


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("warning: ")]


# --------------------------------------------------------------------------- gate
def test_fidelity_below_the_minimum_exits_3_and_writes_nothing(files, tmp_path) -> None:
    out = tmp_path / "m.onnx"
    args = [str(files["bundle"]), "--budget", "0.1", "--steps", "0", "-o", str(out), "--quiet", "--trust-checkpoint"]
    code, text = _run([*args, "--min-fidelity", "0.9999"])
    lines = _error_lines(text)
    assert code == 3 and len(lines) == 1, text
    assert re.search(r"held-out cosine vs the dense model 0\.\d{4} is below the minimum 0\.9999", lines[0]), lines
    assert "--force writes it anyway" in lines[0]
    assert sorted(os.listdir(tmp_path)) == []  # no ONNX, no report, no temporary file
    code, text = _run([a for a in args if a != "--quiet"] + ["--min-fidelity", "0.9999", "--force"])
    assert code == 0 and "Fidelity gate: FAILED, written with --force (held-out cosine 0." in text, text
    gate = json.loads((tmp_path / "m.report.json").read_text())["gate"]
    assert gate["passed"] is False and gate["forced"] is True and gate["min_fidelity"] == 0.9999
    assert gate["cosine"] < 0.9999 and gate["parity_ok"] is True
    for p in tmp_path.iterdir():
        p.unlink()
    code, text = _run([*args, "--min-fidelity", "-1"])  # a gate that passes is recorded too
    assert code == 0, text
    gate = json.loads((tmp_path / "m.report.json").read_text())["gate"]
    assert gate["passed"] is True and gate["forced"] is False


def test_injected_parity_failure_exits_3_keeps_its_message_and_writes_nothing(files, tmp_path, monkeypatch) -> None:
    def broken(*_args, **_kw):
        raise VerificationError("ONNX model differs from PyTorch: max abs diff 0.5 > tolerance 0.0001", 0.5, 1e-4)

    monkeypatch.setattr(onnx_export, "compare", broken)
    out = tmp_path / "m.onnx"
    args = [str(files["bundle"]), "--budget", "0.3", "--steps", "0", "-o", str(out), "--quiet", "--trust-checkpoint"]
    code, text = _run(args)
    lines = _error_lines(text)
    assert code == 3 and len(lines) == 1, text
    assert lines[0].startswith("error: ONNX model differs from PyTorch: max abs diff 0.5 > tolerance 0.0001"), lines
    assert sorted(os.listdir(tmp_path)) == []
    code, text = _run([*args, "--force"])
    assert code == 0, text
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["parity"] == {"max_abs_diff": 0.5, "tolerance": 1e-4, "ok": False}
    assert report["gate"]["forced"] is True and report["gate"]["parity_ok"] is False


# --------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("raised, code", [(KeyboardInterrupt, 130), (Terminated, 143)])
def test_an_interrupt_while_writing_leaves_no_file(files, tmp_path, monkeypatch, raised, code) -> None:
    real_write = onnx_export._write

    def half_written(proto, path, external):  # the model file is being written when the signal comes
        real_write(proto, path, external)
        raise raised()

    monkeypatch.setattr(onnx_export, "_write", half_written)
    out = tmp_path / "m.onnx"
    got, text = _run([str(files["bundle"]), "--budget", "0.3", "--steps", "0", "-o", str(out), "--quiet",
                      "--trust-checkpoint"])
    assert got == code and _error_lines(text)[-1].startswith("interrupted"), text
    assert sorted(os.listdir(tmp_path)) == []  # the temporary ONNX file is gone too
    monkeypatch.setattr(onnx_export, "_write", real_write)

    def report_interrupted(*_args, **_kw):  # after the ONNX file is in place
        raise raised()

    monkeypatch.setattr(job_mod, "write_report", report_interrupted)
    got, _ = _run([str(files["bundle"]), "--budget", "0.3", "--steps", "0", "-o", str(out), "--quiet",
                   "--trust-checkpoint"])
    assert got == code and sorted(os.listdir(tmp_path)) == []


def test_an_interrupted_import_is_an_interrupt(files, tmp_path, monkeypatch) -> None:
    # pybind11 turns an interrupt inside a module's init into ImportError("initialization
    # failed") caused by it; the command still exits 130 and writes nothing.
    def interrupted_import(*_args, **_kw):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(job_mod, "build_onnx", interrupted_import)
    code, text = _run([str(files["bundle"]), "--budget", "0.3", "--steps", "0", "-o", str(tmp_path / "m.onnx"),
                       "--quiet", "--trust-checkpoint"])
    assert code == 130 and _error_lines(text) == ["interrupted (SIGINT): nothing written"], text
    assert sorted(os.listdir(tmp_path)) == []


def test_external_data_outputs_are_whole_or_absent(files, tmp_path, monkeypatch) -> None:
    # Every weight goes to m.onnx.data, as for a model over ~1.8 GB.
    monkeypatch.setattr(onnx_export, "_EXTERNAL_DATA_BYTES", 0)
    args = [str(files["bundle"]), "--budget", "0.3", "--steps", "0", "-o", str(tmp_path / "m.onnx"), "--quiet",
            "--trust-checkpoint"]
    code, text = _run(args)
    assert code == 0, text
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data", "m.report.json"]
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {sess.get_inputs()[0].name: np.zeros((2, 32), np.float32)})[0].shape == (2, 5)
    for p in tmp_path.iterdir():
        p.unlink()

    def report_interrupted(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(job_mod, "write_report", report_interrupted)
    code, _ = _run(args)
    assert code == 130 and sorted(os.listdir(tmp_path)) == []


def _wait_for(proc: subprocess.Popen, needle: str, seconds: float) -> str:
    """stderr lines until one holds ``needle`` (the CLI prints one line per finished
    phase when stderr is not a terminal)."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"no {needle!r} on stderr: {''.join(seen)}")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_distillation_exits_with_its_code_and_leaves_nothing(files, tmp_path, sig, code) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [sys.executable, "-m", "gblr_compress", str(files["safetensors"]), "--factory", FACTORY,
           "--calib", str(files["calib"]), "--budget", "0.3", "--steps", "100000", "-o", str(out_dir / "m.onnx")]
    # PYTHONFAULTHANDLER: should the child not exit, SIGABRT makes it print every
    # thread's Python stack, so the failure says where it hung.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        # The init's last line is printed when it ends; the distillation starts next.
        _wait_for(proc, "init (per layer)", 120)
        time.sleep(1.0)  # well inside the 100,000 distillation steps
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            raise AssertionError(f"still running 60 s after the signal; its stacks:\n{err[-6000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == f"interrupted ({'SIGINT' if sig == signal.SIGINT else 'SIGTERM'}): nothing written", err
    assert "Traceback" not in err
    assert sorted(os.listdir(out_dir)) == []  # no ONNX, no report, no temporary file


# ---------------------------------------------------------------- reproducibility
VARYING = ("created", "seconds", "memory", "outputs")  # documented in README.md


def test_one_seed_gives_one_graph_and_one_report(files, tmp_path) -> None:
    reports, graphs = [], []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        code, text = _run([str(files["bundle"]), "--budget", "0.3", "--steps", "6", "--seed", "3",
                           "-o", str(folder / "m.onnx"), "--quiet", "--trust-checkpoint"])
        assert code == 0, text
        proto = onnx.load(str(folder / "m.onnx"))
        graphs.append(proto.graph.SerializeToString(deterministic=True))
        meta = {p.key: p.value for p in proto.metadata_props}
        report = json.loads((folder / "m.report.json").read_text())
        assert json.loads(meta["gblr.report"]) == report  # the file carries the same report
        reports.append({k: v for k, v in report.items() if k not in VARYING})
    assert graphs[0] == graphs[1]
    assert reports[0] == reports[1]
    assert reports[0]["quality"]["distilled"]  # the distillation ran: the check covers it


# ------------------------------------------------------------------ safe loading
def test_safetensors_and_state_dict_with_a_factory_never_unpickle(files, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    calls = []
    real_load = torch.load

    def spy(*args, **kw):
        calls.append(kw.get("weights_only"))
        return real_load(*args, **kw)

    monkeypatch.setattr(torch, "load", spy)
    warned = []
    load_model(files["safetensors"], FACTORY, warn=warned.append)
    assert calls == [] and warned == []  # safetensors: torch.load is not even called
    load_model(files["state"], FACTORY, warn=warned.append)
    assert calls == [True] and warned == []  # weights_only=True: tensors only
    load_model(files["bundle"], warn=warned.append)
    assert calls == [True, False] and len(warned) == 1 and "is a pickle" in warned[0]


def test_every_pickle_load_warns_unless_trusted(files, tmp_path) -> None:
    args = [str(files["bundle"]), "--budget", "0.3", "--steps", "0", "-o", str(tmp_path / "m.onnx"), "--quiet"]
    code, text = _run(args)
    warnings = [line for line in text.splitlines() if "is a pickle" in line]
    assert code == 0 and len(warnings) == 1, text
    assert warnings[0] == (f"warning: {files['bundle']} is a pickle: loading it runs code from the file; "
                           "pass --trust-checkpoint to silence this")
    code, text = _run([*args, "--trust-checkpoint"])
    assert code == 0 and "is a pickle" not in text, text


def test_huggingface_loading_never_trusts_remote_code() -> None:
    sources = [p.read_text() for p in (ROOT / "gblr_compress").rglob("*.py")]
    calls = [line for s in sources for line in s.splitlines() if "from_pretrained(" in line]
    assert calls and all("trust_remote_code=False" in c for c in calls), calls
    assert not any("trust_remote_code=True" in s for s in sources)
