"""Calibration data: files, input specs, synthetic inputs, the fit check and the choice
between sources; bad input -> one-line InputError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gblr_compress.calibration import (
    calibration_batches,
    check_inputs_fit,
    load_calib,
    parse_input_spec,
    spec_like,
    synthetic_inputs,
    vocab_hint,
)
from gblr_compress.checkpoint import LoadedModel
from gblr_compress.errors import InputError
from samples.models import tiny_encoder


def _one_line_error(fn, *args, match: str, **kw) -> str:
    with pytest.raises(InputError, match=match) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


def test_calib_pt_and_npz(tmp_path) -> None:
    x = torch.randn(4, 64)
    torch.save([x, x + 1], tmp_path / "list.pt")
    torch.save({"input_ids": torch.ones(2, 8, dtype=torch.long)}, tmp_path / "dict.pt")
    np.savez(tmp_path / "pos.npz", x.numpy(), x.numpy())
    np.savez(tmp_path / "one.npz", x.numpy())
    np.savez(tmp_path / "named.npz", input_ids=np.ones((2, 8), dtype=np.int64))
    lst = load_calib(tmp_path / "list.pt")
    assert len(lst) == 2 and torch.equal(lst[1], x + 1)
    assert list(load_calib(tmp_path / "dict.pt")[0]) == ["input_ids"]
    pos = load_calib(tmp_path / "pos.npz")[0]
    assert isinstance(pos, tuple) and len(pos) == 2 and torch.equal(pos[0], x)
    assert torch.equal(load_calib(tmp_path / "one.npz")[0], x)
    named = load_calib(tmp_path / "named.npz")[0]
    assert named["input_ids"].dtype == torch.int64
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    _one_line_error(load_calib, tmp_path / "bad.npz", match="cannot read")
    torch.save([], tmp_path / "empty.pt")
    _one_line_error(load_calib, tmp_path / "empty.pt", match="empty")


def test_calib_that_does_not_fit_and_model_untouched() -> None:
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8)).train()
    before = model[1].running_mean.clone()
    out = check_inputs_fit(model, torch.randn(4, 64) + 3)
    assert out.shape == (4, 8)
    assert model.training and model[1].training and torch.equal(model[1].running_mean, before)
    msg = _one_line_error(check_inputs_fit, model, torch.randn(4, 63), match="does not fit the model")
    assert "RuntimeError" in msg


def test_input_spec_and_synthetic_inputs() -> None:
    spec = parse_input_spec("input_ids:int64[8,16], attention_mask:int64[8,16]")
    assert spec == {"input_ids": (torch.int64, (8, 16)), "attention_mask": (torch.int64, (8, 16))}
    model = tiny_encoder()
    batches = synthetic_inputs(spec, 2, seed=1, vocab_hint=vocab_hint(model))
    assert len(batches) == 2 and int(batches[0]["attention_mask"].min()) == 1
    assert 0 <= int(batches[0]["input_ids"].min()) and int(batches[0]["input_ids"].max()) < 1000
    assert int(batches[0]["input_ids"].max()) > 1  # the hint widens the id range
    assert check_inputs_fit(model, batches[0]).shape == (8, 4)
    again = synthetic_inputs(spec, 2, seed=1, vocab_hint=1000)
    assert torch.equal(again[1]["input_ids"], batches[1]["input_ids"])
    pos = parse_input_spec("float32[3,64]")
    (x,) = synthetic_inputs(pos, 1)
    assert x.shape == (3, 64) and x.dtype == torch.float32
    for bad in ("x:int64[8,", "x:int7[8]", "x:float32[0,3]", "x:int64[2],float32[2]", "a:int64[1],a:int64[1]", ""):
        _one_line_error(parse_input_spec, bad, match=".")


def test_calibration_batches_prefers_file_then_bundle_then_synthetic(tmp_path) -> None:
    model = nn.Linear(6, 2)
    x = torch.randn(3, 6)
    torch.save([x], tmp_path / "c.pt")
    bundle = LoadedModel(model, example_inputs=x, calib=[x + 1], source_format="bundle")
    warnings: list[str] = []
    got, synthetic = calibration_batches(tmp_path / "c.pt", bundle, None, 4, 0, warnings)
    assert not synthetic and torch.equal(got[0], x) and warnings == []
    got, synthetic = calibration_batches(None, bundle, None, 4, 0, warnings)
    assert not synthetic and torch.equal(got[0], x + 1) and warnings == []
    plain = LoadedModel(model, example_inputs=x, calib=None, source_format="bundle")
    got, synthetic = calibration_batches(None, plain, None, 4, 0, warnings)
    assert synthetic and len(got) == 4 and got[0].shape == (3, 6) and len(warnings) == 1
    got, _ = calibration_batches(None, plain, "float32[5,6]", 2, 0, warnings)
    assert len(got) == 2 and got[0].shape == (5, 6)
    bare = LoadedModel(model, example_inputs=None, calib=None, source_format="module")
    _one_line_error(calibration_batches, None, bare, None, 4, 0, [], match="no inputs to run the model on")
    assert spec_like({"ids": torch.ones(2, 3, dtype=torch.long)}) == {"ids": (torch.int64, (2, 3))}
    assert spec_like((x, x)) == {"0": (torch.float32, (3, 6)), "1": (torch.float32, (3, 6))}
