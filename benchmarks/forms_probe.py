"""Two structured forms measured before building them (issue 16, item 2), on all-MiniLM-L6-v2.

Both are compared at equal exact cost with what the init already builds, on held-out
text from another source than the calibration's, with the real nonlinearities:

1. **FFN: pruned window plus a low-rank residual** vs a pruned window alone. The
   residual form keeps ``k - t`` units dense and approximates the ``h - k + t`` dropped
   units through a rank-``r`` producer (activation-whitened SVD of their rows of
   ``W1``, their activation applied as in the model) and a rank-``r`` consumer block
   (reduced-rank regression of the teacher's output on the student's own dropped
   units, after the kept units' least-squares part); the ``t`` units' cost pays for
   both ranks: ``t (n + m) = 2 r (n + h - k + t)``. The pruned window alone keeps
   ``k`` units, its consumer refit by least squares on the same student inputs. Units
   are ordered by the library's OBS elimination (``obs_order``). Score: relative error
   of the FFN's output on held-out tokens.
2. **Attention: per-head rank instead of whole heads.** Whole heads: the library's
   ``prune_group`` (OBS order over heads, ridge refit of the output projection, mean
   folded). Per-head rank: each head's query/key bilinear form ``[W_q b_q]^T [W_k b_k]``
   truncated by a whitened SVD (the layer input's moment), each head's value/output
   pair by reduced-rank regression on the output projection's input moment, the
   output projection then refit by least squares; ranks are either ``k`` per head
   (the form an export could shrink uniformly) or chosen globally by singular value
   (``glob``, the same total). Equal cost: ``heads`` whole heads vs ``32 heads / 12``
   dims per head. Score: relative error of the attention output on held-out tokens,
   and (``--model-level``) the sentence-embedding cosine vs dense with every layer's
   attention compressed that way and the FFNs dense.

Command (``--calib-source wiki --eval-source news`` are the defaults)::

    PYTHONPATH=. python benchmarks/forms_probe.py
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F

from benchmarks import assets
from benchmarks.common import run_main
from benchmarks.minilm.sources import SOURCES, calib_sentences, eval_set
from gblr_compress.init.prune import obs_order, prune_group

_F64 = torch.float64
Batches = list[tuple[torch.Tensor, torch.Tensor]]  # (hidden (B, T, n) float64, mask (B, T) bool)


def _rel(y: torch.Tensor, t: torch.Tensor) -> float:
    """Relative error ``||y - t|| / ||t||``."""
    return math.sqrt(float(((y - t) ** 2).sum()) / float((t**2).sum()))


def _ones(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a column of ones (the bias) appended."""
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def _sqrt_pair(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C^1/2, C^-1/2)`` of a symmetric PSD matrix, small eigenvalues floored."""
    e, V = torch.linalg.eigh(C)
    e = e.clamp_min(float(e.max()) * 1e-10)
    return V @ torch.diag(e.sqrt()) @ V.T, V @ torch.diag(e.rsqrt()) @ V.T


def _lstsq(Z: torch.Tensor, T: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """``(p, m)`` least-squares map ``Z -> T`` with a small ridge (a fraction of the
    moment's mean diagonal)."""
    A = Z.T @ Z / len(Z)
    A = A + ridge * float(A.diagonal().mean()) * torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve(A, Z.T @ T / len(Z))


class MiniLM:
    """The dense model, its tokenizer, and captures of a layer's inputs."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = assets.minilm_dir()
        self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()

    def _batches(self, texts: Sequence[str]):
        for i in range(0, len(texts), 32):
            yield self.tok(list(texts[i : i + 32]), padding=True, truncation=True, max_length=128, return_tensors="pt")

    def capture(self, module: torch.nn.Module, texts: Sequence[str], output: bool = False) -> Batches:
        """``module``'s input (or output) per batch of ``texts``, with the batch's mask."""
        got: list[torch.Tensor] = []

        def pre(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            got.append((args[0] if args else kwargs["hidden_states"]).detach().to(_F64))

        def post(_m: torch.nn.Module, _a: tuple, out: torch.Tensor) -> None:
            got.append(out.detach().to(_F64))

        hook = module.register_forward_hook(post) if output else module.register_forward_pre_hook(pre, with_kwargs=True)
        masks = []
        try:
            with torch.no_grad():
                for b in self._batches(texts):
                    self.model(**b)
                    masks.append(b["attention_mask"].bool())
        finally:
            hook.remove()
        return list(zip(got, masks, strict=True))

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled, normalized sentence embeddings (the sentence-transformers head)."""
        out = []
        with torch.no_grad():
            for b in self._batches(texts):
                h = self.model(**b).last_hidden_state
                m = b["attention_mask"][..., None].float()
                out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out)


def _tokens(batches: Batches) -> torch.Tensor:
    """Real tokens of captured batches, ``(N, n)``."""
    return torch.cat([x[m] for x, m in batches])


def _pruned_error(Hc: torch.Tensor, Hh: torch.Tensor, Tc: torch.Tensor, Th: torch.Tensor, S: torch.Tensor) -> float:
    """Held-out error of the FFN output from units ``S`` alone, consumer refit on ``Hc``."""
    A = _lstsq(_ones(Hc[:, S]), Tc)
    return _rel(_ones(Hh[:, S]) @ A, Th)


def _residual_error(Gc: torch.Tensor, Gh: torch.Tensor, Tc: torch.Tensor, Th: torch.Tensor, kk: int, r: int) -> float:
    """Held-out error of the FFN output from the student's units ``G`` (``kk`` kept, the
    rest through the low-rank producer): the kept units' least-squares part plus a
    rank-``r`` map of the dropped units (reduced-rank regression on what the kept units
    do not explain), fit on the calibration tokens."""
    Zc, Rd = _ones(Gc[:, :kk]), Gc[:, kk:]
    Rres = Rd - Zc @ torch.linalg.lstsq(Zc, Rd).solution  # dropped units beyond the kept ones
    Tres = Tc - Zc @ torch.linalg.lstsq(Zc, Tc).solution
    B = _lstsq(Rres, Tres, 1e-6)  # (d, m), full rank; the reduced-rank regression keeps its top r
    _, _, V2t = torch.linalg.svd(Rres @ B, full_matrices=False)
    Br = B @ V2t[:r].T @ V2t[:r]
    A = torch.linalg.lstsq(Zc, Tc - Rd @ Br).solution
    return _rel(_ones(Gh[:, :kk]) @ A + Gh[:, kk:] @ Br, Th)


def ffn_rows(lm: MiniLM, calib: Sequence[str], held: Sequence[str], layers: Sequence[int],
             units_kept: Sequence[int], trades: Sequence[int]) -> list[list[str]]:
    """Table rows of probe 1: per layer and kept-unit count, the pruned window's error and
    the residual form's for each number of units traded for ranks."""
    rows = []
    for li in layers:
        layer = lm.model.encoder.layer[li]
        W1, b1 = layer.intermediate.dense.weight.detach().to(_F64), layer.intermediate.dense.bias.detach().to(_F64)
        W2, b2 = layer.output.dense.weight.detach().to(_F64), layer.output.dense.bias.detach().to(_F64)
        h, n = W1.shape
        m = W2.shape[0]
        Xc = _tokens(lm.capture(layer.intermediate.dense, calib))
        Xh = _tokens(lm.capture(layer.intermediate.dense, held))
        act = layer.intermediate.intermediate_act_fn
        Hc, Hh = act(Xc @ W1.T + b1), act(Xh @ W1.T + b1)
        Tc, Th = Hc @ W2.T + b2, Hh @ W2.T + b2
        Cx = Xc.T @ Xc / len(Xc)
        L, Li = _sqrt_pair(Cx + 1e-2 * float(Cx.diagonal().mean()) * torch.eye(n, dtype=_F64))
        Hc1 = _ones(Hc)
        C = Hc1.T @ Hc1 / len(Hc1)
        for k in units_kept:
            order = obs_order(W2, C[:h, :h], k, 1, 0.1)
            row = [str(li), str(k), f"{_pruned_error(Hc, Hh, Tc, Th, order[:k]):.4f}"]
            for t in trades:
                kk = k - t
                S, Dr = order[:kk], order[kk:]
                r = max(1, (t * (n + m)) // (2 * (n + h - kk)))
                U, s, Vt = torch.linalg.svd(W1[Dr] @ L, full_matrices=False)
                W1D = (U[:, :r] * s[:r]) @ Vt[:r] @ Li
                Gc = torch.cat([act(Xc @ W1[S].T + b1[S]), act(Xc @ W1D.T + b1[Dr])], 1)
                Gh = torch.cat([act(Xh @ W1[S].T + b1[S]), act(Xh @ W1D.T + b1[Dr])], 1)
                err = _residual_error(Gc, Gh, Tc, Th, kk, r)
                row += [f"{err:.4f} (r {r}; {_pruned_error(Hc, Hh, Tc, Th, S):.4f})"]
            rows.append(row)
            print(" | ".join(row), file=sys.stderr, flush=True)
    return rows


def _attention(batches: Batches, P: Sequence[torch.Tensor], heads: int, want_ctx: bool = False):
    """The attention output (before the residual) on real tokens, from the layer input
    and weights ``P = (Wq, bq, Wk, bk, Wv, bv, Wo, bo)``; with ``want_ctx`` also the
    output projection's input."""
    Wq, bq, Wk, bk, Wv, bv, Wo, bo = P
    dh = Wq.shape[0] // heads
    ys, cs = [], []
    for X, m in batches:
        B, T, _ = X.shape
        q, k, v = ((X @ W.T + b).view(B, T, heads, -1).transpose(1, 2) for W, b in ((Wq, bq), (Wk, bk), (Wv, bv)))
        s = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(~m[:, None, None, :], -1e9)
        ctx = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        ys.append((ctx @ Wo.T + bo)[m])
        cs.append(ctx[m])
    return (torch.cat(ys), torch.cat(cs)) if want_ctx else torch.cat(ys)


def _head_forms(cal: Batches, P: Sequence[torch.Tensor], heads: int, kept: int) -> dict[str, list[torch.Tensor]]:
    """The attention weights of each form at the cost of ``kept`` whole heads."""
    Wq, bq, Wk, bk, Wv, bv, Wo, bo = P
    dh = Wq.shape[0] // heads
    _, ctx = _attention(cal, P, heads, want_ctx=True)
    Cc, mu = ctx.T @ ctx / len(ctx), ctx.mean(0)
    Ccen = Cc - torch.outer(mu, mu)
    X1 = _ones(_tokens(cal))
    Cx = X1.T @ X1 / len(X1)
    Lx, Lxi = _sqrt_pair(Cx + 1e-6 * float(Cx.diagonal().mean()) * torch.eye(Cx.shape[0], dtype=_F64))
    out: dict[str, list[torch.Tensor]] = {}
    pg = prune_group(Wo, Cc, kept, 1, None, 0.1, unit_size=dh, mu_fit=mu)
    cols = torch.cat([torch.arange(u * dh, (u + 1) * dh) for u in pg.keep.tolist()])
    Wo2 = torch.zeros_like(Wo)
    Wo2[:, cols] = pg.consumer_weight
    out["heads"] = [Wq, bq, Wk, bk, Wv, bv, Wo2, bo + pg.bias_shift]
    qk, vo = [], []  # per head: (U, s, Vt) of the whitened QK form; (Vt, Li) of the VO regression
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        Mq = torch.cat([Wq[sl], bq[sl, None]], 1) @ Lx
        Mk = torch.cat([Wk[sl], bk[sl, None]], 1) @ Lx
        qk.append(torch.linalg.svd(Mq.T @ Mk, full_matrices=False))
        Ch = Ccen[sl, sl]
        L, Li = _sqrt_pair(Ch + 1e-8 * float(Ch.diagonal().mean()) * torch.eye(dh, dtype=_F64))
        _, s2, V2t = torch.linalg.svd(Wo[:, sl] @ L, full_matrices=False)
        vo.append((s2, V2t, Li))
    k = round(dh * kept / heads)
    glob_qk = sorted(((float(v), h) for h in range(heads) for v in qk[h][1][:dh]), reverse=True)[: heads * k]
    glob_vo = sorted(((float(v), h) for h in range(heads) for v in vo[h][0]), reverse=True)[: heads * k]
    ranks = {"uniform": ([k] * heads, [k] * heads),
             "glob": ([sum(1 for _, g in glob_qk if g == h) for h in range(heads)],
                      [sum(1 for _, g in glob_vo if g == h) for h in range(heads)])}
    n = Wq.shape[1]
    for name, (kq, kv) in ranks.items():
        nq, nk, nv = torch.zeros_like(Wq), torch.zeros_like(Wk), torch.zeros_like(Wv)
        nbq, nbk, nbv = torch.zeros_like(bq), torch.zeros_like(bk), torch.zeros_like(bv)
        R = torch.zeros(Wo.shape[1], Wo.shape[1], dtype=_F64)  # ctx -> reduced ctx, zero-padded per head
        for h in range(heads):
            base = h * dh
            U, s, Vt = qk[h]
            a = (U[:, : kq[h]] * s[: kq[h]].sqrt()).T @ Lxi  # (kq, n + 1): new query rows and bias
            b = (Vt[: kq[h]].T * s[: kq[h]].sqrt()).T @ Lxi
            nq[base : base + kq[h]], nbq[base : base + kq[h]] = a[:, :n], a[:, n]
            nk[base : base + kq[h]], nbk[base : base + kq[h]] = b[:, :n], b[:, n]
            _, V2t, Li = vo[h]
            Rh = V2t[: kv[h]] @ Li  # (kv, dh)
            sl = slice(base, base + dh)
            nv[base : base + kv[h]], nbv[base : base + kv[h]] = Rh @ Wv[sl], Rh @ bv[sl]
            R[base : base + kv[h], sl] = Rh
        Crr = R @ Ccen @ R.T
        live = torch.nonzero(Crr.diagonal() > 0).reshape(-1)
        A = Crr[live][:, live]
        A = A + 1e-3 * float(A.diagonal().mean()) * torch.eye(len(live), dtype=_F64)
        Wor = torch.zeros_like(Wo)
        Wor[:, live] = torch.linalg.solve(A, (Wo @ Ccen @ R.T[:, live]).T).T
        out[name] = [nq, nbq, nk, nbk, nv, nbv, Wor, bo + Wo @ mu - Wor @ (R @ mu)]
    return out


def _attention_params(layer: torch.nn.Module) -> tuple[list[torch.nn.Linear], list[torch.Tensor]]:
    sa, so = layer.attention.self, layer.attention.output.dense
    lins = [sa.query, sa.key, sa.value, so]
    return lins, [t.detach().to(_F64) for lin in lins for t in (lin.weight, lin.bias)]


def attention_rows(lm: MiniLM, calib: Sequence[str], held: Sequence[str], layers: Sequence[int],
                   kept_heads: Sequence[int]) -> list[list[str]]:
    """Table rows of probe 2, per layer: each form's held-out attention-output error."""
    heads = lm.model.config.num_attention_heads
    rows = []
    for li in layers:
        layer = lm.model.encoder.layer[li]
        _, P = _attention_params(layer)
        cal, hol = lm.capture(layer.attention.self, calib), lm.capture(layer.attention.self, held)
        Th = _attention(hol, P, heads)
        for kept in kept_heads:
            forms = _head_forms(cal, P, heads, kept)
            rows.append([str(li), str(kept), str(round(P[0].shape[0] // heads * kept / heads))]
                        + [f"{_rel(_attention(hol, forms[f], heads), Th):.3f}" for f in ("heads", "uniform", "glob")])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def model_level(lm: MiniLM, calib: Sequence[str], scored: dict[str, list[str]], kept: int) -> dict[str, dict[str, float]]:
    """Mean embedding cosine vs dense per scored source, with every layer's attention in
    each form at the cost of ``kept`` heads (FFNs dense); each layer's form is fit on
    the inputs the layers before it, already compressed, give it."""
    heads = lm.model.config.num_attention_heads
    ref = {s: lm.embed(t) for s, t in scored.items()}
    saved = [p.detach().clone() for p in lm.model.parameters()]
    out: dict[str, dict[str, float]] = {}
    try:
        for form in ("heads", "glob"):
            for li, layer in enumerate(lm.model.encoder.layer):
                lins, P = _attention_params(layer)
                new = _head_forms(lm.capture(layer.attention.self, calib), P, heads, kept)[form]
                with torch.no_grad():
                    for i, lin in enumerate(lins):
                        lin.weight.copy_(new[2 * i].float())
                        lin.bias.copy_(new[2 * i + 1].float())
                print(f"{form}: layer {li} done", file=sys.stderr, flush=True)
            out[form] = {s: float((lm.embed(t) * ref[s]).sum(-1).mean()) for s, t in scored.items()}
            _restore(lm, saved)
    finally:
        _restore(lm, saved)
    return out


def _restore(lm: MiniLM, saved: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, t in zip(lm.model.parameters(), saved, strict=True):
            p.copy_(t)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib-source", choices=SOURCES, default="wiki")
    ap.add_argument("--eval-source", choices=SOURCES, default="news")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 3, 5])
    ap.add_argument("--units-kept", type=int, nargs="+", default=[1228, 768, 460],
                    help="FFN units kept by the pruned window (of 1536: about budget 0.8 / 0.5 / 0.3)")
    ap.add_argument("--trades", type=int, nargs="+", default=[16, 64, 128], help="units traded for the residual's ranks")
    ap.add_argument("--kept-heads", type=int, nargs="+", default=[6, 7, 8, 9])
    ap.add_argument("--model-level", type=int, default=8, metavar="HEADS",
                    help="also score embeddings with every layer's attention at this many heads' cost (0: skip)")
    ap.add_argument("--skip", choices=["ffn", "attention"], nargs="*", default=[])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if args.calib_source == args.eval_source:
        print("note: calibration and evaluation from the same source (not a shifted split)", file=sys.stderr)
    calib = calib_sentences(args.calib_source, args.calib_size)
    held = eval_set(args.eval_source).sentences
    lm = MiniLM()
    print(f"calibration: {len(calib)} {args.calib_source} sentences; scored: {len(held)} {args.eval_source} sentences\n")
    if "ffn" not in args.skip:
        rows = ffn_rows(lm, calib, held, args.layers, args.units_kept, args.trades)
        print("FFN output error, held out: pruned window of k units vs k - t units + rank-r residual "
              "(in brackets: k - t units alone)\n")
        print(_table(["layer", "k", "pruned k"] + [f"k - {t} + residual" for t in args.trades], rows) + "\n")
    if "attention" not in args.skip:
        rows = attention_rows(lm, calib, held, args.layers, args.kept_heads)
        print("Attention output error, held out, at the cost of `heads` whole heads\n")
        print(_table(["layer", "heads", "dims per head", "whole heads", "per-head rank", "global rank"], rows) + "\n")
        if args.model_level:
            # every source but the calibration's (the suite's pool too)
            scored = {s: eval_set(s).sentences for s in SOURCES if s != args.calib_source}
            res = model_level(lm, calib, scored, args.model_level)
            print(f"Embedding cosine vs dense, every layer's attention at {args.model_level} heads' cost, FFNs dense\n")
            print(_table(["form"] + list(scored), [[f] + [f"{v[s]:.4f}" for s in scored] for f, v in res.items()]) + "\n")
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
