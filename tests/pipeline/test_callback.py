"""The RankSearch callback end to end with a real Trainer on a tiny module and datamodule."""

from __future__ import annotations

import json
import types
from pathlib import Path

import optuna
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrsearch
from lrsearch.measure import Evaluator, paired_drop_interval
from lrsearch.pipeline import _compress, _outcome
from lrsearch.pipeline._data import DataError

FAST = {"search": {"n_trials": 6, "objective": "macs", "seed": 1},
        "finetune": {"epochs": 1, "progress": False, "accelerator": "cpu"}}


def _split(seed: int, n: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=generator)
    y = (x[:, :4] * torch.tensor([1.0, -2.0, 0.5, 1.5])).argmax(1)
    return TensorDataset(x, y)


class Classifier(lrsearch.LowRankCheckpointMixin, pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, _index):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _index):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class Data(pl.LightningDataModule):
    def __init__(self, *, with_test: bool = True) -> None:
        super().__init__()
        self.with_test = with_test

    def train_dataloader(self):
        return DataLoader(_split(0, 1024), batch_size=64, shuffle=True)

    def val_dataloader(self):
        return DataLoader(_split(1, 512), batch_size=128)

    def test_dataloader(self):
        if not self.with_test:
            raise NotImplementedError
        return DataLoader(_split(2, 512), batch_size=128)


class Snapshot(pl.Callback):
    """Runs before RankSearch in on_fit_end and records the trained module's state."""

    def on_fit_end(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.types = [type(m) for m in pl_module.modules()]


def _fit(tmp_path: Path, callback: lrsearch.RankSearch, *, datamodule=None, **fit_kwargs):
    torch.manual_seed(0)
    module = Classifier()
    snapshot = Snapshot()
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu",
                         callbacks=[snapshot, callback])
    trainer.fit(module, datamodule=datamodule, **fit_kwargs)
    return module, trainer, snapshot


def _loader_batches(loader) -> list:
    return list(loader)


def test_callback_compresses_saves_and_reloads(tmp_path: Path) -> None:
    callback = lrsearch.RankSearch("2%", run_dir=tmp_path / "lrs", **FAST)
    module, _, snapshot = _fit(tmp_path, callback, datamodule=Data())
    result = callback.result
    assert result is not None and result.meets_budget, result.report.get("message")
    assert all(torch.equal(snapshot.state[k], v) for k, v in module.state_dict().items())
    assert [type(m) for m in module.modules()] == snapshot.types
    run = tmp_path / "lrs"
    for name in ("model/recipe.json", "compressed.ckpt", "report.json", "report.html", "search/study.db"):
        assert (run / name).is_file(), name
    compressed = result.model.eval()
    x = torch.randn(32, 16)
    reloaded = lrsearch.load(run / "model", Classifier()).eval()
    assert torch.equal(reloaded(x), compressed(x))
    from_checkpoint = Classifier.load_from_checkpoint(run / "compressed.ckpt").eval()
    assert torch.equal(from_checkpoint(x), compressed(x))
    assert any(isinstance(m, lrsearch.LowRankLinear) for m in from_checkpoint.modules())

    report = json.loads((run / "report.json").read_text())
    test_batches = _loader_batches(Data().test_dataloader())
    assert report["meets_budget"] is True
    assert report["splits"]["test"] == "test" and "selection" in report["splits"]["select"]
    assert report["final"]["verify_metric"] == pytest.approx(Evaluator(test_batches).evaluate(compressed).value)
    assert report["dense"]["verify_metric"] == pytest.approx(Evaluator(test_batches).evaluate(module).value)
    assert report["final"]["params"] == lrsearch.count_params(compressed)
    assert report["final"]["verify_drop"] <= report["allowed_drop"]
    assert report["final"]["ranks"] == {k: v for k, v in result.ranks.items()}
    # The drop's 95 % interval comes from the same paired per-sample hits, and the page shows it.
    base, tuned = Evaluator(test_batches).evaluate(module), Evaluator(test_batches).evaluate(compressed)
    low, high = report["final"]["verify_drop_interval"]
    assert [low, high] == pytest.approx(list(paired_drop_interval(base.correct, tuned.correct)))
    assert low <= report["final"]["verify_drop"] <= high and low < high
    # The attempts were judged on the selection split, not on the test split.
    assert report["attempts"][-1]["select_drop_interval"] != [low, high]
    assert report["final"]["select_drop"] == report["attempts"][-1]["select_drop"]
    assert f"{low * 100:.2f} to {high * 100:.2f} points" in (run / "report.html").read_text()


def _breaking_finetune(*, first_only: bool):
    """A finetune stand-in that zeroes the fine-tuned weights (of the first candidate only, or of all)."""
    real = _compress.finetune
    calls: list[int] = []

    def fake(module, **kwargs):
        tuned = real(module, **kwargs)
        calls.append(1)
        if len(calls) == 1 or not first_only:
            with torch.no_grad():
                for parameter in tuned.parameters():
                    parameter.zero_()
        return tuned

    return fake, calls


def test_a_failed_candidate_moves_the_selection_dearer(tmp_path: Path, monkeypatch) -> None:
    fake, calls = _breaking_finetune(first_only=True)
    monkeypatch.setattr(_compress, "finetune", fake)
    callback = lrsearch.RankSearch("3%", run_dir=tmp_path / "lrs", max_finetunes=4,
                                   search={**FAST["search"], "n_trials": 12}, finetune=FAST["finetune"])
    _fit(tmp_path, callback, datamodule=Data())
    result = callback.result
    ladder = [c.trial for c in result.search.uniform]
    assert len(ladder) >= 2, "the tiny search must leave two uniform rungs to fall back on"
    attempts = result.report["attempts"]
    assert attempts[0]["meets_budget"] is False and attempts[0]["family"] == "uniform"
    assert attempts[0]["trial"] == ladder[(len(ladder) - 1) // 2]   # the ladder's middle rung first
    assert attempts[1]["family"] == "uniform" and ladder.index(attempts[1]["trial"]) > ladder.index(attempts[0]["trial"])
    assert result.meets_budget and result.candidate.trial in [a["trial"] for a in attempts if a["meets_budget"]]
    held = [a for a in attempts if a["meets_budget"]]
    study = optuna.load_study(study_name=result.search.study_name, storage=result.search.storage)
    macs = {t.number: t.user_attrs.get("macs") for t in study.trials}
    rung = min((a for a in attempts[:2] if a["meets_budget"]), key=lambda a: ladder.index(a["trial"]))
    for later in attempts[2:]:  # then the descent and the front, only what is cheaper than the rung that held
        assert later["family"] in ("descent", "front")
        if later["family"] == "front":
            assert later["trial"] in [c.trial for c in result.search.pareto]
        assert macs[later["trial"]] < macs[rung["trial"]]
    assert result.candidate.trial == min(held, key=lambda a: macs[a["trial"]])["trial"]


def test_a_descent_from_the_ladders_winner_can_win(tmp_path: Path, monkeypatch) -> None:
    """Fine-tuning breaks a model with two layers at rank 8: the ladder stops at 16, one layer at 8 holds."""
    real = _compress.finetune
    tuned_ranks: list[list[int]] = []

    def fake(module, **kwargs):
        ranks = sorted(m.rank for m in module.modules() if isinstance(m, lrsearch.LowRankLinear))
        tuned_ranks.append(ranks)
        tuned = real(module, **kwargs)
        if sum(rank <= 8 for rank in ranks) >= 2:
            with torch.no_grad():
                for parameter in tuned.parameters():
                    parameter.zero_()
        return tuned

    monkeypatch.setattr(_compress, "finetune", fake)
    callback = lrsearch.RankSearch("3%", run_dir=tmp_path / "lrs", max_finetunes=4,
                                   search={**FAST["search"], "n_trials": 12}, finetune=FAST["finetune"])
    _fit(tmp_path, callback, datamodule=Data())
    result = callback.result
    attempts = result.report["attempts"]
    families = [a["family"] for a in attempts]
    assert families[:2] == ["uniform", "uniform"] and "descent" in families
    assert families == sorted(families, key=["uniform", "descent", "front"].index)
    assert len(attempts) == len(tuned_ranks) <= 4
    assert result.meets_budget and result.report["final"]["trial"] == attempts[families.index("descent")]["trial"]
    assert sum(rank <= 8 for rank in result.ranks.values()) == 1       # one layer cut below the ladder's rank
    study = optuna.load_study(study_name=result.search.study_name, storage=result.search.storage)
    assert study.trials[result.candidate.trial].user_attrs["macs"] == result.candidate.macs  # a trial of the study
    assert any(str(t.user_attrs.get("warm_start", "")).startswith("descent@") for t in study.trials)
    rungs = {c.trial: c for c in result.search.uniform}
    winner = min((rungs[a["trial"]] for a in attempts if a["family"] == "uniform" and a["meets_budget"]),
                 key=lambda c: c.macs)
    assert result.candidate.macs < winner.macs
    assert result.report["timing"]["descent_size"] >= 1


def test_none_holds_is_reported_plainly(tmp_path: Path, monkeypatch) -> None:
    fake, calls = _breaking_finetune(first_only=False)
    monkeypatch.setattr(_compress, "finetune", fake)
    callback = lrsearch.RankSearch("2%", run_dir=tmp_path / "lrs", max_finetunes=2, **FAST)
    _fit(tmp_path, callback, datamodule=Data())
    result = callback.result
    assert result.meets_budget is False and result.model is None
    assert len(calls) == min(2, len(result.search.pareto))
    assert result.report["attempts"][-1]["trial"] == result.search.pareto[-1].trial  # the dearest, last
    assert not (tmp_path / "lrs" / "model").exists() and not (tmp_path / "lrs" / "compressed.ckpt").exists()
    report = json.loads((tmp_path / "lrs" / "report.json").read_text())
    assert report["meets_budget"] is False and "final" not in report
    assert "No configuration met the budget" in report["message"]
    assert "test split was not looked at" in report["message"]


def test_swap_puts_the_compressed_layers_into_the_module(tmp_path: Path) -> None:
    callback = lrsearch.RankSearch("2%", run_dir=tmp_path / "lrs", swap=True, **FAST)
    module, _, _ = _fit(tmp_path, callback, datamodule=Data())
    assert callback.result.meets_budget
    assert any(isinstance(m, lrsearch.LowRankLinear) for m in module.modules())
    x = torch.randn(8, 16)
    assert torch.equal(module.eval()(x), callback.result.model.eval()(x))


def test_plain_dataloaders_without_test_split_hold_out_validation(tmp_path: Path) -> None:
    callback = lrsearch.RankSearch("2%", run_dir=tmp_path / "lrs", **FAST)
    with pytest.warns(UserWarning, match="no test split"):
        _fit(tmp_path, callback, train_dataloaders=Data().train_dataloader(),
             val_dataloaders=Data().val_dataloader())
    splits = callback.result.report["splits"]
    assert "held out" in splits["test"] and "selection" in splits["select"] and "search" in splits["search"]


def test_missing_validation_data_is_a_clear_error(tmp_path: Path) -> None:
    callback = lrsearch.RankSearch("2%", run_dir=tmp_path / "lrs", **FAST)
    with pytest.raises(DataError, match="validation data") as error:
        _fit(tmp_path, callback, train_dataloaders=Data().train_dataloader())
    assert "HINT" in str(error.value)


def test_runs_only_on_global_rank_zero(tmp_path: Path) -> None:
    callback = lrsearch.RankSearch("2%", run_dir=tmp_path / "lrs", **FAST)
    trainer = types.SimpleNamespace(is_global_zero=False, default_root_dir=str(tmp_path))
    callback.on_fit_end(trainer, Classifier())
    assert callback.result is None
    assert not (tmp_path / "lrs").exists()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"budget": "abc"}, lrsearch.BudgetError, "abc"),
    ({"budget": "100%"}, lrsearch.BudgetError, "100"),
    ({"search": {"n_trails": 3}}, TypeError, "n_trails"),
    ({"finetune": {"epoch": 1}}, TypeError, "epoch"),
    ({"max_finetunes": 0}, ValueError, "max_finetunes"),
    ({"select_fraction": 1.0}, ValueError, "select_fraction"),
    ({"search": "fast"}, TypeError, "search"),
], ids=["budget-abc", "budget-100", "search-typo", "finetune-typo", "candidates-0", "fraction-1", "search-str"])
def test_arguments_are_validated_in_init(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        lrsearch.RankSearch(**kwargs)


def test_lightning_namespace_callback(tmp_path: Path) -> None:
    """``lightning.pytorch`` Trainers get their own RankSearch subclass."""
    lp = pytest.importorskip("lightning.pytorch")
    from lrsearch.lightning import RankSearch

    class Module(lrsearch.LowRankCheckpointMixin, lp.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _index):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, _index):
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    callback = RankSearch("2%", run_dir=tmp_path / "lrs", **FAST)
    assert isinstance(callback, lp.Callback) and not isinstance(callback, pl.Callback)
    torch.manual_seed(0)
    trainer = lp.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu",
                         callbacks=[callback])
    trainer.fit(Module(), train_dataloaders=Data().train_dataloader(), val_dataloaders=Data().val_dataloader())
    assert callback.result is not None
    assert (tmp_path / "lrs" / "report.json").is_file()


def test_the_test_split_is_scored_once_per_reported_model(tmp_path: Path, monkeypatch) -> None:
    """Selection happens on the selection split; the test split sees the original and the final model once."""
    scored: list[tuple[str, int]] = []
    test_inputs = _loader_batches(Data().test_dataloader())[0][0]

    class Counting(Evaluator):
        def evaluate(self, model):
            first = self._batches[0][0] if isinstance(self._batches[0], (list, tuple)) else None
            role = "test" if first is not None and torch.equal(first, test_inputs) else "other"
            scored.append((role, len(scored)))
            return super().evaluate(model)

    monkeypatch.setattr(_compress, "Evaluator", Counting)  # the selection split
    monkeypatch.setattr(_outcome, "Evaluator", Counting)  # the test split
    callback = lrsearch.RankSearch("2%", run_dir=tmp_path / "lrs", max_finetunes=3, **FAST)
    _fit(tmp_path, callback, datamodule=Data())
    result = callback.result
    finetunes = len(result.report["attempts"])
    assert finetunes >= 1
    roles = [role for role, _ in scored]
    assert roles.count("test") == 2
    # Both test scorings come after every other one: the selection split's (the baseline and one per
    # fine-tune) and the search split's (the descent's starting factors).
    assert roles[-2:] == ["test", "test"] and len(roles) - 2 >= 1 + finetunes


def _recording_finetune():
    """A finetune stand-in that keeps a copy of each module it is given, before training it."""
    real = _compress.finetune
    started: list[dict[str, torch.Tensor]] = []

    def fake(module, **kwargs):
        started.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        return real(module, **kwargs)

    return fake, started


@pytest.mark.parametrize("finetune_from", ["svd", "search"])
def test_fine_tunes_start_from_the_factors_asked_for(tmp_path: Path, monkeypatch, finetune_from: str) -> None:
    fake, started = _recording_finetune()
    monkeypatch.setattr(_compress, "finetune", fake)
    callback = lrsearch.RankSearch("3%", run_dir=tmp_path / "lrs", max_finetunes=1, finetune_from=finetune_from,
                                   **FAST)
    module, _, _ = _fit(tmp_path, callback, datamodule=Data())
    result = callback.result
    tried = next(c for c in (*result.search.uniform, *result.search.pareto)
                 if c.trial == result.report["attempts"][0]["trial"])
    plain = lrsearch.Decomposition(module, method="svd").build(dict(tried.ranks), schemes=tried.schemes)
    expected = plain if finetune_from == "svd" else result.search.build(tried)
    other = result.search.build(tried) if finetune_from == "svd" else plain
    state = started[0]
    assert state.keys() == expected.state_dict().keys()
    assert all(torch.allclose(state[k], v, atol=1e-5) for k, v in expected.state_dict().items())
    assert not all(torch.allclose(state[k], v, atol=1e-5) for k, v in other.state_dict().items())


def _starts_follow_the_rule(attempts: list[dict]) -> None:
    """finetune_from="auto": once the start is the search's it stays so, and only after a plain-SVD
    fine-tune that ended further down than its trial's search drop."""
    starts = [attempt["start"] for attempt in attempts]
    switched = starts.index("search") if "search" in starts else len(starts)
    assert starts == ["svd"] * switched + ["search"] * (len(starts) - switched), starts
    if switched < len(starts):
        assert attempts[switched - 1]["select_drop"] > attempts[switched - 1]["search_drop"], attempts


@pytest.mark.parametrize("ruin_the_first", [False, True])
def test_auto_starts_from_plain_svd_until_a_fine_tune_from_it_loses_ground(
        tmp_path: Path, monkeypatch, ruin_the_first: bool) -> None:
    """The default ``finetune_from="auto"``. Ruined (its weights zeroed), the first fine-tune ends far below
    where the search's factors started, so the next one starts from the search's factors."""
    fake, started = _recording_finetune()
    calls: list[int] = []

    def finetune(module, **kwargs):
        tuned = fake(module, **kwargs)
        calls.append(1)
        if ruin_the_first and len(calls) == 1:
            with torch.no_grad():
                for parameter in tuned.parameters():
                    parameter.zero_()
        return tuned

    monkeypatch.setattr(_compress, "finetune", finetune)
    callback = lrsearch.RankSearch("3%", run_dir=tmp_path / "lrs", max_finetunes=2, **FAST)
    assert callback.spec.finetune_from == "auto"
    module, _, _ = _fit(tmp_path, callback, datamodule=Data())
    result = callback.result
    attempts = result.report["attempts"]
    assert attempts[0]["start"] == "svd"
    _starts_follow_the_rule(attempts)
    if ruin_the_first:
        assert len(attempts) == 2 and attempts[1]["start"] == "search"
        second = next(c for c in (*result.search.uniform, *result.search.pareto)
                      if c.trial == attempts[1]["trial"])
        expected = result.search.build(second).state_dict()
        assert all(torch.allclose(started[1][k], v, atol=1e-5) for k, v in expected.items())
    plain = lrsearch.Decomposition(module, method="svd")
    first = next(c for c in (*result.search.uniform, *result.search.pareto) if c.trial == attempts[0]["trial"])
    assert all(torch.allclose(started[0][k], v, atol=1e-5)
               for k, v in plain.build(dict(first.ranks), schemes=first.schemes).state_dict().items())
