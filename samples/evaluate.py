"""Accuracy of a sample before and after compression, the latter run in onnxruntime.

    python -m samples.evaluate samples/data/digits_test.pt samples/data/digits_module.pt out/digits.onnx

The dense model is the torch.save'd sample module (a pickle this project wrote); the
compressed model is the exported ONNX file, run with onnxruntime alone (no torch model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

__all__ = ["onnx_logits", "main"]


def onnx_logits(path: str | Path, inputs: torch.Tensor | dict[str, torch.Tensor]) -> np.ndarray:
    """Run an exported model on a batch (a tensor or a dict of named tensors)."""
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, dict):
        feed = {k: v.numpy() for k, v in inputs.items() if k in names}
    else:
        feed = {names[0]: inputs.numpy()}
    return sess.run(None, feed)[0]


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Print dense (PyTorch) and compressed (onnxruntime) test accuracy."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("test", type=Path, help="NAME_test.pt from samples.make_samples")
    p.add_argument("dense", type=Path, help="NAME_module.pt (the dense model)")
    p.add_argument("onnx", type=Path, help="the compressed model exported by gblr-compress")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path.cwd()))  # the pickled sample refers to samples.models
    test = torch.load(args.test, weights_only=True)
    inputs, labels = test["inputs"], test["labels"]
    dense = torch.load(args.dense, weights_only=False).eval()
    with torch.no_grad():
        logits = dense(**inputs) if isinstance(inputs, dict) else dense(inputs)
    before = float((logits.argmax(-1) == labels).float().mean())
    after = float((torch.from_numpy(onnx_logits(args.onnx, inputs)).argmax(-1) == labels).float().mean())
    print(f"test accuracy: dense (PyTorch) {before:.3f} -> compressed (onnxruntime) {after:.3f} "
          f"on {len(labels)} held-out samples")
    return before, after


if __name__ == "__main__":
    main()
