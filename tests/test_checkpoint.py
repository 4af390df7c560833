"""Checkpoint loading: every supported format loads and runs; bad input -> one-line InputError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gblr_compress.checkpoint import load_model
from gblr_compress.errors import InputError
from gblr_compress.swap import find_linears
from samples.models import DigitsMLP


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
    assert find_linears(a.model) == ["fc1", "fc2", "fc3"]


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


def test_hf_folder_without_its_named_head_loads_the_base_model(tmp_path) -> None:
    """A sentence-transformers folder names MPNetForMaskedLM but ships the encoder only:
    the base model is loaded (and said so), not a model with a random head."""
    import json

    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=8)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    notes: list[str] = []
    loaded = load_model(tmp_path, note=notes.append)
    assert type(loaded.model).__name__ == "BertModel"
    assert len(notes) == 1 and "BertForMaskedLM" in notes[0] and "base model" in notes[0]
    # a folder whose weights hold the named head loads that class, with no note
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "mlm")
    notes.clear()
    assert type(load_model(tmp_path / "mlm", note=notes.append).model).__name__ == "BertForMaskedLM"
    assert notes == []


def test_training_checkpoint_layouts_load_and_their_other_keys_are_named(tmp_path, mlp) -> None:
    # What training scripts save: the model beside its optimizer state and epoch.
    x = torch.randn(5, 64)
    torch.save({"model": mlp, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    notes: list[str] = []
    got = load_model(tmp_path / "ckpt.pt", note=notes.append)
    assert got.source_format == "bundle" and torch.allclose(got.model(x), mlp(x))
    assert len(notes) == 1 and "ignoring key(s) epoch, optimizer" in notes[0]
    big = DigitsMLP()  # the factory builds hidden=512
    for key in ("state_dict", "model_state_dict", "model"):
        torch.save({key: big.state_dict(), "epoch": 3}, tmp_path / f"{key}.pt")
        # Without the factory: one line naming where the weights are; with it: loaded safely.
        _one_line_error(load_model, tmp_path / f"{key}.pt", match=f"state_dict under '{key}'.*--factory")
        c = load_model(tmp_path / f"{key}.pt", factory="samples.models:digits_mlp")
        assert c.source_format == "state_dict" and torch.allclose(c.model(x), big(x))
