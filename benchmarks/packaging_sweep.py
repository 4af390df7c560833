"""Model packagings a new user brings, each run through the ``gblr-compress`` command.

The real all-MiniLM-L6-v2 as a whole ``BertModel`` pickle (float32 and float16), in
wrappers that return a dict or a tuple, in a wrapper whose ``forward(features)`` takes
one dict, as a whole ``SentenceTransformer`` pickle (when sentence-transformers is
installed; calibrated with the tokenizer it carries), and in a training script's
checkpoint dict;
small random HuggingFace models of several architectures, each as a whole-module
pickle and as a folder, calibrated on news sentences with MiniLM's tokenizer; torch's
own ``nn.TransformerEncoder``, a CNN, an LSTM and a ViT with ``--input-spec``; and two
packaging the command refuses (a TorchScript file).
Per case it prints the exit code, the wall time, how many Linear layers were
compressed, the onnxruntime parity check and the held-out cosine from the report, or
the one-line error.

Usage::

    PYTHONPATH=. python benchmarks/packaging_sweep.py [--cases NAME ...] [--steps 10] [--budget 0.5]

The wrappers live in this module so that their pickles load in the command (run from
the repository root, which the command makes importable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

from benchmarks import assets
from benchmarks.common import run_main

ROOT = Path(__file__).resolve().parent.parent


class DictOut(nn.Module):
    """Sentence embedding and token states in a dict."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return {"sentence_embedding": nn.functional.normalize(e, dim=-1), "token_embeddings": h}


class ClsTuple(nn.Module):
    """A projected [CLS] vector and the pooler output, as a tuple; optional arguments."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.proj = nn.Linear(bert.config.hidden_size, 128)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=False)
        return self.proj(out[0][:, 0]), out[1]


class OneDict(nn.Module):
    """sentence-transformers' calling convention: ``forward(features)``, one dict."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.bert(**features).last_hidden_state[:, 0]


class TorchEncoder(nn.Module):
    """torch's ``nn.TransformerEncoder`` over token ids, mean-pooled to 10 classes."""

    def __init__(self, vocab: int = 1000, d: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 128, batch_first=True, dropout=0.0), 2,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


class SmallCNN(nn.Module):
    """A convolution, pooling, and two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.fc1 = nn.Linear(256, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.features(x))))


class LSTMNet(nn.Module):
    """An LSTM over token ids and two Linears on its last state."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(1000, 64)
        self.lstm = nn.LSTM(64, 64, batch_first=True)
        self.fc = nn.Linear(64, 64)
        self.out = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(x))
        return self.out(torch.relu(self.fc(h[:, -1])))


def _tiny_hf() -> dict[str, Callable[[], nn.Module]]:
    """Small random HuggingFace models on MiniLM's 30,522-word vocabulary."""
    import transformers as T

    v = 30522
    return {
        "bert-cls": lambda: T.BertForSequenceClassification(T.BertConfig(
            vocab_size=v, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=v, dim=64, hidden_dim=128, n_layers=2,
                                                                   n_heads=4)),
        "roberta-cls": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
            vocab_size=v, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)),
        "mpnet": lambda: T.MPNetModel(T.MPNetConfig(vocab_size=v + 5, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
            vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)),
        "t5-encoder": lambda: T.T5EncoderModel(T.T5Config(vocab_size=v, d_model=64, d_ff=128, num_layers=2,
                                                          num_heads=4, d_kv=16)),
    }


def build_cases(work: Path) -> dict[str, list[str]]:
    """Write every packaging under ``work``; each case's command arguments (model first)."""
    import transformers as T

    from benchmarks import packaging_sweep as me  # pickles must name an importable module

    minilm = assets.minilm_dir()
    calib = work / "calib.txt"
    calib.write_text("\n".join(assets.news_sentences()[:300]) + "\n")
    text = ["--calib-text", str(calib)]
    tok = ["--tokenizer", str(minilm)]
    torch.manual_seed(0)
    bert = T.AutoModel.from_pretrained(minilm).eval()
    cases: dict[str, list[str]] = {}

    def save(name: str, obj: object, *args: str) -> None:
        torch.save(obj, work / f"{name}.pt")
        cases[name] = [str(work / f"{name}.pt"), *args]

    save("minilm-bertmodel", bert, *text, *tok)
    save("minilm-dict-wrapper", me.DictOut(bert).eval(), *text, *tok)
    save("minilm-tuple-wrapper", me.ClsTuple(bert).eval(), *text, *tok)
    save("minilm-training-checkpoint", {"model": me.DictOut(bert).eval(), "epoch": 3, "optimizer": {}}, *text, *tok)
    save("minilm-onedict-wrapper", me.OneDict(bert).eval(), *text, *tok)
    # The package's own folder, as a user downloads it: modules.json keeps the pooling.
    cases["minilm-st-folder"] = [str(assets.minilm_st_dir()), *text]
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("sentence-transformers is not installed: no SentenceTransformer pickle case", flush=True)
    else:
        save("minilm-sentence-transformer", SentenceTransformer(str(minilm), device="cpu").eval(), *text)
    torch.jit.save(torch.jit.trace(me.SmallCNN().eval(), torch.randn(1, 3, 32, 32)), work / "cnn-script.pt")
    cases["torchscript (refused)"] = [str(work / "cnn-script.pt"), "--input-spec", "x:float32[8,3,32,32]"]
    save("minilm-bertmodel-float16", T.AutoModel.from_pretrained(minilm).half().eval(), *text, *tok)
    for name, make in _tiny_hf().items():
        model = make().eval()
        save(f"{name}-pickle", model, *text, *tok)
        folder = work / f"{name}-folder"
        model.save_pretrained(folder)
        T.AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
        cases[f"{name}-folder"] = [str(folder), *text]
    save("torch-transformer-encoder", me.TorchEncoder().eval(), "--input-spec", "x:int64[8,16]")
    save("cnn", me.SmallCNN().eval(), "--input-spec", "x:float32[8,3,32,32]")
    save("lstm", me.LSTMNet().eval(), "--input-spec", "x:int64[8,16]")
    vit = T.ViTModel(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8)).eval()
    save("vit", vit, "--input-spec", "pixel_values:float32[4,3,32,32]")
    return cases


def run_case(args: list[str], out: Path, budget: float, steps: int) -> dict:
    """One command run: exit code, seconds, and the report's figures or the error line."""
    cmd = [str(Path(sys.executable).with_name("gblr-compress")), *args, "--budget", str(budget), "--steps", str(steps),
           "--trust-checkpoint", "-o", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    row = {"code": proc.returncode, "seconds": time.perf_counter() - t0}
    report = out.with_suffix(".report.json")
    if proc.returncode == 0 and report.exists():
        r = json.loads(report.read_text())
        final = r["quality"].get("frozen") or {}
        row.update(compressed=sum(l["status"] == "compressed" for l in r["layers"]), layers=len(r["layers"]),
                   parity=r["parity"]["ok"], cosine=final.get("cosine"))
    else:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith(("error:", "internal error:"))]
        row["error"] = lines[-1] if lines else proc.stderr.strip()[-200:]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", help="run only these cases (substring match)")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = build_cases(work)
        if args.cases:
            cases = {k: v for k, v in cases.items() if any(c in k for c in args.cases)}
        print(f"budget {args.budget}, --steps {args.steps}; {len(cases)} cases", flush=True)
        print(f"{'case':36s} {'exit':>4s} {'s':>5s}  result", flush=True)
        for i, (name, cmd) in enumerate(cases.items()):
            row = run_case(cmd, work / f"case{i}.onnx", args.budget, args.steps)
            if "error" in row:
                result = row["error"]
            else:
                cos = "-" if row["cosine"] is None else f"{row['cosine']:.3f}"
                result = (f"{row['compressed']}/{row['layers']} Linears compressed, parity "
                          f"{'ok' if row['parity'] else 'FAILED'}, held-out cosine {cos}")
            print(f"{name:36s} {row['code']:4d} {row['seconds']:5.0f}  {result}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
