"""The all-MiniLM-L6-v2 benchmark: real model, hand-written data, contenders, ORT speed.

Modules, bottom up:

- ``data``: the evaluation and calibration sentences under ``data/``.
- ``model``: load the packaged pretrained model offline; mean-pooled, L2-normalized
  sentence embeddings; calibration batches.
- ``baselines``: low-rank layer and the SVD family (plain, ASVD-style, whitened).
- ``metrics``: embedding fidelity against the dense model.
- ``contenders``: the registry of ``(dense_model, calib_batches, budget) -> nn.Module``
  (the pruning + least-squares anchor itself lives in ``benchmarks/prune_anchor.py``,
  importable by other benchmarks).
- ``speed``: ONNX export and interleaved ONNX Runtime latency; the int8 contender's
  onnxruntime-quantized graph behind the torch call signature.
- ``sources``: text sources (suite, Wikipedia, news, WordNet) with disjoint
  calibration / eval splits.
- ``shift``: the generalization mode: calibrate on one source, score on all.

The entry point is ``benchmarks/minilm_bench.py``. Needs the ``bench`` extra (see
``benchmarks/README.md`` for the install line).
"""
