"""Deployment: ``--quantize int8``, ``--target-fidelity`` and the candidates in the report.

The search's known answers come from layers whose spectrum fixes what each budget
keeps (:func:`tests.cli_models.two_level`, :func:`tests.cli_models.flat`); its latency
is a deterministic stand-in (weight bytes of each file), so which candidate is fastest
does not depend on the machine's load. The real timer is what ``--quantize`` and the
exit-3 command run.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from gblr_compress.cli import main
from gblr_compress.distill import DistillConfig
from gblr_compress.errors import InputError
from gblr_compress.export.measure import Timing
from gblr_compress.job import Job
from gblr_compress.pipeline import CompressConfig
from gblr_compress.report import (
    Candidate,
    load_report,
    render_inspect,
    report_from_dict,
    report_to_dict,
    write_pareto_png,
    write_report,
)
from gblr_compress.target import meets, pick, run_target, search_job
from tests.cli_models import flat, two_level
from tests.test_report_schema import make_report


def _bytes_timer(paths, inputs, reference):  # noqa: ARG001 - the Timer signature
    """Latency = weight bytes of the file: int8 and lower budgets are smaller, hence faster."""
    size = {k: sum(len(t.raw_data) or t.ByteSize() for t in onnx.load(str(p)).graph.initializer)
            for k, p in paths.items()}
    return {k: Timing(size[k] / 1e3, size[reference] / size[k]) for k in paths}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("deploy")
    out = {}
    for name, make in (("two_level", two_level), ("flat", flat)):
        torch.manual_seed(0)
        out[name] = d / f"{name}.pt"
        torch.save({"model": make().eval(), "calib": [torch.randn(4, 16, 64) for _ in range(10)]}, out[name])
    return out


def _one_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_quantize_int8_integer_kernels_fidelity_dynamic_batch(bundles: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, [str(bundles["two_level"]), "--budget", "0.9", "--steps", "0",
                                    "--quantize", "int8", "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}  # the sliced GEMMs run on integer kernels
    # Weights in 7 bits: AVX2's uint8 x int8 kernels saturate on full-range weights.
    weights = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and all(w.min() >= -64 and w.max() <= 64 for w in weights)
    assert max(int(abs(w).max()) for w in weights) >= 60  # the 7-bit range is used, not less
    assert "MatMul" not in ops  # nothing with a constant weight stayed float
    report = load_report(out)  # the report travels inside the int8 file
    q = report.deploy["quantization"]
    assert q["compressed_integer"] >= 1 and q["integer_kernels"] >= q["compressed_integer"]
    assert q["left_float"] == [] and q["compressed_float"] == 0
    by = {(c.budget, c.int8): c for c in report.candidates}
    assert set(by) == {(0.9, False), (0.9, True), ("dense", False)}
    fl, q8 = by[(0.9, False)], by[(0.9, True)]
    assert q8.chosen and not fl.chosen
    # Two-level spectrum: budget 0.9 keeps every large direction; int8 costs little more.
    assert fl.cosine > 0.999 and 0.98 < q8.cosine <= fl.cosine + 1e-3
    assert abs(fl.cosine - report.quality["frozen"]["cosine"]) < 1e-4  # ORT reproduces PyTorch
    assert all(c.latency_ms > 0 and c.speedup > 0 for c in report.candidates)
    assert by[("dense", False)].speedup == pytest.approx(1.0)
    assert fl.cost == q8.cost == report.linear_cost
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = np.random.default_rng(0).standard_normal((batch, 7, 64)).astype(np.float32)
        assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape == (batch, 7, 64)


def test_int8_file_past_its_tolerance_is_refused_even_with_force(bundles: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # --force writes what the fidelity gate or parity refused; the int8 tolerance has its
    # own option, so the error names that one and --force does not override it.
    import gblr_compress.job as job_mod

    monkeypatch.setattr(job_mod, "int8_check", lambda *_: "the int8 file loses 0.5000 held-out cosine (test)")
    out = tmp_path / "q.onnx"
    for extra in ([], ["--force"]):
        res = CliRunner().invoke(main, [str(bundles["two_level"]), "--budget", "0.9", "--steps", "0",
                                        "--quantize", "int8", "-o", str(out), "--quiet", "--trust-checkpoint", *extra])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 3 and lines == ["error: the int8 file loses 0.5000 held-out cosine (test)"], res.output
        assert list(tmp_path.iterdir()) == []  # nothing written


def test_target_only_a_high_budget_meets(bundles: dict[str, Path], tmp_path: Path) -> None:
    job = Job(model=str(bundles["two_level"]), output=str(tmp_path / "t.onnx"),
              config=CompressConfig(distill=DistillConfig(steps=0)))
    result = run_target(job, 0.99, timer=_bytes_timer)
    cands = result.report.candidates
    chosen = result.report.chosen
    assert chosen is not None and chosen.budget != "dense" and chosen.budget >= 0.8
    assert chosen.cosine >= 0.99 and chosen is pick(cands, 0.99)
    # Budgets whose rank cannot hold the 24 large directions all miss: the bisection
    # found 0.8 between the grid's 0.9 (meets) and 0.7 (misses).
    assert all(c.cosine < 0.99 for c in cands if c.budget != "dense" and c.budget <= 0.7)
    assert 0.8 in {c.budget for c in cands}
    # The grid stops at the first budget whose float file misses: 0.5 and 0.3 keep less.
    assert {c.budget for c in cands if c.budget != "dense"} == {0.9, 0.8, 0.7}
    assert all(c.speedup <= chosen.speedup for c in cands if meets(c, 0.99))
    assert result.report.settings["budget"] == chosen.budget
    written = load_report(tmp_path / "t.onnx")
    assert written.chosen is not None and written.chosen.label == chosen.label
    assert (tmp_path / "t.report.json").is_file()
    # The search's distilled finalists never run again at a smaller step; the job the
    # user gave is left as it was.
    assert result.report.settings["retry"] is False
    assert job.config.retry is True and search_job(job).config.retry is False


def test_target_int8_alone_meets(bundles: dict[str, Path], tmp_path: Path) -> None:
    job = Job(model=str(bundles["flat"]), output=str(tmp_path / "t.onnx"),
              config=CompressConfig(distill=DistillConfig(steps=0)))
    result = run_target(job, 0.99, timer=_bytes_timer)
    chosen = result.report.chosen
    # A flat spectrum: every budget loses too much; dense int8 keeps ~0.999.
    assert chosen is not None and chosen.label == "dense+int8" and chosen.cosine >= 0.99
    assert all(c.cosine < 0.9 for c in result.report.candidates if c.budget != "dense")
    assert {c.budget for c in result.report.candidates} == {"dense", 0.9}  # 0.9 missed: nothing below is built
    ops = {n.op_type for n in onnx.load(str(tmp_path / "t.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    # The same candidates at a target int8 misses: only dense is left.
    assert pick(result.report.candidates, 0.99999).label == "dense"


def test_target_nothing_meets_exit_3(bundles: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.onnx"
    res = CliRunner().invoke(main, [str(bundles["flat"]), "--target-fidelity", "0.99999", "--steps", "0",
                                    "-o", str(out)])
    assert res.exit_code == 3, res.output
    assert "only the dense model meets --target-fidelity 0.99999" in res.stderr
    assert "dense+int8" in res.stderr or "int8" in res.stderr  # the table is printed
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_bad_values_exit_2(bundles: dict[str, Path], tmp_path: Path) -> None:
    m, out = str(bundles["flat"]), str(tmp_path / "x.onnx")
    runner = CliRunner()
    assert "--target-fidelity must be in (0, 1]" in _one_error(
        runner.invoke(main, [m, "--target-fidelity", "1.5", "-o", out]))
    assert "--target-fidelity must be in (0, 1]" in _one_error(
        runner.invoke(main, [m, "--target-fidelity", "0", "-o", out]))
    assert "not both" in _one_error(runner.invoke(main, [m, "--budget", "0.5", "--target-fidelity", "0.9", "-o", out]))
    assert "--budget" in _one_error(runner.invoke(main, [m, "-o", out]))
    assert "--allow-dense" in _one_error(runner.invoke(main, [m, "--budget", "0.5", "--allow-dense", "-o", out]))
    assert "int8" in _one_error(runner.invoke(main, [m, "--budget", "0.5", "--quantize", "int4", "-o", out]))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        run_target(Job(model=m, output=out), 1.5)


def _with_candidates():
    report = make_report()
    report.candidates = [
        Candidate(budget="dense", int8=False, cost=960, dense_cost=960, fidelity={"cosine": 1.0, "rel_error": 0.0},
                  latency_ms=2.0, speedup=1.0),
        Candidate(budget="dense", int8=True, cost=960, dense_cost=960, fidelity={"cosine": 0.993}, latency_ms=1.1,
                  speedup=1.9),
        Candidate(budget=0.3, int8=True, cost=220, dense_cost=960, fidelity={"cosine": 0.961, "rel_error": 0.2},
                  latency_ms=0.6, speedup=3.3, chosen=True, distilled=True),
        Candidate(budget=0.5, int8=False, cost=480, dense_cost=960, fidelity={"cosine": 0.97}),
    ]
    report.deploy = {"target": 0.95, "choice": "fastest", "quantization": {
        "method": "dynamic", "integer_kernels": 3, "compressed_integer": 1,
        "left_float": [{"node": "n", "op": "MatMul", "reason": "both inputs are activations"}], "ops": {}}}
    return report


def test_candidates_round_trip_and_checks(tmp_path: Path) -> None:
    report = _with_candidates()
    d = report_to_dict(report)
    back = report_from_dict(json.loads(json.dumps(d)))
    assert back.candidates == report.candidates and back.deploy == report.deploy
    assert back.chosen is not None and back.chosen.label == "0.3+int8"
    path = write_report(report, tmp_path / "r.json")
    assert load_report(path).candidates == report.candidates
    for bad in ({"budget": 1.5, "int8": False, "cost": 1, "dense_cost": 2},
                {"budget": "dense", "int8": "no", "cost": 1, "dense_cost": 2},
                {"budget": 0.5, "int8": True, "cost": 1},
                {"budget": 0.5, "int8": True, "cost": 1, "dense_cost": 2, "speedup": "fast"}):
        with pytest.raises(InputError, match="malformed report"):
            report_from_dict({**d, "candidates": [bad]})
    with pytest.raises(InputError, match="more than one"):
        report_from_dict({**d, "candidates": [d["candidates"][2], d["candidates"][2]]})
    old = {k: v for k, v in d.items() if k not in ("candidates", "deploy")}  # reports before this field
    assert report_from_dict(old).candidates == []


def test_inspect_candidates_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_report(_with_candidates(), tmp_path / "r.json")
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    res = CliRunner().invoke(main, ["inspect", str(path), "--no-heatmap"])
    assert res.exit_code == 0, res.output
    row = next(l for l in res.output.splitlines() if "budget 0.3" in l)
    assert row.lstrip().startswith("*") and "3.30x" in row and "0.9610" in row and "yes" in row
    assert "dense" in res.output and "1.90x" in res.output
    assert "gblr-compress[plot]" in res.output  # says how to get the picture
    assert "float (1): both inputs are activations" in res.output
    res = CliRunner().invoke(main, ["inspect", str(path), "--png", str(tmp_path / "png")])
    assert _one_error(res) == "error: --png needs matplotlib: pip install 'gblr-compress[plot]' (matplotlib)"


def test_pareto_png_with_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = _with_candidates()
    png = write_pareto_png(report, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    path = write_report(report, tmp_path / "r.json")
    res = CliRunner().invoke(main, ["inspect", str(path), "--png", str(tmp_path / "png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "png" / "pareto.png").is_file() and (tmp_path / "png" / "enc.fc1.png").is_file()
    console = Console(record=True, width=150)
    render_inspect(report, console, heatmaps=False)
    assert "Candidates" in console.export_text()


def test_the_finalist_is_the_budget_whose_distillation_could_give_a_faster_file() -> None:
    from gblr_compress.deploy import Entry
    from gblr_compress.target import FINALISTS, _finalists

    def entries(cosines: dict[float, float]) -> dict[float, Entry]:
        return {b: Entry(Candidate(budget=b, int8=False, cost=1, dense_cost=1, fidelity={"cosine": c}), Path("x"))
                for b, c in cosines.items()}

    assert FINALISTS == 1
    fl = entries({0.9: 0.99, 0.7: 0.96, 0.6: 0.945, 0.5: 0.88, 0.3: 0.7})
    q8 = entries({0.9: 0.985, 0.7: 0.955, 0.6: 0.94, 0.5: 0.87, 0.3: 0.69})
    # int8 meets 0.95 down to 0.7: the next faster candidate is 0.6 + int8, distilled.
    assert _finalists(fl, q8, 0.95) == [0.6]
    # No int8 file meets 0.958, the float file at 0.7 does: its int8 file may, distilled.
    assert _finalists(fl, q8, 0.958) == [0.7]
    # Nothing meets: the highest budget.
    assert _finalists(fl, q8, 0.999) == [0.9]
    # int8 meets even at the lowest budget: that budget itself.
    assert _finalists(fl, q8, 0.5) == [0.3]


def test_the_shift_probe_decides_when_it_is_lower(tmp_path: Path) -> None:
    # Held-out texts share the calibration file's templates: a file can meet F there and
    # miss it on the same words reordered. The search takes the lower cosine.
    def cand(budget: float | str, int8: bool, held: float, probe: float, speedup: float) -> Candidate:
        return Candidate(budget=budget, int8=int8, cost=100, dense_cost=200, speedup=speedup,
                         fidelity={"cosine": held, "rel_error": 0.1, "probe_cosine": probe})

    fast = cand(0.5, True, 0.97, 0.93, 3.0)  # meets 0.95 on held-out only
    slow = cand(0.9, True, 0.99, 0.96, 2.2)
    dense8 = cand("dense", True, 0.995, 0.994, 2.0)
    dense = cand("dense", False, 1.0, 1.0, 1.0)
    assert fast.search_cosine == 0.93 and slow.search_cosine == 0.96
    assert not meets(fast, 0.95) and meets(slow, 0.95)
    assert pick([fast, slow, dense8, dense], 0.95) is slow
    assert pick([fast, slow, dense8, dense], 0.97) is dense8
    no_probe = Candidate(budget=0.5, int8=True, cost=1, dense_cost=2, fidelity={"cosine": 0.97})
    assert no_probe.probe_cosine is None and no_probe.search_cosine == 0.97 and meets(no_probe, 0.95)
    # The probe's cosine round-trips and inspect shows it, checking the target on it.
    report = _with_candidates()
    slow.chosen = True
    report.candidates = [fast, slow, dense8, dense]
    back = report_from_dict(json.loads(json.dumps(report_to_dict(report))))
    assert back.candidates[0].probe_cosine == 0.93
    console = Console(record=True, width=160)
    render_inspect(back, console, heatmaps=False)
    text = console.export_text()
    assert "probe cos" in text and "the lower cosine >= 0.95" in text
    row = next(l for l in text.splitlines() if "budget 0.5" in l)
    assert row.lstrip().startswith("x") and "0.9300" in row


def test_the_bisection_refines_the_int8_frontier() -> None:
    from gblr_compress.deploy import Entry
    from gblr_compress.target import _bisection

    def entries(cosines: dict[float, float]) -> dict[float, Entry]:
        return {b: Entry(Candidate(budget=b, int8=False, cost=1, dense_cost=1, fidelity={"cosine": c}), Path("x"))
                for b, c in cosines.items()}

    fl = entries({0.9: 0.99, 0.7: 0.96, 0.5: 0.9, 0.3: 0.8})
    q8 = entries({0.9: 0.98, 0.7: 0.945, 0.5: 0.89, 0.3: 0.79})
    # The float files meet 0.95 down to 0.7, the int8 files only at 0.9: the winner is an
    # int8 file, so the step goes between 0.9 and 0.7.
    assert _bisection(fl, q8, 0.95) == 0.8
    # No int8 file meets 0.985: the float frontier (0.9 meets, 0.7 does not).
    assert _bisection(fl, q8, 0.985) == 0.8
    assert _bisection(fl, q8, 0.94) == 0.6  # int8 meets down to 0.7
    assert _bisection(fl, q8, 0.5) is None  # the lowest budget meets: nothing to refine
    assert _bisection(fl, q8, 0.999) is None  # nothing meets
