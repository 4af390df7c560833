"""Generalization: calibrate on one text source, score on every source.

Every contender is built once per (calibration source, budget) and its embeddings are
scored against the dense model's on each eval source (:mod:`minilm.sources`). A figure
is *in-distribution* where the eval source is the calibration source (disjoint
sentences) and *shifted* elsewhere; the issue's decisions are taken on the shifted ones.

Retrieval: paraphrase top-1 on the suite's pairs, nearest-neighbour agreement with the
dense model elsewhere (:func:`minilm.metrics.nn_hits`). Paired comparisons of the
reference gblr row against each contender give McNemar p on those hits and a 95%
paired-bootstrap interval of the mean-cosine difference.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from .contenders import set_training_texts
from .metrics import fidelity, paired
from .model import Batch, embed, make_batches
from .sources import calib_sentences, eval_set

__all__ = ["Scored", "render_paired", "render_shift", "run_shift", "shifted_means"]

# The gblr rows a contender is compared with, best first: the first present at a budget.
REFERENCES = ("gblr-calibrated", "gblr-init")

Scored = dict  # {"contender", "budget", "calib", "cost", "build_s", "by_eval": {source: Fidelity dict}}


def run_shift(
    dense: nn.Module,
    tokenizer: object,
    build: Callable[[str, nn.Module, list[Batch], float], tuple[nn.Module, int]],
    plan: list[tuple[str, float]],
    calib_sources: list[str],
    eval_sources: list[str],
    n_calib: int,
    eval_size: int = 400,
    log: Callable[[str], None] = print,
    reorder: bool = True,
    vocab_share: float | None = None,
    copy_lengths: str | None = None,
    general: bool = True,
) -> tuple[list[Scored], dict[tuple, torch.Tensor], dict[str, torch.Tensor]]:
    """Build and score every ``(contender, budget)`` of ``plan`` per calibration source.

    Args:
        dense: the dense encoder (not modified).
        tokenizer: its tokenizer.
        build: ``(contender name, dense, calib batches, budget) -> (model, exact cost)``.
        plan: the ``(contender, budget)`` pairs to run.
        calib_sources / eval_sources: names from :data:`minilm.sources.SOURCES`.
        n_calib: calibration sentences per source.
        eval_size: scored sentences per non-suite source.
        reorder: the gblr rows also train on the command's default reordered copies of
            the training sentences (``--calib-text`` does; ``--reorder-copies 0`` not).
        vocab_share: the share of the copies' words drawn from the tokenizer's vocabulary
            (``--vocab-share``; None: the command's default).
        copy_lengths: the copies' lengths (``--copy-lengths``; None: the command's default).
        general: the gblr rows (and ``whitened-svd+distill``'s) also train
            on the command's default count of the package's general English sentences
            (``--general-text``; WordNet usage examples, none of them among the
            ``wordnet`` source's scored sentences, but from that source).

    Returns:
        ``(rows, embeddings keyed (calib, contender, budget, eval), dense embeddings per
        eval source)``.
    """
    evals = {es: eval_set(es, eval_size) for es in eval_sources}
    batches = {es: make_batches(tokenizer, ev.sentences, batch_size=64) for es, ev in evals.items()}
    dense_emb = {es: embed(dense, b) for es, b in batches.items()}
    rows: list[Scored] = []
    embs: dict[tuple, torch.Tensor] = {}
    for cs in calib_sources:
        sentences = calib_sentences(cs, n_calib, eval_size)
        calib = make_batches(tokenizer, sentences, batch_size=32)
        copies, added = set_training_texts(calib, sentences, tokenizer, vocab_share, copy_lengths, general, reorder)
        log(f"calibration source {cs}: {len(sentences)} sentences, "
            f"{sum(int(b['attention_mask'].sum()) for b in calib):,} tokens, "
            f"{copies} reordered copies and {added} general English sentences for the gblr rows"
            + (f" (vocabulary share {vocab_share})" if copies and vocab_share is not None else "")
            + (f" ({copy_lengths} lengths)" if copies and copy_lengths is not None else ""))
        for name, budget in plan:
            t0 = time.perf_counter()
            model, cost = build(name, dense, calib, budget)
            build_s = time.perf_counter() - t0
            by_eval = {}
            for es, ev in evals.items():
                emb = embed(model, batches[es])
                embs[(cs, name, budget, es)] = emb
                negs = [k for _, k in ev.negatives]
                by_eval[es] = asdict(fidelity(emb, dense_emb[es], ev.pairs, negs))
            rows.append({"contender": name, "budget": budget, "calib": cs, "cost": cost, "build_s": build_s,
                         "by_eval": by_eval})
            shown = ", ".join(f"{es} {f['mean_cos']:.3f}" for es, f in by_eval.items())
            log(f"  [{cs}] {name} @ B={budget}: mean cos {shown} ({build_s:.1f} s)")
    return rows, embs, dense_emb


def shifted_means(row: Scored) -> tuple[float, float]:
    """(in-distribution mean cos, mean over the shifted eval sources) of one row
    (NaN where the row has none)."""
    ind = [f["mean_cos"] for es, f in row["by_eval"].items() if es == row["calib"]]
    out = [f["mean_cos"] for es, f in row["by_eval"].items() if es != row["calib"]]
    nan = float("nan")
    return (ind[0] if ind else nan), (sum(out) / len(out) if out else nan)


def render_shift(rows: list[Scored], dense_cost: int, eval_sources: list[str]) -> str:
    """Markdown: one line per (contender, budget, calibration source); per eval source
    ``mean / min cos, retrieval``, the in-distribution cell in bold."""
    head = ("| contender | budget | calib | exact cost (ratio) | "
            + " | ".join(f"{es}: mean / min cos, retr." for es in eval_sources)
            + " | in-dist. mean cos | shifted mean cos | build s |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (-r["budget"], r["calib"], r["contender"])):
        cells = []
        for es in eval_sources:
            f = r["by_eval"][es]
            cell = f"{f['mean_cos']:.3f} / {f['min_cos']:.3f}, {f['top1']:.3f}"
            cells.append(f"**{cell}**" if es == r["calib"] else cell)
        ind, out = shifted_means(r)
        lines.append(f"| {r['contender']} | {r['budget']:g} | {r['calib']} | {r['cost']:,} "
                     f"({r['cost'] / dense_cost:.3f}) | " + " | ".join(cells)
                     + f" | {ind:.3f} | {out:.3f} | {r['build_s']:.0f} |")
    return "\n".join(lines)


def paired_rows(
    rows: list[Scored], embs: dict[tuple, torch.Tensor], dense_emb: dict[str, torch.Tensor],
    pairs_of: dict[str, list[tuple[int, int]]],
) -> list[dict]:
    """The reference gblr row (:data:`REFERENCES`) against every other row at its
    budget and calibration source, per eval source (:func:`minilm.metrics.paired`)."""
    out = []
    present = {(r["calib"], r["contender"], r["budget"]) for r in rows}
    for r in rows:
        cs, name, budget = r["calib"], r["contender"], r["budget"]
        ref = next((x for x in REFERENCES if (cs, x, budget) in present), None)
        if ref is None or ref == name:
            continue
        per = {}
        for es in dense_emb:
            p = paired(embs[(cs, ref, budget, es)], embs[(cs, name, budget, es)], dense_emb[es], pairs_of[es])
            per[es] = asdict(p)
        out.append({"calib": cs, "budget": budget, "reference": ref, "versus": name, "by_eval": per})
    return out


def render_paired(rows: list[dict], eval_sources: list[str]) -> str:
    """Markdown of :func:`paired_rows`: per eval source, mean-cos difference [95% CI]
    and the retrieval queries only the reference / only the other gets right (McNemar p)."""
    head = ("| budget | calib | reference vs | "
            + " | ".join(f"{es}: d mean cos [95% CI]; only ref / only other (p)" for es in eval_sources) + " |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (-r["budget"], r["calib"], r["versus"])):
        cells = []
        for es in eval_sources:
            p = r["by_eval"][es]
            lo, hi = p["ci_mean_cos"]
            cell = f"{p['d_mean_cos']:+.3f} [{lo:+.3f}, {hi:+.3f}]; {p['a_only']} / {p['b_only']} ({p['p_top1']:.2g})"
            cells.append(f"**{cell}**" if es == r["calib"] else cell)
        lines.append(f"| {r['budget']:g} | {r['calib']} | {r['reference']} vs {r['versus']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
