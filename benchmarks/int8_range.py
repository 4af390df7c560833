"""Dynamic int8 with full-range and 7-bit weights, on the dense models.

``--quantize int8`` (and every benchmark's "int8" file) calls
:func:`gblr_compress.export.quantize.quantize_int8`, which quantizes weights to the
7-bit range (``reduce_range``). This script shows why: for all-MiniLM-L6-v2 and
all-mpnet-base-v2 (the folders ``benchmarks/assets.py`` builds) it exports the dense
model, quantizes it with full-range int8 weights, with 7-bit weights, and with uint8
weights (onnxruntime's other remedy), and prints each file's mean / min embedding
cosine against the dense PyTorch model on news sentences (mean-pooled last hidden
state), its mean per-token cosine against the float file, and its speed against the
float file in one interleaved onnxruntime run (2 threads, spinning off, medians of
per-round ratios). Whether full-range weights saturate depends on the CPU (x86 without
VNNI does); the script prints the CPU's flags that decide it. The ``smollm2`` case
(SmolLM2-135M, a causal LM) is scored by perplexity on held-out Wikipedia windows, as
``benchmarks/models_bench.py`` scores it, against the dense PyTorch model's.

Usage::

    PYTHONPATH=. python benchmarks/int8_range.py [--cases minilm mpnet smollm2] [--sentences 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from benchmarks import assets
from benchmarks.common import run_main
from benchmarks.models_bench import (
    _embeddings_onnx,
    _embeddings_torch,
    _feeds,
    _session,
    _tokenize,
    _windows,
    encoder_fidelity,
    perplexity_onnx,
    perplexity_torch,
)
from gblr_compress.export.measure import latency
from gblr_compress.export.onnx_export import build_onnx, save_onnx
from gblr_compress.export.quantize import quantize_int8

FOLDERS = {"minilm": assets.minilm_dir, "mpnet": assets.mpnet_dir, "smollm2": assets.smollm2_dir}


def _uint8(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic quantization with uint8 weights (no saturation either)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QUInt8)


def _token_cosine(a: Path, b: Path, tokenizer, texts: list[str]) -> float:
    """Mean cosine of each real token's output under the two files."""
    sa, sb = _session(a), _session(b)
    cos = []
    for i in range(0, len(texts), 32):
        batch = _tokenize(tokenizer, texts[i : i + 32])
        ya = torch.from_numpy(sa.run(None, _feeds(sa, batch))[0])
        yb = torch.from_numpy(sb.run(None, _feeds(sb, batch))[0])
        keep = batch["attention_mask"].bool()
        cos.append(torch.nn.functional.cosine_similarity(ya[keep], yb[keep], dim=-1))
    return float(torch.cat(cos).mean())


def _cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags) or "none listed"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", default=["minilm", "mpnet"], choices=list(FOLDERS))
    ap.add_argument("--sentences", type=int, default=256, help="news sentences scored")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    import transformers as T

    texts = assets.news_sentences()[: args.sentences]
    print(f"CPU flags: {_cpu_flags()}; {len(texts)} news sentences", flush=True)
    print("| model | file | news mean / min cos vs dense (an LM: perplexity vs dense) | token cos vs float file "
          "| speed vs float |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.cases:
            if name == "smollm2":
                _lm_case(work, args.rounds)
                continue
            folder = FOLDERS[name]()
            tok = T.AutoTokenizer.from_pretrained(folder)
            model = T.AutoModel.from_pretrained(folder).eval()
            example = _tokenize(tok, texts[:32])
            fp32 = work / f"{name}.onnx"
            save_onnx(build_onnx(model, example), fp32)
            files = _files(work, name, fp32)
            dense = _embeddings_torch(model, tok, texts, pooled_output=False)
            timing = latency(files, example, "float32", rounds=args.rounds)
            for label, path in files.items():
                fid = encoder_fidelity(dense, _embeddings_onnx(path, tok, texts, pooled_output=False))
                tcos = 1.0 if path == fp32 else _token_cosine(fp32, path, tok, texts)
                print(f"| {name} | {label} | {fid['mean_cos']:.3f} / {fid['min_cos']:.3f} | {tcos:.3f} | "
                      f"{timing[label].speedup:.2f}x |", flush=True)
            del model, dense
    return 0


def _files(work: Path, name: str, fp32: Path) -> dict[str, Path]:
    """The float file and its full-range, 7-bit and uint8-weight int8 versions."""
    files = {"float32": fp32, "int8, full range": work / f"{name}_s8.onnx",
             "int8, 7 bits (the command's)": work / f"{name}_s8rr.onnx", "uint8 weights": work / f"{name}_u8.onnx"}
    quantize_int8(fp32, files["int8, full range"], reduce_range=False)
    quantize_int8(fp32, files["int8, 7 bits (the command's)"])
    _uint8(fp32, files["uint8 weights"])
    return files


def _lm_case(work: Path, rounds: int) -> None:
    """SmolLM2-135M: each file's perplexity on held-out Wikipedia windows against the
    dense PyTorch model's, and its speed against the float file."""
    import transformers as T

    folder = FOLDERS["smollm2"]()
    tok = T.AutoTokenizer.from_pretrained(folder)
    model = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    model.config.use_cache = False  # no KV cache in the graph
    windows = _windows(tok, assets.wiki_eval_text())
    example = {"input_ids": windows[:4], "attention_mask": torch.ones_like(windows[:4])}
    fp32 = work / "smollm2.onnx"
    save_onnx(build_onnx(model, example), fp32)
    dense = perplexity_torch(model, windows)
    del model
    files = _files(work, "smollm2", fp32)
    timing = latency(files, example, "float32", rounds=rounds)
    for label, path in files.items():
        ppl = perplexity_onnx(path, windows)
        print(f"| smollm2 | {label} | {ppl:.2f} vs {dense:.2f} ({ppl / dense:.2f}x) | - | "
              f"{timing[label].speedup:.2f}x |", flush=True)


if __name__ == "__main__":
    run_main(main)
