"""Speed of exported GBLR layers in onnxruntime (CPU) against dense and truncated SVD.

Run from the repository root:

    python -m benchmarks.export_bench            # both parts, a few minutes on 2 cores
    python -m benchmarks.export_bench --part layer --rounds 15

Every figure is a ratio measured in this run: variants run interleaved in rounds (each
round times every variant once, ``--reps`` calls each), a round gives one ratio per
variant, and the table shows the median of the per-round ratios. ORT: CPU provider,
2 intra-op threads, spinning disabled. Targets (issue 5):

* single layer, budget 0.3, 1024 tokens: 4 windowed blocks (about half the rows and
  columns) >= 2x faster than the dense MatMul; full-row blocks with column windows
  (what training tends to learn) >= 2.5x;
* BERT-small (36 Linears, all compressed at 0.3), batch 8 x seq 128: GBLR latency
  <= 1.1x that of equal-cost truncated-SVD layers (which run ~1.9x faster than dense).
  Checked on the structure the default settings learn (``--learned F`` with F from
  ``benchmarks/distill_bench.py --save F``) and, as a stress case, on 4 random windows
  in every layer (``gblr-random``; 1.3x here: many windows per layer stay slower).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from gblr_compress.export import export_onnx
from gblr_compress.layer import FrozenGBLR
from gblr_compress.structure import Block, LayerStructure
from samples.models import bert_small

BUDGET = 0.3


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def interleaved_ratios(
    runners: dict[str, callable], baseline: str, rounds: int, reps: int
) -> dict[str, float]:
    """Median over rounds of ``time(baseline) / time(variant)`` (higher = faster)."""
    for run in runners.values():  # warm-up: allocations, thread pool
        for _ in range(3):
            run()
    per_round: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        times = {}
        for name, run in runners.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                run()
            times[name] = time.perf_counter() - t0
        for name in runners:
            per_round[name].append(times[baseline] / times[name])
    return {k: statistics.median(v) for k, v in per_round.items()}


def _block(m: int, n: int, rows, cols, r: int, gen) -> Block:
    return Block(
        rows[0], rows[1], cols[0], cols[1],
        torch.randn(rows[1], r, generator=gen) * 0.05, torch.randn(r, cols[1], generator=gen) * 0.05,
    )


def windowed(m: int, n: int, gen) -> LayerStructure:
    """4 blocks, each about half the rows and half the columns, spread (one wraps)."""
    rw, cw = m // 2, n // 2
    r = int(BUDGET * m * n) // (4 * (rw + cw))
    blocks = [_block(m, n, ((k * m) // 4 + m // 8 * (k == 3), rw), ((k * n) // 4, cw), r, gen) for k in range(4)]
    return LayerStructure(n, m, blocks, torch.zeros(m))


def full_rows(m: int, n: int, gen) -> LayerStructure:
    """4 blocks spanning all output rows, each reading a column window (half width)."""
    cw = n // 2
    r = int(BUDGET * m * n) // (4 * (m + cw))
    blocks = [_block(m, n, (0, m), ((k * n) // 4, cw), r, gen) for k in range(4)]
    return LayerStructure(n, m, blocks, torch.zeros(m))


def svd_like(m: int, n: int, gen) -> LayerStructure:
    """One full-width block: the truncated SVD at the same cost."""
    r = int(BUDGET * m * n) // (m + n)
    return LayerStructure(n, m, [_block(m, n, (0, m), (0, n), r, gen)], torch.zeros(m))


def random_windows(m: int, n: int, gen, K: int = 4) -> LayerStructure:
    """``K`` blocks with random windows (widths 1/4..1 of each axis), equal rank, at budget."""
    rws = torch.randint(m // 4, m + 1, (K,), generator=gen).tolist()
    cws = torch.randint(n // 4, n + 1, (K,), generator=gen).tolist()
    rs = torch.randint(0, m, (K,), generator=gen).tolist()
    cs = torch.randint(0, n, (K,), generator=gen).tolist()
    r = max(1, int(BUDGET * m * n) // sum(a + b for a, b in zip(rws, cws)))
    blocks = [_block(m, n, (rs[k], rws[k]), (cs[k], cws[k]), r, gen) for k in range(K)]
    return LayerStructure(n, m, blocks, torch.zeros(m))


def export(model: nn.Module, x, path: Path, form: str = "auto"):
    return export_onnx(model.eval(), x, path, form=form, verify=True)


def bench_layers(tmp: Path, rounds: int, reps: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    ok = True
    print(f"\nSingle layer, budget {BUDGET}, 1024 tokens (8 x 128); speed-up over dense (median of per-round ratios)")
    print(f"{'shape (in x out)':>17} {'variant':>12} {'form':>9} {'cost/dense':>10} {'speed-up':>9} {'target':>7}")
    for n, m in [(384, 1536), (1536, 384)]:
        x = torch.randn(8, 128, n)
        feed = {"input_0": x.numpy()}
        dense = nn.Linear(n, m)
        export(dense, x, tmp / "dense.onnx", form="auto")
        variants = {"dense": (None, "dense", 1.0)}
        sessions = {"dense": session(tmp / "dense.onnx")}
        specs = {"windowed": windowed(m, n, gen), "full-row": full_rows(m, n, gen), "svd": svd_like(m, n, gen)}
        for name, s in specs.items():
            res = export(nn.Sequential(FrozenGBLR(s)), x, tmp / f"{name}.onnx")
            sessions[name] = session(tmp / f"{name}.onnx")
            variants[name] = (s, res.layers[0].form, s.cost / s.dense_cost)
            for form in ("segments", "grid", "vpad", "lowrank"):
                if form == res.layers[0].form:
                    continue
                key = f"{name}:{form}"
                export(nn.Sequential(FrozenGBLR(s)), x, tmp / f"{key}.onnx", form=form)
                sessions[key] = session(tmp / f"{key}.onnx")
                variants[key] = (s, form, s.cost / s.dense_cost)
        runners = {k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()}
        ratios = interleaved_ratios(runners, "dense", rounds, reps)
        targets = {"windowed": 2.0, "full-row": 2.5}
        for key, (_s, form, frac) in variants.items():
            if key == "dense":
                continue
            tgt = targets.get(key)
            mark = "" if tgt is None else (f">={tgt:.1f}" + (" ok" if ratios[key] >= tgt else " MISS"))
            if tgt is not None and ratios[key] < tgt:
                ok = False
            label = key if ":" not in key else "  " + key.split(":")[0] + " (forced)"
            print(f"{f'{n} x {m}':>17} {label:>12} {form:>9} {frac:>10.3f} {ratios[key]:>8.2f}x {mark:>7}")
    return ok


def compress_bert(structure_fn, gen) -> nn.Module:
    torch.manual_seed(0)
    model = bert_small().eval()
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                s = structure_fn(child.out_features, child.in_features, gen)
                s.bias = child.bias.detach().clone()
                s.name = f"{name}.{cname}"
                setattr(mod, cname, FrozenGBLR(s))
    return model


def bench_bert(tmp: Path, rounds: int, reps: int, learned: Path | None = None) -> bool:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8000, (8, 128), generator=gen)
    mask = torch.ones(8, 128, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": mask}
    feed = {k: v.numpy() for k, v in inputs.items()}
    torch.manual_seed(0)
    models = {
        "dense": bert_small().eval(),
        "svd": compress_bert(svd_like, gen),
        "gblr-random": compress_bert(random_windows, gen),
        "gblr-windowed": compress_bert(windowed, gen),
        "gblr-full-row": compress_bert(full_rows, gen),
    }
    if learned is not None:
        # Written by benchmarks/distill_bench.py --save: the structure the default settings
        # learn on bert_small (a pickled module; only load files you wrote yourself).
        models["gblr-learned"] = torch.load(learned, weights_only=False).eval()
    sessions, forms, costs = {}, {}, {}
    for name, model in models.items():
        res = export(model, inputs, tmp / f"bert-{name}.onnx")
        sessions[name] = session(tmp / f"bert-{name}.onnx")
        forms[name] = ",".join(f"{f}:{sum(l.form == f for l in res.layers)}" for f in ("segments", "grid", "vpad", "lowrank")) if res.layers else "-"
        costs[name] = (
            sum(l.exact_cost for l in res.layers) / sum(l.dense_cost for l in res.layers) if res.layers else 1.0
        )
    runners = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
    ratios = interleaved_ratios(runners, "dense", rounds, reps)
    print("\nBERT-small (36 Linears), batch 8 x seq 128; latency relative to the SVD model (median of per-round ratios)")
    print(f"{'model':>14} {'cost/dense':>10} {'forms (count)':>34} {'vs dense':>9} {'latency/svd':>11}")
    ok = True
    for name in models:
        lat = ratios["svd"] / ratios[name]  # time(name) / time(svd)
        mark = ""
        if name == "gblr-learned":  # issue 5's target: what the default settings learn
            mark = " <=1.10 " + ("ok" if lat <= 1.1 else "MISS")
            ok = ok and lat <= 1.1
        elif name.startswith("gblr-"):
            mark = " (stress case, no target)"
        print(f"{name:>14} {costs[name]:>10.3f} {forms[name]:>34} {ratios[name]:>8.2f}x {lat:>11.2f}{mark}")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["layer", "bert", "all"], default="all")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--learned", type=Path, default=None,
                   help="frozen bert_small from distill_bench.py --save, timed as gblr-learned")
    args = p.parse_args()
    torch.set_num_threads(2)
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("layer", "all"):
            ok &= bench_layers(Path(tmp), args.rounds, args.reps)
        if args.part in ("bert", "all"):
            ok &= bench_bert(Path(tmp), args.rounds, max(1, args.reps // 5), args.learned)
    unchecked = args.part in ("bert", "all") and args.learned is None
    if unchecked:
        print("\n(the BERT-small latency target applies to a learned structure: pass --learned F)")
    verdict = "all targets met" if ok else "some targets missed"
    print(f"\n{verdict}{' (BERT-small target not checked)' if unchecked else ''}")


if __name__ == "__main__":
    main()
