"""The fine-tuning Trainer respects the user's: it inherits the parent Trainer's device, precision and
loggers, ``FinetuneConfig.trainer`` overrides them, and metrics carry the candidate's name."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from lrsearch import ConflictError, UnknownOptionError
from lrsearch.pipeline._finetune import FinetuneConfig, finetune, parent_settings
from tests.reliability._lit import TinyClassifier, TinyData

pytestmark = pytest.mark.filterwarnings("ignore::pytorch_lightning.utilities.warnings.PossibleUserWarning")

FAST = {"epochs": 1, "progress": False, "distill": False}


class Probe(pl.Callback):
    """Records the Trainer settings a fit ran with."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.precision, self.loggers = trainer.precision, list(trainer.loggers)
        self.device = trainer.strategy.root_device.type
        self.progress_bar = trainer.progress_bar_callback is not None


class Inherit(pl.Callback):
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.settings = parent_settings(trainer)


def _parent(tmp_path: Path) -> tuple[dict[str, Any], CSVLogger]:
    logger = CSVLogger(tmp_path / "logs", name="fit")
    grab = Inherit()
    pl.Trainer(max_steps=1, logger=logger, precision="bf16-mixed", accelerator="cpu", enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
               limit_val_batches=0, callbacks=[grab]).fit(TinyClassifier(), datamodule=TinyData())
    return grab.settings, logger


def _tune(tmp_path: Path, config: FinetuneConfig, inherited: dict[str, Any], name: str | None = "trial3") -> Probe:
    probe = Probe()
    trainer = dict(config.trainer or {})
    trainer["callbacks"] = [probe]
    config = FinetuneConfig(**{**config.to_dict(), "trainer": trainer})
    data = TinyData()
    finetune(TinyClassifier(), teacher=None, root_dir=tmp_path / "ft", config=config,
             train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader(),
             inherited=inherited, name=name)
    return probe


def test_the_parent_trainers_device_precision_and_loggers_are_inherited(tmp_path: Path) -> None:
    settings, logger = _parent(tmp_path)
    assert settings == {"accelerator": "cpu", "precision": "bf16-mixed", "devices": 1, "logger": [logger],
                        "enable_progress_bar": False}
    probe = _tune(tmp_path, FinetuneConfig(**FAST), settings)
    assert probe.precision == "bf16-mixed" and probe.device == "cpu"
    assert [getattr(p, "inner", None) for p in probe.loggers] == [logger]
    logger.save()
    with (Path(logger.log_dir) / "metrics.csv").open() as handle:
        columns = set(next(csv.reader(handle)))
    assert "trial3/val_acc" in columns and "trial3/val_loss" in columns, columns


def test_finetune_trainer_options_win_over_the_inherited_ones(tmp_path: Path) -> None:
    settings, _ = _parent(tmp_path)
    probe = _tune(tmp_path, FinetuneConfig(**FAST, trainer={"precision": "32-true", "logger": False}), settings)
    assert probe.precision == "32-true" and probe.loggers == []


@pytest.mark.parametrize(("progress", "inherited", "shown"), [
    (None, {"enable_progress_bar": False}, False),  # the user turned bars off in the Trainer
    (None, {"enable_progress_bar": True}, True),
    (None, {}, True),
    (True, {"enable_progress_bar": False}, True),   # an explicit choice wins
    (False, {"enable_progress_bar": True}, False),
])
def test_the_fine_tunes_progress_bar_follows_the_parent_unless_set(
        tmp_path: Path, progress: bool | None, inherited: dict[str, Any], shown: bool) -> None:
    probe = _tune(tmp_path, FinetuneConfig(**{**FAST, "progress": progress}), inherited, name=None)
    assert probe.progress_bar is shown


def test_without_a_parent_the_fine_tune_logs_nothing(tmp_path: Path) -> None:
    probe = _tune(tmp_path, FinetuneConfig(**FAST), {}, name=None)
    assert probe.loggers == [] and probe.precision == "32-true"


@pytest.mark.parametrize(("trainer", "error", "match"), [
    ({"max_epochs": 3}, ConflictError, "use the epochs option"),
    ({"accelerator": "cpu"}, ConflictError, "use the accelerator option"),
    ({"default_root_dir": "x"}, ConflictError, "lrsearch chooses it"),
    ([("precision", 16)], ValueError, "trainer must map"),
])
def test_trainer_options_lrsearch_sets_itself_are_refused(trainer: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        FinetuneConfig(trainer=trainer)


def test_an_unknown_trainer_option_fails_before_the_fit(tmp_path: Path) -> None:
    with pytest.raises(UnknownOptionError, match="did you mean 'precision'"):
        _tune(tmp_path, FinetuneConfig(**FAST, trainer={"precison": "16-mixed"}), {})
    assert not (tmp_path / "ft").exists()
