"""nn.Conv1d, through its registry entry: exact at full rank, whitened optimum, cost, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lrsearch
from lrsearch.core import LowRankConv1d, candidate_ranks, dense_cost, factorized_cost, full_rank
from lrsearch.core._cost import geometry_of
from tests.core import _models as M

CONFIGS = [
    pytest.param({"kernel_size": 3, "padding": 1}, id="k3-p1"),
    pytest.param({"kernel_size": 5, "stride": 2, "padding": 2, "padding_mode": "reflect"}, id="k5-s2-reflect"),
    pytest.param({"kernel_size": 4, "padding": "same", "padding_mode": "replicate"}, id="k4-same-replicate"),
    pytest.param({"kernel_size": 3, "padding": 2, "dilation": 2, "padding_mode": "circular"}, id="k3-d2-circular"),
    pytest.param({"kernel_size": 3, "padding": "valid", "bias": False}, id="k3-valid-nobias"),
    pytest.param({"kernel_size": 1}, id="k1"),
]


class Signal(nn.Module):
    """A 1-D signal model: two Conv1d layers, a pool and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 16, 5, padding=2)
        self.conv2 = nn.Conv1d(16, 24, 3, stride=2, padding=1, padding_mode="reflect")
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(-1))


def correlated_signals(count: int, channels: int, length: int, *, seed: int = 0) -> torch.Tensor:
    """Smooth, channel-correlated signals, so whitening has something to exploit."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(count, channels, length, generator=generator).cumsum(-1) / length ** 0.5
    mix = torch.randn(channels, channels, generator=generator)
    return torch.einsum("dc,ncl->ndl", mix, base)


@pytest.mark.parametrize("config", CONFIGS)
def test_full_rank_reproduces_the_dense_conv(config: dict) -> None:
    conv = nn.Conv1d(4, 6, **config)
    x = torch.randn(3, 4, 17)
    top = min(6, 4 * conv.kernel_size[0])
    layer = LowRankConv1d.from_dense(conv, top)
    assert M.rel_err(layer(x), conv(x)) <= 1e-5
    assert M.rel_err(layer.to_dense().weight, conv.weight) <= 1e-5
    assert (layer.first.kernel_size, layer.second.kernel_size) == (conv.kernel_size, (1,))
    assert layer.first.stride == conv.stride and layer.first.padding_mode == conv.padding_mode


def test_unbatched_input_and_repr() -> None:
    conv = nn.Conv1d(4, 6, 3, padding=1)
    layer = LowRankConv1d.from_dense(conv, 6)
    x = torch.randn(4, 11)
    assert M.rel_err(layer(x), conv(x)) <= 1e-5
    assert "rank=6" in repr(layer) and "scheme='channel'" in repr(layer)


def test_only_the_channel_scheme_and_ranks_are_validated() -> None:
    with pytest.raises(ValueError, match="channel"):
        LowRankConv1d(4, 6, 3, 2, scheme="spatial")  # type: ignore[arg-type]
    with pytest.raises(lrsearch.InvalidRankError, match="LowRankConv1d"):
        LowRankConv1d(4, 6, 3, 7)  # full rank is min(6, 12)
    model = Signal()
    with pytest.raises(ValueError, match="Conv1d"):
        lrsearch.factorize(model, {"conv1": 4}, method="svd", conv_scheme={"conv1": "tucker2"})


def test_grouped_conv1d_is_skipped_with_reason() -> None:
    model = nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.Conv1d(8, 8, 3))
    decomposition = lrsearch.Decomposition(model, method="svd")
    assert decomposition.targets == ("1",)
    assert "groups=2" in decomposition.skipped["0"]


@pytest.mark.parametrize("config", CONFIGS)
def test_cost_matches_the_flop_counter(config: dict) -> None:
    conv = nn.Conv1d(4, 6, **config)
    x = torch.randn(2, 4, 17)
    y = conv(x)
    geometry = geometry_of(conv, input_shape=tuple(x.shape[1:]), output_shape=tuple(y.shape[1:]))
    assert geometry.kind == "conv1d" and geometry.out_hw == (y.shape[-1],)
    for module, cost in [(conv, dense_cost(geometry)), (LowRankConv1d.from_dense(conv, 2),
                                                           factorized_cost(geometry, 2))]:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(x)
        assert cost.macs == counter.get_total_flops() // 2 // x.shape[0]
        assert cost.params == sum(p.numel() for p in module.parameters())
    assert full_rank(geometry) == min(6, 4 * conv.kernel_size[0])
    assert candidate_ranks(geometry_of(nn.Conv1d(64, 64, 3)), multiple=8) == [8, 16, 24, 32, 40]


@pytest.mark.parametrize("config", CONFIGS[:4])
def test_whitening_is_the_exact_optimum_on_calibration_signals(config: dict) -> None:
    conv = nn.Conv1d(4, 6, **config)
    model = nn.Sequential(conv)
    signals = correlated_signals(24, 4, 20, seed=1)
    whitened = lrsearch.Decomposition(model, method="whitened", calibration=list(signals.split(8)))
    M.assert_whitened_optimum(model, signals, whitened, lrsearch.Decomposition(model, method="svd"))


def test_signal_model_factorizes_saves_and_loads(tmp_path) -> None:
    model = M.seeded(Signal).eval()
    signals = correlated_signals(16, 3, 32)
    decomposition = lrsearch.Decomposition(model, method="whitened", calibration=list(signals.split(8)))
    assert decomposition.targets == ("conv1", "conv2", "head")
    assert decomposition.scheme("conv1") == "channel" and decomposition.schemes("conv1") == ("channel",)
    exact = decomposition.build(1.0)
    assert isinstance(exact.conv1, LowRankConv1d) and isinstance(exact.conv2, LowRankConv1d)
    with torch.no_grad():
        assert M.rel_err(exact(signals), model(signals)) <= 1e-5
    small = decomposition.build({"conv1": 4, "conv2": 8})
    lrsearch.save(small, tmp_path / "signal")
    recipe = lrsearch.read_recipe(tmp_path / "signal")
    assert recipe["layers"]["conv2"]["type"] == "conv1d" and recipe["layers"]["conv2"]["rank"] == 8
    loaded = lrsearch.load(tmp_path / "signal", M.seeded(Signal, seed=5)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(signals), small(signals))
    assert loaded.conv2.second.kernel_size == (1,)


def test_a_conv2d_scheme_for_every_conv_leaves_conv1d_on_its_own_default() -> None:
    model = nn.Sequential(nn.Conv1d(3, 8, 3), nn.Flatten(), nn.Unflatten(1, (8, 1, 6)), nn.Conv2d(8, 8, 3, padding=1))
    compressed = lrsearch.factorize(model, 2, method="svd", conv_scheme="spatial")
    assert compressed[0].scheme == "channel" and compressed[3].scheme == "spatial"
