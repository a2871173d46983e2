"""A channels_last model stays channels_last: factorized convs store their kernels like the dense ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrsearch
from lrsearch.core import LowRankConv2d
from tests.core import _models as M


def _conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and module.groups == 1}


@pytest.mark.parametrize("scheme", ["channel", "spatial", "tucker2"])
def test_factorized_convs_keep_channels_last(scheme: str) -> None:
    model = M.seeded(M.ResidualCNN).to(memory_format=torch.channels_last).eval()
    spatial = [w for w in _conv_weights(model).values() if w.shape[-2:] != (1, 1)]
    assert spatial and all(not w.is_contiguous() for w in spatial)  # really channels_last, not ambiguous
    compressed = lrsearch.factorize(model, 1.0, method="svd", conv_scheme=scheme).eval()
    weights = _conv_weights(compressed)
    assert any("first" in name for name in weights)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights.values()), [
        name for name, w in weights.items() if not w.is_contiguous(memory_format=torch.channels_last)]
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert M.rel_err(compressed(x), model(x)) <= 1e-5


def test_contiguous_model_stays_contiguous_and_load_follows_the_fresh_model(tmp_path) -> None:
    model = M.seeded(M.ResidualCNN)
    compressed = lrsearch.factorize(model, 0.5, method="svd")
    assert all(w.is_contiguous() for w in _conv_weights(compressed).values())
    lrsearch.save(compressed, tmp_path / "cnn")
    fresh = M.seeded(M.ResidualCNN, seed=2).to(memory_format=torch.channels_last)
    loaded = lrsearch.load(tmp_path / "cnn", fresh)
    replaced = {name: w for name, w in _conv_weights(loaded).items() if ".first" in name or ".second" in name}
    assert replaced and all(w.is_contiguous(memory_format=torch.channels_last) for w in replaced.values())
    assert isinstance(loaded.block.conv1, LowRankConv2d)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compressed(x))
