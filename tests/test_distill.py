"""Distillation with proximal width updates, and freezing, on small real models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gblr_compress.budget import budget_cost, project_widths_, total_cost
from gblr_compress.distill import (
    DistillConfig,
    _Recompute,
    _TeacherCache,
    activation_bytes_per_position,
    agreement,
    distill_,
    feature_modules,
    gblr_layers,
    normalized_mse,
    output_loss,
)
from gblr_compress.errors import ConfigError
from gblr_compress.freeze import freeze_, recover_
from gblr_compress.layer import FrozenGBLR, GBLRLayerConfig, GBLRLinear
from gblr_compress.progress import ProgressEvent
from gblr_compress.swap import find_linears, replace_module
from samples.models import TinyEncoder


def _token_batches(gen: torch.Generator, count: int, B: int = 4, T: int = 12) -> list[dict]:
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 50, (B, T), generator=gen)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[:, T - 3 :] = torch.randint(0, 2, (B, 3), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _swap_from_linear(model: torch.nn.Module, groups: int, rank: int) -> None:
    for name in find_linears(model):
        lin = model.get_submodule(name)
        replace_module(model, name, GBLRLinear.from_linear(lin, GBLRLayerConfig(groups, rank)))


def _tiny_case(seed: int, groups: int, rank: int, budget: float, batches: int = 4):
    """A one-layer TinyEncoder teacher, a GBLR student of it, its cost bound and token batches."""
    gen = torch.Generator().manual_seed(seed)
    teacher = TinyEncoder(vocab=50, hidden=32, layers=1, heads=4, ffn=64, max_len=16, classes=3).eval()
    student = copy.deepcopy(teacher)
    _swap_from_linear(student, groups=groups, rank=rank)
    return teacher, student, budget_cost(list(gblr_layers(student).values()), budget), _token_batches(gen, batches)


def test_dict_input_encoder_runs_the_whole_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = TinyEncoder(vocab=50, hidden=32, layers=1, heads=4, ffn=64, max_len=16, classes=3).eval()
    student = copy.deepcopy(teacher)
    _swap_from_linear(student, groups=4, rank=2)
    layers = list(gblr_layers(student).values())
    max_cost = budget_cost(layers, 0.3)
    calib, hold = _token_batches(gen, 6), _token_batches(gen, 2)
    seen: list[ProgressEvent] = []
    result = distill_(
        student, teacher, calib, max_cost, DistillConfig(steps=12, eval_every=4), holdout=hold, progress=seen.append
    )
    assert [p.done for p in seen] == list(range(1, 13)) and {p.phase for p in seen} == {"distill"}
    assert all(p.cost <= max_cost for p in seen)
    assert result.heldout_after <= result.heldout_before
    # No gradient outlives the loop (they would be carried through freeze and export).
    assert all(p.grad is None for p in student.parameters())
    rec = recover_(student, teacher, calib, max_cost, DistillConfig(steps=4, eval_every=2), holdout=hold)
    assert rec.heldout_after <= rec.heldout_before
    records = freeze_(student)
    assert set(records) == set(find_linears(teacher)) - {"head"} | {"head"}
    assert not gblr_layers(student)
    assert sum(r.cost for r in records.values()) <= max_cost
    out = student(**hold[0])
    assert out.shape == (4, 3) and torch.isfinite(out).all()


def test_distill_is_deterministic_for_a_seed_with_or_without_the_teacher_cache() -> None:
    gen = torch.Generator().manual_seed(1)
    teacher = TinyEncoder(vocab=50, hidden=16, layers=1, heads=2, ffn=32, max_len=16).eval()
    calib, hold = _token_batches(gen, 3), _token_batches(gen, 1)
    outs, histories = [], []
    for cache_mb in (4096.0, 4096.0, 0.0):  # the teacher is fixed: keeping its outputs changes nothing
        student = copy.deepcopy(teacher)
        _swap_from_linear(student, groups=2, rank=2)
        layers = list(gblr_layers(student).values())
        cfg = DistillConfig(steps=8, seed=3, eval_every=2, teacher_cache_mb=cache_mb)
        result = distill_(student, teacher, calib, budget_cost(layers, 0.5), cfg, holdout=hold)
        outs.append(student(**calib[0]))
        histories.append([(h["step"], h["loss"], h["heldout"]) for h in result.history])
    for out, history in zip(outs[1:], histories[1:]):
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
        assert history == histories[0]


class _TinyLM(nn.Module):
    """Token ids -> per-position logits over a vocabulary 8x the hidden width."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.mid = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 64)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        return {"logits": self.lm_head(torch.tanh(self.mid(self.embed(input_ids)))), "extra": None}


def test_teacher_cache_keeps_a_widening_head_s_input_and_remakes_its_output_exactly() -> None:
    gen = torch.Generator().manual_seed(4)
    teacher = _TinyLM().eval()
    batch = _token_batches(gen, 1)[0]
    cache = _TeacherCache(teacher, None, 2**30)
    first, _ = cache(0, batch)
    (kept, _), = cache.kept.values()
    assert isinstance(kept["logits"], _Recompute) and cache.used == 4 * 12 * 8 * 4  # the hidden states
    again, _ = cache(0, batch)
    assert torch.equal(again["logits"], first["logits"]) and list(again) == ["logits"]
    cache(1, batch, keep=False)  # a batch that will not come round again is not kept
    assert list(cache.kept) == [0]


def test_distill_of_an_lm_is_the_same_with_or_without_the_teacher_cache() -> None:
    gen = torch.Generator().manual_seed(5)
    teacher = _TinyLM().eval()
    calib, hold = _token_batches(gen, 2), _token_batches(gen, 1)
    outs = []
    for cache_mb in (4096.0, 0.0):
        student = copy.deepcopy(teacher)
        replace_module(student, "mid", GBLRLinear.from_linear(student.mid, GBLRLayerConfig(2, 2)))
        layers = list(gblr_layers(student).values())
        cfg = DistillConfig(steps=6, seed=3, eval_every=2, teacher_cache_mb=cache_mb)
        distill_(student, teacher, calib, budget_cost(layers, 0.5), cfg, holdout=hold)
        outs.append(student(**calib[0])["logits"])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_freeze_keeps_the_eval_function() -> None:
    gen = torch.Generator().manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 20)).double()
    _swap_from_linear(model, groups=3, rank=2)
    with torch.no_grad():
        for layer in gblr_layers(model).values():
            layer.widths.uniform_(0.2, 1.0, generator=gen)
            layer.locations.uniform_(0.0, 1.0, generator=gen)
    model.eval()
    x = torch.randn(7, 40, generator=gen, dtype=torch.float64)
    before = model(x)
    cost = total_cost(list(gblr_layers(model).values()))
    records = freeze_(model)
    assert all(isinstance(model.get_submodule(n), FrozenGBLR) for n in records)
    assert sum(r.cost for r in records.values()) == cost
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)


def test_agreement_metrics() -> None:
    lin = torch.nn.Linear(5, 4)
    batches = [torch.randn(6, 5)]
    same = agreement(lin, lin, batches)
    assert same["rel_error"] == 0.0 and abs(same["cosine"] - 1.0) < 1e-6 and same["top1"] == 1.0
    other = copy.deepcopy(lin)
    with torch.no_grad():
        other.weight.mul_(-1)
        other.bias.mul_(-1)
    assert agreement(other, lin, batches)["cosine"] < -0.99


def test_losses_leave_padding_out() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 8, generator=gen)  # (batch, seq, features)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    s = t + 0.1 * torch.randn(3, 5, 8, generator=gen)
    garbage = s.clone()
    garbage[~mask] = 1e3  # what a model computes at padding is never used
    torch.testing.assert_close(normalized_mse(garbage, t, mask), normalized_mse(s, t, mask))
    want = (s - t)[mask].pow(2).mean() / t[mask].pow(2).mean()
    torch.testing.assert_close(normalized_mse(s, t, mask), want)
    # A pooled (batch, features) output is not per-token: the mask does not apply to it.
    pooled_s, pooled_t = s.mean(1), t.mean(1)
    both = output_loss((garbage, pooled_s), (t, pooled_t), mask=mask)
    torch.testing.assert_close(both, (want + normalized_mse(pooled_s, pooled_t)) / 2)
    assert output_loss(garbage, t) > 100 * output_loss(garbage, t, mask=mask)


def test_agreement_masks_padding_and_skips_top1_for_embeddings() -> None:
    class Pad(torch.nn.Module):
        """Per-token outputs that differ from the identity only at padded positions."""

        def __init__(self, junk: float) -> None:
            super().__init__()
            self.junk = junk

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return torch.where(attention_mask[..., None] != 0, x, torch.full_like(x, self.junk))

    mask = torch.ones(2, 4, dtype=torch.long)
    mask[0, 2:] = 0
    batches = [{"x": torch.randn(2, 4, 3), "attention_mask": mask}]
    got = agreement(Pad(5.0), Pad(-5.0), batches)
    assert got["rel_error"] == 0.0 and abs(got["cosine"] - 1.0) < 1e-9
    lin = torch.nn.Linear(5, 4)
    assert "top1" not in agreement(lin, lin, [torch.randn(6, 5)], logits=False)


def test_auto_loss_follows_what_the_output_is() -> None:
    from torch.nn import functional as F

    from gblr_compress.distill import output_kind, output_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=gen) * 3
    emb = F.normalize(torch.randn(6, 10, generator=gen), dim=1)
    tokens = torch.randn(2, 5, 10, generator=gen)
    assert [output_kind(t) for t in (logits, emb, tokens)] == ["logits", "embedding", "features"]
    other = torch.randn(6, 10, generator=gen)
    # logits: KL (shift-invariant: adding a constant per row changes nothing)
    assert float(output_loss(logits + 5.0, logits)) < 1e-6
    # a unit-norm embedding is matched by normalized MSE, not a softmax
    moved = F.normalize(emb + 0.1 * other, dim=1)
    expected = (moved - emb).pow(2).mean() / emb.pow(2).mean()
    torch.testing.assert_close(output_loss(moved, emb), expected)
    # per-token outputs: normalized MSE at the real positions only
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    noisy = tokens.clone()
    noisy[0, 3:] += 100.0  # padding garbage
    torch.testing.assert_close(output_loss(noisy, tokens, mask=mask), torch.tensor(0.0))


def test_deadline_keeps_the_steps_that_fit() -> None:
    import time

    teacher, student, max_cost, calib = _tiny_case(3, groups=2, rank=2, budget=0.3)
    seen: list[ProgressEvent] = []
    # A deadline already reached: the timed steps run, and no others.
    result = distill_(student, teacher, calib, max_cost, DistillConfig(steps=50), progress=seen.append,
                      deadline=time.perf_counter())
    assert result.steps == 3 and [e.done for e in seen] == [1, 2, 3] and seen[-1].total == 3
    assert all(e.cost <= max_cost for e in seen)


def test_epochs_scale_steps_with_the_data_within_extra_seconds() -> None:
    gen = torch.Generator().manual_seed(5)
    teacher = TinyEncoder(vocab=50, hidden=32, layers=1, heads=4, ffn=64, max_len=16, classes=3).eval()
    calib = _token_batches(gen, 6)
    # The plan: steps, or more passes over many batches; 0 steps stays 0 (no training).
    assert DistillConfig(steps=10, epochs=5.0).planned_steps(6) == 30
    assert DistillConfig(steps=10, epochs=5.0).planned_steps(1) == 10
    assert DistillConfig(steps=10).planned_steps(6) == 10
    assert DistillConfig(steps=0, epochs=5.0).planned_steps(6) == 0
    runs, timed = {}, {}
    for extra_seconds in (0.0, 1e6):
        student = copy.deepcopy(teacher)
        _swap_from_linear(student, groups=2, rank=2)
        max_cost = budget_cost(list(gblr_layers(student).values()), 0.3)
        seen: list[ProgressEvent] = []
        result = distill_(student, teacher, calib, max_cost,
                          DistillConfig(steps=10, epochs=5.0, extra_seconds=extra_seconds), progress=seen.append)
        runs[extra_seconds] = (result.steps, seen[-1].done, seen[-1].total)
        timed[extra_seconds] = result.timed
    # No time for extra steps: the configured steps still all run; with time, the plan.
    assert runs[0.0] == (10, 10, 10)
    assert runs[1e6] == (30, 30, 30)
    # The record says when the clock trimmed the plan (the one count that follows the
    # machine's speed), and nothing when the plan ran whole.
    assert timed[0.0] is not None and timed[0.0].startswith("10 of the 30 steps planned (5 passes over 6 batches)")
    assert timed[1e6] is None
    with pytest.raises(ConfigError):
        DistillConfig(epochs=-1.0)


def test_too_few_steps_for_the_deadline_skip_the_phase_before_any_step() -> None:
    import time

    gen = torch.Generator().manual_seed(4)
    teacher = TinyEncoder(vocab=50, hidden=32, layers=1, heads=4, ffn=64, max_len=16, classes=3).eval()
    calib, held = _token_batches(gen, 4), _token_batches(gen, 2)
    student = copy.deepcopy(teacher)
    _swap_from_linear(student, groups=2, rank=2)
    max_cost = budget_cost(list(gblr_layers(student).values()), 0.3)
    project_widths_(list(gblr_layers(student).values()), max_cost)
    before = copy.deepcopy(student.state_dict())
    seen: list[ProgressEvent] = []
    # The deadline is reached: no step fits, so none runs and the student is the init.
    result = distill_(student, teacher, calib, max_cost, DistillConfig(steps=50), holdout=held,
                      progress=seen.append, deadline=time.perf_counter())
    assert result.steps == 0 and not seen and result.skipped and "fewer than 20" in result.skipped
    assert result.heldout_after == result.heldout_before
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, before[key])
    # min_steps=0 keeps the old rule: the timed steps run, then the deadline stops it.
    result = distill_(student, teacher, calib, max_cost, DistillConfig(steps=50, min_steps=0), holdout=held,
                      progress=seen.append, deadline=time.perf_counter())
    assert result.skipped is None and result.steps == 3 and len(seen) == 3


def test_feature_term_taps_blocks_of_a_module_list_else_layers() -> None:
    encoder = TinyEncoder(vocab=50, hidden=32, layers=2, heads=4, ffn=64, max_len=16, classes=3)
    layers = find_linears(encoder)
    blocks = feature_modules(encoder, layers)
    lists = [n for n, m in encoder.named_modules() if isinstance(m, torch.nn.ModuleList)]
    assert blocks == [f"{lists[0]}.0", f"{lists[0]}.1"]  # each transformer layer, in order
    assert feature_modules(encoder, layers, "layers") == layers
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    assert feature_modules(mlp, ["0", "2"]) == ["0", "2"]  # no repeated blocks: the layers


class _DropoutNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4)
        self.drop_modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.drop_modes.append(self.drop.training)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def test_only_the_compressed_layers_train_dropout_stays_off() -> None:
    # The teacher runs in eval mode; a student with live dropout would learn to match it
    # through noise the teacher does not have.
    torch.manual_seed(0)
    teacher = _DropoutNet().eval()
    student = copy.deepcopy(teacher)
    _swap_from_linear(student, groups=2, rank=2)
    calib = [torch.randn(16, 8) for _ in range(4)]
    layers = list(gblr_layers(student).values())
    distill_(student, teacher, calib, budget_cost(layers, 0.5), DistillConfig(steps=4, eval_every=2),
             holdout=[torch.randn(16, 8)])
    assert student.drop_modes and not any(student.drop_modes)


def test_a_causal_lms_named_logits_are_matched_by_kl_per_position() -> None:
    from torch.nn import functional as F

    from gblr_compress.distill import kl_rows, output_kind, output_loss

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 11, generator=gen) * 2
    s = (t + 0.5 * torch.randn(2, 5, 11, generator=gen)).requires_grad_()
    assert output_kind(t, "logits") == "logits" and output_kind(t) == "features"
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = output_loss({"logits": s}, {"logits": t}, mask=mask)
    # the plain KL at the 8 real positions, per position, times T^2
    rs, rt = s[mask], t[mask]
    ref = F.kl_div(F.log_softmax(rs / 2, -1), F.log_softmax(rt / 2, -1), log_target=True, reduction="batchmean") * 4
    torch.testing.assert_close(got, ref)
    (g_got,) = torch.autograd.grad(got, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g_got, g_ref)
    # more rows than one chunk: the chunked value and gradient are the plain ones
    big_t = torch.randn(600, 7, generator=gen)
    big_s = (big_t + torch.randn(600, 7, generator=gen)).requires_grad_()
    plain = F.kl_div(F.log_softmax(big_s, -1), F.log_softmax(big_t, -1), log_target=True, reduction="batchmean")
    chunked = kl_rows(big_s, big_t, 1.0)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(torch.autograd.grad(chunked, big_s)[0], torch.autograd.grad(plain, big_s)[0])
    # hidden states under any other name stay normalized MSE
    assert output_kind(t, "last_hidden_state") == "features"


def test_pruned_windows_train_their_content_and_keep_their_identity_factor() -> None:
    from gblr_compress.distill import frozen_content
    from gblr_compress.layer import FrozenGBLR
    from tests.test_shrink import _cols, _rows

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 5)).eval()
    student = copy.deepcopy(teacher)
    student[0], student[2] = _rows(student[0], 10), _cols(student[2], 10)  # 10 of 24 units kept
    before = {n: t.detach().clone() for n, t in student.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 12, generator=gen) for _ in range(6)]
    held = [torch.randn(16, 12, generator=gen) for _ in range(2)]
    assert len(frozen_content({"0": student[0], "2": student[2]})) == 4  # W sides and biases
    result = distill_(student, teacher, calib, 0, DistillConfig(steps=30, lr=1e-2, eval_every=5), holdout=held)
    assert result.heldout_after < result.heldout_before  # the kept units' weights moved usefully
    after = student.state_dict()
    assert not torch.equal(after["0.V.0"], before["0.V.0"]) and not torch.equal(after["2.U.0"], before["2.U.0"])
    assert torch.equal(after["0.U.0"], torch.eye(10)) and torch.equal(after["2.V.0"], torch.eye(10))
    assert isinstance(student[0], FrozenGBLR) and student[0].identity_side(0) == "U"


def test_a_step_run_in_row_chunks_trains_as_the_whole_batch() -> None:
    # activation_mb below one batch's estimate: each step runs its rows one at a time and
    # adds up their gradients weighted by their share of the positions. With per-position
    # losses (KL on logits, no feature term) that is the whole batch's gradient exactly.
    gen = torch.Generator().manual_seed(2)
    teacher = _TinyLM().eval()
    calib = [{"input_ids": torch.randint(0, 50, (4, 6), generator=gen),
              "attention_mask": torch.ones(4, 6, dtype=torch.long)} for _ in range(3)]
    per_position = activation_bytes_per_position([teacher.mid], 64)
    assert per_position == 4 * (3 * 16 + 4 * 64)
    states = []
    for activation_mb in (0.0, 1.5 * 6 * per_position / 2**20):  # whole batches; 1 row (1.5 rows' worth)
        student = copy.deepcopy(teacher)
        _swap_from_linear(student, groups=2, rank=2)
        layers = list(gblr_layers(student).values())
        rows: set[int] = set()

        def seen(_m: nn.Module, args: tuple, _out: object, rows: set[int] = rows) -> None:
            if torch.is_grad_enabled():  # a training forward, not a held-out evaluation
                rows.add(args[0].shape[0])

        student.embed.register_forward_hook(seen)
        cfg = DistillConfig(steps=6, seed=1, layer_weight=0.0, activation_mb=activation_mb)
        distill_(student, teacher, calib, budget_cost(layers, 0.6), cfg)
        assert rows == ({4} if activation_mb == 0 else {1})  # the training forwards' rows
        states.append({k: v.detach().clone() for k, v in student.state_dict().items()})
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-4, atol=1e-5)


def test_a_pooled_output_is_compared_on_the_last_blocks_tokens() -> None:
    from gblr_compress.batches import flatten_outputs, no_token_axis

    hidden = torch.randn(4, 7, 16)
    pooled = torch.nn.functional.normalize(hidden.mean(1), dim=-1)  # a sentence-embedding wrapper
    assert no_token_axis([pooled], hidden)
    assert no_token_axis(flatten_outputs({"embedding": pooled}), hidden)
    assert not no_token_axis([hidden, pooled], hidden)  # a folder
    assert not no_token_axis([torch.randn(4, 7, 50)], hidden)  # per-token logits
    assert not no_token_axis([pooled], torch.randn(4, 16))  # the block has no token axis either


class _TwoBlocks(nn.Module):
    """Two residual MLP blocks in a ModuleList, then the pooled, normalized vector (a
    sentence-embedding wrapper) or, with ``per_token``, the last block's output."""

    def __init__(self, per_token: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(2))
        self.per_token = per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 8)
        for block in self.layers:
            x = x + block(x)
        return x if self.per_token else nn.functional.normalize(x.mean(1), dim=-1)


def test_the_pooled_wrappers_output_term_is_the_last_blocks_tokens(monkeypatch) -> None:
    import gblr_compress.distill as distill

    gen = torch.Generator().manual_seed(3)
    calib = [torch.randn(4, 5, 8, generator=gen) for _ in range(3)]
    calls: list[int] = []
    real = distill.output_loss
    monkeypatch.setattr(distill, "output_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    for per_token, expected in ((False, 0), (True, 4)):  # no held-out data: only training steps call it
        calls.clear()
        teacher = _TwoBlocks(per_token).eval()
        student = copy.deepcopy(teacher)
        _swap_from_linear(student, groups=2, rank=2)
        layers = list(gblr_layers(student).values())
        distill_(student, teacher, calib, budget_cost(layers, 0.6), DistillConfig(steps=4))
        assert len(calls) == expected


def test_agreement_is_the_same_taken_to_float64_a_slice_at_a_time(monkeypatch) -> None:
    import gblr_compress.distill as distill

    gen = torch.Generator().manual_seed(5)
    teacher = _TinyLM().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.mid.weight.add_(0.3 * torch.randn(student.mid.weight.shape, generator=gen))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    batches = [{"input_ids": torch.randint(0, 50, (3, 7), generator=gen), "attention_mask": mask}]
    whole = agreement(student, teacher, batches)
    monkeypatch.setattr(distill, "_AGREEMENT_ELEMENTS", 100)  # 1 row of 64 logits at a time
    sliced = agreement(student, teacher, batches)
    assert sliced.keys() == whole.keys()
    for k in whole:
        assert sliced[k] == pytest.approx(whole[k], rel=1e-12, abs=1e-12)


def test_row_errors_score_each_row_at_its_real_positions() -> None:
    from torch.nn import functional as F

    from gblr_compress.distill import kl_rows, row_errors

    gen = torch.Generator().manual_seed(9)
    t = torch.randn(2, 4, 6, generator=gen)
    s = t + 0.3 * torch.randn(2, 4, 6, generator=gen)
    s[0, 3] = -t[0, 3]  # a padded position: never counted
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    got = row_errors(s, t, mask, kl=False)
    want = [1 - F.cosine_similarity(s[i][mask[i]], t[i][mask[i]], dim=-1).double().mean() for i in range(2)]
    torch.testing.assert_close(got, torch.stack(want))
    got = row_errors({"logits": s}, {"logits": t}, mask, kl=True)
    want = [kl_rows(s[i][mask[i]], t[i][mask[i]]).double() for i in range(2)]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-7)


def test_init_decay_pulls_the_content_back_toward_the_init() -> None:
    # AdamW's decoupled decay centred on the init instead of 0: the content drifts less
    # the stronger the pull, and a pull of the whole way each step leaves it at the init.
    teacher, init, max_cost, calib = _tiny_case(0, groups=2, rank=4, budget=0.5)

    def drift(decay: float) -> float:
        student = copy.deepcopy(init)
        distill_(student, teacher, calib, max_cost,
                 DistillConfig(steps=8, structure_lr=0.0, lr=1e-2, init_decay=decay, eval_every=4))
        return sum((a - b).abs().sum().item() for a, b in zip(student.parameters(), init.parameters()))

    free, pulled, held = drift(0.0), drift(30.0), drift(1e9)
    assert 0.0 < pulled < free
    assert held == 0.0
    with pytest.raises(ConfigError, match="init_decay"):
        DistillConfig(init_decay=-1.0)


_FIRST_RUN = """
import gc, sys, torch
sys.path.insert(0, {root!r})
from tests.test_distill import _tiny_case
from gblr_compress.distill import DistillConfig, distill_, _TeacherCache
teacher, student, cost, batches = _tiny_case(0, 4, 2, 0.5, batches=6)
gc.collect()
gc.disable()  # what the cyclic collector would free later is still there to count
distill_(student, teacher, batches[:4], cost, DistillConfig(steps=8, eval_every=4, init_decay=10.0),
         holdout=batches[4:])
objs = gc.get_objects()
print(sum(len(o.state) for o in objs if isinstance(o, torch.optim.Optimizer)),
      sum(len(o.kept) for o in objs if isinstance(o, _TeacherCache)))
"""


def test_a_finished_distillation_lets_go_of_its_optimizer_state_and_teacher_outputs() -> None:
    # In a fresh process the first optimizer torch makes keeps its creating frame in a
    # reference cycle: the moments and the kept teacher outputs outlived the run until
    # the cyclic collector ran.
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", _FIRST_RUN.format(root=root)], capture_output=True, text=True,
                         check=True, cwd=root).stdout.split()
    assert out == ["0", "0"]


def test_a_new_best_state_is_written_over_the_last_copy() -> None:
    # Each saved state is as large as the trained content: a new best state taking a
    # fresh copy held two at once, which raised the second run's peak above the first's.
    from gblr_compress.distill import _gblr_state

    _, student, _, _ = _tiny_case(0, 4, 2, 0.5)
    layers = gblr_layers(student)
    saved = _gblr_state(layers)
    ptrs = {(n, k): t.data_ptr() for n, d in saved.items() for k, t in d.items()}
    with torch.no_grad():
        for layer in layers.values():
            layer.U.add_(1.0)
    again = _gblr_state(layers, into=saved)
    assert again is saved and {(n, k): t.data_ptr() for n, d in again.items() for k, t in d.items()} == ptrs
    for n, layer in layers.items():
        torch.testing.assert_close(again[n]["U"], layer.U.detach())
