"""The analytic cost model against torch's FLOP counter and parameter counts of real modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lrsearch
from lrsearch.core._conv import LowRankConv2d, conv_full_rank
from lrsearch.core._cost import (
    Cost,
    LayerGeometry,
    break_even_rank,
    candidate_ranks,
    count_macs,
    count_params,
    dense_cost,
    factorized_cost,
    full_rank,
    geometry_of,
)
from lrsearch.core._linear import LowRankLinear



BATCH = 3


def measured_macs(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds per sample of one forward call, from torch's own counter."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    flops = counter.get_total_flops()
    assert flops % (2 * x.shape[0]) == 0
    return flops // 2 // x.shape[0]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Linear


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("tokens", [None, 5], ids=["rows1", "rows5"])
@pytest.mark.parametrize("rank", [1, 4, 7], ids=["r1", "r4", "r7"])
def test_linear_costs_match_flop_counter(rank: int, tokens: int | None, bias: bool) -> None:
    linear = nn.Linear(10, 7, bias=bias)
    x = torch.randn(BATCH, 10) if tokens is None else torch.randn(BATCH, tokens, 10)
    geometry = geometry_of(linear, rows=tokens or 1)
    assert geometry.kind == "linear" and geometry.rows == (tokens or 1)
    assert full_rank(geometry) == 7

    dense = dense_cost(geometry)
    assert dense.params == n_params(linear)
    assert dense.macs == measured_macs(linear, x) == 10 * 7 * (tokens or 1)

    layer = LowRankLinear.from_dense(linear, rank)
    factorized = factorized_cost(geometry, rank)
    assert factorized.params == n_params(layer)
    assert factorized.macs == measured_macs(layer, x) == rank * 17 * (tokens or 1)


# ---------------------------------------------------------------------------------------------
# Conv2d, every scheme

CONV_CONFIGS = [
    pytest.param({"kernel_size": 3, "padding": 1}, (10, 12), id="3x3-p1"),
    pytest.param({"kernel_size": (3, 5), "stride": 2, "padding": (1, 2)}, (10, 12), id="3x5-s2-p1x2"),
    pytest.param({"kernel_size": (2, 4), "padding": "same", "padding_mode": "reflect", "bias": False},
                 (9, 11), id="2x4-same-reflect-nobias"),
    pytest.param({"kernel_size": 3, "dilation": 2, "stride": (2, 1), "padding": "valid"}, (11, 10),
                 id="3x3-d2-s2x1-valid"),
    pytest.param({"kernel_size": 3, "stride": (1, 2), "padding": (0, 1), "padding_mode": "circular"},
                 (8, 9), id="3x3-s1x2-circular"),
    pytest.param({"kernel_size": 1, "stride": 2}, (9, 9), id="1x1-s2"),
]

SCHEME_RANKS = [
    pytest.param("channel", 1, id="channel-r1"),
    pytest.param("channel", 3, id="channel-r3"),
    pytest.param("spatial", 2, id="spatial-r2"),
    pytest.param("spatial", 4, id="spatial-r4"),
    pytest.param("tucker2", (2, 3), id="tucker2-pair"),
    pytest.param("tucker2", 5, id="tucker2-int-clipped"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize(("scheme", "rank"), SCHEME_RANKS)
@pytest.mark.parametrize(("config", "hw"), CONV_CONFIGS)
def test_conv_costs_match_flop_counter(config: dict, hw: tuple[int, int], scheme: str, rank) -> None:
    conv = nn.Conv2d(4, 6, **config)
    x = torch.randn(BATCH, 4, *hw)
    with torch.no_grad():
        y = conv(x)
    geometry = geometry_of(conv, input_shape=tuple(x.shape[1:]), output_shape=tuple(y.shape[1:]))
    assert geometry.kind == "conv2d" and geometry.in_hw == hw and geometry.out_hw == tuple(y.shape[-2:])
    assert full_rank(geometry, scheme) == conv_full_rank(6, 4, tuple(conv.kernel_size), scheme)

    dense = dense_cost(geometry)
    assert dense.params == n_params(conv)
    assert dense.macs == measured_macs(conv, x)

    layer = LowRankConv2d.from_dense(conv, rank, scheme=scheme)
    factorized = factorized_cost(geometry, rank, scheme)
    assert factorized.params == n_params(layer)
    assert factorized.macs == measured_macs(layer, x)


@pytest.mark.parametrize("scheme", ["channel", "spatial", "tucker2"])
def test_conv_cost_without_spatial_size_has_no_macs(scheme: str) -> None:
    conv = nn.Conv2d(4, 6, 3)
    geometry = geometry_of(conv)
    assert geometry.in_hw is None and geometry.out_hw is None
    assert dense_cost(geometry) == Cost(n_params(conv), None)
    layer = LowRankConv2d.from_dense(conv, 2, scheme=scheme)
    assert factorized_cost(geometry, 2, scheme) == Cost(n_params(layer), None)


def test_geometry_of_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match="Conv3d"):
        geometry_of(nn.Conv3d(3, 4, 3))


def test_factorized_conv_cost_validates_rank() -> None:
    geometry = geometry_of(nn.Conv2d(4, 6, 3), input_shape=(4, 8, 8), output_shape=(6, 6, 6))
    with pytest.raises(lrsearch.InvalidRankError):
        factorized_cost(geometry, 7, "channel")  # full rank is min(6, 36) = 6
    with pytest.raises(lrsearch.InvalidRankError):
        factorized_cost(geometry, (5, 2), "tucker2")


def test_cheaper_than_is_strict_in_both() -> None:
    assert Cost(9, 9).cheaper_than(Cost(10, 10))
    assert not Cost(10, 9).cheaper_than(Cost(10, 10))
    assert not Cost(9, 10).cheaper_than(Cost(10, 10))
    assert Cost(9, None).cheaper_than(Cost(10, 10))
    assert Cost(9, 10).cheaper_than(Cost(10, None))


# ---------------------------------------------------------------------------------------------
# Break-even and candidate ranks


def _linear(m: int, n: int, *, bias: bool = True, rows: int = 1) -> LayerGeometry:
    return LayerGeometry("linear", n, m, bias, rows=rows)


def _conv(cin: int, cout: int, kernel, in_hw=None, out_hw=None, bias: bool = True) -> LayerGeometry:
    return LayerGeometry("conv2d", cin, cout, bias, kernel_size=kernel, in_hw=in_hw, out_hw=out_hw)


GEOMETRIES = [
    pytest.param(_linear(64, 64), "channel", id="linear-64x64"),
    pytest.param(_linear(7, 7, bias=False, rows=9), "channel", id="linear-7x7-nobias-rows9"),
    pytest.param(_linear(100, 30), "channel", id="linear-100x30"),
    pytest.param(_linear(3, 200), "channel", id="linear-3x200"),
    pytest.param(_linear(1, 1), "channel", id="linear-1x1"),
    pytest.param(_conv(16, 32, (3, 3), (16, 16), (16, 16)), "channel", id="conv-channel"),
    pytest.param(_conv(16, 32, (3, 3)), "channel", id="conv-channel-no-hw"),
    pytest.param(_conv(16, 32, (3, 3), (16, 16), (16, 16)), "spatial", id="conv-spatial"),
    pytest.param(_conv(16, 32, (3, 5), (16, 16), (8, 8)), "spatial", id="conv-spatial-strided"),
    pytest.param(_conv(16, 32, (3, 3)), "spatial", id="conv-spatial-no-hw"),
    pytest.param(_conv(16, 32, (3, 3), (16, 16), (16, 16)), "tucker2", id="conv-tucker2"),
    pytest.param(_conv(24, 8, (3, 3), (8, 8), (4, 4)), "tucker2", id="conv-tucker2-strided"),
    pytest.param(_conv(4, 4, (1, 1), (8, 8), (8, 8)), "tucker2", id="conv-tucker2-1x1"),
]


@pytest.mark.parametrize(("geometry", "scheme"), GEOMETRIES)
def test_break_even_rank_is_the_last_cheaper_rank(geometry: LayerGeometry, scheme: str) -> None:
    dense = dense_cost(geometry)
    top = full_rank(geometry, scheme)
    top = max(top) if isinstance(top, tuple) else top
    cheaper = [r for r in range(1, top + 1) if factorized_cost(geometry, r, scheme).cheaper_than(dense)]
    assert cheaper == list(range(1, len(cheaper) + 1))  # cost grows with rank: a prefix
    limit = break_even_rank(geometry, scheme)
    assert limit == len(cheaper)
    if limit >= 1:
        assert factorized_cost(geometry, limit, scheme).cheaper_than(dense)
    assert limit < top  # full rank is never cheaper than dense
    assert not factorized_cost(geometry, limit + 1, scheme).cheaper_than(dense)


@pytest.mark.parametrize("rows", [1, 9], ids=["rows1", "rows9"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 64, 65])
def test_break_even_square_linear(n: int, bias: bool, rows: int) -> None:
    # r·2n (+ n bias) < n² (+ n bias)  ⇔  r < n/2  ⇔  r ≤ (n − 1) // 2.
    assert break_even_rank(_linear(n, n, bias=bias, rows=rows)) == (n - 1) // 2


@pytest.mark.parametrize(("m", "n"), [(100, 30), (30, 100), (3, 200), (17, 5), (128, 64)])
def test_break_even_rectangular_linear(m: int, n: int) -> None:
    # r (m + n) < m n  ⇔  r ≤ (m n − 1) // (m + n).
    assert break_even_rank(_linear(m, n)) == (m * n - 1) // (m + n)


@pytest.mark.parametrize(("cin", "cout", "k"), [(16, 32, 3), (3, 64, 3), (64, 64, 1), (8, 8, 5)])
def test_break_even_channel_conv_closed_form(cin: int, cout: int, k: int) -> None:
    # r (cin k² + cout) < cout cin k²  (parameters and MACs alike, per output position).
    expected = (cout * cin * k * k - 1) // (cin * k * k + cout)
    assert break_even_rank(_conv(cin, cout, (k, k), (12, 12), (12, 12)), "channel") == expected
    assert break_even_rank(_conv(cin, cout, (k, k)), "channel") == expected


@pytest.mark.parametrize(("geometry", "scheme"), GEOMETRIES)
def test_candidate_ranks_multiples_of_8(geometry: LayerGeometry, scheme: str) -> None:
    dense = dense_cost(geometry)
    limit = break_even_rank(geometry, scheme)
    ranks = candidate_ranks(geometry, scheme, multiple=8)
    assert ranks == [r for r in range(8, limit + 1, 8)]
    assert all(r % 8 == 0 and 1 <= r <= limit for r in ranks)
    assert all(factorized_cost(geometry, r, scheme).cheaper_than(dense) for r in ranks)
    assert candidate_ranks(geometry, scheme) == ranks  # 8 is the default


def test_candidate_ranks_examples() -> None:
    assert candidate_ranks(_linear(64, 64)) == [8, 16, 24]  # break-even 31
    assert candidate_ranks(_linear(64, 64), multiple=1) == list(range(1, 32))
    assert candidate_ranks(_linear(64, 64), multiple=16) == [16]
    assert candidate_ranks(_linear(16, 16)) == []  # break-even 7 < 8
    assert break_even_rank(_linear(16, 16)) == 7
    assert candidate_ranks(_linear(1, 1), multiple=1) == []  # nothing is cheaper


@pytest.mark.parametrize("multiple", [0, -8])
def test_candidate_ranks_bad_multiple(multiple: int) -> None:
    with pytest.raises(ValueError, match="multiple"):
        candidate_ranks(_linear(64, 64), multiple=multiple)


# ---------------------------------------------------------------------------------------------
# Whole models


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 5))


MODEL_CASES = [
    pytest.param(_mlp, (4, 20), 4 * (20 * 32 + 32 * 10), {"0": 8, "2": 3}, {}, id="mlp"),
    pytest.param(_mlp, (4, 6, 20), 4 * 6 * (20 * 32 + 32 * 10), {"0": 8}, {}, id="mlp-tokens"),
    pytest.param(_cnn, (2, 3, 10, 10),
                 2 * (8 * 3 * 9 * 100 + 12 * 8 * 9 * 16 + 192 * 5), {"0": 2, "2": 4, "5": 3}, {},
                 id="cnn-channel"),
    pytest.param(_cnn, (2, 3, 10, 10),
                 2 * (8 * 3 * 9 * 100 + 12 * 8 * 9 * 16 + 192 * 5), {"0": 2, "2": (3, 5)},
                 {"0": "spatial", "2": "tucker2"}, id="cnn-spatial-tucker2"),
]


@pytest.mark.parametrize(("make", "shape", "expected", "ranks", "schemes"), MODEL_CASES)
def test_count_macs_matches_analytic_costs(make, shape, expected: int, ranks: dict, schemes: dict) -> None:
    model = make()
    x = torch.randn(*shape)
    batch = shape[0]
    decomposition = lrsearch.Decomposition(model, method="svd", calibration=[x])
    geometries = {name: decomposition.geometry(name) for name in decomposition.targets}
    dense = {name: dense_cost(g) for name, g in geometries.items()}
    assert count_macs(model, x) == expected == batch * sum(c.macs for c in dense.values())
    assert count_params(model) == sum(c.params for c in dense.values())

    compressed = decomposition.build(ranks, schemes=schemes)
    saved_macs = saved_params = 0
    for name, rank in ranks.items():
        scheme = schemes.get(name, decomposition.scheme(name))
        cost = factorized_cost(geometries[name], rank, "channel" if scheme == "linear" else scheme)
        saved_macs += dense[name].macs - cost.macs
        saved_params += dense[name].params - cost.params
    assert saved_macs > 0 and saved_params > 0
    assert count_macs(compressed, x) == count_macs(model, x) - batch * saved_macs
    assert count_params(compressed) == count_params(model) - saved_params


def test_count_macs_restores_training_flags_and_needs_no_grad() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[1].eval()
    x = torch.randn(3, 4)
    first = count_macs(model, x)
    assert first == 3 * (16 + 8)
    assert model.training and model[0].training and not model[1].training
    assert all(p.grad is None for p in model.parameters())


def test_count_params_counts_shared_parameters_once() -> None:
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_params(model) == 42
    tied = nn.Sequential(nn.Linear(5, 3, bias=False), nn.Linear(3, 5, bias=False))
    tied[1].weight = nn.Parameter(tied[0].weight.detach().T.contiguous())
    assert count_params(tied) == 30
    tied[1].weight = tied[0].weight  # same Parameter object: counted once
    assert count_params(tied) == 15


# ---------------------------------------------------------------------------------------------
# Geometry recorded by calibration


class _Sequence(nn.Module):
    """A Linear applied to (batch, tokens, features) and a conv on images in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.proj = nn.Linear(6, 8)
        self.conv_valid = nn.Conv2d(4, 5, (3, 2))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv_valid(self.conv(images)), self.proj(tokens)


def test_decomposition_geometry_records_rows_and_spatial_sizes() -> None:
    model = _Sequence()
    batches = [(torch.randn(2, 3, 9, 12), torch.randn(2, 7, 6)),
               (torch.randn(5, 3, 9, 12), torch.randn(5, 7, 6))]
    decomposition = lrsearch.Decomposition(model, method="whitened", calibration=batches,
                                           forward=lambda m, batch: m(*batch))
    proj = decomposition.geometry("proj")
    assert (proj.kind, proj.in_features, proj.out_features, proj.rows) == ("linear", 6, 8, 7)
    assert dense_cost(proj).macs == 6 * 8 * 7
    conv = decomposition.geometry("conv")
    assert (conv.kind, conv.in_hw, conv.out_hw, conv.kernel_size) == ("conv2d", (9, 12), (5, 6), (3, 3))
    valid = decomposition.geometry("conv_valid")
    assert (valid.in_hw, valid.out_hw, valid.kernel_size) == ((5, 6), (3, 5), (3, 2))
    assert dense_cost(valid).macs == 5 * 4 * 3 * 2 * 15


def test_decomposition_geometry_plain_rows_and_no_calibration() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with_data = lrsearch.Decomposition(model, method="svd", calibration=[torch.randn(4, 6)])
    assert with_data.geometry("0").rows == 1 and with_data.geometry("2").rows == 1
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3))
    without_data = lrsearch.Decomposition(cnn, method="svd")
    geometry = without_data.geometry("0")
    assert geometry.in_hw is None and geometry.out_hw is None
    assert dense_cost(geometry).macs is None
