"""LowRankLinear and LowRankConv2d: exactness at full rank, geometry, dtype, validation, training."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

import lrsearch
from lrsearch.core._conv import CONV_SCHEMES, LowRankConv2d, conv_full_rank, conv_weight_matrix
from lrsearch.core._factors import matrix_factors, tucker2_factors
from lrsearch.core._linear import LowRankLinear
from tests.core._models import rel_err

TOL32 = 1e-5
IN_CHANNELS, OUT_CHANNELS = 3, 4
INPUT_HW = (9, 10)




def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def _label(value) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# The conv configuration table: every kernel × padding × padding mode, with stride, dilation
# and bias cycled through all their values so that every value meets every other axis.
KERNELS = [1, 3, (3, 5), (2, 4)]
PADDINGS = [0, 1, (1, 2), "same", "valid"]
MODES = ["zeros", "reflect", "replicate", "circular"]
STRIDES = [1, 2, (2, 1)]
DILATIONS = [1, 2, (2, 1)]


def _torch_rejects(config: dict) -> str | None:
    """The error torch itself raises for this dense conv on our input, or None if it is valid."""
    try:
        conv = nn.Conv2d(IN_CHANNELS, OUT_CHANNELS, **config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # even kernel with padding='same'
            conv(torch.zeros(1, IN_CHANNELS, *INPUT_HW))
    except (ValueError, RuntimeError, NotImplementedError) as error:
        return f"torch rejects it: {error}"
    return None


def _conv_table() -> list:
    params = []
    for index, (kernel, padding, mode) in enumerate(itertools.product(KERNELS, PADDINGS, MODES)):
        stride = STRIDES[index % 3]
        if padding == "same":
            # torch rejects padding='same' with stride > 1; that combination is tested below.
            stride = 1
        config = {
            "kernel_size": kernel,
            "stride": stride,
            "padding": padding,
            "dilation": DILATIONS[(index // 3) % 3],
            "bias": (index // 4 + index) % 2 == 0,
            "padding_mode": mode,
        }
        label = (f"k{_label(_pair(kernel))}-s{_label(stride)}-p{_label(padding)}-"
                 f"d{_label(config['dilation'])}-{mode}-{'bias' if config['bias'] else 'nobias'}")
        reason = _torch_rejects(config)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(config, id=label, marks=marks))
    return params


CONV_TABLE = _conv_table()


def test_conv_table_covers_every_value() -> None:
    """The cycling above really pairs each stride/dilation/bias with several kernels and modes."""
    configs = [p.values[0] for p in CONV_TABLE if not p.marks]
    assert len(configs) == len(KERNELS) * len(PADDINGS) * len(MODES)
    for axis, values in (("stride", STRIDES), ("dilation", DILATIONS), ("bias", [True, False])):
        for value in values:
            seen = [c for c in configs if c[axis] == value]
            assert {_label(_pair(c["kernel_size"])) for c in seen} == {_label(_pair(k)) for k in KERNELS}
            assert {c["padding_mode"] for c in seen} == set(MODES)


def _dense_conv(config: dict, dtype: torch.dtype = torch.float32) -> nn.Conv2d:
    conv = nn.Conv2d(IN_CHANNELS, OUT_CHANNELS, dtype=dtype, **config)
    if conv.bias is not None:
        with torch.no_grad():
            conv.bias.normal_()
    return conv


def _full_rank(conv: nn.Conv2d, scheme: str):
    return conv_full_rank(conv.out_channels, conv.in_channels, tuple(conv.kernel_size), scheme)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
@pytest.mark.parametrize("config", CONV_TABLE)
def test_conv_full_rank_reproduces_dense(config: dict, scheme: str) -> None:
    conv = _dense_conv(config)
    x = torch.randn(2, IN_CHANNELS, *INPUT_HW)
    layer = LowRankConv2d.from_dense(conv, _full_rank(conv, scheme), scheme=scheme)
    with torch.no_grad():
        expected = conv(x)
        assert layer(x).shape == expected.shape
        assert rel_err(layer(x), expected) <= TOL32
        dense = layer.to_dense()
        assert dense.weight.shape == conv.weight.shape
        assert rel_err(dense.weight, conv.weight) <= TOL32
        assert rel_err(dense(x), expected) <= TOL32
    if conv.bias is None:
        assert layer.bias is None and dense.bias is None
    else:
        assert torch.equal(layer.bias, conv.bias)
        assert torch.equal(dense.bias, conv.bias)


def _stages(layer: LowRankConv2d) -> list[nn.Conv2d]:
    return [stage for stage in (layer.first, layer.second, layer.third) if stage is not None]


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
@pytest.mark.parametrize("config", CONV_TABLE)
def test_conv_geometry_preserved(config: dict, scheme: str) -> None:
    conv = _dense_conv(config)
    layer = LowRankConv2d.from_dense(conv, 1 if scheme != "tucker2" else (1, 1), scheme=scheme)
    (sh, sw), (dh, dw) = _pair(config["stride"]), _pair(config["dilation"])
    padding = config["padding"] if isinstance(config["padding"], str) else _pair(config["padding"])
    mode = config["padding_mode"]

    # The layer's own record of the geometry.
    assert layer.kernel_size == tuple(conv.kernel_size)
    assert layer.stride == (sh, sw) and layer.dilation == (dh, dw)
    assert layer.padding == padding and layer.padding_mode == mode
    assert (layer.bias is not None) == config["bias"]

    # How the stages share it.
    if scheme == "channel":
        spatial, point = layer.first, layer.second
        assert (spatial.stride, spatial.dilation, spatial.padding) == ((sh, sw), (dh, dw), padding)
        assert spatial.padding_mode == mode
        assert point.kernel_size == (1, 1) and point.stride == (1, 1) and point.bias is layer.bias
    elif scheme == "spatial":
        vertical, horizontal = layer.first, layer.second
        assert vertical.kernel_size == (conv.kernel_size[0], 1)
        assert horizontal.kernel_size == (1, conv.kernel_size[1])
        assert vertical.stride == (sh, 1) and horizontal.stride == (1, sw)
        assert vertical.dilation == (dh, 1) and horizontal.dilation == (1, dw)
        if isinstance(padding, str):
            assert vertical.padding == horizontal.padding == padding
        else:
            assert vertical.padding == (padding[0], 0) and horizontal.padding == (0, padding[1])
        assert vertical.padding_mode == horizontal.padding_mode == mode
        assert vertical.bias is None and horizontal.bias is layer.bias
    else:
        first, core, last = layer.first, layer.second, layer.third
        assert first.kernel_size == last.kernel_size == (1, 1)
        assert first.stride == last.stride == (1, 1)
        assert (core.stride, core.dilation, core.padding) == ((sh, sw), (dh, dw), padding)
        assert core.padding_mode == mode and core.kernel_size == tuple(conv.kernel_size)
        assert first.bias is None and core.bias is None and last.bias is layer.bias
    for stage in _stages(layer):
        assert stage.groups == 1
        assert stage.weight.dtype == conv.weight.dtype and stage.weight.device == conv.weight.device

    # The dense equivalent is a conv with exactly the original geometry.
    dense = layer.to_dense()
    for attribute in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                      "padding_mode", "groups"):
        assert getattr(dense, attribute) == getattr(conv, attribute), attribute
    assert (dense.bias is not None) == (conv.bias is not None)
    assert dense.weight.dtype == conv.weight.dtype and dense.weight.device == conv.weight.device


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_conv_same_padding_with_stride_rejected_like_torch(scheme: str) -> None:
    with pytest.raises(ValueError, match="same"):
        nn.Conv2d(IN_CHANNELS, OUT_CHANNELS, 3, padding="same", stride=2)
    with pytest.raises(ValueError, match="same"):
        LowRankConv2d(IN_CHANNELS, OUT_CHANNELS, 3, 2 if scheme != "tucker2" else (2, 2),
                      scheme=scheme, padding="same", stride=2)


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_conv_float64_full_rank_and_dtype(scheme: str) -> None:
    conv = nn.Conv2d(IN_CHANNELS, OUT_CHANNELS, (3, 5), stride=(2, 1), padding=(1, 2),
                     padding_mode="reflect", dtype=torch.float64)
    x = torch.randn(2, IN_CHANNELS, *INPUT_HW, dtype=torch.float64)
    layer = LowRankConv2d.from_dense(conv, _full_rank(conv, scheme), scheme=scheme)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    dense = layer.to_dense()
    assert dense.weight.dtype == torch.float64 and dense.bias.dtype == torch.float64
    with torch.no_grad():
        assert layer(x).dtype == torch.float64
        assert rel_err(layer(x), conv(x)) <= 1e-12
        assert rel_err(dense.weight, conv.weight) <= 1e-12


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_conv_bfloat16_keeps_dtype(scheme: str) -> None:
    conv = nn.Conv2d(IN_CHANNELS, OUT_CHANNELS, 3, padding=1, dtype=torch.bfloat16)
    x = torch.randn(2, IN_CHANNELS, *INPUT_HW, dtype=torch.bfloat16)
    layer = LowRankConv2d.from_dense(conv, _full_rank(conv, scheme), scheme=scheme)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert layer.to_dense().weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = layer(x)
        assert out.dtype == torch.bfloat16
        assert rel_err(out, conv(x)) <= 5e-2


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_conv_constructor_places_parameters_on_device(scheme: str) -> None:
    layer = LowRankConv2d(IN_CHANNELS, OUT_CHANNELS, 3, 2 if scheme != "tucker2" else (2, 2),
                          scheme=scheme, device="meta", dtype=torch.float16)
    params = list(layer.parameters())
    assert len(params) == len(_stages(layer)) + 1  # every stage weight + the bias
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in params)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_conv_cuda_device_kept(scheme: str) -> None:
    conv = nn.Conv2d(IN_CHANNELS, OUT_CHANNELS, 3, padding=1, padding_mode="reflect", device="cuda")
    x = torch.randn(2, IN_CHANNELS, *INPUT_HW, device="cuda")
    layer = LowRankConv2d.from_dense(conv, _full_rank(conv, scheme), scheme=scheme)
    assert all(p.device == conv.weight.device for p in layer.parameters())
    dense = layer.to_dense()
    assert dense.weight.device == conv.weight.device and dense.bias.device == conv.weight.device
    with torch.no_grad():
        assert rel_err(layer(x), conv(x)) <= 1e-4  # TF32 convolutions may be enabled


@CUDA
def test_linear_cuda_device_kept() -> None:
    linear = nn.Linear(8, 6, device="cuda")
    layer = LowRankLinear.from_dense(linear, 6)
    assert all(p.device == linear.weight.device for p in layer.parameters())
    assert layer.to_dense().weight.device == linear.weight.device
    x = torch.randn(4, 8, device="cuda")
    with torch.no_grad():
        assert rel_err(layer(x), linear(x)) <= 1e-4


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_conv_truncated_to_dense_matches_layer(scheme: str) -> None:
    """Below full rank, ``to_dense`` is still exactly the function the factorized layer computes."""
    conv = nn.Conv2d(5, 6, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1), padding_mode="circular")
    x = torch.randn(2, 5, 11, 12)
    layer = LowRankConv2d.from_dense(conv, 2 if scheme != "tucker2" else (2, 3), scheme=scheme)
    with torch.no_grad():
        assert rel_err(layer.to_dense()(x), layer(x)) <= TOL32
        assert rel_err(layer(x), conv(x)) > 1e-2  # genuinely truncated


# ---------------------------------------------------------------------------------------------
# LowRankLinear

LINEAR_SHAPES = [pytest.param(7, 5, id="wide-7to5"), pytest.param(5, 7, id="tall-5to7"),
                 pytest.param(6, 6, id="square-6")]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("in_features", "out_features"), LINEAR_SHAPES)
def test_linear_full_rank_reproduces_dense(in_features: int, out_features: int, bias: bool) -> None:
    linear = nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(8, in_features)
    layer = LowRankLinear.from_dense(linear, min(in_features, out_features))
    assert layer.rank == layer.max_rank == min(in_features, out_features)
    assert (layer.in_features, layer.out_features) == (in_features, out_features)
    assert layer.first.bias is None
    assert (layer.second.bias is not None) == bias
    with torch.no_grad():
        assert rel_err(layer(x), linear(x)) <= TOL32


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("in_features", "out_features"), LINEAR_SHAPES)
def test_linear_to_dense_round_trip(in_features: int, out_features: int, bias: bool) -> None:
    linear = nn.Linear(in_features, out_features, bias=bias)
    dense = LowRankLinear.from_dense(linear, min(in_features, out_features)).to_dense()
    assert isinstance(dense, nn.Linear)
    assert dense.weight.shape == linear.weight.shape
    assert rel_err(dense.weight, linear.weight) <= TOL32
    if bias:
        assert torch.equal(dense.bias, linear.bias)
    else:
        assert dense.bias is None
    x = torch.randn(4, in_features)
    with torch.no_grad():
        assert rel_err(dense(x), linear(x)) <= TOL32


def test_linear_truncated_to_dense_is_the_product() -> None:
    linear = nn.Linear(9, 7)
    layer = LowRankLinear.from_dense(linear, 3)
    dense = layer.to_dense()
    singular_values = torch.linalg.svdvals(dense.weight.detach().double())
    assert singular_values[3:].max() <= 1e-5 * singular_values[0] < singular_values[2]
    x = torch.randn(5, 9)
    with torch.no_grad():
        assert rel_err(dense(x), layer(x)) <= TOL32


def test_linear_sequence_inputs() -> None:
    linear = nn.Linear(6, 10)
    layer = LowRankLinear.from_dense(linear, 6)
    x = torch.randn(3, 5, 6)  # (batch, tokens, features)
    with torch.no_grad():
        out = layer(x)
        assert out.shape == (3, 5, 10)
        assert rel_err(out, linear(x)) <= TOL32
        x4 = torch.randn(2, 3, 4, 6)
        assert rel_err(layer(x4), linear(x4)) <= TOL32


def test_linear_float64_kept() -> None:
    linear = nn.Linear(8, 6, dtype=torch.float64)
    layer = LowRankLinear.from_dense(linear, 6)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        assert layer(x).dtype == torch.float64
        assert rel_err(layer(x), linear(x)) <= 1e-12
    assert layer.to_dense().weight.dtype == torch.float64


def test_linear_bfloat16_kept() -> None:
    linear = nn.Linear(8, 6, dtype=torch.bfloat16)
    layer = LowRankLinear.from_dense(linear, 6)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, linear(x)) <= 5e-2
    dense = layer.to_dense()
    assert dense.weight.dtype == torch.bfloat16 and dense.bias.dtype == torch.bfloat16


def test_linear_constructor_places_parameters_on_device() -> None:
    layer = LowRankLinear(8, 6, 3, device="meta", dtype=torch.float16)
    assert [tuple(p.shape) for p in layer.parameters()] == [(3, 8), (6, 3), (6,)]
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in layer.parameters())


def test_linear_extra_repr_mentions_rank() -> None:
    layer = LowRankLinear.from_dense(nn.Linear(8, 6), 3)
    assert "rank=3" in layer.extra_repr()
    assert "rank=3" in repr(layer)
    assert "in_features=8" in layer.extra_repr() and "out_features=6" in layer.extra_repr()


def test_conv_extra_repr_mentions_rank_and_scheme() -> None:
    layer = LowRankConv2d.from_dense(nn.Conv2d(3, 4, 3), (2, 3), scheme="tucker2")
    assert "rank=(2, 3)" in repr(layer) and "tucker2" in repr(layer)


# ---------------------------------------------------------------------------------------------
# Validation

BAD_RANKS = [pytest.param(0, id="zero"), pytest.param(-1, id="negative"),
             pytest.param(5, id="above-full"), pytest.param(1.5, id="float"),
             pytest.param(True, id="bool"), pytest.param("2", id="str")]


@pytest.mark.parametrize("rank", BAD_RANKS)
def test_linear_invalid_rank(rank: object) -> None:
    with pytest.raises(lrsearch.InvalidRankError, match=r"\[1, 4\]") as info:
        LowRankLinear(6, 4, rank)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, lrsearch.LrSearchError)
    with pytest.raises(lrsearch.InvalidRankError, match=r"\[1, 4\]"):
        LowRankLinear.from_dense(nn.Linear(6, 4), rank)  # type: ignore[arg-type]


# (scheme, kernel) → full rank for Cin=3, Cout=4: channel min(4, 27)=4, spatial min(4*3, 3*3)=9.
CONV_LIMITS = [pytest.param("channel", 4, id="channel"), pytest.param("spatial", 9, id="spatial")]


@pytest.mark.parametrize(("scheme", "limit"), CONV_LIMITS)
@pytest.mark.parametrize("offset", [None, 0, -1, 1], ids=["float", "zero", "negative", "above-full"])
def test_conv_invalid_rank(scheme: str, limit: int, offset: int | None) -> None:
    rank = 1.5 if offset is None else (limit + 1 if offset == 1 else offset)
    assert conv_full_rank(4, 3, (3, 3), scheme) == limit
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(lrsearch.InvalidRankError, match=rf"\[1, {limit}\]") as info:
        LowRankConv2d.from_dense(conv, rank, scheme=scheme)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    with pytest.raises(lrsearch.InvalidRankError, match=rf"\[1, {limit}\]"):
        LowRankConv2d(3, 4, 3, True, scheme=scheme)  # type: ignore[arg-type]
    LowRankConv2d.from_dense(conv, limit, scheme=scheme)  # the limit itself is fine


@pytest.mark.parametrize("fraction", [-0.5, 0.0, 1.5], ids=["negative", "zero", "above-one"])
def test_rank_map_fraction_outside_unit_interval_rejected(fraction: float) -> None:
    """A fraction in a rank map must obey the same (0, 1] rule as a global fraction."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    decomposition = lrsearch.Decomposition(model, method="svd")
    with pytest.raises(lrsearch.InvalidRankError):
        decomposition.resolve(fraction)
    with pytest.raises(lrsearch.InvalidRankError):
        decomposition.resolve({"0": fraction})


@pytest.mark.parametrize("where", ["constructor", "from_dense", "conv_full_rank"])
def test_conv_unknown_scheme(where: str) -> None:
    with pytest.raises(ValueError, match="cp"):
        if where == "constructor":
            LowRankConv2d(3, 4, 3, 2, scheme="cp")  # type: ignore[arg-type]
        elif where == "from_dense":
            LowRankConv2d.from_dense(nn.Conv2d(3, 4, 3), 2, scheme="cp")  # type: ignore[arg-type]
        else:
            conv_full_rank(4, 3, (3, 3), "cp")


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
@pytest.mark.parametrize("groups", [2, 4], ids=["grouped", "depthwise"])
def test_conv_grouped_rejected(groups: int, scheme: str) -> None:
    conv = nn.Conv2d(4, 8, 3, groups=groups)
    with pytest.raises(lrsearch.UnsupportedLayerError, match=f"groups={groups}") as info:
        LowRankConv2d.from_dense(conv, 2, scheme=scheme)
    assert isinstance(info.value, TypeError)


# ---------------------------------------------------------------------------------------------
# Tucker-2 ranks


@pytest.mark.parametrize(("rank", "expected"), [
    pytest.param(2, (2, 2), id="int-below-both"),
    pytest.param(4, (3, 4), id="int-clipped-to-cin"),
    pytest.param(6, (3, 6), id="int-equals-cout"),
    pytest.param((1, 5), (1, 5), id="pair"),
    pytest.param([3, 2], (3, 2), id="list-pair"),
])
def test_tucker2_rank_forms(rank, expected: tuple[int, int]) -> None:
    conv = nn.Conv2d(3, 6, 3, padding=1)
    layer = LowRankConv2d.from_dense(conv, rank, scheme="tucker2")
    assert layer.rank == expected
    assert (layer.first.out_channels, layer.second.out_channels) == expected
    assert (layer.second.in_channels, layer.third.in_channels) == expected
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert layer(x).shape == conv(x).shape


def test_tucker2_full_rank_pair_is_cin_cout() -> None:
    assert conv_full_rank(6, 3, (3, 3), "tucker2") == (3, 6)


@pytest.mark.parametrize("rank", [
    pytest.param((4, 2), id="r_in-above-cin"),
    pytest.param((2, 7), id="r_out-above-cout"),
    pytest.param((0, 2), id="r_in-zero"),
    pytest.param((2, 1.0), id="r_out-float"),
    pytest.param(7, id="int-above-both"),
    pytest.param(0, id="int-zero"),
    pytest.param((1, 2, 3), id="triple"),
])
def test_tucker2_invalid_ranks(rank) -> None:
    with pytest.raises(lrsearch.InvalidRankError):
        LowRankConv2d.from_dense(nn.Conv2d(3, 6, 3), rank, scheme="tucker2")


def test_tucker2_pair_limit_named_in_message() -> None:
    with pytest.raises(lrsearch.InvalidRankError, match=r"\[1, 3\]"):
        LowRankConv2d(3, 6, 3, (4, 2), scheme="tucker2")
    with pytest.raises(lrsearch.InvalidRankError, match=r"\[1, 6\]"):
        LowRankConv2d(3, 6, 3, (2, 7), scheme="tucker2")


# ---------------------------------------------------------------------------------------------
# Training


def _assert_trains(layer: nn.Module, x: torch.Tensor, names: list[str]) -> None:
    layer.train()
    loss = layer(x).square().mean()
    loss.backward()
    for name in names:
        grad = layer.get_parameter(name).grad
        assert grad is not None, name
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # One gradient step lowers the loss.
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter -= 0.1 * parameter.grad
        assert layer(x).square().mean() < loss


def test_linear_trains_with_factors_from_inference_mode() -> None:
    linear = nn.Linear(8, 6)
    with torch.inference_mode():
        factors = matrix_factors(linear.weight, gram=torch.eye(8))
    assert factors.left.is_inference()
    layer = LowRankLinear.from_dense(linear, 3, factors=factors)
    assert not any(p.is_inference() for p in layer.parameters())
    assert all(p.requires_grad for p in layer.parameters())
    _assert_trains(layer, torch.randn(4, 8), ["first.weight", "second.weight", "second.bias"])


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_conv_trains_with_factors_from_inference_mode(scheme: str) -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.inference_mode():
        if scheme == "tucker2":
            factors = tucker2_factors(conv.weight)
        else:
            factors = matrix_factors(conv_weight_matrix(conv.weight, scheme))
    rank = (2, 2) if scheme == "tucker2" else 2
    layer = LowRankConv2d.from_dense(conv, rank, scheme=scheme, factors=factors)
    names = ["first.weight", "second.weight"] + (["third.weight"] if scheme == "tucker2" else [])
    _assert_trains(layer, torch.randn(2, 3, 6, 6), names)


def test_decomposition_built_model_trains_after_inference_mode_factors() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(16, 8) for _ in range(2)]
    with torch.inference_mode():
        decomposition = lrsearch.Decomposition(model, method="whitened", calibration=batches)
        decomposition.factors("0")
        decomposition.factors("2")
    compressed = decomposition.build(3)
    assert isinstance(compressed[0], LowRankLinear) and isinstance(compressed[2], LowRankLinear)
    _assert_trains(compressed, torch.randn(4, 8),
                   ["0.first.weight", "0.second.weight", "2.first.weight", "2.second.weight"])
