"""The product end to end: ``gblr-compress`` run as a command on the model folder.

The contenders call the library; this runs the real command line in a subprocess
(load, init, distill, freeze, export, verify, report) and scores the ONNX file it
writes, mean-pooled in onnxruntime, so the wall time and the quality are those a user
gets from::

    gblr-compress MODEL_DIR --budget B --calib calib.pt --include 'encoder.layer.*' -o out.onnx
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from gblr_compress.errors import InputError

from .model import Batch, mean_pool, model_dir
from .speed import make_session

__all__ = ["run_cli"]


def run_cli(budget: float, calib: list[Batch], eval_batches: list[Batch], workdir: Path, seed: int = 0) -> dict:
    """Run the CLI at ``budget`` (and ``--seed seed`` when not 0) and embed
    ``eval_batches`` with the ONNX file it wrote.

    Returns:
        ``{"command", "wall_s", "seconds" (per phase, from the CLI's JSON summary),
        "parity", "cost", "onnx" (the file's path), "embeddings" (N, H)}``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    calib_path, onnx_path = workdir / "calib.pt", workdir / f"minilm_b{budget:g}.onnx"
    torch.save(calib, calib_path)
    cmd = [sys.executable, "-m", "gblr_compress", str(model_dir()), "--budget", f"{budget:g}",
           "--calib", str(calib_path), "--include", "encoder.layer.*", "-o", str(onnx_path), "--json"]
    seed_args = ["--seed", str(seed)] if seed else []
    cmd += seed_args
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise InputError(f"gblr-compress exited {done.returncode}: {done.stderr.strip()[-500:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    session = make_session(onnx_path)
    wanted = [i.name for i in session.get_inputs()]
    embs = []
    for b in eval_batches:
        hidden = torch.from_numpy(session.run(None, {k: b[k].numpy() for k in wanted})[0])  # (B, T, H)
        embs.append(mean_pool(hidden, b["attention_mask"]))
    shown = ["gblr-compress", "MODEL_DIR", *cmd[4:6], "--calib", "calib.pt", "--include", "'encoder.layer.*'",
             "-o", onnx_path.name, *seed_args]
    return {
        "command": " ".join(shown),
        "wall_s": wall,
        "seconds": summary["seconds"],
        "parity": summary["parity"],
        "cost": summary["totals"]["linear_cost"],
        "onnx": onnx_path,
        "embeddings": torch.cat(embs),
    }
