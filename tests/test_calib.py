"""Streaming activation moments: exact X^T X for any leading shape, shared inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gblr_compress.calib import augment_tokens, collect_moments, layer_sensitivity
from samples.models import TinyEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


class _Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 6)
        return self.b(torch.relu(self.a(x)))


def test_moments_match_stacked_activations_for_3d_inputs() -> None:
    model = _Seq().double()
    batches = [torch.randn(4, 7, 6, dtype=torch.float64) for _ in range(3)]
    calls = []
    moments = collect_moments(model, ["a", "b"], batches, progress=lambda e: calls.append((e.done, e.total)))
    X = torch.cat([x.reshape(-1, 6) for x in batches])  # (84, 6)
    H = torch.relu(model.a(X)).detach()
    assert moments["a"].count == 84 and moments["b"].count == 84
    assert moments["a"].xtx.dtype == torch.float64
    torch.testing.assert_close(moments["a"].xtx, X.T @ X)
    torch.testing.assert_close(moments["b"].xtx, H.T @ H)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert model.training  # mode restored
    assert not model.a._forward_pre_hooks  # hooks removed


def test_shared_inputs_of_qkv_get_the_same_moment() -> None:
    model = TinyEncoder(vocab=50, hidden=16, layers=1, heads=2, ffn=32, max_len=8)
    ids = [torch.randint(0, 50, (2, 8)) for _ in range(2)]
    names = ["layers.0.q", "layers.0.k", "layers.0.v", "layers.0.fc2"]
    moments = collect_moments(model, names, [{"input_ids": i} for i in ids])
    assert torch.equal(moments["layers.0.q"].xtx, moments["layers.0.v"].xtx)
    assert moments["layers.0.k"].count == 32
    assert moments["layers.0.fc2"].xtx.shape == (32, 32)
    # reference: capture the input with a plain hook
    seen = []
    h = model.layers[0].q.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        for i in ids:
            model(i)
    h.remove()
    X = torch.cat([s.reshape(-1, 16) for s in seen]).double()
    torch.testing.assert_close(moments["layers.0.q"].xtx, X.T @ X, rtol=1e-5, atol=1e-4)


class _Sometimes(nn.Module):
    """``a`` and ``b`` read the same tensor unless the batch says otherwise; ``c`` reads
    ``a``'s input twice (a reused module)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
        y = self.a(x) + self.c(x) + self.c(x)
        return y + self.b(x * 2.0 if bool(split) else x)


def test_layers_share_one_sum_only_while_they_read_the_same_input() -> None:
    model = _Sometimes().double()
    xs = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    batches = [(xs[0], torch.tensor(False)), (xs[1], torch.tensor(True)), (xs[2], torch.tensor(False))]
    moments = collect_moments(model, ["a", "b", "c"], batches)
    X = torch.cat(xs)
    torch.testing.assert_close(moments["a"].xtx, X.T @ X)
    torch.testing.assert_close(moments["c"].xtx, 2 * X.T @ X)  # read twice per batch
    assert moments["c"].count == 30
    Xb = torch.cat([xs[0], 2.0 * xs[1], xs[2]])
    torch.testing.assert_close(moments["b"].xtx, Xb.T @ Xb)  # split off after batch 0
    # always read together: one tensor, not two equal ones
    same = collect_moments(model, ["a", "b"], [batches[0], batches[2]])
    assert same["a"].xtx is same["b"].xtx


def test_layer_never_called_gives_an_empty_moment() -> None:
    model = _Seq()
    moments = collect_moments(model, ["a"], [])
    assert moments["a"].count == 0 and moments["a"].xtx.abs().sum() == 0


def test_padded_positions_are_left_out_and_rows_can_be_capped() -> None:
    model = TinyEncoder(vocab=50, hidden=16, layers=1, heads=2, ffn=32, max_len=8)
    ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # 3 padded positions
    seen = []
    h = model.layers[0].q.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    h.remove()
    X = seen[0][mask.bool()].double()  # (13, 16): the unpadded positions
    batch = {"input_ids": ids, "attention_mask": mask}
    moments = collect_moments(model, ["layers.0.q"], [batch])
    assert moments["layers.0.q"].count == 13
    torch.testing.assert_close(moments["layers.0.q"].xtx, X.T @ X, rtol=1e-5, atol=1e-4)
    capped = collect_moments(model, ["layers.0.q"], [batch], max_rows=5)
    idx = torch.linspace(0, 12, 5).round().long()
    assert capped["layers.0.q"].count == 5
    torch.testing.assert_close(capped["layers.0.q"].xtx, X[idx].T @ X[idx], rtol=1e-5, atol=1e-4)


def test_wide_inputs_use_the_blocked_product_exactly() -> None:
    lin = nn.Linear(1030, 2).double()  # >= 1024 inputs: the two-halves product
    x = torch.randn(3, 50, 1030, dtype=torch.float64)
    model = nn.Sequential(lin)
    moments = collect_moments(model, ["0"], [x])
    X = x.reshape(-1, 1030)
    torch.testing.assert_close(moments["0"].xtx, X.T @ X)


def test_sensitivity_matches_the_exact_jacobian_trace_of_a_linear_chain() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    w = layer_sensitivity(model, ["0", "1", "2"], [x], probes=400)
    with torch.no_grad():
        o0, y = model[0](x), model(x)
        o1 = model[1](o0)
        j0 = model[2].weight @ model[1].weight  # dy/do0 for every row
        j1 = model[2].weight
        y2 = float(y.pow(2).sum())
        # tr(J J^T) over the batch is the row count times the per-row Frobenius norm.
        want = {
            "0": float(o0.pow(2).mean()) * len(x) * float(j0.pow(2).sum()) / y2,
            "1": float(o1.pow(2).mean()) * len(x) * float(j1.pow(2).sum()) / y2,
            "2": float(y.pow(2).mean()) * len(x) * 3 / y2,
        }
    for name in want:
        assert w[name] == pytest.approx(want[name], rel=0.15)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_sensitivity_of_a_large_batch_runs_in_row_chunks_with_the_same_traces() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)).double()
    x = torch.randn(2000, 6, dtype=torch.float64)  # 2,000 positions: four chunks
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    chunked = layer_sensitivity(model, ["0", "1", "2"], [x], probes=100)
    handle.remove()
    assert max(rows) <= 512 and sum(rows) == 2000
    whole = layer_sensitivity(model, ["0", "1", "2"], [x[:400]], probes=400)  # one pass
    for name in whole:  # the same estimate (per row), up to the probes' noise
        assert chunked[name] == pytest.approx(whole[name], rel=0.15)


def test_sensitivity_of_a_model_with_a_fixed_batch_size_runs_the_whole_batch() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).view(1000, 3)  # only takes its whole batch

    w = layer_sensitivity(Fixed(), ["lin"], [torch.randn(1000, 4)])
    assert w["lin"] > 0.0


def test_sensitivity_of_a_layer_off_the_output_path_is_zero() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.unused(x)
            return self.used(x)

    w = layer_sensitivity(Branchy(), ["used", "unused"], [torch.randn(8, 4)])
    assert w["used"] > 0 and w["unused"] == 0.0


def test_sensitivity_ignores_what_only_padded_positions_see() -> None:
    class Split(nn.Module):
        """Real positions come from ``real``, padded ones from ``pad``."""

        def __init__(self) -> None:
            super().__init__()
            self.real, self.pad = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            keep = attention_mask[..., None] != 0
            return torch.where(keep, self.real(x), 100.0 * self.pad(x))

    mask = torch.ones(4, 6, dtype=torch.long)
    mask[:, 3:] = 0
    batch = {"x": torch.randn(4, 6, 4), "attention_mask": mask}
    w = layer_sensitivity(Split(), ["real", "pad"], [batch])
    assert w["real"] > 0 and w["pad"] == 0.0


def test_augmented_token_batches_keep_specials_padding_and_other_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (16, 24), generator=gen)
    mask = torch.ones_like(ids)
    lengths = torch.randint(5, 25, (16,), generator=gen)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 0], ids[row, n - 1] = 1, 2  # [CLS] ... [SEP]
        ids[row, n:], mask[row, n:] = 0, 0
    types = torch.randint(0, 2, ids.shape, generator=gen)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    out = augment_tokens([batch], rate=0.3, copies=3, seed=0)
    assert len(out) == 3 and out[0]["input_ids"] is not ids
    pool = set(ids[mask.bool()].tolist()) - {1, 2}
    changed = 0
    for aug in out:
        assert torch.equal(aug["attention_mask"], mask) and torch.equal(aug["token_type_ids"], types)
        new = aug["input_ids"]
        for row, n in enumerate(lengths.tolist()):
            assert new[row, 0] == 1 and new[row, n - 1] == 2 and not new[row, n:].any()
            assert set(new[row, 1 : n - 1].tolist()) <= pool  # drawn from the data's own tokens
        changed += int((new != ids).sum())
    inner = int(mask.sum()) - 2 * 16
    assert 0.2 < changed / (3 * inner) < 0.4
    assert torch.equal(ids, batch["input_ids"])  # the given batch is not modified
    again = augment_tokens([batch], rate=0.3, copies=3, seed=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(out, again))


def test_float_batches_and_rate_zero_are_not_augmented() -> None:
    assert augment_tokens([torch.randn(4, 8)], rate=0.2, copies=2) == []
    assert augment_tokens([torch.randint(0, 9, (4, 8))], rate=0.0, copies=2) == []
    tup = augment_tokens([(torch.randint(3, 9, (4, 8)), torch.randn(4, 8))], rate=0.5, copies=1)
    assert len(tup) == 1 and isinstance(tup[0], tuple) and tup[0][0].shape == (4, 8)
    with pytest.raises(ValueError):
        augment_tokens([torch.randint(0, 9, (4, 8))], rate=1.0, copies=1)


class _Block(nn.Module):
    """A residual block, the residual inside as in a transformer layer."""

    def __init__(self) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class _Pooled(nn.Module):
    """Two blocks in a ModuleList, then a pooled, normalized output (no token axis),
    or the last block's per-token output with ``per_token``."""

    def __init__(self, per_token: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(2))
        self.per_token = per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 6)
        for block in self.layers:
            x = block(x)
        return x if self.per_token else nn.functional.normalize(x.mean(1), dim=-1)


def test_a_pooled_output_is_weighed_on_the_last_blocks_tokens() -> None:
    from gblr_compress.calib import sensitivity_target

    torch.manual_seed(0)
    pooled, tokens = _Pooled().double(), _Pooled(per_token=True).double()
    tokens.load_state_dict(pooled.state_dict())
    names = ["layers.0.ffn.0", "layers.0.ffn.2", "layers.1.ffn.0", "layers.1.ffn.2"]
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    assert sensitivity_target(pooled, names, x) == "layers.1"
    assert sensitivity_target(tokens, names, x) is None  # per-token outputs already
    assert sensitivity_target(pooled, names + ["extra"], x) is None  # a layer outside the blocks
    assert sensitivity_target(nn.Sequential(nn.Linear(6, 3)).double(), ["0"], x) is None  # no blocks
    # Weighed on the target, the pooled model's weights are the per-token model's.
    got = layer_sensitivity(pooled, names, [x], probes=8, seed=3, target="layers.1")
    want = layer_sensitivity(tokens, names, [x], probes=8, seed=3)
    for n in names:
        assert got[n] == pytest.approx(want[n], rel=1e-9)
    assert got != layer_sensitivity(pooled, names, [x], probes=8, seed=3)
