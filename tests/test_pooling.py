"""sentence-transformers folders: the declared chain is read, pooled as
sentence-transformers pools, and kept through load, compression and export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gblr_compress.checkpoint import load_model
from gblr_compress.cli import main
from gblr_compress.pooling import SentenceChain, SentencePooling, pool, read_sentence_chain
from gblr_compress.text import forward_inputs

ST = "sentence_transformers.models."


def _st_folder(folder: Path, pooling: dict, chain: tuple[str, ...] = ("Transformer", "Pooling", "Normalize")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize", "Dense": "2_Dense"}
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": paths[k], "type": ST + k} for i, k in enumerate(chain)]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    return folder


def test_the_chain_a_folder_declares(tmp_path) -> None:
    assert read_sentence_chain(tmp_path) is None  # a plain HuggingFace folder
    mean = _st_folder(tmp_path / "mean", {"pooling_mode_mean_tokens": True})
    assert read_sentence_chain(mean) == SentenceChain(mean / "", ("mean",), True)
    both = _st_folder(tmp_path / "both", {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True},
                      ("Transformer", "Pooling"))
    assert read_sentence_chain(both) == SentenceChain(both / "", ("cls", "mean"), False)
    dense = _st_folder(tmp_path / "dense", {"pooling_mode_mean_tokens": True}, ("Transformer", "Pooling", "Dense"))
    assert "chains Dense after the pooling" in read_sentence_chain(dense)
    weighted = _st_folder(tmp_path / "weighted", {"pooling_mode_weightedmean_tokens": True})
    assert "pooling_mode_weightedmean_tokens" in read_sentence_chain(weighted)
    assert "no pooling mode" in read_sentence_chain(_st_folder(tmp_path / "none", {}))
    other = _st_folder(tmp_path / "other", {"pooling_mode_mean_tokens": True}, ("Pooling", "Transformer"))
    assert read_sentence_chain(other) is None  # not a Transformer followed by a Pooling
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "modules.json").write_text("[{")
    assert "cannot be read" in read_sentence_chain(tmp_path / "broken")


def test_pooling_modes_as_sentence_transformers_computes_them() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 3, generator=g)  # (B, T, H)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    got = pool(h, mask, ("cls", "max", "mean", "mean_sqrt_len"))  # (B, 4 H)
    real = [h[0], h[1, :2]]  # each row's real tokens
    want = torch.stack([torch.cat([r[0], r.max(0).values, r.mean(0), r.sum(0) / len(r) ** 0.5]) for r in real])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(pool(h, None, ("mean",)), h.mean(1))
    with pytest.raises(ValueError, match="unknown pooling mode"):
        pool(h, mask, ("lasttoken",))


class _NoTypes(nn.Module):
    """A base model whose forward takes no token_type_ids, returning a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        return (self.fc(self.emb(input_ids)),)


def test_the_wrapper_passes_what_the_base_takes_and_normalizes() -> None:
    torch.manual_seed(0)
    base = _NoTypes()
    wrapped = SentencePooling(base, ("mean",), normalize=True)
    assert wrapped.input_names == ("input_ids", "attention_mask")
    assert forward_inputs(wrapped) == ["input_ids", "attention_mask"]  # what text batches carry
    ids = torch.randint(0, 20, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    out = wrapped(ids, mask, token_type_ids=torch.zeros_like(ids))  # ignored: the base does not take it
    assert list(out) == ["last_hidden_state", "sentence_embedding"]  # a tuple's first tensor: the token states
    torch.testing.assert_close(out["sentence_embedding"].norm(dim=1), torch.ones(3))
    h = base(ids)[0]
    torch.testing.assert_close(out["sentence_embedding"][0], nn.functional.normalize(h[0, :4].mean(0), dim=0))
    with pytest.raises(ValueError, match="modes must be among"):
        SentencePooling(base, ("weightedmean",), normalize=False)


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT saved as a sentence-transformers folder (mean pooling, normalized),
    with a word-level tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from tests.test_real_models import _sentences

    d = tmp_path_factory.mktemp("st")
    folder = d / "model"
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_sentences(300), trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                                                      "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}))
    _st_folder(folder, {"pooling_mode_mean_tokens": True})
    (d / "calib.txt").write_text("\n".join(_sentences(96, seed=1)) + "\n")
    return folder


def test_a_sentence_transformers_folder_keeps_its_pooling_through_the_command(st_folder, tmp_path) -> None:
    notes: list[str] = []
    loaded = load_model(st_folder, note=notes.append)
    assert isinstance(loaded.model, SentencePooling) and "sentence-transformers folder" in notes[0]
    before = {p.name: p.read_bytes() for p in st_folder.rglob("*") if p.is_file()}
    out = tmp_path / "st.onnx"
    # A pattern written for the plain folder still selects the encoder's layers.
    result = CliRunner().invoke(main, [str(st_folder), "--steps", "4", "--budget", "0.5", "--quiet",
                                       "--calib-text", str(st_folder.parent / "calib.txt"), "--max-length", "16",
                                       "--batch-size", "8", "--include", "encoder.layer.*", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "is a sentence-transformers folder: BertModel with its mean pooling, normalized" in result.output
    assert {p.name: p.read_bytes() for p in st_folder.rglob("*") if p.is_file()} == before  # untouched
    report = json.loads((tmp_path / "st.report.json").read_text())
    layers = {l["name"]: l for l in report["layers"]}
    assert sum(l["status"] == "compressed" for l in layers.values()) >= 1 and report["parity"]["ok"]
    assert all(name.startswith("model.encoder.layer.") for name in layers)  # the pooler was not included
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # The base model's outputs as the plain folder gives them, and the embedding.
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state", "pooler_output", "sentence_embedding"]
    ids = np.random.default_rng(3).integers(4, 40, (3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    tokens, _, sentence = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    assert tokens.shape == (3, 9, 32) and sentence.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(sentence, axis=1), 1.0, atol=1e-5)
    # The graph pools its own token states as sentence-transformers does.
    m = mask[..., None].astype(np.float32)
    pooled = (tokens * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(sentence, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=1e-5)


def test_the_output_term_leaves_out_what_a_model_declares_pooled() -> None:
    from gblr_compress.distill import output_loss, output_term

    torch.manual_seed(0)
    wrapped = SentencePooling(_NoTypes(), ("mean",), normalize=True)
    ids = torch.randint(0, 20, (2, 5))
    out = wrapped(ids, torch.ones_like(ids))
    assert list(output_term(out, wrapped)) == ["last_hidden_state"]
    assert output_term(out, _NoTypes()) is out  # nothing declared: every output
    alone = {"sentence_embedding": out["sentence_embedding"]}
    assert output_term(alone, wrapped) is alone  # never an empty comparison
    # The embedding moves, the token states do not: no loss.
    moved = {**out, "sentence_embedding": -out["sentence_embedding"]}
    assert output_loss(output_term(moved, wrapped), output_term(out, wrapped)).item() == 0.0
    assert output_loss(moved, out).item() > 0.0


def test_layer_patterns_match_with_or_without_the_wrappers_prefix() -> None:
    from gblr_compress.adapter import DictCall
    from gblr_compress.swap import find_linears
    from tests.cli_models import DictEncoder

    wrapped = SentencePooling(_NoTypes(), ("mean",), normalize=False)
    assert find_linears(wrapped, include=["fc"]) == find_linears(wrapped, include=["model.fc"]) == ["model.fc"]
    assert find_linears(wrapped, exclude=["fc"]) == [] and find_linears(wrapped, include=["emb*"]) == []
    call = DictCall(DictEncoder())
    assert find_linears(call, include=["fc1"]) == ["model.fc1"]
    assert find_linears(call, exclude=["fc*"]) == []
    assert find_linears(nn.Sequential(_NoTypes()), include=["fc"]) == []  # no prefix declared: names as they are


def test_a_chain_not_computed_here_loads_the_base_model_with_a_note(st_folder, tmp_path) -> None:
    folder = tmp_path / "dense"
    shutil.copytree(st_folder, folder)
    _st_folder(folder, {"pooling_mode_mean_tokens": True}, ("Transformer", "Pooling", "Dense"))
    notes: list[str] = []
    loaded = load_model(folder, note=notes.append)
    assert not isinstance(loaded.model, SentencePooling)
    assert any("chains Dense after the pooling" in n and "compressed as its base model" in n for n in notes)


def _move_base_into_subfolder(folder: Path, sub: str = "0_Transformer") -> None:
    """Older sentence-transformers folders keep the base model and its tokenizer in
    ``0_Transformer/``, which ``modules.json`` names as the Transformer's path."""
    (folder / sub).mkdir()
    for p in list(folder.iterdir()):
        if p.is_file() and p.name != "modules.json":
            p.rename(folder / sub / p.name)
    modules = json.loads((folder / "modules.json").read_text())
    modules[0]["path"] = sub
    (folder / "modules.json").write_text(json.dumps(modules))


def test_a_folder_with_its_base_model_in_a_subfolder_loads_and_tokenizes(st_folder, tmp_path) -> None:
    from gblr_compress.pooling import transformer_folder

    folder = tmp_path / "old"
    shutil.copytree(st_folder, folder)
    _move_base_into_subfolder(folder)
    assert not (folder / "config.json").exists() and not (folder / "tokenizer.json").exists()
    assert transformer_folder(folder) == folder / "0_Transformer" and transformer_folder(st_folder) == st_folder
    assert read_sentence_chain(folder) == SentenceChain(folder / "0_Transformer", ("mean",), True)
    out = tmp_path / "old.onnx"
    result = CliRunner().invoke(main, [str(folder), "--steps", "0", "--budget", "0.5", "--quiet",
                                       "--calib-text", str(st_folder.parent / "calib.txt"), "--max-length", "16",
                                       "--batch-size", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()][-1] == "sentence_embedding"
    # A chain not computed here still finds its base model in the subfolder.
    dense = tmp_path / "old_dense"
    shutil.copytree(folder, dense)
    modules = json.loads((dense / "modules.json").read_text())
    modules[2] = {"idx": 2, "name": "2", "path": "2_Dense", "type": ST + "Dense"}
    (dense / "modules.json").write_text(json.dumps(modules))
    notes: list[str] = []
    loaded = load_model(dense, note=notes.append)
    assert type(loaded.model).__name__ == "BertModel" and any("compressed as its base model" in n for n in notes)
