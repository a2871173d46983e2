"""factorize / Decomposition surgery: equivalence at full rank, skipped layers, rank forms,
the user's model left untouched (also after a failing call), trainability and dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrsearch
from lrsearch import LowRankConv2d, LowRankLinear
from lrsearch.core import LowRankMultiheadAttention
from tests.core import _models as M


# name -> (factory, input shape)
CASES = {
    "mlp": (M.MLP, (8, 12)),
    "residual_cnn": (M.ResidualCNN, (4, 3, 16, 16)),
    "transformer_layer": (M.transformer_layer, (4, 6, 32)),
}
TOL = 1e-4


def _batches(shape, count=3, seed=100):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


def _run(model, x, **kwargs):
    torch.manual_seed(1234)  # identical dropout masks for both models in train mode
    return model(x, **kwargs)


def _factorized_names(model):
    return {name for name, module in model.named_modules()
            if isinstance(module, (LowRankLinear, LowRankConv2d))}


def _hook_counts(model):
    return {name: (len(module._forward_hooks), len(module._forward_pre_hooks))
            for name, module in model.named_modules()}


# ---------------------------------------------------------------------------- full-rank equivalence

@pytest.mark.parametrize("method", ["svd", "whitened"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_full_rank_matches_original_in_train_eval_and_inference(case, method):
    factory, shape = CASES[case]
    model = M.seeded(factory)
    before = M.snapshot(model)
    decomposition = lrsearch.Decomposition(model, method=method, calibration=_batches(shape))
    compressed = decomposition.build(1.0)

    assert _factorized_names(compressed) == set(decomposition.targets)
    assert decomposition.targets, "something must have been factorized"
    x = _batches(shape, count=1, seed=7)[0]
    for mode in ("train", "eval"):
        model.train(mode == "train")
        compressed.train(mode == "train")
        expected, actual = _run(model, x), _run(compressed, x)
        assert actual.shape == expected.shape
        assert M.relative_error(actual, expected) < TOL, mode
    model.eval()
    compressed.eval()
    with torch.inference_mode():  # nn.TransformerEncoderLayer takes its fused fast path here
        expected, actual = model(x), compressed(x)
    assert M.relative_error(actual, expected) < TOL
    assert {name: type(m) for name, m in model.named_modules()} == before["types"]


def test_transformer_layer_attention_projections_are_targets_and_dense_attention_keeps_its_type():
    model = M.seeded(M.transformer_layer)
    decomposition = lrsearch.Decomposition(model, method="svd")
    assert decomposition.targets == ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")
    assert decomposition.skipped == {}
    compressed = decomposition.build({"linear1": 8, "linear2": 8})  # attention left dense ...
    assert type(compressed.self_attn) is nn.MultiheadAttention  # ... keeps its type and weights
    assert torch.equal(compressed.self_attn.out_proj.weight, model.self_attn.out_proj.weight)
    assert compressed.self_attn.in_proj_weight.data_ptr() != model.self_attn.in_proj_weight.data_ptr()
    assert isinstance(compressed.linear1, LowRankLinear)
    full = decomposition.build(1.0)
    assert type(full.self_attn) is LowRankMultiheadAttention
    assert isinstance(full.self_attn.in_proj, LowRankLinear) and isinstance(full.self_attn.out_proj, LowRankLinear)
    assert type(model.self_attn) is nn.MultiheadAttention  # the original is untouched


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize(("method", "calibrate"), [("svd", False), ("svd", True), ("whitened", True)])
def test_transformer_encoder_with_nested_tensor_and_padding_mask(method, calibrate):
    model = M.seeded(M.transformer_encoder)
    assert model.use_nested_tensor
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 4:] = True
    mask[2, 2:] = True

    def forward(m, batch):
        return m(batch, src_key_padding_mask=mask)

    calibration = _batches((4, 6, 32)) if calibrate else None
    compressed = lrsearch.factorize(model, 1.0, method=method, calibration=calibration, forward=forward)
    assert _factorized_names(compressed) == {f"layers.{i}.{name}" for i in (0, 1)
                                             for name in ("linear1", "linear2", "self_attn.in_proj",
                                                          "self_attn.out_proj")}
    assert model.use_nested_tensor, "the user's encoder must keep its setting"
    x = _batches((4, 6, 32), count=1, seed=7)[0]
    keep = ~mask  # with grad enabled, neither encoder nests, and padded positions hold computed values
    for mode in ("train", "eval"):
        model.train(mode == "train")
        compressed.train(mode == "train")
        expected = _run(model, x, src_key_padding_mask=mask)
        actual = _run(compressed, x, src_key_padding_mask=mask)
        assert M.relative_error(actual[keep], expected[keep]) < TOL, mode
    model.eval()
    compressed.eval()
    for context in (torch.inference_mode, torch.no_grad):  # the dense encoder nests: zeros when padded
        with context():
            expected = model(x, src_key_padding_mask=mask)
            actual = compressed(x, src_key_padding_mask=mask)
        assert actual.shape == expected.shape
        assert torch.equal(expected[~keep], torch.zeros_like(expected[~keep]))
        assert M.relative_error(actual, expected) < TOL  # every position, padded ones included


def test_residual_cnn_skips_depthwise_conv_and_keeps_it_dense():
    model = M.seeded(M.ResidualCNN)
    decomposition = lrsearch.Decomposition(model, method="svd")
    assert set(decomposition.skipped) == {"depthwise"}
    assert "depthwise" in decomposition.skipped["depthwise"]
    assert set(decomposition.targets) == {"stem", "block.conv1", "block.conv2", "block.shortcut", "head"}
    compressed = decomposition.build(0.5)
    assert type(compressed.depthwise) is nn.Conv2d
    assert compressed.depthwise.groups == model.depthwise.groups
    assert torch.equal(compressed.depthwise.weight, model.depthwise.weight)
    assert compressed.depthwise.weight.data_ptr() != model.depthwise.weight.data_ptr()


# ---------------------------------------------------------------------------- conv schemes

SCHEME_METHODS = [("channel", "svd"), ("channel", "whitened"), ("spatial", "svd"),
                  ("spatial", "whitened"), ("tucker2", "svd")]


@pytest.mark.parametrize(("scheme", "method"), SCHEME_METHODS)
def test_every_conv_scheme_inside_residual_cnn(scheme, method):
    model = M.seeded(M.ResidualCNN)
    shape = (4, 3, 16, 16)
    compressed = lrsearch.factorize(model, 1.0, method=method, calibration=_batches(shape),
                                    conv_scheme=scheme)
    convs = {name: module for name, module in compressed.named_modules()
             if isinstance(module, LowRankConv2d)}
    assert set(convs) == {"stem", "block.conv1", "block.conv2", "block.shortcut"}
    assert {module.scheme for module in convs.values()} == {scheme}
    x = _batches(shape, count=1, seed=7)[0]
    for training in (True, False):
        model.train(training)
        compressed.train(training)
        assert M.relative_error(_run(compressed, x), _run(model, x)) < TOL

    # below full rank the schemes really compress: fewer parameters, a different output
    small = lrsearch.factorize(model, 0.25, method=method, calibration=_batches(shape),
                               conv_scheme=scheme)
    assert lrsearch.count_params(small) < lrsearch.count_params(model)
    model.eval()
    small.eval()
    assert M.relative_error(small(x), model(x)) > 1e-3


def test_conv_scheme_map_mixes_schemes_per_layer():
    model = M.seeded(M.ResidualCNN).eval()
    schemes = {"stem": "spatial", "block.conv1": "tucker2", "block.conv2": "channel"}
    compressed = lrsearch.factorize(model, 1.0, method="svd", conv_scheme=schemes).eval()
    for name, scheme in schemes.items():
        assert compressed.get_submodule(name).scheme == scheme
    assert compressed.block.shortcut.scheme == "channel"  # unlisted convs use the default
    x = _batches((2, 3, 16, 16), count=1)[0]
    assert M.relative_error(compressed(x), model(x)) < TOL


def test_tucker2_needs_svd_method():
    model = M.seeded(M.ResidualCNN)
    with pytest.raises(ValueError, match="svd"):
        lrsearch.factorize(model, 1.0, method="whitened", calibration=_batches((2, 3, 16, 16)),
                           conv_scheme="tucker2")


def test_unknown_conv_scheme_is_rejected():
    with pytest.raises(ValueError, match="bogus"):
        lrsearch.factorize(M.seeded(M.ResidualCNN), 1.0, method="svd", conv_scheme="bogus")


# ---------------------------------------------------------------------------- the user's model

@pytest.mark.parametrize("case", sorted(CASES))
def test_original_model_untouched_and_shares_no_storage(case):
    factory, shape = CASES[case]
    model = M.seeded(factory)
    model.train()
    first_child = next(iter(model.children()))
    first_child.eval()  # mixed flags must survive the calibration pass
    before = M.snapshot(model)
    hooks = _hook_counts(model)
    compressed = lrsearch.factorize(model, 0.5, method="whitened", calibration=_batches(shape))

    M.assert_same_snapshot(before, model)
    assert _hook_counts(model) == hooks
    original_ptrs = {p.data_ptr() for p in model.parameters()}
    new_ptrs = {p.data_ptr() for p in compressed.parameters()}
    assert not original_ptrs & new_ptrs
    modules = dict(model.named_modules())
    for name in _factorized_names(compressed):  # a dense layer, or a projection of a dense attention
        assert isinstance(modules.get(name), (nn.Linear, nn.Conv2d)) or isinstance(
            modules[name.rpartition(".")[0]], nn.MultiheadAttention)
    # training the result does not leak into the original
    optimizer = torch.optim.SGD(compressed.parameters(), lr=0.1)
    compressed.train()
    _run(compressed, _batches(shape, count=1)[0]).square().mean().backward()
    optimizer.step()
    M.assert_same_snapshot(before, model)


@pytest.mark.parametrize("ranks", [
    {"fc1": 4, "fc2": 0, "head": 2},        # bad rank in the middle of the map
    {"fc1": 4, "fc2": 33, "head": 2},       # above full rank
    {"fc1": 4, "fc2": 2.5, "head": 2},      # a float rank in a map means a fraction; 2.5 is none
    {"fc1": 4, "fc2": "low", "head": 2},    # unknown string
    {"fc1": 4, "fc2": True, "head": 2},     # bools are not ranks
    8,                                      # head (32→5) has full rank 5
    1.5,
    0.0,
    {},
])
def test_failing_call_raises_invalid_rank_and_leaves_model_untouched(ranks):
    model = M.seeded(M.MLP)
    model.fc2.eval()
    before = M.snapshot(model)
    hooks = _hook_counts(model)
    with pytest.raises(lrsearch.InvalidRankError) as info:
        lrsearch.factorize(model, ranks, method="whitened", calibration=_batches((8, 12)))
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, lrsearch.LrSearchError)
    M.assert_same_snapshot(before, model)
    assert _hook_counts(model) == hooks


def test_out_of_range_rank_message_names_the_layer_and_its_range():
    with pytest.raises(lrsearch.InvalidRankError, match=r"'fc2'.*\[1, 32\]"):
        lrsearch.factorize(M.seeded(M.MLP), {"fc1": 4, "fc2": 40}, method="svd")


def test_unknown_and_unsupported_names_in_rank_map_leave_model_untouched():
    model = M.seeded(M.ResidualCNN)
    before = M.snapshot(model)
    with pytest.raises(lrsearch.UnknownLayerError, match="block.conv1"):
        lrsearch.factorize(model, {"stem": 4, "block.conv_1": 4}, method="svd")
    with pytest.raises(lrsearch.UnsupportedLayerError, match="depthwise"):
        lrsearch.factorize(model, {"stem": 4, "depthwise": 4}, method="svd")
    with pytest.raises(lrsearch.UnknownLayerError, match="pool"):
        lrsearch.factorize(model, {"stem": 4, "pool": 4}, method="svd")
    M.assert_same_snapshot(before, model)


def test_failing_calibration_restores_flags_and_removes_hooks():
    model = M.seeded(M.ResidualCNN)
    model.block.eval()
    before = M.snapshot(model)
    hooks = _hook_counts(model)
    with pytest.raises(lrsearch.CalibrationError, match="batch 1"):
        lrsearch.factorize(model, 0.5, method="whitened",
                           calibration=[torch.randn(2, 3, 16, 16), torch.randn(2, 5, 16, 16)])
    M.assert_same_snapshot(before, model)
    assert _hook_counts(model) == hooks


def test_whitened_needs_calibration():
    model = M.seeded(M.MLP)
    with pytest.raises(lrsearch.CalibrationError):
        lrsearch.factorize(model, 4)
    with pytest.raises(lrsearch.CalibrationError, match="empty"):
        lrsearch.factorize(model, 4, calibration=[])


# ---------------------------------------------------------------------------- rank forms

def test_one_int_rank_for_every_layer():
    compressed = lrsearch.factorize(M.seeded(M.MLP), 4, method="svd")
    assert {name: compressed.get_submodule(name).rank for name in ("fc1", "fc2", "head")} == {
        "fc1": 4, "fc2": 4, "head": 4}


def _expected_full_rank(module):
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features)
    kh, kw = module.kernel_size
    return min(module.out_channels, module.in_channels * kh * kw)  # channel scheme


@pytest.mark.parametrize("fraction", [0.25, 0.1, 1.0])
@pytest.mark.parametrize("case", ["mlp", "residual_cnn"])
def test_fraction_rank_is_rounded_per_layer_with_minimum_one(case, fraction):
    factory, shape = CASES[case]
    model = M.seeded(factory)
    compressed = lrsearch.factorize(model, fraction, method="whitened", calibration=_batches(shape))
    names = _factorized_names(compressed)
    assert names
    for name in names:
        expected = max(1, round(fraction * _expected_full_rank(model.get_submodule(name))))
        assert compressed.get_submodule(name).rank == expected, name


def test_rank_map_with_dense_entries_and_unlisted_layers():
    model = M.seeded(M.MLP)
    compressed = lrsearch.factorize(model, {"fc1": 4, "fc2": "dense"}, method="svd")
    assert isinstance(compressed.fc1, LowRankLinear) and compressed.fc1.rank == 4
    assert type(compressed.fc2) is nn.Linear
    assert type(compressed.head) is nn.Linear  # unlisted: stays dense
    assert torch.equal(compressed.fc2.weight, model.fc2.weight)
    assert _factorized_names(compressed) == {"fc1"}


def test_rank_map_float_entry_is_a_fraction_of_that_layer():
    compressed = lrsearch.factorize(M.seeded(M.MLP), {"fc2": 0.5, "head": 1.0}, method="svd")
    assert compressed.fc2.rank == 16
    assert compressed.head.rank == 5


def test_tucker2_rank_pair_and_int():
    model = M.seeded(M.ResidualCNN)
    compressed = lrsearch.factorize(model, {"block.conv1": (3, 5), "block.conv2": 4}, method="svd",
                                    conv_scheme="tucker2")
    conv1 = compressed.block.conv1
    assert conv1.scheme == "tucker2" and conv1.rank == (3, 5)
    assert conv1.first.weight.shape == (3, 8, 1, 1)
    assert conv1.second.weight.shape == (5, 3, 3, 3)
    assert conv1.third.weight.shape == (16, 5, 1, 1)
    assert compressed.block.conv2.rank == (4, 4)
    assert type(compressed.stem) is nn.Conv2d
    x = torch.randn(2, 3, 16, 16)
    assert compressed.eval()(x).shape == (2, 10)
    with pytest.raises(lrsearch.InvalidRankError, match="input mode"):
        lrsearch.factorize(model, {"block.conv1": (9, 5)}, method="svd", conv_scheme="tucker2")


def test_decomposition_builds_independent_models_from_cached_factors():
    model = M.seeded(M.MLP)
    decomposition = lrsearch.Decomposition(model, method="whitened", calibration=_batches((8, 12)))
    first = decomposition.build({"fc1": 6, "fc2": 8})
    reference = M.snapshot(first)
    factors = decomposition.factors("fc1")
    assert factors.left.shape[1] == 12 and factors.right.shape == (12, 12)
    optimizer = torch.optim.SGD(first.parameters(), lr=0.5)
    first(torch.randn(4, 12)).square().mean().backward()
    optimizer.step()
    second = decomposition.build({"fc1": 6, "fc2": 8})
    for name, tensor in reference["tensors"].items():
        assert torch.equal(second.state_dict()[name], tensor), name
    assert not {p.data_ptr() for p in first.parameters()} & {p.data_ptr() for p in second.parameters()}
    assert decomposition.resolve({"fc1": 6, "fc2": "dense", "head": 0.5}) == {
        "fc1": ("linear", 6), "head": ("linear", 2)}


# ---------------------------------------------------------------------------- layers that must stay dense

@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_layer_whose_forward_never_runs_is_skipped(method):
    model = M.seeded(M.UsesWeightDirectly)
    decomposition = lrsearch.Decomposition(model, method=method, calibration=_batches((4, 12)))
    assert "proj" not in decomposition.targets
    assert "never ran" in decomposition.skipped["proj"]
    compressed = decomposition.build(1.0)
    assert type(compressed.proj) is nn.Linear
    assert _factorized_names(compressed) == {"fc", "head"}
    x = torch.randn(5, 12)
    assert M.relative_error(compressed(x), model(x)) < TOL
    with pytest.raises(lrsearch.UnsupportedLayerError, match="never ran"):
        lrsearch.factorize(model, {"proj": 4}, method=method, calibration=_batches((4, 12)))


def test_tied_weights_are_skipped_and_stay_tied():
    model = M.seeded(M.TiedLM)
    tokens = [torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    decomposition = lrsearch.Decomposition(model, method="whitened", calibration=tokens)
    assert "head" in decomposition.skipped
    reason = decomposition.skipped["head"]
    assert "tied" in reason or "shared" in reason
    assert "embed" in reason
    compressed = decomposition.build(1.0)
    assert type(compressed.head) is nn.Linear
    assert compressed.head.weight is compressed.embed.weight
    assert isinstance(compressed.hidden, LowRankLinear)
    x = tokens[0]
    assert M.relative_error(compressed(x), model(x)) < TOL


# ---------------------------------------------------------------------------- modes, grads, dtype

def test_calibration_restores_train_eval_flags_per_submodule():
    model = M.seeded(M.ResidualCNN)
    model.train()
    model.block.bn1.eval()
    model.head.eval()
    expected = {name: module.training for name, module in model.named_modules()}
    assert not all(expected.values()) and any(expected.values())
    compressed = lrsearch.factorize(model, 0.5, method="whitened", calibration=_batches((2, 3, 16, 16)))
    assert {name: module.training for name, module in model.named_modules()} == expected
    replaced = _factorized_names(compressed)
    for name, training in expected.items():  # untouched modules of the copy keep their modes
        if not any(name == r or name.startswith(r + ".") for r in replaced):
            assert compressed.get_submodule(name).training == training, name


@pytest.mark.parametrize("training", [True, False])
def test_replacement_layers_take_the_mode_of_the_layer_they_replace(training):
    model = M.seeded(M.MLP).train(training)
    compressed = lrsearch.factorize(model, 4, method="svd")
    modes = {name: module.training for name, module in compressed.named_modules()}
    assert set(modes.values()) == {training}, modes


def test_replacement_layers_follow_mixed_modes():
    model = M.seeded(M.ResidualCNN).train()
    model.head.eval()
    compressed = lrsearch.factorize(model, 0.5, method="svd")
    assert compressed.training and compressed.block.conv1.training
    assert isinstance(compressed.head, LowRankLinear)
    assert [m.training for m in compressed.head.modules()] == [False, False, False]


@pytest.mark.parametrize("context", ["enabled", "no_grad"])
def test_result_requires_grad_and_trains(context):
    model = M.seeded(M.ResidualCNN)
    calibration = _batches((2, 3, 16, 16))
    if context == "no_grad":
        with torch.no_grad():
            compressed = lrsearch.factorize(model, 0.5, method="whitened", calibration=calibration)
    else:
        compressed = lrsearch.factorize(model, 0.5, method="whitened", calibration=calibration)
    params = dict(compressed.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer = torch.optim.SGD(compressed.parameters(), lr=0.1)
    compressed.train()
    out = compressed(calibration[0])
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 2])).backward()
    optimizer.step()
    for name in _factorized_names(compressed):
        for pname, parameter in compressed.get_submodule(name).named_parameters():
            full = f"{name}.{pname}"
            assert parameter.grad is not None, full
            if pname.endswith("weight"):  # a bias right before BatchNorm gets a zero gradient
                assert not torch.equal(params[full], before[full]), full


def test_result_trains_when_factorized_under_inference_mode():
    """assign_() promises trainable parameters even when factors come from inference mode."""
    model = M.seeded(M.MLP)
    with torch.inference_mode():
        compressed = lrsearch.factorize(model, 4, method="whitened", calibration=_batches((8, 12)))
    assert not any(p.is_inference() for p in compressed.parameters())
    compressed(torch.randn(3, 12)).square().mean().backward()
    assert all(p.grad is not None for p in compressed.parameters())


@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_float64_model_stays_float64(method):
    model = M.seeded(M.ResidualCNN).double()
    shape = (2, 3, 16, 16)
    calibration = [b.double() for b in _batches(shape)]
    compressed = lrsearch.factorize(model, 1.0, method=method, calibration=calibration,
                                    conv_scheme="spatial")
    assert {p.dtype for p in compressed.parameters()} == {torch.float64}
    assert {b.dtype for b in compressed.buffers() if b.is_floating_point()} == {torch.float64}
    model.eval()
    compressed.eval()
    x = calibration[0]
    out = compressed(x)
    assert out.dtype == torch.float64
    assert M.relative_error(out, model(x)) < 1e-9
