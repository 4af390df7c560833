"""Static (calibrated) QDQ int8 against the dynamic int8 that ``--quantize int8`` uses.

The deployment issue allowed static QDQ quantization with the calibration batches "as
an option if it helps". This script measures whether it does, on the files a
``benchmarks/deploy_bench.py --workdir DIR`` run leaves (``dense.onnx``,
``gblr_B.onnx``, their dynamic int8 files, ``minilm_wrapper.pt``, ``calib.txt``):
onnxruntime's ``quantize_static`` (QDQ format, int8 weights per channel, uint8
activations, MinMax calibration on the first ``--calib-lines`` calibration sentences in
batches of 32), scored on news sentences against the dense PyTorch model and timed in
one interleaved onnxruntime run beside the dynamic files.

Usage::

    PYTHONPATH=. python benchmarks/deploy_bench.py --workdir DIR
    PYTHONPATH=. python benchmarks/static_int8.py --workdir DIR [--budget 0.5]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from benchmarks import assets
from benchmarks.common import run_main
from benchmarks.minilm.sources import eval_set
from benchmarks.models_bench import _embeddings_onnx, _embeddings_torch, _feeds, _session, _tokenize, encoder_fidelity
from gblr_compress.errors import InputError
from gblr_compress.export.measure import latency


def quantize_static_qdq(src: Path, dst: Path, tokenizer: object, texts: list[str]) -> float:
    """``src`` quantized by onnxruntime's static QDQ int8 into ``dst``, calibrated on
    ``texts`` in batches of 32; returns the seconds it took."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    sess = _session(src)
    feeds = [_feeds(sess, _tokenize(tokenizer, texts[i : i + 32])) for i in range(0, len(texts), 32)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.items, None)

    t0 = time.perf_counter()
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="a deploy_bench --workdir")
    ap.add_argument("--budget", type=float, default=0.5, help="the gblr file's budget in that run")
    ap.add_argument("--calib-lines", type=int, default=256)
    ap.add_argument("--eval-lines", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    w = args.workdir
    files = {"dense fp32": w / "dense.onnx", "dense int8 dynamic": w / "dense_int8.onnx",
             f"gblr {args.budget}": w / f"gblr_{args.budget}.onnx",
             f"gblr {args.budget} int8 dynamic": w / f"gblr_{args.budget}_int8.onnx"}
    for p in [*files.values(), w / "minilm_wrapper.pt", w / "calib.txt"]:
        if not p.is_file():
            raise InputError(f"{p} is missing: run benchmarks/deploy_bench.py --workdir {w} first")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(assets.minilm_dir()))
    dense = torch.load(w / "minilm_wrapper.pt", weights_only=False).eval()  # our own pickle, from deploy_bench
    calib = [t for t in (w / "calib.txt").read_text().splitlines() if t.strip()][: args.calib_lines]
    for name in ("dense fp32", f"gblr {args.budget}"):
        src = files[name]
        dst = w / f"{src.stem}_qdq.onnx"
        seconds = quantize_static_qdq(src, dst, tokenizer, calib)
        print(f"{name}: static QDQ int8 in {seconds:.0f} s", flush=True)
        files[f"{name.removesuffix(' fp32')} int8 static QDQ"] = dst
    news = eval_set("news", args.eval_lines).sentences
    ref = _embeddings_torch(dense, tokenizer, news, True)
    fid = {k: encoder_fidelity(ref, _embeddings_onnx(p, tokenizer, news, True)) for k, p in files.items()}
    times = latency(files, _tokenize(tokenizer, news[:32]), "dense fp32", rounds=args.rounds)
    print(f"\nall-MiniLM-L6-v2 wrapper, {len(news)} news sentences, static calibration on {len(calib)} sentences\n")
    print("| file | news mean cos | min cos | vs dense fp32 |\n| --- | --- | --- | --- |")
    for k in files:
        print(f"| {k} | {fid[k]['mean_cos']:.3f} | {fid[k]['min_cos']:.3f} | {times[k].speedup:.2f}x |")
    return 0


if __name__ == "__main__":
    run_main(main)
