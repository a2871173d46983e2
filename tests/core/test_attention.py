"""nn.MultiheadAttention: LowRankMultiheadAttention computes the same function (every option of
the original), and its projections are targets that factorize exactly at full rank inside
TransformerEncoderLayer, TransformerEncoder and ViT-shaped blocks, and save/load."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import lrsearch
from lrsearch.core import LowRankLinear, LowRankMultiheadAttention
from tests.core import _models as M

TOL = 1e-5
E, HEADS, L, S, N = 16, 4, 5, 7, 3


def _attention(**options) -> nn.MultiheadAttention:
    attention = nn.MultiheadAttention(E, HEADS, **options)
    with torch.no_grad():  # biases start at zero; give every tensor a value that matters
        for parameter in attention.parameters():
            parameter.normal_()
    return attention


def _inputs(sharing: str, *, batch_first: bool, kdim: int = E):
    def tensor(length: int, dim: int) -> torch.Tensor:
        return torch.randn(N, length, dim) if batch_first else torch.randn(length, N, dim)

    query = tensor(L, E)
    if sharing == "self":
        return query, query, query
    key = tensor(S, kdim)
    return (query, key, key) if sharing == "kv" else (query, key, tensor(S, kdim))


def _masks(source: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    padding = torch.rand(N, source, generator=generator) < 0.3
    padding[:, 0] = False
    blocked = torch.rand(L, source, generator=generator) < 0.3
    blocked[:, 0] = False
    additive = torch.zeros(L, source).masked_fill(blocked, -1e4)
    per_head = torch.rand(N * HEADS, L, source, generator=generator) < 0.3
    per_head[..., 0] = False
    return [{}, {"key_padding_mask": padding}, {"attn_mask": blocked}, {"attn_mask": additive},
            {"attn_mask": per_head}, {"key_padding_mask": padding, "attn_mask": blocked}]


def _compare(dense: nn.Module, low: nn.Module, *args, **kwargs) -> None:
    torch.manual_seed(11)  # identical dropout masks in train mode
    expected, expected_weights = dense(*args, **kwargs)
    torch.manual_seed(11)
    actual, actual_weights = low(*args, **kwargs)
    assert M.rel_err(actual, expected) <= TOL
    assert (actual_weights is None) == (expected_weights is None)
    if expected_weights is not None:
        assert actual_weights.shape == expected_weights.shape
        assert M.rel_err(actual_weights, expected_weights) <= TOL


OPTIONS = [pytest.param(dict(zip(("batch_first", "bias", "add_bias_kv", "add_zero_attn"), values)),
                        id="-".join(f"{k}{int(v)}" for k, v in zip(("bf", "bias", "bkv", "zero"), values)))
           for values in itertools.product([False, True], repeat=4)]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("sharing", ["self", "kv", "cross"])
def test_explicit_attention_equals_multihead_attention(options: dict, sharing: str) -> None:
    dense = _attention(**options)
    low = LowRankMultiheadAttention.from_dense(dense)
    query, key, value = _inputs(sharing, batch_first=options["batch_first"])
    source = key.shape[1] if options["batch_first"] else key.shape[0]
    for training in (True, False):
        dense.train(training)
        low.train(training)
        for masks in _masks(source):
            for need_weights, average in [(True, True), (True, False), (False, True)]:
                _compare(dense, low, query, key, value, need_weights=need_weights,
                         average_attn_weights=average, **masks)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("sharing", ["kv", "cross"])
def test_separate_kdim_vdim_projections(batch_first: bool, sharing: str) -> None:
    dense = _attention(kdim=12, vdim=12, batch_first=batch_first)
    low = LowRankMultiheadAttention.from_dense(dense)
    assert low.projections == ("q_proj", "k_proj", "v_proj", "out_proj")
    query, key, value = _inputs(sharing, batch_first=batch_first, kdim=12)
    for masks in _masks(S):
        for need_weights in (True, False):
            _compare(dense, low, query, key, value, need_weights=need_weights, **masks)
    torch.testing.assert_close(low.in_proj_bias, dense.in_proj_bias)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_causal_and_unbatched(need_weights: bool) -> None:
    dense = _attention(dropout=0.3, batch_first=True)
    low = LowRankMultiheadAttention.from_dense(dense)
    x = torch.randn(N, L, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    dense.train()
    low.train()
    _compare(dense, low, x, x, x, need_weights=need_weights)  # same dropout draws
    dense.eval()
    low.eval()
    _compare(dense, low, x, x, x, need_weights=need_weights, attn_mask=causal, is_causal=True)
    single = torch.randn(L, E)
    _compare(dense, low, single, single, single, need_weights=need_weights,
             key_padding_mask=torch.tensor([False, False, True, False, True]))
    with torch.no_grad():  # the original takes its fused fast path here
        _compare(dense, low, x, x, x, need_weights=False)
    with pytest.raises(RuntimeError, match="attn_mask"):
        low(x, x, x, is_causal=True)


class ViTBlock(nn.Module):
    """torchvision's ViT EncoderBlock shape: pre-norm, ``self_attention(x, x, x, need_weights=False)``."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class CrossAttention(nn.Module):
    """A decoder-style block: queries attend to a memory of another width (kdim = vdim = 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(E, HEADS, kdim=12, vdim=12)
        self.head = nn.Linear(E, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, memory = x[..., :E], x[..., E:E + 12]
        return self.head(self.attention(query, memory, memory)[0])


def _encoder_layer(batch_first: bool = True, norm_first: bool = False) -> nn.Module:
    return nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first)


MODELS = {
    "encoder-layer": (_encoder_layer, (4, 6, 32)),
    "encoder-layer-seq-first": (lambda: _encoder_layer(batch_first=False), (6, 4, 32)),
    "encoder-layer-norm-first": (lambda: _encoder_layer(norm_first=True), (4, 6, 32)),
    "encoder": (lambda: nn.TransformerEncoder(_encoder_layer(), 2, enable_nested_tensor=False), (4, 6, 32)),
    "vit-block": (ViTBlock, (4, 6, 32)),
    "cross-attention": (CrossAttention, (5, 3, E + 12)),
}


def _batches(shape: tuple[int, ...], count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("case", sorted(MODELS))
@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_full_rank_factorization_equals_the_dense_model(case: str, method: str) -> None:
    factory, shape = MODELS[case]
    model = M.seeded(factory)
    batches = _batches(shape)
    compressed = lrsearch.factorize(model, 1.0, method=method, calibration=batches)
    attentions = [m for m in compressed.modules() if isinstance(m, LowRankMultiheadAttention)]
    assert attentions and all(isinstance(getattr(a, name), LowRankLinear)
                              for a in attentions for name in a.projections)
    x = _batches(shape, count=1, seed=9)[0]
    for training in (True, False):
        model.train(training)
        compressed.train(training)
        with torch.no_grad():
            assert M.rel_err(compressed(x), model(x)) <= TOL, training
    with torch.inference_mode():  # fused fast paths of the dense model
        assert M.rel_err(compressed(x), model(x)) <= TOL
    assert not any(isinstance(m, LowRankMultiheadAttention) for m in model.modules())


def test_projection_targets_geometry_and_whitening() -> None:
    model = M.seeded(ViTBlock).eval()
    batches = _batches((4, 6, 32))
    whitened = lrsearch.Decomposition(model, calibration=batches)
    assert whitened.targets == ("self_attention.in_proj", "self_attention.out_proj", "mlp.0", "mlp.2")
    geometry = whitened.geometry("self_attention.in_proj")
    assert (geometry.kind, geometry.in_features, geometry.out_features, geometry.rows) == ("linear", 32, 96, 6)
    assert type(whitened.working_model.self_attention) is LowRankMultiheadAttention
    assert whitened.working_model.self_attention.in_proj.weight is model.self_attention.in_proj_weight
    plain = lrsearch.Decomposition(model, method="svd")
    x = batches[0]
    with torch.no_grad():
        for rank in (4, 8, 16):
            ranks = {"self_attention.in_proj": rank, "self_attention.out_proj": rank}
            assert M.rel_err(whitened.build(ranks)(x), model(x)) < M.rel_err(plain.build(ranks)(x), model(x))


def test_attention_that_overrides_forward_stays_dense_with_reason() -> None:
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return super().forward(*args, **kwargs)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = Custom(E, HEADS, batch_first=True)
            self.head = nn.Linear(E, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attention(x, x, x)[0])

    decomposition = lrsearch.Decomposition(Net(), method="svd")
    assert decomposition.targets == ("head",)
    assert "overrides forward" in decomposition.skipped["attention"]
    assert "reads .weight directly" in decomposition.skipped["attention.out_proj"]


@pytest.mark.parametrize("case", ["encoder", "cross-attention"])
def test_save_and_load_round_trip(tmp_path, case: str) -> None:
    factory, shape = MODELS[case]
    model = M.seeded(factory).eval()
    decomposition = lrsearch.Decomposition(model, calibration=_batches(shape))
    attention = next(n for n in decomposition.targets if n.endswith("out_proj")).rpartition(".")[0]
    first = f"{attention}.in_proj" if f"{attention}.in_proj" in decomposition.targets else f"{attention}.k_proj"
    compressed = decomposition.build({first: 4}).eval()  # out_proj stays a dense Linear
    lrsearch.save(compressed, tmp_path / case)
    layers = lrsearch.read_recipe(tmp_path / case)["layers"]
    assert layers[attention]["type"] == "attention" and layers[first]["rank"] == 4
    loaded = lrsearch.load(tmp_path / case, M.seeded(factory, seed=4)).eval()
    assert type(loaded.get_submodule(attention)) is LowRankMultiheadAttention
    assert type(loaded.get_submodule(f"{attention}.out_proj")) is nn.Linear
    x = _batches(shape, count=1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compressed(x))
