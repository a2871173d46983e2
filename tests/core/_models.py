"""Tiny models shared by test_surgery.py, test_targets.py and test_serialization.py.

Tests load this file by path (pytest runs with ``--import-mode=importlib``, so the test folder is
not on ``sys.path``); see ``load_models`` at the top of each test file.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, in_features: int = 12, hidden: int = 32, out_features: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return torch.relu(y + self.shortcut(x))


class ResidualCNN(nn.Module):
    """Conv stem, one residual block (two 3×3 convs + 1×1 shortcut), a depthwise conv, pool, head."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.block = ResidualBlock(width, 2 * width)
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.block(x)
        x = torch.relu(self.depthwise(x))
        return self.head(self.pool(x).flatten(1))


def transformer_layer() -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)


def transformer_encoder() -> nn.TransformerEncoder:
    return nn.TransformerEncoder(transformer_layer(), num_layers=2, enable_nested_tensor=True)


class UsesWeightDirectly(nn.Module):
    """``proj`` is a Linear whose forward never runs: the parent reads ``proj.weight`` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc(x))
        x = F.linear(x, self.proj.weight, self.proj.bias)
        return self.head(x)


class TiedLM(nn.Module):
    """An Embedding whose weight is shared with the output head (weight tying)."""

    def __init__(self, vocab: int = 20, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


def seeded(factory, seed: int = 0, **kwargs) -> nn.Module:  # noqa: ANN001
    """``factory(**kwargs)`` built under a fixed seed, so two calls give identical weights."""
    torch.manual_seed(seed)
    return factory(**kwargs)


def snapshot(model: nn.Module) -> dict:
    """Everything about a model that factorize/load must not change: types, flags, tensors."""
    return {
        "types": {name: type(module) for name, module in model.named_modules()},
        "training": {name: module.training for name, module in model.named_modules()},
        "tensors": {name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
        "ptrs": {name: param.data_ptr() for name, param in model.named_parameters()},
        "requires_grad": {name: param.requires_grad for name, param in model.named_parameters()},
    }


def assert_same_snapshot(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["training"] == before["training"]
    assert after["ptrs"] == before["ptrs"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][name], tensor), name


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error, in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


def assert_whitened_optimum(model: nn.Module, inputs: torch.Tensor, whitened, plain, *, layer: str = "0") -> None:  # noqa: ANN001
    """At every rank below full, the whitened build's output error on ``inputs`` (the calibration
    data) equals the tail of its singular values, the exact optimum, and beats the plain SVD's."""
    values = whitened.singular_values(layer)
    with torch.no_grad():
        reference = model(inputs)
        for rank in range(1, whitened.full_rank(layer)):
            white_error = float((whitened.build(rank)(inputs) - reference).double().norm())
            plain_error = float((plain.build(rank)(inputs) - reference).double().norm())
            assert white_error == pytest.approx(float(values[rank:].square().sum().sqrt()), rel=1e-3), rank
            assert white_error < plain_error, rank
