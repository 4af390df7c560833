"""Deployment frontier: gblr-compress with and without int8, int8 alone, dense, and
``--target-fidelity``, on all-MiniLM-L6-v2 (the usual sentence-embedding wrapper),
scored on sentences from another source than the calibration text.

What runs (all offline; assets from ``python -m benchmarks.assets``):

1. the ``gblr-compress`` command at each ``--budgets`` value (default 0.5), float; each
   file then quantized with the function ``--quantize int8`` calls
   (:func:`gblr_compress.export.quantize.quantize_int8`), plus one command run with
   ``--quantize int8`` at the first budget with ``--command-int8``, to check the
   command's own path and report;
2. the dense model exported to ONNX, and that file quantized the same way (int8 alone:
   what a CPU user gets today in one call);
3. the command with ``--target-fidelity F`` (default 0.95), timed against one default
   run (the first budget's float run);
4. :data:`CONTENDERS`: more files on the same frontier: the pruning + least-squares
   anchor at ``--anchor-budgets`` (default 0.8 0.6 0.5), float and int8, calibrated on
   the same Wikipedia text;
5. every file scored on news sentences (mean / min cosine of the embeddings vs the dense
   PyTorch model, nearest-neighbour agreement) and timed in ONE interleaved onnxruntime
   run (2 threads, spinning off, medians of per-round ratios vs dense fp32) on a batch
   of 32 news sentences.

Calibration: Wikipedia sentences (``--calib-lines``); evaluation: news sentences. With
``--heldout-source wordnet`` every command also gets ``--heldout`` with WordNet usage
examples (evenly spaced, ``--heldout-lines``): three sources, one to calibrate on, one
to decide on, one to score on.

Usage (heavy: run alone)::

    flock /tmp/gblr-cpu.lock env PYTHONPATH=. python benchmarks/deploy_bench.py \\
        [--budgets 0.5 0.3] [--target 0.95] [--calib-lines 2000] [--json out.json] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

from benchmarks import assets
from benchmarks.common import run_main
from benchmarks.minilm.sources import calib_sentences, eval_set
from benchmarks.models_bench import (
    _embeddings_onnx,
    _embeddings_torch,
    _tokenize,
    encoder_fidelity,
    pickled_minilm_wrapper,
)
from gblr_compress.export import export_onnx
from gblr_compress.export.measure import latency
from gblr_compress.export.quantize import quantize_int8

# ---------------------------------------------------------------- more contenders
# Each entry builds one more ONNX file for the frontier from (workdir, dense wrapper,
# calibration text file) and returns (path, exact Linear cost share or None).
CONTENDERS: dict[str, Callable[[Path, nn.Module, Path], tuple[Path, float | None]]] = {}
ANCHOR_BUDGETS = (0.8, 0.6, 0.5)  # the pruning anchor's points on the frontier (--anchor-budgets)
_ANCHOR: dict[str, object] = {}  # the dense model's consumer moments, computed once per run


def anchor_onnx(work: Path, dense: nn.Module, calib_txt: Path, budget: float, int8: bool = False) -> tuple[Path, float]:
    """The pruning + least-squares anchor (``benchmarks/prune_anchor.py``: FFN units and
    heads pruned by output energy, consumers refit in closed form, global split, no
    fine-tune) at ``budget`` of the encoder's Linear cost, calibrated on the same text
    as the command, exported to ONNX (smaller dense GEMMs), optionally int8 on top.
    Each budget is pruned and exported once; its int8 file quantizes that export."""
    import copy

    from transformers import AutoTokenizer

    from benchmarks.prune_anchor import compressible_linears, consumer_moments, linear_cost, prune_anchor_

    if "moments" not in _ANCHOR:
        tokenizer = AutoTokenizer.from_pretrained(str(assets.minilm_dir()), local_files_only=True)
        lines = [t for t in calib_txt.read_text().splitlines() if t.strip()]
        batches = [_tokenize(tokenizer, lines[i:i + 32]) for i in range(0, len(lines), 32)]
        _ANCHOR.update(moments=consumer_moments(dense, batches), sample=batches[0])
    key = f"float {budget}"
    if key not in _ANCHOR:
        names = compressible_linears(dense)
        student = copy.deepcopy(dense)
        result = prune_anchor_(student, [], int(budget * linear_cost(dense, names)), moments=_ANCHOR["moments"])
        path = work / f"anchor_{budget}.onnx"
        export_onnx(student.eval(), _ANCHOR["sample"], path, verify=False)
        _ANCHOR[key] = (path, result.cost / linear_cost(dense, names))
    path, share = _ANCHOR[key]
    if not int8:
        return path, share
    q = work / f"anchor_{budget}_int8.onnx"
    quantize_int8(path, q)
    return q, share


def add_anchor(budgets: tuple[float, ...] | list[float]) -> None:
    """Put the pruning anchor (float and int8) at each budget into :data:`CONTENDERS`."""
    for b in budgets:
        CONTENDERS[f"prune+lsq {b}"] = lambda work, dense, calib, b=b: anchor_onnx(work, dense, calib, b)
        CONTENDERS[f"prune+lsq {b} + int8"] = lambda work, dense, calib, b=b: anchor_onnx(work, dense, calib, b, True)


def command(args: list[str]) -> tuple[dict, float]:
    """The command as a user types it; its report (None on exit 3) and wall time."""
    cmd = [str(Path(sys.executable).with_name("gblr-compress")), *args, "--quiet"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode == 3:
        return {"exit": 3, "stderr": proc.stderr}, wall
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    out = Path(args[args.index("-o") + 1])
    return json.loads(out.with_name(out.stem + ".report.json").read_text()), wall


def frontier(rows: list[dict]) -> None:
    """Mark rows no other row beats on both speed and mean cosine."""
    for r in rows:
        r["pareto"] = not any(o is not r and o["speedup"] >= r["speedup"] and o["mean_cos"] >= r["mean_cos"]
                              and (o["speedup"] > r["speedup"] or o["mean_cos"] > r["mean_cos"]) for o in rows)


def print_table(rows: list[dict], more: Sequence[str] = ()) -> None:
    """The frontier table; ``more``: other sources whose mean cosine each row also has
    (``r[f"{source} mean cos"]``)."""
    extra = "".join(f" {s} mean cos |" for s in more)
    print(f"| file | Linear cost | news mean cos | min cos | NN agree |{extra} ORT ms | vs dense fp32 | frontier |")
    print("| --- " * (8 + len(more)) + "|")
    for r in sorted(rows, key=lambda r: -r["speedup"]):
        share = "-" if r["share"] is None else f"{r['share']:.3f}"
        cells = "".join(f" {r[f'{s} mean cos']:.3f} |" for s in more)
        print(f"| {r['name']} | {share} | {r['mean_cos']:.3f} | {r['min_cos']:.3f} | {r['nn_agree']:.3f} |{cells} "
              f"{r['ms']:.1f} | {r['speedup']:.2f}x | {'yes' if r['pareto'] else ''} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5])
    ap.add_argument("--target", type=float, default=0.95, help="--target-fidelity run (0: skip it)")
    ap.add_argument("--calib-lines", type=int, default=2000)
    ap.add_argument("--calib-source", choices=["wiki", "suite"], default="wiki",
                    help="calibration text: Wikipedia sentences, or the MiniLM suite's hand-written (templated) ones")
    ap.add_argument("--also-score", nargs="*", choices=["wiki", "wordnet", "suite"], default=[],
                    help="more sources every file is scored on besides news (mean cosine only)")
    ap.add_argument("--eval-lines", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--command-int8", action="store_true",
                    help="also run the command with --quantize int8 at the first budget (one more compress run)")
    ap.add_argument("--anchor-budgets", nargs="*", type=float, default=list(ANCHOR_BUDGETS),
                    help="budgets of the pruning + least-squares anchor (none: leave it out)")
    ap.add_argument("--heldout-source", choices=["none", "wordnet"], default="none",
                    help="give every command --heldout with text from this source (none: the calibration's share)")
    ap.add_argument("--heldout-lines", type=int, default=400)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more arguments for every command")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the files here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    add_anchor(args.anchor_budgets)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        folder, tokenizer, dense, wrapper = pickled_minilm_wrapper(work)
        if args.calib_source == "wiki":
            calib_all, _ = assets.wiki_split()
        else:
            calib_all = calib_sentences("suite", args.calib_lines)
        calib_txt = work / "calib.txt"
        calib_txt.write_text("\n".join(calib_all[: args.calib_lines]) + "\n")
        news = assets.news_sentences()[: args.eval_lines]
        sample = _tokenize(tokenizer, news[:32])  # the timed input: 32 news sentences
        base = [str(wrapper), "--calib-text", str(calib_txt), "--tokenizer", str(folder), *args.extra]
        if args.heldout_source == "wordnet":
            held_txt = work / "heldout.txt"
            held_txt.write_text("\n".join(assets.wordnet_spread(args.heldout_lines)) + "\n")
            base += ["--heldout", str(held_txt)]

        files: dict[str, tuple[Path, float | None]] = {}
        dense_onnx = work / "dense.onnx"
        export_onnx(dense, sample, dense_onnx, verify=False)
        files["dense fp32"] = (dense_onnx, 1.0)
        quantize_int8(dense_onnx, work / "dense_int8.onnx")
        files["dense + int8 (int8 alone)"] = (work / "dense_int8.onnx", 1.0)
        walls: dict[str, float] = {}
        reports: dict[str, dict] = {}
        for b in args.budgets:
            out = work / f"gblr_{b}.onnx"
            reports[f"{b}"], walls[f"budget {b}"] = command([*base, "--budget", str(b), "-o", str(out)])
            share = reports[f"{b}"]["totals"]["achieved"]
            files[f"gblr {b}"] = (out, share)
            quantize_int8(out, work / f"gblr_{b}_int8.onnx")
            files[f"gblr {b} + int8"] = (work / f"gblr_{b}_int8.onnx", share)
        b0 = args.budgets[0]
        if args.command_int8:
            q_out = work / f"gblr_{b0}_cmd_int8.onnx"
            reports["quantize"], walls[f"budget {b0} --quantize int8"] = command(
                [*base, "--budget", str(b0), "--quantize", "int8", "-o", str(q_out)])
            files[f"gblr {b0} --quantize int8 (command)"] = (q_out, reports["quantize"]["totals"]["achieved"])
        if args.target > 0:
            t_out = work / "target.onnx"
            reports["target"], walls[f"--target-fidelity {args.target}"] = command(
                [*base, "--target-fidelity", str(args.target), "-o", str(t_out)])
            if reports["target"].get("exit") != 3:
                files[f"--target-fidelity {args.target} (chosen)"] = (t_out, reports["target"]["totals"]["achieved"])
        for name, build in CONTENDERS.items():
            files[name] = build(work, dense, calib_txt)

        ref = _embeddings_torch(dense, tokenizer, news, True)
        others = {s: eval_set(s, args.eval_lines).sentences for s in args.also_score}
        other_refs = {s: _embeddings_torch(dense, tokenizer, t, True) for s, t in others.items()}
        rows = []
        for name, (path, share) in files.items():
            fid = encoder_fidelity(ref, _embeddings_onnx(path, tokenizer, news, True))
            for s, t in others.items():
                fid[f"{s} mean cos"] = encoder_fidelity(other_refs[s], _embeddings_onnx(path, tokenizer, t, True))[
                    "mean_cos"]
            rows.append({"name": name, "share": share, **fid})
        times = latency({r["name"]: files[r["name"]][0] for r in rows}, sample, "dense fp32", rounds=args.rounds)
        for r in rows:
            r["ms"], r["speedup"] = times[r["name"]].ms, times[r["name"]].speedup
        frontier(rows)

    held_note = ("" if args.heldout_source == "none"
                 else f", --heldout {args.heldout_lines} {args.heldout_source} examples")
    source = "Wikipedia" if args.calib_source == "wiki" else "hand-written (suite)"
    print(f"\nall-MiniLM-L6-v2 wrapper, calibration {len(calib_all[: args.calib_lines])} {source} sentences{held_note}, "
          f"scored on {len(news)} news sentences, timed on 32 x {sample['input_ids'].shape[1]} tokens, "
          f"{args.rounds} rounds\n")
    print_table(rows, args.also_score)
    print("\n| command | wall s |")
    print("| --- | --- |")
    for k, v in walls.items():
        print(f"| {k} | {v:.0f} |")
    default = walls[f"budget {b0}"]
    if args.target > 0:
        t = walls[f"--target-fidelity {args.target}"]
        print(f"\nsearch time / one default run: {t / default:.2f}x")
        rep = reports["target"]
        if rep.get("exit") == 3:
            print("target search: only dense meets the target (exit 3)\n" + rep["stderr"][-3000:])
        else:
            print(f"target search chose: {rep['deploy'].get('choice')}")
            print("| candidate | int8 | distilled | held-out cosine | shift-probe cosine | ORT speedup | chosen |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for c in rep["candidates"]:
                probe = c["fidelity"].get("probe_cosine")
                print(f"| {c['budget']} | {c['int8']} | {c['distilled']} | {c['fidelity'].get('cosine', 0):.4f} | "
                      f"{'-' if probe is None else f'{probe:.4f}'} | {c['speedup']:.2f}x | "
                      f"{'*' if c['chosen'] else ''} |")
    q = reports.get("quantize", reports.get("target", {})).get("deploy", {}).get("quantization")
    if q:
        print(f"\n--quantize int8 graph: {q['integer_kernels']} integer kernels ({q['compressed_integer']} in compressed "
              f"layers), {len(q['left_float'])} MatMul/Gemm left float: "
              + "; ".join(sorted({f['reason'] for f in q['left_float']})))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "walls": walls, "reports": {
            k: {kk: v.get(kk) for kk in ("candidates", "deploy", "quality", "seconds", "exit")} for k, v in reports.items()
        }}, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
