"""Checkpoint loading: every supported format loads and runs; bad input -> one-line InputError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gblr_compress.checkpoint import (
    check_inputs_fit,
    find_linear_names,
    load_calib,
    load_model,
    parse_input_spec,
    synthetic_inputs,
    vocab_hint,
)
from gblr_compress.errors import InputError
from samples.models import DigitsMLP, tiny_encoder


def _one_line_error(fn, *args, match: str, **kw) -> str:
    with pytest.raises(InputError, match=match) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture
def mlp() -> DigitsMLP:
    return DigitsMLP(hidden=32).eval()


def test_whole_module_bundle_state_dict_and_safetensors_load_and_run(tmp_path, mlp) -> None:
    x = torch.randn(5, 64)
    ref = mlp(x)
    torch.save(mlp, tmp_path / "m.pt")
    torch.save({"model": mlp, "example_inputs": x[:2], "calib": [x, x]}, tmp_path / "b.pt")
    big = DigitsMLP()  # the factory builds hidden=512
    torch.save(big.state_dict(), tmp_path / "sd.pth")
    save_file(big.state_dict(), str(tmp_path / "w.safetensors"))

    a = load_model(tmp_path / "m.pt")
    assert a.source_format == "module" and torch.allclose(a.model(x), ref)
    b = load_model(tmp_path / "b.pt")
    assert b.source_format == "bundle" and len(b.calib) == 2 and b.example_inputs.shape == (2, 64)
    assert torch.allclose(b.model(x), ref)
    for name, fmt in (("sd.pth", "state_dict"), ("w.safetensors", "safetensors")):
        c = load_model(tmp_path / name, factory="samples.models:digits_mlp")
        assert c.source_format == fmt and not c.model.training
        assert torch.allclose(c.model(x), big(x))
    assert find_linear_names(a.model) == ["fc1", "fc2", "fc3"]


def test_bad_model_files_give_one_line_errors(tmp_path, mlp) -> None:
    _one_line_error(load_model, tmp_path / "nope.pt", match="no such file")
    (tmp_path / "rand.pt").write_bytes(np.random.default_rng(0).bytes(2000))
    _one_line_error(load_model, tmp_path / "rand.pt", match="cannot read .* supported")
    torch.save(mlp, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    _one_line_error(load_model, tmp_path / "trunc.pt", match="cannot read")
    torch.jit.save(torch.jit.script(mlp), tmp_path / "ts.pt")
    _one_line_error(load_model, tmp_path / "ts.pt", match="TorchScript")
    torch.save(mlp.state_dict(), tmp_path / "sd.pt")
    _one_line_error(load_model, tmp_path / "sd.pt", match="--factory")
    torch.save(nn.Sequential(nn.Conv1d(1, 1, 3), nn.ReLU()), tmp_path / "conv.pt")
    _one_line_error(load_model, tmp_path / "conv.pt", match="no nn.Linear")
    # Hidden 32 weights do not fit the hidden 512 factory.
    _one_line_error(load_model, tmp_path / "sd.pt", factory="samples.models:digits_mlp", match="does not match")
    # A pickled module is refused on the safe path.
    _one_line_error(load_model, tmp_path / "m.pt", factory="samples.models:digits_mlp", match="weights_only")


@pytest.mark.parametrize(
    "factory, match",
    [
        ("no_colon", "package.module:function"),
        ("no_such_pkg_xyz.mod:f", "cannot import"),
        ("samples.models:missing", "no attribute"),
        ("samples.models:__all__", "not callable"),
        ("samples.models:EncoderLayer", "failed"),
    ],
)
def test_bad_factory(tmp_path, factory, match) -> None:
    save_file(DigitsMLP().state_dict(), str(tmp_path / "w.safetensors"))
    _one_line_error(load_model, tmp_path / "w.safetensors", factory=factory, match=match)


def test_hf_directory_needs_transformers(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        _one_line_error(load_model, tmp_path, match="pip install transformers")
    else:
        _one_line_error(load_model, tmp_path, match="cannot load HuggingFace")


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
