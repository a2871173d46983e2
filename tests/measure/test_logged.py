"""Scoring by a metric the LightningModule logs: the same number Lightning's own validation gives."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrsearch.measure import Evaluator, EvaluationError, LoggedMetric, LoggedMetricError


def _data(n: int = 300, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return TensorDataset(x, (x[:, 0] > 0.2).long() + (x[:, 1] > 0).long())


class Logging(pl.LightningModule):
    """Logs in every way users do: per-step tensors, a torchmetrics object, an epoch-end value."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        self.acc = torchmetrics.classification.MulticlassAccuracy(3, average="micro")
        self.hits: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch, _index):
        x, y = batch
        logits = self(x)
        self.acc(logits, y)
        self.log("val_acc_obj", self.acc)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())
        self.log_dict({"val_loss": nn.functional.cross_entropy(logits, y)})
        self.log("val_worst", nn.functional.cross_entropy(logits, y), reduce_fx="max")
        self.hits.append(logits.argmax(-1) == y)

    def on_validation_epoch_end(self) -> None:
        self.log("val_epoch_acc", torch.cat(self.hits).float().mean())
        self.hits.clear()


def _lightning_values(module: pl.LightningModule, loader: DataLoader) -> dict[str, float]:
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu")
    return {name: float(value) for name, value in trainer.validate(module, loader, verbose=False)[0].items()}


@pytest.mark.parametrize("name", ["val_acc", "val_acc_obj", "val_loss", "val_worst", "val_epoch_acc"])
def test_logged_value_equals_lightnings_own(name: str) -> None:
    loader = DataLoader(_data(), batch_size=64)  # 300 rows: a short last batch makes the weighting matter
    expected = _lightning_values(Logging(), loader)[name]
    evaluation = Evaluator(loader, metric=LoggedMetric(name)).evaluate(Logging())
    assert evaluation.value == pytest.approx(expected, rel=1e-6)
    assert evaluation.samples == 300


def test_the_size_weighted_mean_differs_from_the_plain_mean_of_steps() -> None:
    loader = DataLoader(_data(), batch_size=64)
    module = Logging().eval()
    with torch.no_grad():
        per_batch = [float((module(x).argmax(-1) == y).float().mean()) for x, y in loader]
        exact = float(torch.cat([module(x).argmax(-1) == y for x, y in loader]).float().mean())
    value = Evaluator(loader, metric=LoggedMetric("val_acc")).evaluate(module).value
    assert value == pytest.approx(exact, abs=1e-6)
    assert abs(sum(per_batch) / len(per_batch) - exact) > 1e-4


def test_module_is_left_as_it_was() -> None:
    module = Logging().train()
    Evaluator(DataLoader(_data(), batch_size=64), metric=LoggedMetric("val_acc_obj")).evaluate(module)
    assert "log" not in module.__dict__ and "log_dict" not in module.__dict__
    assert module.training
    assert int(module.acc.tp.sum() + module.acc.fn.sum()) == 0  # metric state reset afterwards


def test_repeated_evaluations_do_not_accumulate() -> None:
    evaluator = Evaluator(DataLoader(_data(), batch_size=64), metric=LoggedMetric("val_acc_obj"))
    module = Logging()
    first, second = evaluator.evaluate(module), evaluator.evaluate(module)
    assert first.value == second.value
    with torch.no_grad():  # a changed model scores differently: nothing is cached
        module.net[2].bias.add_(torch.tensor([5.0, 0.0, 0.0]))
    assert evaluator.evaluate(module).value != first.value


def test_a_name_never_logged_lists_what_is() -> None:
    evaluator = Evaluator(DataLoader(_data(), batch_size=64), metric=LoggedMetric("val_accuracy"))
    with pytest.raises(LoggedMetricError, match="never logs 'val_accuracy'") as error:
        evaluator.evaluate(Logging())
    for name in ("val_acc", "val_acc_obj", "val_loss", "val_worst", "val_epoch_acc"):
        assert repr(name) in str(error.value)
    assert "HINT" in str(error.value).upper()


def test_plain_module_has_no_validation_step() -> None:
    evaluator = Evaluator(DataLoader(_data(), batch_size=64), metric=LoggedMetric("val_acc"))
    with pytest.raises(LoggedMetricError, match="no validation_step"):
        evaluator.evaluate(nn.Linear(8, 3))


class _OddLogging(Logging):
    def validation_step(self, batch, _index):
        self.log("val_acc", torch.ones(2), reduce_fx="mean")


class _OddReduction(Logging):
    def validation_step(self, batch, _index):
        self.log("val_acc", 1.0, reduce_fx=torch.median)


@pytest.mark.parametrize(("module", "match"), [(_OddLogging(), r"shape \(2,\)"), (_OddReduction(), "reduce_fx")])
def test_values_lrsearch_cannot_replay_are_named(module: pl.LightningModule, match: str) -> None:
    with pytest.raises(LoggedMetricError, match=match):
        Evaluator(DataLoader(_data(), batch_size=64), metric=LoggedMetric("val_acc")).evaluate(module)


def test_other_names_may_log_anything() -> None:
    class Noisy(Logging):
        def validation_step(self, batch, index):
            super().validation_step(batch, index)
            self.log("val_images", torch.ones(3, 2), reduce_fx=torch.median)

    loader = DataLoader(_data(), batch_size=64)
    expected = _lightning_values(Logging(), loader)["val_acc"]
    assert Evaluator(loader, metric=LoggedMetric("val_acc")).evaluate(Noisy()).value == pytest.approx(expected)


@pytest.mark.parametrize("name", ["", "  ", None, 3])
def test_a_logged_metric_needs_a_name(name) -> None:
    with pytest.raises(LoggedMetricError, match="needs a name"):
        LoggedMetric(name)


def test_batch_fn_cannot_be_combined() -> None:
    with pytest.raises(EvaluationError, match="batch_fn cannot be combined"):
        Evaluator([(torch.zeros(2, 8), torch.zeros(2))], metric=LoggedMetric("val_acc"),
                  batch_fn=lambda model, batch: (model(batch[0]), batch[1]))
