"""transformers' Conv1D (GPT-2): found without importing transformers in core, exact at full rank,
tied lm_head kept dense and named, cost and save/load. Random-weight tiny GPT-2s only."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lrsearch
from lrsearch.core import LowRankLinear, dense_cost, factorized_cost
from lrsearch.core._cost import geometry_of
from tests.core import _models as M

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, SEQ = 64, 12
CONV1D_NAMES = [f"h.{block}.{name}" for block in range(2)
                for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def _config() -> transformers.GPT2Config:
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   bos_token_id=0, eos_token_id=0)


def _tokens(count: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (4, SEQ), generator=generator)} for _ in range(count)]


def test_gpt2_model_targets_its_eight_conv1d_layers() -> None:
    model = M.seeded(transformers.GPT2Model, config=_config())
    selection = lrsearch.select_targets(model)
    assert list(selection.targets) == CONV1D_NAMES
    assert selection.skipped == {}


def test_gpt2_lm_head_is_tied_so_it_stays_dense_and_is_named() -> None:
    model = M.seeded(transformers.GPT2LMHeadModel, config=_config())
    selection = lrsearch.select_targets(model)
    assert list(selection.targets) == ["transformer." + name for name in CONV1D_NAMES]
    assert "tied" in selection.skipped["lm_head"] and "transformer.wte" in selection.skipped["lm_head"]


@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_full_rank_gpt2_equals_the_dense_model(method: str) -> None:
    model = M.seeded(transformers.GPT2LMHeadModel, config=_config()).eval()
    batches = _tokens()
    compressed = lrsearch.factorize(model, 1.0, method=method, calibration=batches).eval()
    attention = compressed.transformer.h[0].attn
    assert isinstance(attention.c_attn, LowRankLinear) and attention.c_attn.out_features == 96
    assert type(compressed.lm_head) is torch.nn.Linear
    with torch.no_grad():
        for batch in batches:
            assert M.rel_err(compressed(**batch).logits, model(**batch).logits) <= 1e-5
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D  # the original is untouched


def test_whitened_rows_are_tokens_and_low_rank_beats_plain() -> None:
    model = M.seeded(transformers.GPT2Model, config=_config()).eval()
    batches = _tokens(3)
    whitened = lrsearch.Decomposition(model, calibration=batches)
    plain = lrsearch.Decomposition(model, method="svd")
    geometry = whitened.geometry("h.0.mlp.c_fc")
    assert (geometry.kind, geometry.in_features, geometry.out_features, geometry.rows) == ("hf_conv1d", 32, 128, SEQ)
    with torch.no_grad():
        reference = model(**batches[0]).last_hidden_state
        ranks = {"h.0.mlp.c_fc": 8, "h.1.attn.c_attn": 8}
        white = M.rel_err(whitened.build(ranks)(**batches[0]).last_hidden_state, reference)
        svd = M.rel_err(plain.build(ranks)(**batches[0]).last_hidden_state, reference)
    assert white < svd


def test_conv1d_cost_matches_the_flop_counter() -> None:
    conv = Conv1D(24, 10)
    x = torch.randn(3, 5, 10)
    geometry = geometry_of(conv, rows=5)
    layer = LowRankLinear.from_weight(conv.weight.T, conv.bias, 4)
    assert M.rel_err(LowRankLinear.from_weight(conv.weight.T, conv.bias, 10)(x), conv(x)) <= 1e-5
    for module, cost in [(conv, dense_cost(geometry)), (layer, factorized_cost(geometry, 4))]:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(x)
        assert cost.macs == counter.get_total_flops() // 2 // x.shape[0]
        assert cost.params == sum(p.numel() for p in module.parameters())


def test_subclass_overriding_forward_is_skipped() -> None:
    class Scaled(Conv1D):
        def forward(self, x):  # noqa: ANN001, ANN202
            return 2 * super().forward(x)

    model = torch.nn.Sequential(Scaled(8, 4), torch.nn.Linear(8, 8))
    selection = lrsearch.select_targets(model)
    assert list(selection.targets) == ["1"]
    assert "overrides forward" in selection.skipped["0"]


def test_gpt2_save_and_load_round_trip(tmp_path) -> None:
    model = M.seeded(transformers.GPT2LMHeadModel, config=_config()).eval()
    batches = _tokens()
    compressed = lrsearch.factorize(model, {"transformer.h.0.attn.c_attn": 8, "transformer.h.1.mlp.c_proj": 16},
                                    calibration=batches).eval()
    lrsearch.save(compressed, tmp_path / "gpt2")
    recipe = lrsearch.read_recipe(tmp_path / "gpt2")
    assert recipe["layers"]["transformer.h.0.attn.c_attn"]["type"] == "linear"
    fresh = M.seeded(transformers.GPT2LMHeadModel, seed=3, config=_config())
    loaded = lrsearch.load(tmp_path / "gpt2", fresh).eval()
    assert isinstance(loaded.transformer.h[1].mlp.c_proj, LowRankLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, compressed(**batches[0]).logits)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tying survives the load
