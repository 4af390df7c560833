"""Benchmark compressors on the real all-MiniLM-L6-v2 sentence encoder.

For each budget and each registered contender (``minilm.contenders.CONTENDERS``) this
compresses the 36 encoder Linears at an exact cost, then reports embedding fidelity vs
the dense model on the hand-written eval set (mean/min cosine, paraphrase top-1,
Spearman of pairwise similarities) and ONNX Runtime CPU latency as interleaved
per-round ratios vs dense (batch 8 x seq 128, 2 intra-op threads, no spinning).

Run from the repository root (the ``bench`` extra installed, see benchmarks/README.md)::

    PYTHONPATH=. python benchmarks/minilm_bench.py --budgets 0.5 0.3
    PYTHONPATH=. python benchmarks/minilm_bench.py --quick
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import tempfile
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import torch
from minilm import contenders
from minilm.cli_run import run_cli
from minilm.contenders import BUDGET_FREE, CONTENDERS, PENDING, set_distill_hook
from minilm.data import load_calib, load_eval
from minilm.metrics import fidelity, paired
from minilm.model import embed, encoder_linears, load_dense, make_batches
from minilm.shift import paired_rows as shift_paired_rows
from minilm.shift import render_paired as render_shift_paired
from minilm.shift import render_shift, run_shift
from minilm.sources import SOURCES
from minilm.speed import OrtEncoder, SpeedResult, export_encoder, latency_ratio, make_session, measure_speed, ort_embed
from torch import nn

from benchmarks.common import run_main
from gblr_compress.errors import InputError
from gblr_compress.text import COPY_LENGTH_CHOICES


def encoder_cost(model: nn.Module, names: list[str]) -> int:
    """Exact summed multiply-adds per token of the modules at ``names`` in ``model``.

    A plain Linear costs ``m*n``; a replacement must say its own cost via
    ``exact_cost()`` (LowRankLinear, FrozenGBLR and GBLRLinear all do).
    """
    if isinstance(model, OrtEncoder):  # an ONNX graph: it states its own cost
        return model.linear_cost
    total = 0
    for name in names:
        mod = model.get_submodule(name)
        if hasattr(mod, "exact_cost"):
            total += int(mod.exact_cost())
        elif isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features
        else:
            raise TypeError(f"{name}: {type(mod).__name__} has no exact_cost()")
    return total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3], help="cost ratios B")
    p.add_argument("--contenders", nargs="+", default=None, help="subset of registered contenders")
    p.add_argument("--quick", action="store_true", help="fewer calibration sentences and timing rounds")
    p.add_argument("--no-speed", action="store_true", help="skip ONNX export and timing")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 40, quick 4)")
    p.add_argument("--calib", type=int, default=None, help="calibration sentences (default all, quick 64)")
    p.add_argument("--distill-hook", default=None, help="module:function, (student, dense, calib) -> student")
    p.add_argument("--cli-budgets", type=float, nargs="*", default=[0.5, 0.3],
                   help="budgets at which the gblr-compress command itself is run; there the gblr-calibrated "
                        "row is the command's ONNX file (none: build that row with the library call)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of gblr-compress's init and distillation (gblr and whitened-svd+distill rows)")
    p.add_argument("--attention", choices=("eager", "sdpa"), default="eager",
                   help="attention implementation of the model the library rows start from (the command "
                        "itself always loads the folder with transformers' default, sdpa)")
    p.add_argument("--calib-sources", nargs="+", default=None, choices=SOURCES,
                   help="generalization mode: calibrate on each of these sources in turn and score on every "
                        "--eval-sources one (in-distribution and shifted side by side)")
    p.add_argument("--eval-sources", nargs="+", default=list(SOURCES), choices=SOURCES,
                   help="generalization mode: the scored sources")
    p.add_argument("--eval-size", type=int, default=400, help="generalization mode: sentences per non-suite source")
    p.add_argument("--distilled", nargs="*", default=["gblr-calibrated", "whitened-svd+distill"],
                   help="generalization mode: contenders run only at --distilled-budgets (the slow ones)")
    p.add_argument("--distilled-budgets", type=float, nargs="*", default=[0.5],
                   help="generalization mode: budgets of the --distilled contenders")
    p.add_argument("--no-reorder", action="store_true",
                   help="generalization mode: no reordered copies for the gblr rows (the command's "
                        "--reorder-copies 0; by default they get the copies --calib-text adds)")
    p.add_argument("--no-general-text", action="store_true",
                   help="generalization mode: no general English sentences for the gblr and "
                        "whitened-svd+distill rows (the command's --general-text 0; by default they get the "
                        "command's default count, as --calib-text adds)")
    p.add_argument("--vocab-share", type=float, default=None,
                   help="generalization mode: share of the copies' words drawn from the tokenizer's vocabulary "
                        "(the command's --vocab-share; default: the command's default)")
    p.add_argument("--copy-lengths", choices=COPY_LENGTH_CHOICES, default=None,
                   help="generalization mode: the copies' lengths (the command's --copy-lengths; default: its default)")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this file")
    p.add_argument("--onnx-dir", type=Path, default=None, help="keep the ONNX files here")
    return p.parse_args(argv)


def load_hook(spec: str):
    mod_name, _, fn_name = spec.partition(":")
    if not fn_name:
        raise InputError(f"--distill-hook must be module:function, got {spec!r}")
    return getattr(importlib.import_module(mod_name), fn_name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    contenders.SEED = args.seed
    if args.distill_hook:
        set_distill_hook(load_hook(args.distill_hook))
    names = args.contenders or list(CONTENDERS)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise InputError(f"unknown contender(s) {unknown}; registered: {list(CONTENDERS)}")
    rounds = args.rounds or (4 if args.quick else 40)

    t_start = time.perf_counter()
    dense, tokenizer = load_dense(attention=args.attention)
    if args.calib_sources:
        return shift_main(args, names, dense, tokenizer, t_start)
    evalset = load_eval()
    calib_sentences = load_calib()
    n_calib = args.calib or (64 if args.quick else len(calib_sentences))
    calib = make_batches(tokenizer, calib_sentences[:n_calib], batch_size=32)
    eval_batches = make_batches(tokenizer, evalset.sentences, batch_size=64)
    dense_emb = embed(dense, eval_batches)  # (N, 384)
    lin_names = list(encoder_linears(dense))
    dense_cost = encoder_cost(dense, lin_names)
    print(
        f"all-MiniLM-L6-v2: {len(lin_names)} encoder Linears, dense cost {dense_cost:,} MAC/token; "
        f"eval {len(evalset.sentences)} sentences ({len(evalset.pairs)} paraphrase pairs, "
        f"{len(evalset.negatives)} hard negatives); calib {n_calib} sentences "
        f"({sum(int(b['attention_mask'].sum()) for b in calib)} tokens)"
    )

    rows: list[dict] = []
    negs = [k for _, k in evalset.negatives]
    ref = fidelity(dense_emb, dense_emb, evalset.pairs, negs)
    rows.append({"name": "dense", "budget": 1.0, "cost": dense_cost, **asdict(ref), "build_s": 0.0})
    models: dict[str, nn.Module] = {"dense": dense}
    embs: dict[str, torch.Tensor] = {}
    cli_budgets = list(args.cli_budgets or [])
    runs: dict[float, dict] = {}  # budget -> the command's run

    def command(budget: float) -> dict:
        if budget not in runs:
            print(f"running the gblr-compress command at B={budget} ...", flush=True)
            workdir = Path(tempfile.mkdtemp(prefix="minilm_cli_"))
            run = run_cli(budget, calib, eval_batches, workdir, args.seed)
            run["fidelity"] = fidelity(run["embeddings"], dense_emb, evalset.pairs, negs)
            runs[budget] = run
        return runs[budget]

    command_onnx: dict[str, Path] = {}  # rows whose model is the command's ONNX file
    for budget in args.budgets:
        for name in names:
            key = f"{name}@{budget}"
            if name == COMMAND_ROW and budget in cli_budgets:
                # The CLI path end to end: the row is the file the command wrote, scored
                # in onnxruntime, instead of a second, library-built copy of it.
                run = command(budget)
                emb, cost, build_s, fid = run["embeddings"], run["cost"], run["wall_s"], run["fidelity"]
                command_onnx[key] = run["onnx"]
            else:
                t0 = time.perf_counter()
                student = CONTENDERS[name](dense, calib, budget).eval()
                build_s = time.perf_counter() - t0
                cost = encoder_cost(student, lin_names)
                emb = embed(student, eval_batches)
                fid = fidelity(emb, dense_emb, evalset.pairs, negs)
                models[key] = student
            if cost > budget * dense_cost and name not in BUDGET_FREE:
                raise RuntimeError(f"{name} at B={budget}: cost {cost} exceeds the budget {budget * dense_cost:.0f}")
            embs[key] = emb
            row = {"name": name, "budget": budget, "cost": cost, **asdict(fid), "build_s": build_s}
            if key in command_onnx:
                row["ort_max_err"] = runs[budget]["parity"]["max_abs_diff"]
                row["from_command"] = True
            rows.append(row)
            print(f"  {name} @ B={budget}: mean cos {fid.mean_cos:.3f}, top-1 {fid.top1:.3f} ({build_s:.1f} s)", flush=True)
    for budget in cli_budgets:
        command(budget)

    timings: dict[str, SpeedResult] = {}
    if not args.no_speed:
        onnx_dir = args.onnx_dir or Path(tempfile.mkdtemp(prefix="minilm_onnx_"))
        onnx_dir.mkdir(parents=True, exist_ok=True)
        paths = dict(command_onnx)
        probe = eval_batches[0]
        for key, model in models.items():
            if isinstance(model, OrtEncoder):
                paths[key] = model.onnx_path
            else:
                paths[key] = export_encoder(model, onnx_dir / f"{key.replace('@', '_b')}.onnx")
            # Parity: the exported graph computes what the torch model computes.
            got = ort_embed(make_session(paths[key]), probe["input_ids"], probe["attention_mask"])
            with torch.no_grad():
                want = model(probe["input_ids"], probe["attention_mask"])
            rows_by_key(rows)[key]["ort_max_err"] = float((got - want).abs().max())
        # Models whose compressed layers have the same shapes run the same graph with
        # other numbers (every SVD variant at one budget): time one of each.
        shapes = {key: layer_shapes(model, lin_names) for key, model in models.items()}
        shapes.update({key: ("command", key) for key in command_onnx})
        timed: dict[tuple, str] = {}
        for key, sig in shapes.items():
            timed.setdefault(sig, key)
        print(f"timing {len(timed)} ONNX models ({len(paths) - len(timed)} share another's shapes), "
              f"{rounds} interleaved rounds ...", flush=True)
        speed = measure_speed({k: paths[k] for k in timed.values()}, batch=8, seq=128, rounds=rounds,
                              calls=1 if args.quick else 3)
        for key, sig in shapes.items():
            rep = timed[sig]
            timings[key] = speed[rep]
            rows_by_key(rows)[key].update(asdict(speed[rep]))
            if rep != key:
                rows_by_key(rows)[key]["speed_of"] = rep

    cli_rows = []
    for budget, run in runs.items():
        shown = {k: v for k, v in run.items() if k not in ("embeddings", "onnx", "fidelity")}
        cli_rows.append({"budget": budget, **shown, **asdict(run["fidelity"])})
    versus = paired_rows(embs, timings, dense_emb, evalset.pairs)
    elapsed = time.perf_counter() - t_start
    print()
    print(render_table(rows, dense_cost))
    if versus:
        print()
        print(render_paired_table(versus))
    if cli_rows:
        print()
        print(render_cli_table(cli_rows, dense_cost))
    for slot, why in PENDING.items():
        print(f"  (pending) {slot}: {why}")
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; {date.today()}; total {elapsed:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "attention": args.attention, "rows": rows, "paired": versus, "cli": cli_rows, "pending": PENDING, "elapsed_s": elapsed},
                                        indent=2))
    return 0


def shift_main(args: argparse.Namespace, names: list[str], dense: nn.Module, tokenizer: object,
               t_start: float) -> int:
    """The generalization mode (``--calib-sources``): see :mod:`minilm.shift`."""
    lin_names = list(encoder_linears(dense))
    dense_cost = encoder_cost(dense, lin_names)
    n_calib = args.calib or (64 if args.quick else 256)
    plan = [(n, b) for b in args.budgets for n in names if n not in args.distilled]
    plan += [(n, b) for b in args.distilled_budgets for n in names if n in args.distilled]

    def build(name: str, model: nn.Module, calib: list, budget: float) -> tuple[nn.Module, int]:
        student = CONTENDERS[name](model, calib, budget).eval()
        cost = encoder_cost(student, lin_names)
        if cost > budget * dense_cost and name not in BUDGET_FREE:
            raise RuntimeError(f"{name} at B={budget}: cost {cost} exceeds the budget {budget * dense_cost:.0f}")
        return student, cost

    print(f"all-MiniLM-L6-v2, generalization: calibrate on {args.calib_sources} ({n_calib} sentences each), "
          f"score on {args.eval_sources}; dense cost {dense_cost:,} MAC/token", flush=True)
    rows, embs, dense_emb = run_shift(dense, tokenizer, build, plan, args.calib_sources, args.eval_sources,
                                      n_calib, args.eval_size, log=lambda m: print(m, flush=True),
                                      reorder=not args.no_reorder, vocab_share=args.vocab_share,
                                      copy_lengths=args.copy_lengths, general=not args.no_general_text)
    from minilm.sources import eval_set

    pairs_of = {es: eval_set(es, args.eval_size).pairs for es in args.eval_sources}
    versus = shift_paired_rows(rows, embs, dense_emb, pairs_of)
    elapsed = time.perf_counter() - t_start
    print()
    print(render_shift(rows, dense_cost, args.eval_sources))
    print()
    print(render_shift_paired(versus, args.eval_sources))
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; {date.today()}; total {elapsed:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "calib": n_calib, "rows": rows, "paired": versus,
                                         "elapsed_s": elapsed}, indent=2))
    return 0


def render_cli_table(rows: list[dict], dense_cost: int) -> str:
    """Markdown table of the command-line runs: quality of the ONNX file, wall time per phase."""
    head = ("| command | exact cost (ratio) | mean cos | min cos | top-1 | Spearman | ORT parity | "
            "load / init / distill / recover / export s | wall s |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        sec = r["seconds"]
        phases = " / ".join(f"{sec.get(k, 0.0):.1f}" for k in ("load", "init", "distill", "recover", "export"))
        parity = f"{r['parity']['max_abs_diff']:.1e}" if r.get("parity") else "-"
        lines.append(
            f"| `{r['command']}` | {r['cost']:,} ({r['cost'] / dense_cost:.3f}) | {r['mean_cos']:.3f} | "
            f"{r['min_cos']:.3f} | {r['top1']:.3f} | {r['spearman']:.3f} | {parity} | {phases} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


REFERENCE = "gblr-calibrated"
# The contender whose rows, at the --cli-budgets, are the command's own output.
COMMAND_ROW = "gblr-calibrated"


def paired_rows(
    embs: dict[str, torch.Tensor],
    timings: dict[str, SpeedResult],
    dense_emb: torch.Tensor,
    pairs: list[tuple[int, int]],
) -> list[dict]:
    """gblr-calibrated against every other contender at its budget, on the same
    sentences and queries (:func:`minilm.metrics.paired`), and on latency per round
    where both were timed."""
    out = []
    for key, emb in embs.items():
        name, _, budget = key.partition("@")
        ref = f"{REFERENCE}@{budget}"
        if name == REFERENCE or ref not in embs:
            continue
        row = {"budget": float(budget), "versus": name, **asdict(paired(embs[ref], emb, dense_emb, pairs))}
        if ref in timings and key in timings:
            row["latency"] = latency_ratio(timings[ref], timings[key])
        out.append(row)
    return out


def render_paired_table(rows: list[dict]) -> str:
    """Markdown table of :func:`paired_rows`."""
    head = (f"| budget | {REFERENCE} vs | mean cos diff [95% CI] | top-1 diff | queries only {REFERENCE} / "
            "only the other gets right | McNemar p | latency ratio, median [min, max] |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        lo, hi = r["ci_mean_cos"]
        lat = "-"
        if "latency" in r:
            med, lat_lo, lat_hi = r["latency"]
            lat = f"{med:.2f}x [{lat_lo:.2f}, {lat_hi:.2f}]"
        lines.append(
            f"| {r['budget']:g} | {r['versus']} | {r['d_mean_cos']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
            f"{r['d_top1']:+.3f} | {r['a_only']} / {r['b_only']} | {r['p_top1']:.2g} | {lat} |"
        )
    return "\n".join(lines)


def layer_shapes(model: nn.Module, names: list[str]) -> tuple:
    """What fixes the exported graph of the compressed layers: module types and the
    shapes (and, for GBLR layers, the windows) of everything they hold."""
    if isinstance(model, OrtEncoder):
        return ("onnx", str(model.onnx_path))
    sig = []
    for name in names:
        mod = model.get_submodule(name)
        tensors = tuple((k, tuple(v.shape)) for k, v in mod.state_dict().items())
        windows = tuple(b.window_key() for b in mod.structure().blocks) if hasattr(mod, "structure") else ()
        sig.append((type(mod).__name__, tensors, windows))
    return tuple(sig)


def rows_by_key(rows: list[dict]) -> dict[str, dict]:
    return {("dense" if r["name"] == "dense" else f"{r['name']}@{r['budget']}"): r for r in rows}


def render_table(rows: list[dict], dense_cost: int) -> str:
    """Markdown table: one line per (contender, budget), dense first."""
    head = "| contender | budget | exact cost (ratio) | mean cos | min cos | top-1 | top-1 w/o hard neg | Spearman | ORT speedup vs dense [min, max] | ORT err |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        speed = (
            f"{r['speedup']:.2f}x [{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}]" if "speedup" in r else "-"
        )
        if "speed_of" in r:
            speed = f"= {r['speed_of'].split('@')[0]}"
        err = f"{r['ort_max_err']:.1e}" if "ort_max_err" in r else "-"
        name = f"{r['name']} (command)" if r.get("from_command") else r["name"]
        lines.append(
            f"| {name} | {r['budget']:g} | {r['cost']:,} ({r['cost'] / dense_cost:.3f}) | "
            f"{r['mean_cos']:.3f} | {r['min_cos']:.3f} | {r['top1']:.3f} | {r['top1_no_neg']:.3f} | {r['spearman']:.3f} | {speed} | {err} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
