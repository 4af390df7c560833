"""Numerical faults: each case compresses correctly, is left dense with a reason, or is
refused with one line naming the tensor (gblr_compress/numerics.py, whitening_moment,
distillation's fault stop)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gblr_compress.distill as distill_mod
from gblr_compress.budget import budget_cost
from gblr_compress.calib import Moment
from gblr_compress.cli import main
from gblr_compress.distill import DistillConfig, distill_, gblr_layers
from gblr_compress.distill import _fault as distill_fault
from gblr_compress.init import InitConfig
from gblr_compress.init.layer import init_layer
from gblr_compress.init.linalg import cholesky, whitening_moment
from gblr_compress.job import Job, run_job
from gblr_compress.layer import GBLRLayerConfig, GBLRLinear
from gblr_compress.pipeline import CompressConfig
from gblr_compress.swap import find_linears, replace_module

pytestmark = pytest.mark.usefixtures("one_thread")  # many small runs on a shared 2-core box


def _mlp(n_in: int = 32, hidden: int = 48, n_out: int = 5) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


def _calib(n_in: int = 32, count: int = 5, rows: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(rows, n_in, generator=gen) for _ in range(count)]


def _bundle(tmp: Path, model: nn.Module, calib: list[torch.Tensor]) -> Path:
    path = tmp / "bundle.pt"
    torch.save({"model": model, "calib": calib}, path)
    return path


def _cli(args: list[str]) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, [*args, "--trust-checkpoint", "--quiet"])
    assert "Traceback" not in result.output
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def _job(tmp: Path, model: nn.Module, calib: list[torch.Tensor], steps: int = 2, budget: float = 0.3):
    torch.manual_seed(0)
    return run_job(Job(model=str(_bundle(tmp, model, calib)), output=str(tmp / "m.onnx"), trust_checkpoint=True,
                       config=CompressConfig(budget=budget, distill=DistillConfig(steps=steps))))


# ------------------------------------------------------------------ refused: one line
@pytest.mark.parametrize("where, needle", [("weight", "4.weight"), ("bias", "2.bias")])
def test_nan_or_inf_in_weights_is_refused_naming_the_tensor(tmp_path, where, needle) -> None:
    model = _mlp()
    with torch.no_grad():
        if where == "weight":
            model[4].weight[0, 3] = float("nan")
        else:
            model[2].bias[1] = float("inf")
    code, lines = _cli([str(_bundle(tmp_path, model, _calib())), "--budget", "0.3", "-o", str(tmp_path / "m.onnx")])
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert ("NaN" if where == "weight" else "Inf") in lines[0]
    assert not list(tmp_path.glob("m.*"))


def test_nan_or_inf_in_calibration_data_is_refused_naming_the_batch(tmp_path) -> None:
    calib = _calib()
    calib[3][2, 7] = float("inf")
    calib_path = tmp_path / "calib.pt"
    torch.save(calib, calib_path)
    torch.save(_mlp(), tmp_path / "model.pt")
    code, lines = _cli([str(tmp_path / "model.pt"), "--calib", str(calib_path), "--budget", "0.3",
                        "-o", str(tmp_path / "m.onnx")])
    assert code == 2 and len(lines) == 1 and "batch 3" in lines[0] and "Inf" in lines[0], lines
    np.savez(tmp_path / "calib.npz", x=np.full((4, 32), np.nan, dtype=np.float32))
    code, lines = _cli([str(tmp_path / "model.pt"), "--calib", str(tmp_path / "calib.npz"), "--budget", "0.3",
                        "-o", str(tmp_path / "m.onnx")])
    assert code == 2 and "input 'x'" in lines[0] and "NaN" in lines[0], lines
    assert not list(tmp_path.glob("m.*"))


def test_weights_that_overflow_float32_are_refused(tmp_path) -> None:
    model = _mlp()
    with torch.no_grad():
        for i in (0, 2, 4):
            model[i].weight.mul_(1e14)  # finite weights; the output (1e42) is not
    code, lines = _cli([str(_bundle(tmp_path, model, _calib())), "--budget", "0.3", "-o", str(tmp_path / "m.onnx")])
    assert code == 2 and len(lines) == 1 and "overflow" in lines[0], lines
    assert not list(tmp_path.glob("m.*"))


# --------------------------------------------------------------------- whitening
def _moment(x: torch.Tensor) -> Moment:
    return Moment(x.double().T @ x.double(), x.shape[0])


def test_whitening_never_fails_and_says_what_it_did() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 16
    # Singular: 3 input vectors for 16 features, two features always zero.
    x = torch.randn(3, n, generator=gen)
    x[:, :2] = 0
    w = whitening_moment(_moment(x), n, damping=0.0)
    assert torch.linalg.matrix_rank(_moment(x).xtx) == 3
    assert not w.data_free and torch.isfinite(cholesky(w.C)).all()
    # Indefinite by round-off-sized amounts: damped until it factorizes.
    bad = _moment(x)
    bad.xtx -= 1e-3 * float(bad.xtx.diagonal().mean()) * torch.eye(n, dtype=torch.float64)
    w = whitening_moment(bad, n, damping=0.0)
    assert "damped" in w.note and not w.data_free
    assert int(torch.linalg.cholesky_ex(w.C)[1]) == 0
    # Far from positive semi-definite, or not finite: the identity (data-free).
    neg = Moment(-torch.eye(n, dtype=torch.float64), 10)
    neg.xtx[0, 0] = 5.0
    w = whitening_moment(neg, n, damping=0.0)
    assert w.data_free and "data-free" in w.note and torch.equal(w.C, torch.eye(n, dtype=torch.float64))
    nan = _moment(x)
    nan.xtx[1, 2] = float("nan")
    w = whitening_moment(nan, n, damping=0.01)
    assert w.data_free and "not finite" in w.note


def test_init_layer_on_an_unusable_moment_is_data_free_with_a_note() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    moment = _moment(torch.randn(40, 24))
    moment.xtx[3, 3] = float("inf")
    holdout = _moment(torch.randn(10, 24))
    _, rec = init_layer(lin, 160, InitConfig(budget=0.4, refine_steps=0), moment, holdout, name="fc")
    assert "data-free" in rec.note and rec.exact_cost <= 160
    assert rec.calib_error is not None and math.isfinite(rec.calib_error)
    # A singular but finite moment whitens normally (no note, finite errors).
    x = torch.randn(5, 24)
    _, rec = init_layer(lin, 160, InitConfig(budget=0.4, refine_steps=0, damping=0.0), _moment(x), None, name="fc")
    assert rec.note == "" and math.isfinite(rec.calib_error)


# ------------------------------------------------------ compressed or left dense, e2e
def _onnx_matches(path: Path, model: nn.Module, x: torch.Tensor, report) -> None:
    """The written ONNX model is float32, finite and matches the PyTorch student."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.type == "tensor(float)"  # float32 export whatever the checkpoint's dtype
    got = sess.run(None, {inp.name: x.numpy()})[0]
    assert np.isfinite(got).all()
    assert report.parity["ok"]
    ref = model(x).detach().numpy()
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize(
    "case",
    ["zero_layer", "out_1", "in_1", "tiny", "tiny_scale", "huge_scale", "float16", "bfloat16"],
)
def test_degenerate_layers_and_dtypes_compress_or_stay_dense_with_a_reason(tmp_path, case) -> None:
    n_in, calib = 32, _calib()
    if case == "zero_layer":
        model = _mlp()
        with torch.no_grad():
            model[2].weight.zero_()
    elif case == "out_1":  # a 1 x n weight
        model = _mlp(n_out=1)
    elif case == "in_1":  # an n x 1 weight
        n_in, model = 1, _mlp(n_in=1)
        calib = _calib(1)
    elif case == "tiny":
        n_in, model = 2, nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        calib = _calib(2)
    elif case == "tiny_scale":
        model = _mlp()
        with torch.no_grad():
            model[0].weight.mul_(1e-20)
    elif case == "huge_scale":  # finite outputs (~1e15), losses that overflow float32
        model = _mlp()
        with torch.no_grad():
            model[0].weight.mul_(1e15)
    else:
        dtype = getattr(torch, case)
        model = _mlp().to(dtype)
        calib = [c.to(dtype) for c in calib]
    result = _job(tmp_path, model, calib, steps=4 if case == "huge_scale" else 2)
    report = result.report
    assert report.linear_cost <= report.budget_cost
    for layer in report.layers:  # every layer compressed, or dense with the reason why
        assert layer.status in ("compressed", "skipped") and (layer.status == "compressed" or layer.reason)
    frozen = report.quality["frozen"]
    assert all(math.isfinite(v) for v in frozen.values())
    if case == "zero_layer":
        zero = next(l for l in report.layers if l.name == "2")
        assert zero.cost == 0 and frozen["rel_error"] < 0.05  # the zero weight needs no block: only biases train
    if case == "huge_scale":  # the squared error overflows: stopped, best state kept, said so
        assert any(n.startswith("distillation stopped: training loss is inf") for n in report.notes), report.notes
    if case in ("float16", "bfloat16"):
        assert any(case in note and "float32" in note for note in report.notes)
        assert any(case in w for w in result.warnings)
    x = _calib(n_in, count=1, rows=3)[0]
    _onnx_matches(tmp_path / "m.onnx", result.compress.model, x, report)
    json.loads((tmp_path / "m.report.json").read_text())  # written, valid JSON (no NaN)


# ------------------------------------------------------------- distillation faults
def _student(gen: torch.Generator):
    teacher = _mlp().eval()
    student = copy.deepcopy(teacher)
    for name in find_linears(student):
        replace_module(student, name, GBLRLinear.from_linear(student.get_submodule(name), GBLRLayerConfig(2, 4)))
    calib = [torch.randn(8, 32, generator=gen) for _ in range(4)]
    hold = [torch.randn(8, 32, generator=gen) for _ in range(2)]
    return teacher, student, calib, hold


@pytest.mark.parametrize("with_holdout", [True, False])
def test_nan_loss_mid_distillation_stops_and_restores_the_best_state(monkeypatch, with_holdout) -> None:
    gen = torch.Generator().manual_seed(0)
    teacher, student, calib, hold = _student(gen)
    real = distill_mod.output_loss
    calls = {"train": 0}

    def poisoned(*args, **kw):  # training steps run with grad: the 6th one goes NaN
        loss = real(*args, **kw)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 6:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(distill_mod, "output_loss", poisoned)
    max_cost = budget_cost(list(gblr_layers(student).values()), 0.4)
    result = distill_(student, teacher, calib, max_cost, DistillConfig(steps=20, eval_every=2),
                      holdout=hold if with_holdout else ())
    assert result.stopped and "step 6" in result.stopped and "nan" in result.stopped
    assert max(h["step"] for h in result.history) == 4  # nothing after the fault
    assert result.best_step <= 4
    for layer in gblr_layers(student).values():
        assert all(torch.isfinite(p).all() for p in layer.parameters())
    out = student(torch.randn(3, 32))
    assert torch.isfinite(out).all()
    if with_holdout:
        assert result.heldout_after <= result.heldout_before


def test_a_diverging_held_out_loss_is_a_fault() -> None:
    assert distill_fault(8, None, 250.0, 2.0, []) .startswith("held-out loss diverged at step 8")
    assert distill_fault(8, None, 150.0, 2.0, []) is None
    assert "nan" in distill_fault(3, None, float("nan"), 2.0, [])
    assert distill_fault(3, torch.tensor(float("inf")), None, None, []).startswith("training loss is inf")


def test_the_report_says_the_distillation_stopped(tmp_path, monkeypatch) -> None:
    real = distill_mod.output_loss
    calls = {"train": 0}

    def poisoned(*args, **kw):
        loss = real(*args, **kw)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 3:
                return loss + float("inf")
        return loss

    monkeypatch.setattr(distill_mod, "output_loss", poisoned)
    result = _job(tmp_path, _mlp(), _calib(), steps=8)
    notes = json.loads((tmp_path / "m.report.json").read_text())["notes"]
    assert any(n.startswith("distillation stopped: training loss is inf at step 3; restored the best state")
               for n in notes), notes
    assert result.report.parity["ok"] and math.isfinite(result.report.quality["frozen"]["cosine"])
