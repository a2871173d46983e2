"""Coverage: every parameter-holding module classified (target / skipped / excluded / unhandled),
parameter and MAC shares, text and dict renderings, and what a model with nothing to factorize holds."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lrsearch
from lrsearch.core import Coverage, coverage
from lrsearch.core._cost import count_macs
from tests.core import _models as M


class Recurrent(nn.Module):
    """Token embedding, an LSTM and a Linear head: only the head can be factorized."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.lstm(self.embed(tokens))[0]))


class OnlyRecurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 32)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_statuses_and_shares_of_a_recurrent_model() -> None:
    model = M.seeded(Recurrent)
    tokens = torch.randint(0, 50, (4, 7))
    report = coverage(model, tokens)
    status = {module.name: module.status for module in report.modules}
    assert status == {"embed": "unhandled", "lstm": "unhandled", "norm": "unhandled", "head": "target"}
    assert report.total_params == _params(model)
    assert report.target_params == _params(model.head)
    assert report.param_share == pytest.approx(_params(model.head) / _params(model))
    head = next(module for module in report.modules if module.name == "head")
    assert head.macs == 32 * 10 * 7  # per sample: 7 tokens through a 32→10 Linear
    assert report.total_macs == pytest.approx(count_macs(model, tokens) / 4)
    assert 0 < report.mac_share <= 1
    text = report.format()
    assert "Recurrent" in text and "1 LSTM" in text and "1 Embedding" in text and "1 LayerNorm" in text
    assert f"{100 * report.param_share:.1f}%" in text


def test_without_an_example_batch_macs_are_unknown() -> None:
    report = coverage(M.seeded(M.ResidualCNN))
    assert report.total_macs is None and report.mac_share is None and report.target_macs is None
    assert "multiply-adds" not in report.lines()[0]


def test_every_layer_of_an_mlp_is_a_target_and_all_macs_are_covered() -> None:
    report = coverage(M.seeded(M.MLP), torch.randn(5, 12))
    assert [module.status for module in report.modules] == ["target"] * 3
    assert report.param_share == 1.0 and report.mac_share == pytest.approx(1.0)


def test_skipped_excluded_and_tied_layers() -> None:
    model = M.seeded(M.ResidualCNN)
    report = lrsearch.Decomposition(model, method="svd", exclude_modules=["head"]).coverage()
    by_name = {module.name: module for module in report.modules}
    assert by_name["depthwise"].status == "skipped" and "depthwise" in by_name["depthwise"].reason
    assert by_name["head"].status == "excluded"
    assert by_name["block.bn1"].status == "unhandled"
    text = report.format()
    assert "skipped depthwise (Conv2d)" in text and "excluded" in text and "1 BatchNorm2d" in text
    tied = coverage(M.seeded(M.TiedLM), torch.randint(0, 20, (2, 5)))
    head = next(module for module in tied.modules if module.name == "head")
    assert head.status == "skipped" and "tied" in head.reason
    assert head.params == 0  # its weight is counted once, at the embedding that owns it
    assert sum(module.params for module in tied.modules) == tied.total_params


def test_attention_projections_count_as_targets() -> None:
    model = M.seeded(M.transformer_layer)
    report = coverage(model, torch.randn(2, 6, 32))
    targets = {module.name for module in report.by_status("target")}
    assert targets == {"self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"}
    norms = sum(_params(norm) for norm in (model.norm1, model.norm2))
    assert report.target_params == _params(model) - norms
    assert report.target_macs == 6 * (32 * 96 + 32 * 32 + 2 * 32 * 64)  # per sample of 6 tokens
    # torch's FLOP counter does not count the CPU attention kernel, so every counted MAC is a target's.
    assert report.mac_share == pytest.approx(1.0)


def test_to_dict_is_json_and_carries_the_shares() -> None:
    report = coverage(M.seeded(Recurrent), torch.randint(0, 50, (2, 7)))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["param_share"] == pytest.approx(report.param_share)
    assert data["mac_share"] == pytest.approx(report.mac_share)
    assert {module["name"] for module in data["modules"]} == {"embed", "lstm", "norm", "head"}
    assert isinstance(report, Coverage)


def test_nothing_to_factorize_says_what_the_model_holds() -> None:
    with pytest.raises(lrsearch.NoMatchingModuleError) as info:
        coverage(M.seeded(OnlyRecurrent))
    message = str(info.value)
    assert "OnlyRecurrent" in message and "1 Embedding" in message and "1 LSTM" in message
    assert "Conv1D" in message and "MultiheadAttention" in message  # what lrsearch does support
