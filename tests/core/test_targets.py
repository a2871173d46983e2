"""Target selection follows PEFT: regex full match, list of names/suffixes, exclusions win,
typed errors with distinct messages, and unsupported layers reported with a reason."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lrsearch
from lrsearch.core import name_matches, select_targets


def _seeded(factory):
    torch.manual_seed(0)
    return factory()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.xfc1 = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.xfc1(self.fc1(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.block = Block()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.block(self.fc1(x))
        for layer in self.layers:
            x = layer(x)
        return x


class Odd(nn.Module):
    """Linear/conv-like layers that cannot be factorized, next to one that can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(4, 4, 3)
        self.deconv = nn.ConvTranspose2d(4, 4, 3)
        self.grouped = nn.Conv2d(4, 8, 3, groups=2)
        self.fc = nn.Linear(4, 4)


class OnlyUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(4, 4, 3)
        self.deconv = nn.ConvTranspose2d(4, 4, 3)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class Special(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.custom = ScaledLinear(4, 4)
        self.lazy = nn.LazyLinear(4)
        self.param = nn.Linear(4, 4)
        parametrize.register_parametrization(self.param, "weight", nn.Identity())
        self.shared = nn.Linear(4, 4)
        self.alias = self.shared  # one module, two names
        self.plain = nn.Linear(4, 4)


# ---------------------------------------------------------------------------- name_matches

@pytest.mark.parametrize(("name", "patterns", "expected"), [
    ("fc", "fc", True),
    ("fc1", "fc", False),               # str: regex must match the whole name
    ("block.fc", "fc", False),
    ("layers.0", r"layers\.\d+", True),
    ("layers.10", r"layers\.\d+", True),
    ("layers.0.fc", r"layers\.\d+", False),
    ("block.fc1", r".*fc1", True),
    ("fc1", ["fc1"], True),             # list: exact name ...
    ("block.fc1", ["fc1"], True),       # ... or dotted suffix
    ("block.xfc1", ["fc1"], False),
    ("a.block.fc1", ["block.fc1"], True),
    ("xblock.fc1", ["block.fc1"], False),
    ("fc1", ("fc2", "fc1"), True),      # any sequence, not only lists
    ("fc1", [], False),
    ("fc1", None, False),
])
def test_name_matches_peft_semantics(name, patterns, expected):
    assert name_matches(name, patterns) is expected


def test_list_patterns_are_not_regexes():
    assert not name_matches("fc1", ["fc."])
    assert not name_matches("layers.0", [r"layers\.\d+"])


# ---------------------------------------------------------------------------- select_targets

def test_default_targets_every_linear_and_conv2d():
    selection = select_targets(_seeded(Net))
    assert list(selection.targets) == ["fc1", "block.fc1", "block.xfc1", "block.fc", "layers.0",
                                       "layers.1", "conv"]
    assert selection.skipped == {}


def test_regex_target_must_fullmatch():
    model = _seeded(Net)
    selection = select_targets(model, target_modules=r"layers\.\d+")
    assert list(selection.targets) == ["layers.0", "layers.1"]
    selection = select_targets(model, target_modules=r"block\.fc")
    assert list(selection.targets) == ["block.fc"]


def test_regex_that_matches_only_a_prefix_matches_nothing():
    model = _seeded(Net)
    with pytest.raises(lrsearch.NoMatchingModuleError) as info:
        select_targets(model, target_modules="fc")  # no module is named exactly "fc"
    message = str(info.value)
    assert "'fc'" in message
    assert "fc1" in message and "block.fc1" in message  # lists available layer names


def test_list_target_matches_exact_names_and_suffixes():
    model = _seeded(Net)
    selection = select_targets(model, target_modules=["fc1"])
    assert list(selection.targets) == ["fc1", "block.fc1"]  # not block.xfc1
    selection = select_targets(model, target_modules=["block.fc", "layers.1"])
    assert list(selection.targets) == ["block.fc", "layers.1"]


def test_target_modules_only_selects_linear_or_conv_like_modules():
    model = _seeded(Net)
    selection = select_targets(model, target_modules=r"block.*|act")
    assert list(selection.targets) == ["block.fc1", "block.xfc1", "block.fc"]
    assert "block" not in selection.skipped and "act" not in selection.skipped


def test_target_types_restricts_default_selection():
    selection = select_targets(_seeded(Net), target_types=(nn.Conv2d,))
    assert list(selection.targets) == ["conv"]
    selection = select_targets(_seeded(Odd), target_types=(nn.Linear,))
    assert list(selection.targets) == ["fc"]
    assert "grouped" not in selection.skipped  # a Conv2d, but not a requested type


@pytest.mark.parametrize("exclude", [["fc1"], r"(block\.)?fc1"])
def test_exclusions_win_over_targets(exclude):
    model = _seeded(Net)
    selection = select_targets(model, target_modules=["fc1", "fc"], exclude_modules=exclude)
    assert list(selection.targets) == ["block.fc"]
    assert "fc1" not in selection.skipped and "block.fc1" not in selection.skipped


def test_exclusion_without_target_modules():
    selection = select_targets(_seeded(Net), exclude_modules=["block.fc1", "conv"])
    assert "block.fc1" not in selection.targets and "conv" not in selection.targets
    assert "fc1" in selection.targets and "block.xfc1" in selection.targets


def test_unused_exclusion_warns():
    model = _seeded(Net)
    with pytest.warns(UserWarning, match="did not exclude"):
        selection = select_targets(model, exclude_modules=["does_not_exist"])
    assert len(selection.targets) == 7
    with pytest.warns(UserWarning, match="act"):  # matches a module that is not a target
        select_targets(model, exclude_modules=["act"])


def test_used_exclusion_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_targets(_seeded(Net), exclude_modules=["conv"])


def test_exclusions_apply_through_factorize():
    model = _seeded(Net)
    compressed = lrsearch.factorize(model, 2, method="svd", exclude_modules=["block.fc1", "conv"])
    assert type(compressed.block.fc1) is nn.Linear
    assert type(compressed.conv) is nn.Conv2d
    assert isinstance(compressed.block.xfc1, lrsearch.LowRankLinear)
    decomposition = lrsearch.Decomposition(model, method="svd", target_modules=r"layers\.\d+")
    assert decomposition.targets == ("layers.0", "layers.1")


# ---------------------------------------------------------------------------- no match: typed, distinct errors

def _no_match_message(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(lrsearch.NoMatchingModuleError) as info:
            select_targets(model, **kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, lrsearch.LrSearchError)
    return str(info.value)


def test_no_match_errors_have_distinct_messages():
    nothing = _no_match_message(_seeded(Net), target_modules=["nope"])
    excluded = _no_match_message(_seeded(Net), exclude_modules=".*")
    unsupported = _no_match_message(_seeded(OnlyUnsupported))
    no_layers = _no_match_message(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))

    assert "matched no" in nothing and "['nope']" in nothing
    assert "layers.0" in nothing and "block.fc1" in nothing  # sample of available names
    assert "excluded every" in excluded
    assert "unsupported" in unsupported
    assert "deconv" in unsupported and "depthwise" in unsupported
    assert "has no layer lrsearch can factorize" in no_layers and "Sequential" in no_layers
    assert "1 LayerNorm" in no_layers  # says what the model holds instead
    assert len({nothing, excluded, unsupported, no_layers}) == 4


def test_no_match_raised_by_factorize_and_decomposition():
    with pytest.raises(lrsearch.NoMatchingModuleError, match="matched no"):
        lrsearch.factorize(_seeded(Net), 2, method="svd", target_modules=r"fc")
    with pytest.raises(ValueError, match="has no layer lrsearch can factorize"):
        lrsearch.Decomposition(nn.Sequential(nn.Tanh()), method="svd")


def test_many_available_names_are_truncated_in_message():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(20)])
    message = _no_match_message(model, target_modules="nope")
    assert "0, 1, 2" in message and "..." in message
    assert "19" not in message


# ---------------------------------------------------------------------------- skipped with reasons

def test_conv3d_transposed_and_grouped_convs_are_skipped_with_reasons():
    selection = select_targets(_seeded(Odd))
    assert list(selection.targets) == ["fc"]
    assert set(selection.skipped) == {"conv3d", "deconv", "grouped"}
    assert "Conv3d" in selection.skipped["conv3d"] and "not supported" in selection.skipped["conv3d"]
    assert "transposed" in selection.skipped["deconv"]
    assert "grouped" in selection.skipped["grouped"] and "groups=2" in selection.skipped["grouped"]


def test_skipped_layers_are_reported_by_decomposition_and_stay_dense():
    model = _seeded(Odd)
    decomposition = lrsearch.Decomposition(model, method="svd")
    assert decomposition.targets == ("fc",)
    assert set(decomposition.skipped) == {"conv3d", "deconv", "grouped"}
    compressed = decomposition.build(2)
    assert type(compressed.conv3d) is nn.Conv3d
    assert type(compressed.deconv) is nn.ConvTranspose2d
    assert type(compressed.grouped) is nn.Conv2d


def test_explicitly_targeted_unsupported_layer_is_skipped_not_broken():
    selection = select_targets(_seeded(Odd), target_modules=["deconv", "fc"])
    assert list(selection.targets) == ["fc"]
    assert "transposed" in selection.skipped["deconv"]


def test_layers_that_cannot_be_replaced_safely_are_skipped():
    model = _seeded(Special)
    selection = select_targets(model)
    assert list(selection.targets) == ["plain"]
    assert "overrides forward" in selection.skipped["custom"]
    assert "lazy" in selection.skipped["lazy"]
    assert "parametrization" in selection.skipped["param"]
    assert "also registered" in selection.skipped["shared"]
    assert "alias" in selection.skipped["shared"]
