"""Train the two sample models and write them in every supported input format.

Run ``python -m samples.make_samples --out samples/data`` (seconds on 2 CPU cores).

(i) ``digits``: :class:`samples.models.DigitsMLP` on scikit-learn's bundled 8x8 digits
    (inputs standardized with the training split's mean/std; the files hold the
    standardized inputs).
(ii) ``encoder``: :func:`samples.models.tiny_encoder` on a generated sequence task: each
    sequence (length 12..32, padded with id 0, ``attention_mask`` marks real tokens)
    mixes random filler tokens with tokens from 4 patterns; the label is the pattern
    with the most tokens in the sequence.

For each sample NAME the output folder gets:
    NAME_module.pt          torch.save(model)                       (format a, pickle)
    NAME_bundle.pt          {"model", "example_inputs", "calib"}    (format b, pickle)
    NAME_state.safetensors  state_dict, --factory samples.models:... (format c, safe)
    NAME_calib.pt           list of calibration batches (tensors only)
    NAME_calib.npz          the same samples as one batch
    NAME_test.pt            {"inputs": batch, "labels": int64}      held-out test set
and ``manifest.json`` lists files, factories and test accuracies.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from samples.models import digits_mlp, tiny_encoder

__all__ = ["make_digits", "make_encoder", "pattern_task", "main"]

PAD, NUM_PATTERNS, PATTERN_SIZE, FIRST_PATTERN_ID = 0, 4, 8, 2


def _accuracy(model: nn.Module, batch: Any, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(**batch) if isinstance(batch, dict) else model(batch)
    return float((logits.argmax(-1) == labels).float().mean())


def _write_all(
    out: Path, name: str, model: nn.Module, factory: str, calib: list[Any], test: dict[str, Any]
) -> list[str]:
    """Write one sample in every format; returns the file names."""
    model.eval()
    files = {
        "module": f"{name}_module.pt",
        "bundle": f"{name}_bundle.pt",
        "state": f"{name}_state.safetensors",
        "calib_pt": f"{name}_calib.pt",
        "calib_npz": f"{name}_calib.npz",
        "test": f"{name}_test.pt",
    }
    torch.save(model, out / files["module"])
    example = _take(calib[0], 2)
    torch.save({"model": model, "example_inputs": example, "calib": calib}, out / files["bundle"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / files["state"]))
    torch.save(calib, out / files["calib_pt"])
    if isinstance(calib[0], dict):
        arrays = {k: torch.cat([b[k] for b in calib]).numpy() for k in calib[0]}
        np.savez(out / files["calib_npz"], **arrays)
    else:
        np.savez(out / files["calib_npz"], torch.cat(calib).numpy())
    torch.save(test, out / files["test"])
    return list(files.values())


def _take(batch: Any, n: int) -> Any:
    return {k: v[:n].clone() for k, v in batch.items()} if isinstance(batch, dict) else batch[:n].clone()


# -------------------------------------------------------------------- digits
def make_digits(out: Path, epochs: int = 20, seed: int = 0) -> dict[str, Any]:
    """Train the digits MLP and write its files; returns its manifest entry."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(seed)
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=0.25, random_state=seed, stratify=y
    )
    mean, std = X_tr.mean(0), X_tr.std(0) + 1e-6  # constant border pixels have std 0
    to_t = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    xtr, xte = to_t(X_tr), to_t(X_te)  # (N, 64)
    ytr, yte = torch.tensor(y_tr), torch.tensor(y_te)

    model = digits_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(64):
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc = _accuracy(model, xte, yte)
    calib = list(xtr[:512].split(64))  # 8 batches of (64, 64)
    files = _write_all(out, "digits", model, "samples.models:digits_mlp", calib, {"inputs": xte, "labels": yte})
    return {"factory": "samples.models:digits_mlp", "test_accuracy": acc, "test_size": len(yte), "files": files}


# ------------------------------------------------------------------- encoder
def pattern_task(n: int, seq_len: int, vocab: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Generate the 4-pattern counting task.

    Pattern ``k`` is token ids ``2 + 8k .. 9 + 8k``; filler ids are ``>= 34``. The label
    is the pattern with strictly the most tokens in the (unpadded) sequence.

    Returns:
        ``({"input_ids": (n, seq_len) int64, "attention_mask": (n, seq_len) int64},
        labels (n,) int64)``.
    """
    filler_low = FIRST_PATTERN_ID + NUM_PATTERNS * PATTERN_SIZE
    ids = torch.full((n, seq_len), PAD, dtype=torch.long)
    mask = torch.zeros(n, seq_len, dtype=torch.long)
    labels = torch.randint(0, NUM_PATTERNS, (n,), generator=gen)
    lengths = torch.randint(12, seq_len + 1, (n,), generator=gen)
    for i in range(n):
        L = int(lengths[i])
        counts = torch.randint(0, L // 6 + 1, (NUM_PATTERNS,), generator=gen)
        others = counts.clone()
        others[labels[i]] = -1
        counts[labels[i]] = int(others.max()) + 1 + int(torch.randint(0, 3, (1,), generator=gen))
        toks = [
            FIRST_PATTERN_ID + k * PATTERN_SIZE + int(torch.randint(0, PATTERN_SIZE, (1,), generator=gen))
            for k in range(NUM_PATTERNS)
            for _ in range(int(counts[k]))
        ][:L]
        seq = torch.randint(filler_low, vocab, (L,), generator=gen)
        where = torch.randperm(L, generator=gen)[: len(toks)]
        seq[where] = torch.tensor(toks, dtype=torch.long)
        ids[i, :L] = seq
        mask[i, :L] = 1
    return {"input_ids": ids, "attention_mask": mask}, labels


def make_encoder(out: Path, steps: int = 200, seed: int = 0) -> dict[str, Any]:
    """Train the tiny encoder classifier and write its files; returns its manifest entry."""
    torch.manual_seed(seed)
    model = tiny_encoder()
    seq_len, vocab = 32, model.tok.num_embeddings  # short sequences keep training in seconds
    gen = torch.Generator().manual_seed(seed)
    train, ytr = pattern_task(4096, seq_len, vocab, gen)
    test, yte = pattern_task(512, seq_len, vocab, gen)
    calib_x, _ = pattern_task(256, seq_len, vocab, gen)

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    model.train()
    for _step in range(steps):
        idx = torch.randint(0, len(ytr), (64,), generator=gen)
        logits = model(train["input_ids"][idx], train["attention_mask"][idx])  # (64, 4)
        loss = F.cross_entropy(logits, ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    acc = _accuracy(model, test, yte)
    calib = [{k: v[i : i + 32] for k, v in calib_x.items()} for i in range(0, 256, 32)]  # 8 x 32
    files = _write_all(out, "encoder", model, "samples.models:tiny_encoder", calib, {"inputs": test, "labels": yte})
    return {"factory": "samples.models:tiny_encoder", "test_accuracy": acc, "test_size": len(yte), "files": files}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry: train the samples, write files and ``manifest.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("samples/data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["digits", "encoder"], default=None,
                        help="Make one sample only (digits takes seconds, the encoder longer).")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    manifest: dict[str, Any] = {}
    makers = (("digits", make_digits), ("encoder", make_encoder))
    for name, build in (m for m in makers if args.only in (None, m[0])):
        t0 = time.perf_counter()
        manifest[name] = build(args.out, seed=args.seed)
        manifest[name]["train_seconds"] = round(time.perf_counter() - t0, 1)
        print(
            f"{name}: test accuracy {manifest[name]['test_accuracy']:.3f} "
            f"on {manifest[name]['test_size']} held-out samples "
            f"({manifest[name]['train_seconds']} s)"
        )
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {sum(len(m['files']) for m in manifest.values()) + 1} files to {args.out}")
    return manifest


if __name__ == "__main__":
    main()
