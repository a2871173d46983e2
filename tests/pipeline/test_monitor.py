"""``monitor=``: the pipeline scores candidates by a value the LightningModule logs itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrsearch
from lrsearch import cli
from lrsearch.measure import LoggedMetricError

FAST = {"search": {"n_trials": 6, "objective": "macs", "seed": 1},
        "finetune": {"epochs": 1, "progress": False, "accelerator": "cpu"}}


def _logits(model: nn.Module, batch) -> torch.Tensor:
    """How calibration, latency and distillation feed a batch to the dict-returning model."""
    return model(batch[0])["logits"]


def _split(seed: int, n: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=generator)
    return TensorDataset(x, (x[:, :4] * torch.tensor([1.0, -2.0, 0.5, 1.5])).argmax(1))


class Classifier(pl.LightningModule):
    """Its forward returns a dict, so the default top-1 accuracy could not score it: only its log can."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}

    def training_step(self, batch, _index):
        x, y = batch
        return nn.functional.cross_entropy(self(x)["logits"], y)

    def validation_step(self, batch, _index):
        x, y = batch
        logits = self(x)["logits"]
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(_split(0, 1024), batch_size=64, shuffle=True)

    def val_dataloader(self):
        return DataLoader(_split(1, 512), batch_size=100)  # a short last batch: weighting matters

    def test_dataloader(self):
        return DataLoader(_split(2, 512), batch_size=100)


def _trainer(root: Path, callbacks=()) -> pl.Trainer:
    return pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=root, accelerator="cpu", callbacks=list(callbacks))


def _validate(root: Path, module: pl.LightningModule, name: str) -> float:
    return float(_trainer(root).validate(module, Data().test_dataloader(), verbose=False)[0][name])


def _fit(root: Path, callback: lrsearch.RankSearch) -> Classifier:
    torch.manual_seed(0)
    module = Classifier()
    _trainer(root, [callback]).fit(module, datamodule=Data())
    return module


def test_callback_scores_by_the_logged_accuracy(tmp_path: Path) -> None:
    callback = lrsearch.RankSearch("3%", run_dir=tmp_path / "lrs", monitor="val_acc", forward=_logits, **FAST)
    module = _fit(tmp_path, callback)
    result = callback.result
    assert result is not None and result.meets_budget, result.report.get("message")
    report = json.loads((tmp_path / "lrs" / "report.json").read_text())
    assert report["metric"] == "val_acc"
    # The figures are what Lightning itself reports for the module's own metric on the test split.
    assert report["dense"]["verify_metric"] == pytest.approx(_validate(tmp_path, module, "val_acc"), abs=1e-6)
    compressed = lrsearch.load(tmp_path / "lrs" / "model", Classifier())
    assert report["final"]["verify_metric"] == pytest.approx(_validate(tmp_path, compressed, "val_acc"), abs=1e-6)
    assert report["final"]["verify_drop"] <= report["allowed_drop"]
    assert report["final"]["verify_drop_interval"] is None  # a logged value has no per-sample hits


def test_a_logged_loss_counts_an_increase_as_the_drop(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Classifier()
    _trainer(tmp_path).fit(module, datamodule=Data())
    result = lrsearch.compress(module, budget=0.05, run_dir=tmp_path / "lrs", datamodule=Data(), monitor="val_loss",
                               forward=_logits,
                               search=lrsearch.SearchConfig(n_trials=6, objective="macs", seed=1,
                                                                   higher_is_better=False),
                               finetune=lrsearch.FinetuneConfig(epochs=1, progress=False, accelerator="cpu"))
    report = result.report
    assert report["metric"] == "val_loss"
    base = _validate(tmp_path, module, "val_loss")
    assert report["dense"]["verify_metric"] == pytest.approx(base, rel=1e-5)
    for attempt in report["attempts"]:
        assert attempt["select_drop"] <= report["allowed_drop"] or not attempt["meets_budget"]
    if result.meets_budget:
        tuned = _validate(tmp_path, result.model, "val_loss")
        assert report["final"]["verify_drop"] == pytest.approx(tuned - base, abs=1e-5)


def test_a_name_the_module_never_logs_fails_before_anything_is_written(tmp_path: Path) -> None:
    callback = lrsearch.RankSearch("3%", run_dir=tmp_path / "lrs", monitor="val_accuracy", **FAST)
    with pytest.raises(LoggedMetricError, match="never logs 'val_accuracy'") as error:
        _fit(tmp_path, callback)
    assert "'val_acc'" in str(error.value) and "'val_loss'" in str(error.value)
    assert not (tmp_path / "lrs").exists()


def test_monitor_and_metric_together_are_refused_in_init() -> None:
    with pytest.raises(LoggedMetricError, match="Both metric= and monitor="):
        lrsearch.RankSearch("1%", monitor="val_acc", metric=lambda outputs, targets: 0.0)


def test_cli_names_the_unknown_metric_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    status = cli.main(["tune", "--monitor", "val_accuracy", "--run_dir", str(run_dir),
                       "--search.n_trials", "2", "--finetune.progress", "false"])
    assert status == 2  # bad input, as opposed to 1: no configuration met the budget
    err = capsys.readouterr().err
    assert "never logs 'val_accuracy'" in err and "'val_acc'" in err and "Traceback" not in err
    assert not run_dir.exists()
