"""Models as users bring them: a pickled wrapper with an unused layer, a tied head,
text calibration, the memory guard, and a Llama-architecture HuggingFace folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from gblr_compress.cli import main
from gblr_compress.errors import InputError
from tests.cli_models import DictEncoder, SentenceWrapper, TiedLM

pytest.importorskip("tokenizers")

WORDS = "the a cat dog sat ran on under mat log big small red blue and then it was".split()
FAST = ["--steps", "4", "--budget", "0.5", "--quiet"]


def _sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
            for k in torch.randint(4, 14, (n,), generator=g)]


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _without_few_texts(msg: str) -> list[str]:
    """The output's lines less the warning that the fixture's 96 texts draw."""
    return [line for line in msg.strip().splitlines() if not line.startswith("warning: only 96 calibration texts")]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer folder, text files, and pickled models."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("real")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_sentences(300), trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    (d / "tok").mkdir()
    tok.save(str(d / "tok" / "tokenizer.json"))
    (d / "tok" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]", "eos_token": "</s>",
        "unk_token": "[UNK]"}))
    (d / "calib.txt").write_text("\n".join(_sentences(96, seed=1)) + "\n")
    (d / "calib.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in _sentences(96, seed=2)) + "\n")
    torch.manual_seed(0)
    torch.save(SentenceWrapper().eval(), d / "wrapper.pt")
    torch.save(TiedLM().eval(), d / "tied.pt")
    return {"dir": d, "tok": d / "tok", "txt": d / "calib.txt", "jsonl": d / "calib.jsonl",
            "wrapper": d / "wrapper.pt", "tied": d / "tied.pt"}


def _layers(report_path: Path) -> dict[str, dict]:
    return {l["name"]: l for l in json.loads(report_path.read_text())["layers"]}


@pytest.mark.parametrize("text", ["txt", "jsonl"])
def test_wrapper_with_unused_layer_from_text(work, tmp_path, text) -> None:
    out = tmp_path / "m.onnx"
    code, msg = _run([work["wrapper"], *FAST, "--calib-text", work[text], "--tokenizer", work["tok"],
                      "--max-length", "16", "--batch-size", "8", "-o", out])
    assert code == 0, msg
    assert "warning: only 96 calibration texts" in msg  # fewer than a few hundred
    layers = _layers(tmp_path / "m.report.json")
    assert layers["pooler"]["status"] == "excluded"
    assert layers["pooler"]["reason"] == "not used by the model's outputs"
    assert {layers[n]["status"] for n in ("fc1", "fc2")} <= {"compressed", "skipped"}
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["parity"]["ok"] and report["totals"]["linear_dense_cost"] == 2 * 32 * 64
    assert report["memory"]["estimate"] > 0 and report["memory"]["peak"]["load"] > 0
    # the deployed file runs in onnxruntime on new text, with its own shapes
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(5, 20, (3, 11)).astype(np.int64)
    (emb,) = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_few_texts_warn_and_a_table_is_refused(work, tmp_path) -> None:
    few = tmp_path / "few.txt"
    few.write_text("\n".join(_sentences(40, seed=3)) + "\n")
    code, msg = _run([work["wrapper"], *FAST, "--calib-text", few, "--tokenizer", work["tok"],
                      "-o", tmp_path / "m.onnx", "--trust-checkpoint"])
    assert code == 0 and "warning: only 40 calibration texts" in msg and "a few hundred" in msg, msg
    table = tmp_path / "t.csv"
    table.write_text("text,label\n" + "\n".join(f"{t},1" for t in _sentences(200, seed=4)) + "\n")
    code, msg = _run([work["wrapper"], *FAST, "--calib-text", table, "--tokenizer", work["tok"],
                      "-o", tmp_path / "t.onnx", "--trust-checkpoint"])
    assert code == 2 and msg.strip().splitlines() == [msg.strip()] and "is a table" in msg, msg
    assert not (tmp_path / "t.onnx").exists()


def test_tied_head_left_dense_unless_asked(work, tmp_path) -> None:
    ids = torch.randint(5, 20, (8, 12))
    torch.save([ids[i : i + 2] for i in range(0, 8, 2)], tmp_path / "c.pt")
    code, msg = _run([work["tied"], *FAST, "--calib", tmp_path / "c.pt", "-o", tmp_path / "a.onnx"])
    assert code == 0, msg
    layers = _layers(tmp_path / "a.report.json")
    assert layers["lm_head"]["status"] == "excluded" and layers["lm_head"]["reason"] == "weight tied to emb"
    code, msg = _run([work["tied"], *FAST, "--calib", tmp_path / "c.pt", "--compress-tied", "-o", tmp_path / "b.onnx"])
    assert code == 0, msg
    assert _layers(tmp_path / "b.report.json")["lm_head"]["status"] in ("compressed", "skipped")
    assert json.loads((tmp_path / "b.report.json").read_text())["parity"]["ok"]


@pytest.mark.parametrize(("case", "needle"), [
    ("no-tokenizer", "--tokenizer DIR"),
    ("bad-jsonl", "not a JSON line"),
    ("missing-text", "not found"),
    ("both", "not both"),
    ("tiny-memory", "available"),
])
def test_bad_text_calibration_and_memory_refusals(work, tmp_path, case, needle) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    args = {
        "no-tokenizer": ["--calib-text", work["txt"]],
        "bad-jsonl": ["--calib-text", tmp_path / "bad.jsonl", "--tokenizer", work["tok"]],
        "missing-text": ["--calib-text", tmp_path / "nope.txt", "--tokenizer", work["tok"]],
        "both": ["--calib-text", work["txt"], "--calib", work["txt"], "--tokenizer", work["tok"]],
        "tiny-memory": ["--calib-text", work["txt"], "--tokenizer", work["tok"], "--max-memory", "0.001"],
    }[case]
    out = tmp_path / "o" / "m.onnx"
    out.parent.mkdir()
    # --trust-checkpoint: the pickled wrapper's load warning would be a second line.
    code, msg = _run([work["wrapper"], *FAST, *args, "-o", out, "--trust-checkpoint"])
    assert code == 2, msg
    lines = _without_few_texts(msg)
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], msg
    assert list(out.parent.iterdir()) == []  # nothing written


def test_tiny_llama_folder_compresses_exports_and_matches(work, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    import shutil

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, pad_token_id=0, eos_token_id=4, bos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    for f in work["tok"].iterdir():
        shutil.copy(f, folder / f.name)
    out = tmp_path / "llama.onnx"
    code, msg = _run([folder, *FAST, "--calib-text", work["txt"], "--max-length", "16", "--batch-size", "4",
                      "-o", out])
    assert code == 0, msg
    report = json.loads((tmp_path / "llama.report.json").read_text())
    layers = {l["name"]: l for l in report["layers"]}
    assert layers["lm_head"]["status"] == "excluded" and "tied" in layers["lm_head"]["reason"]
    assert sum(l["status"] == "compressed" for l in layers.values()) >= 1
    assert report["parity"]["ok"] and report["source"]["format"] == "huggingface"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits"]  # no KV cache in the graph
    ids = np.random.default_rng(1).integers(5, 20, (2, 9)).astype(np.int64)
    feeds = {i.name: (ids if i.name == "input_ids" else np.ones_like(ids)) for i in sess.get_inputs()}
    (logits,) = sess.run(None, feeds)
    assert logits.shape == (2, 9, 64) and np.isfinite(logits).all()


def test_pickled_dict_forward_model_with_its_own_tokenizer(work, tmp_path) -> None:
    # A pickled sentence-transformers model: forward(features) takes one dict and
    # returns it with its outputs added, and it carries its tokenizer. No --tokenizer.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = DictEncoder().eval()
    model.tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(work["tok"] / "tokenizer.json"), pad_token="[PAD]", unk_token="[UNK]")
    model.tokenizer.model_input_names = ["input_ids", "attention_mask"]
    torch.save(model, tmp_path / "st.pt")
    out = tmp_path / "st.onnx"
    code, msg = _run([tmp_path / "st.pt", *FAST, "--calib-text", work["txt"], "--max-length", "16",
                      "--batch-size", "8", "--trust-checkpoint", "-o", out])
    assert code == 0, msg
    assert "its forward takes one dict of token tensors (DictEncoder)" in msg
    report = json.loads((tmp_path / "st.report.json").read_text())
    assert report["parity"]["ok"]
    assert {l["name"]: l["status"] for l in report["layers"]}["model.fc1"] in ("compressed", "skipped")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["token_embeddings", "sentence_embedding"]
    ids = np.random.default_rng(2).integers(5, 20, (3, 10)).astype(np.int64)
    tokens, pooled = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    dense = model({"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones(3, 10, dtype=torch.int64)})
    assert tokens.shape == (3, 10, 32) and pooled.shape == (3, 32)
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(pooled), dense["sentence_embedding"].detach())
    assert cos.min() > 0.5  # the compressed model still computes what the dense one does


def test_t5_encoder_folder_whose_forward_reads_a_linears_weight(work, tmp_path) -> None:
    # T5's feed-forward reads ``wo.weight.dtype`` in its forward, so the compressed
    # layers that stand in for ``wo`` must answer it through distillation and export.
    transformers = pytest.importorskip("transformers")
    import shutil

    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                pad_token_id=0, eos_token_id=4)
    torch.manual_seed(0)
    folder = tmp_path / "t5"
    transformers.T5EncoderModel(cfg).eval().save_pretrained(folder)
    for f in work["tok"].iterdir():
        shutil.copy(f, folder / f.name)
    out = tmp_path / "t5.onnx"
    code, msg = _run([folder, *FAST, "--calib-text", work["txt"], "--max-length", "16", "-o", out])
    assert code == 0, msg
    report = json.loads((tmp_path / "t5.report.json").read_text())
    layers = {l["name"]: l for l in report["layers"]}
    assert layers["encoder.block.0.layer.1.DenseReluDense.wo"]["status"] == "compressed"
    assert report["parity"]["ok"]


def test_heldout_text_decides_the_heldout_figures(work, tmp_path) -> None:
    # --heldout: every calibration text trains, and the report's held-out cosine is the
    # ONNX file's on the --heldout texts (tokenized like the calibration text).
    from gblr_compress.text import load_tokenizer, text_batches

    held_txt = tmp_path / "held.txt"
    held_txt.write_text("\n".join(_sentences(24, seed=7)) + "\n")
    out = tmp_path / "m.onnx"
    code, msg = _run([work["wrapper"], *FAST, "--calib-text", work["txt"], "--heldout", held_txt,
                      "--tokenizer", work["tok"], "--max-length", "16", "--batch-size", "8", "-o", out])
    assert code == 0, msg
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["source"]["heldout"] == str(held_txt)
    dense = torch.load(work["wrapper"], weights_only=False).eval()
    batches = text_batches(_sentences(24, seed=7), load_tokenizer(work["tok"]), dense, 16, 8)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    cos = []
    with torch.no_grad():
        for b in batches:
            (got,) = sess.run(None, {k: v.numpy() for k, v in b.items() if k in {"input_ids", "attention_mask"}})
            ref = dense(**{k: v for k, v in b.items() if k in {"input_ids", "attention_mask"}})
            cos.append(torch.nn.functional.cosine_similarity(torch.from_numpy(got), ref, dim=-1))
    assert abs(float(torch.cat(cos).mean()) - report["quality"]["frozen"]["cosine"]) < 1e-4


def test_heldout_refusals(work, tmp_path) -> None:
    out = tmp_path / "o" / "m.onnx"
    out.parent.mkdir()
    ids = torch.randint(5, 20, (4, 9))
    torch.save([ids.float()], tmp_path / "float_ids.pt")
    for args, needle in (
        (["--heldout", tmp_path / "nope.txt"], "not found"),
        (["--heldout", tmp_path / "float_ids.pt"], "held-out data (--heldout) does not fit"),
    ):
        code, msg = _run([work["wrapper"], *FAST, "--calib-text", work["txt"], "--tokenizer", work["tok"],
                          *args, "-o", out, "--trust-checkpoint"])
        lines = _without_few_texts(msg)
        assert code == 2 and len(lines) == 1 and needle in lines[0], msg
        assert not list(out.parent.iterdir())


def test_target_fidelity_from_text_decides_on_the_shift_probe(work, tmp_path) -> None:
    # --calib-text without --heldout: every candidate is also scored on the held-out
    # texts' words reordered, and the chosen file keeps F on both figures.
    out = tmp_path / "t.onnx"
    base = [work["wrapper"], "--target-fidelity", "0.9", "--steps", "0", "--calib-text", work["txt"],
            "--tokenizer", work["tok"], "--max-length", "16", "--batch-size", "8", "--trust-checkpoint"]
    res = CliRunner().invoke(main, [str(a) for a in [*base, "-o", out, "--quiet"]])
    assert res.exit_code == 0, res.output
    assert "and on its words reordered (the shift probe)" in res.stderr  # says what it decided on
    report = json.loads((tmp_path / "t.report.json").read_text())
    cands = report["candidates"]
    assert len(cands) >= 8 and all("probe_cosine" in c["fidelity"] for c in cands)
    chosen = next(c for c in cands if c["chosen"])
    assert min(chosen["fidelity"]["cosine"], chosen["fidelity"]["probe_cosine"]) >= 0.9
    assert "held-out and shift-probe cosines >= 0.9" in report["deploy"]["choice"]
    # The probe is reordered text: by default the candidates then train on no reordered copies.
    assert report["source"]["reorder_copies"] == 0
    # The probe is the held-out texts' words reordered, tokenized like the calibration.
    from gblr_compress.job import Job, load_inputs
    from gblr_compress.text import load_tokenizer, read_texts, reorder_words, text_batches, text_row_sources

    inputs = load_inputs(Job(model=str(work["wrapper"]), output=str(tmp_path / "x.onnx"), calib_text=str(work["txt"]),
                             tokenizer=str(work["tok"]), max_length=16, batch_size=8, trust_checkpoint=True),
                         probe=True)
    texts, tok = read_texts(work["txt"]), load_tokenizer(work["tok"])
    # The held-out batches are the last 3 of 12 (rows grouped by length within runs of 8
    # batches): their texts are the ones the rows come from.
    held = sorted(text_row_sources(texts, tok, 16, 8)[-math.ceil(0.2 * 12) * 8:])
    want = text_batches(reorder_words([texts[i] for i in held], 0), tok, inputs.loaded.model, 16, 8)
    assert inputs.probe is not None and len(inputs.probe) == len(want)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(inputs.probe, want, strict=True))
    # --no-shift-probe (or --heldout): the held-out share alone.
    out2 = tmp_path / "n.onnx"
    res = CliRunner().invoke(main, [str(a) for a in [*base, "--no-shift-probe", "--allow-dense", "-o", out2,
                                                     "--quiet"]])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "n.report.json").read_text())
    assert all("probe_cosine" not in c["fidelity"] for c in report["candidates"])
    assert report["source"]["reorder_copies"] == 2  # no probe: the default copies train


def test_reordered_copies_of_the_training_texts_train_and_are_never_held_out(work, tmp_path) -> None:
    # --calib-text: by default the texts outside the held-out share also train as two
    # copies with their words reordered; the held-out share and the probe stay as they were.
    from gblr_compress import text as T
    from gblr_compress.job import Job, load_inputs, reorder_copy_count
    from gblr_compress.pipeline import CompressConfig, prepare

    def inputs_of(**kw):
        kw.setdefault("general_text", 0)  # the general English sentences have a test of their own
        return load_inputs(Job(model=str(work["wrapper"]), output=str(tmp_path / "x.onnx"),
                               calib_text=str(work["txt"]), tokenizer=str(work["tok"]), max_length=16, batch_size=8,
                               trust_checkpoint=True, **kw))

    texts = T.read_texts(work["txt"])
    assert len(texts) == 96  # 12 batches of 8: the last ceil(0.2 * 12) = 3 are held out, 72 texts train
    inputs = inputs_of()
    assert inputs.reorder_copies == 2
    tok = T.load_tokenizer(work["tok"])
    # The training texts are those of the first 9 batches' rows (grouped by length, so
    # not simply the first 72 texts), in file order.
    sources = T.text_row_sources(texts, tok, 16, 8)
    fit = [texts[i] for i in sorted(sources[:72])]
    assert fit != texts[:72] and sorted(sources) == list(range(96))
    words = sorted(w for t in fit for w in t.split())
    # The default: the first copy keeps the texts' lengths, the second is dealt into
    # varied lengths (4-60 words); both hold exactly the training texts' words.
    plain_texts = [T.reorder_words(fit, 1), T.reorder_words(fit, 2, T.varied_counts(len(words), 2))]
    assert [len(t.split()) for t in plain_texts[0]] == [len(t.split()) for t in fit]
    varied = [len(t.split()) for t in plain_texts[1]]
    assert varied != [len(t.split()) for t in fit] and max(varied) > max(len(t.split()) for t in fit)
    assert all(sorted(w for t in copy for w in t.split()) == words for copy in plain_texts)
    plain = [b for copy in plain_texts for b in T.text_batches(copy, tok, inputs.loaded.model, 16, 8)]
    assert all(torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(inputs.extra, plain, strict=True))
    # --copy-lengths same: both copies keep the texts' lengths.
    same = [b for k in (1, 2) for b in T.text_batches(T.reorder_words(fit, k), tok, inputs.loaded.model, 16, 8)]
    assert len(inputs_of(copy_lengths="same").extra) == 2 * 9
    assert all(torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(inputs_of(copy_lengths="same").extra, same, strict=True))
    # --vocab-share 0.5: each copy's words reordered, half of them drawn from the vocabulary.
    assert len(tok.words) == 17  # the test tokenizer's words (WORDS less "a")
    mixed = [T.mix_vocabulary(copy, tok.words, 0.5, k) for copy, k in zip(plain_texts, (1, 2), strict=True)]
    want = [b for copy in mixed for b in T.text_batches(copy, tok, inputs.loaded.model, 16, 8)]
    assert all(torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(inputs_of(vocab_share=0.5).extra, want, strict=True))
    assert mixed != plain_texts
    assert {w for copy in mixed for t in copy for w in t.split()} <= set(tok.words) | {"a"}
    prep = prepare(inputs.loaded.model, CompressConfig(budget=0.5), inputs.calib, held=inputs.held,
                   extra_fit=inputs.extra)
    assert len(prep.fit) == 9 + len(plain) and len(prep.held) == 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(prep.held, inputs.calib[9:], strict=True))
    # --heldout: every calibration text trains, so every one is copied.
    held = tmp_path / "held.txt"
    held.write_text("\n".join(_sentences(24, seed=5)) + "\n")
    assert len(inputs_of(heldout=str(held), reorder_copies=1).extra) == 12
    assert inputs_of(reorder_copies=0).extra == []
    # The auto rule: training texts kept within 1,000, at most 2 copies, none for a causal LM.
    assert [reorder_copy_count(None, n, False) for n in (72, 333, 334, 500, 501, 5000)] == [2, 2, 1, 1, 0, 0]
    assert reorder_copy_count(None, 72, True) == 0 and reorder_copy_count(3, 72, True) == 3
    # The command says in its report how many copies trained, and their share of drawn words.
    for extra, copies, share, lengths, varied in ((["--vocab-share", "0.5"], 2, 0.5, "auto", 1),
                                                  (["--reorder-copies", "0", "--vocab-share", "0.5"], 0, 0.0, "auto", 0),
                                                  (["--copy-lengths", "same"], 2, 0.0, "same", 0)):
        out = tmp_path / f"c{copies}{lengths}.onnx"
        code, msg = _run([work["wrapper"], *FAST, "--calib-text", work["txt"], "--tokenizer", work["tok"],
                          "--max-length", "16", "--batch-size", "8", "--trust-checkpoint", *extra, "-o", out])
        assert code == 0, msg
        source = json.loads((tmp_path / f"c{copies}{lengths}.report.json").read_text())["source"]
        assert source["reorder_copies"] == copies and source["vocab_share"] == share
        assert source["copy_lengths"] == lengths and source["varied_copies"] == varied


def test_general_english_sentences_train_beside_a_small_file_and_are_never_held_out(work, tmp_path) -> None:
    # --calib-text: the package's general English sentences fill the training texts up to
    # 2,000; they train (the init's statistics and the distillation) and are never held out.
    from gblr_compress import text as T
    from gblr_compress.job import GENERAL_FILL, Job, general_text_count, load_inputs
    from gblr_compress.pipeline import CompressConfig, prepare

    def inputs_of(**kw):
        return load_inputs(Job(model=str(work["wrapper"]), output=str(tmp_path / "x.onnx"),
                               calib_text=str(work["txt"]), tokenizer=str(work["tok"]), max_length=16, batch_size=8,
                               trust_checkpoint=True, **kw))

    shipped = T.general_texts(T.GENERAL_TEXTS)
    assert len(shipped) == T.GENERAL_TEXTS == 2000 and len(set(shipped)) == 2000
    assert T.general_texts(5, seed=1) == T.general_texts(5, seed=1) != T.general_texts(5, seed=2)
    assert set(T.general_texts(300)) <= set(shipped) and T.general_texts(0) == []
    for bad in (-1, 2001):
        with pytest.raises(InputError, match="--general-text must be in"):
            T.general_texts(bad)
    # The auto rule: up to 2,000 training texts, none for a causal LM nor for texts that
    # are not English; asked for, as asked.
    assert GENERAL_FILL == 2000
    english = ["The cat sat on the mat."]
    assert [general_text_count(None, english * n, False) for n in (72, 1999, 2000, 5000)] == [1928, 1, 0, 0]
    assert general_text_count(None, english * 72, True) == 0 and general_text_count(7, english * 72, True) == 7
    other = ["Die Katze sitzt auf der Matte.", "def f(x): return x + 1", "SELECT id FROM t;"]
    assert not T.looks_english(other) and general_text_count(None, other, False) == 0
    assert T.looks_english(other[:1] + english) and not T.looks_english([])
    assert general_text_count(5, other, False) == 5
    inputs, alone = inputs_of(reorder_copies=0, general_text=40), inputs_of(reorder_copies=0, general_text=0)
    assert inputs.general_texts == 40 and alone.general_texts == 0 and alone.general == []
    # The init's statistics use them too: a run without a distillation gets them as well.
    from gblr_compress.distill import DistillConfig

    still = inputs_of(reorder_copies=0, general_text=40, config=CompressConfig(distill=DistillConfig(steps=0)))
    assert still.general_texts == 40 and len(still.general) == 5
    assert inputs.extra == alone.extra == []  # kept apart from the reordered copies
    tok = T.load_tokenizer(work["tok"])
    want = T.text_batches(T.general_texts(40), tok, inputs.loaded.model, 16, 8)
    assert len(inputs.general) == len(want) == 5
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(inputs.general, want, strict=True))
    # They train, as the job passes them: the held-out share is the file's own last
    # batches, and the init's statistics see them beside the file's training texts.
    prep = prepare(inputs.loaded.model, CompressConfig(budget=0.5), inputs.calib, held=inputs.held,
                   extra_fit=inputs.extra + inputs.general)
    bare = prepare(alone.loaded.model, CompressConfig(budget=0.5), alone.calib, held=alone.held)
    assert len(prep.fit) == 9 + 5 and len(prep.held) == 3 and len(bare.fit) == 9
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(prep.held, inputs.calib[9:], strict=True))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(prep.fit[9:], want, strict=True))
    for name, moment in bare.stats.moments.items():
        assert moment.count < prep.stats.moments[name].count
        assert torch.equal(bare.stats.holdout[name].mean(), prep.stats.holdout[name].mean())
    # By default, after the two reordered copies of the 72 training texts.
    default = inputs_of()
    assert default.reorder_copies == 2 and default.general_texts == 1928
    tail = T.text_batches(T.general_texts(1928), tok, default.loaded.model, 16, 8)
    assert len(default.general) == len(tail) == math.ceil(1928 / 8)
    assert len(default.extra) == len(inputs_of(general_text=0).extra)  # the copies, as without them
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(default.general, tail, strict=True))
    # The command: its report counts them and a note says so; 0 turns them off.
    for extra, count in (([], 1928), (["--general-text", "0"], 0)):
        out = tmp_path / f"g{count}.onnx"
        code, msg = _run([work["wrapper"], *FAST, "--calib-text", work["txt"], "--tokenizer", work["tok"],
                          "--max-length", "16", "--batch-size", "8", "--trust-checkpoint", *extra, "-o", out])
        assert code == 0, msg
        report = json.loads((tmp_path / f"g{count}.report.json").read_text())
        assert report["source"]["general_texts"] == count
        assert any("general English sentences" in n for n in report["notes"]) == bool(count)


def test_token_calibration_is_decoded_to_text_when_the_tokenizer_is_found(work, tmp_path) -> None:
    # --calib's token batches of an encoder, decoded with the tokenizer found, calibrate
    # as --calib-text does: reordered copies and general English sentences beside them.
    from gblr_compress import text as T
    from gblr_compress.job import Job, load_inputs

    tok = T.load_tokenizer(work["tok"])
    texts = T.read_texts(work["txt"])
    wrapper = torch.load(work["wrapper"], weights_only=False)
    batches = T.text_batches(texts, tok, wrapper, 16, 8)
    assert sorted(T.decode_token_batches(batches, tok)) == sorted(texts)  # batched by length
    # Padding is left out by the mask, special tokens by the decoder; what is no token
    # batch, or holds ids outside the vocabulary, is not decoded.
    assert T.decode_token_batches([{"input_ids": torch.tensor([[2, 5, 3, 0]]),
                                    "attention_mask": torch.tensor([[1, 1, 1, 0]])}], tok) == [tok.decode([5])]
    assert T.decode_token_batches([{"input_ids": torch.tensor([[5, 6]])}], tok) == [tok.decode([5, 6])]
    # Rows that do not tokenize back to their ids are no text of this tokenizer's: a
    # sentence pair's two segments, or ids a tokenizer never makes ([CLS] inside).
    pair = torch.tensor([tok.encode("the cat", True) + tok.encode("a dog", True)[1:]])
    assert T.decode_token_batches([{"input_ids": pair}], tok) is None
    assert T.decode_token_batches([{"input_ids": torch.tensor([[5, 2, 6]])}], tok) is None

    def fails(ids):
        raise ValueError("no such piece")

    from dataclasses import replace

    assert T.decode_token_batches(batches, replace(tok, decode=fails)) is None
    for bad in ([torch.ones(2, 3, dtype=torch.long)], [{"input_ids": torch.ones(2, 3)}],
                [{"input_ids": torch.tensor([[tok.vocab_size]])}], [{"input_ids": torch.tensor([[0]])}], []):
        assert T.decode_token_batches(bad, tok) is None
    # The tokenizer in the local folder a HuggingFace model was loaded from.
    holder = torch.nn.Module()
    holder.inner = torch.nn.Module()
    holder.inner.config = type("Config", (), {"_name_or_path": str(work["tok"])})()
    assert T.named_tokenizer(holder).source == str(work["tok"])
    holder.inner.config._name_or_path = str(tmp_path / "gone")
    assert T.named_tokenizer(holder) is None and T.named_tokenizer(wrapper) is None
    # A Hub model id: the tokenizer in the local HuggingFace cache (local files only).
    pytest.importorskip("transformers")
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    for f in work["tok"].iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    holder.inner.config._name_or_path = "acme/tiny"
    cached = T.named_tokenizer(holder, cache_dir=tmp_path / "hub")
    assert cached.source == "acme/tiny in the local HuggingFace cache" and cached.vocab_size == tok.vocab_size
    holder.inner.config._name_or_path = "acme/elsewhere"
    assert T.named_tokenizer(holder, cache_dir=tmp_path / "hub") is None

    calib = tmp_path / "calib.pt"
    torch.save(batches, calib)

    def inputs_of(**kw):
        return load_inputs(Job(model=str(work["wrapper"]), output=str(tmp_path / "x.onnx"), calib=str(calib),
                               max_length=16, batch_size=8, trust_checkpoint=True, **kw))

    decoded = inputs_of(tokenizer=str(work["tok"]))
    (tmp_path / "decoded.txt").write_text("\n".join(T.decode_token_batches(batches, tok)) + "\n")
    text = load_inputs(Job(model=str(work["wrapper"]), output=str(tmp_path / "x.onnx"),
                           calib_text=str(tmp_path / "decoded.txt"),
                           tokenizer=str(work["tok"]), max_length=16, batch_size=8, trust_checkpoint=True))
    assert "decoded to 96 texts" in decoded.decoded and str(work["tok"]) in decoded.decoded
    assert decoded.general_texts == text.general_texts > 0 and decoded.reorder_copies == text.reorder_copies == 2
    for a, b in ((decoded.calib, text.calib), (decoded.extra, text.extra), (decoded.general, text.general)):
        assert len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    # Kept as given: asked for, or no tokenizer found (this wrapper carries none).
    for kept in (inputs_of(tokenizer=str(work["tok"]), keep_calib_tokens=True), inputs_of()):
        assert kept.decoded is None and kept.general_texts == 0 and kept.extra == []
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(kept.calib, batches, strict=True))
    # The command's report says so.
    out = tmp_path / "d.onnx"
    code, msg = _run([work["wrapper"], *FAST, "--calib", calib, "--tokenizer", work["tok"], "--max-length", "16",
                      "--batch-size", "8", "--trust-checkpoint", "-o", out])
    assert code == 0, msg
    report = json.loads((tmp_path / "d.report.json").read_text())
    assert any("decoded to 96 texts" in n for n in report["notes"]) and report["source"]["general_texts"] > 0
