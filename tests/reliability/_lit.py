"""Tiny Lightning module and datamodule the reliability tests name by class path (``lrsearch tune``).

``TinyClassifier`` is the 16-64-64-4 MLP of tests/study; ``NoLinearClassifier`` has no layer
lrsearch can factorize. ``TinyData`` generates the 4-class rule of the ``trained`` fixture, with an
empty validation split on request; ``NoValidationData`` has none at all.
"""

from __future__ import annotations

import functools
import gc
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrsearch.core import LowRankCheckpointMixin

__all__ = ["MOMENTS", "NoLinearClassifier", "NoValidationData", "TinyClassifier", "TinyData", "in_a_finalizer",
           "press_ctrl_c"]

# Where TinyClassifier(interrupt_at=...) presses Ctrl-C: its first training batch, optimizer step
# and validation batch of a fine-tune, the end of that fit (inside Lightning's run, before its
# teardown), and the first forward after it, outside the Trainer (scoring on the selection split).
MOMENTS = ("train", "optimizer", "validation", "fit_end", "score")


def press_ctrl_c(*, group: bool = False) -> None:
    """SIGINT to this process (or its process group, DataLoader workers included), then a moment
    of Python code for the handler to run in, so that the interrupt lands here."""
    if group:
        os.killpg(os.getpgid(0), signal.SIGINT)
    else:
        os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):
        pass


class _CallsWhenCollected:
    def __init__(self, call: Callable[[], None]) -> None:
        self.call, self.cycle = call, self

    def __del__(self) -> None:
        self.call()


def in_a_finalizer(call: Callable[[], None]) -> None:
    """Run ``call`` in the ``__del__`` of garbage that the cyclic collector frees, here and now."""
    _CallsWhenCollected(call)
    gc.collect()


class TinyClassifier(LowRankCheckpointMixin, pl.LightningModule):
    """A 16-hidden-hidden-4 MLP with cross-entropy and Adam; logs ``val_loss`` and ``val_acc``.

    ``started_file``: the first training step creates it, so a test knows fine-tuning has begun.
    ``interrupt_at``: press Ctrl-C once, at that moment of the fine-tune (see :data:`MOMENTS`):
    to this process, or with ``interrupt_group`` to its whole process group as a terminal does
    (only for a process a test started in a session of its own); with ``interrupt_in_finalizer``
    it lands in a finalizer, as it can in a DataLoader iterator's ``__del__``.
    """

    def __init__(self, hidden: int = 64, lr: float = 1e-2, started_file: str | None = None,
                 interrupt_at: str | None = None, interrupt_group: bool = False,
                 interrupt_in_finalizer: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 4))
        self.pressed = self.fitted = False

    def _moment(self, name: str) -> None:
        if self.hparams.get("interrupt_at") == name and not self.pressed:
            self.pressed = True
            press = functools.partial(press_ctrl_c, group=self.hparams.interrupt_group)
            if self.hparams.interrupt_in_finalizer:
                in_a_finalizer(press)
            else:
                press()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fitted:
            self._moment("score")
        return self.net(x)

    def training_step(self, batch: Any, _index: int) -> torch.Tensor:
        started = self.hparams.get("started_file")
        if started and not Path(started).exists():
            Path(started).write_text("training")
        self._moment("train")
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._moment("optimizer")

    def on_fit_end(self) -> None:
        self.fitted = True
        self._moment("fit_end")

    def validation_step(self, batch: Any, _index: int) -> None:
        self._moment("validation")
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class NoLinearClassifier(TinyClassifier):
    """Scores the first four inputs through a ReLU: no Linear or Conv2d to factorize."""

    def __init__(self, lr: float = 1e-2) -> None:
        pl.LightningModule.__init__(self)
        self.save_hyperparameters()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x[:, :4] * self.scale)


class TinyData(pl.LightningDataModule):
    """1024 training, 512 validation and 256 test samples of a 4-class rule on 16 inputs.

    ``empty_val`` makes the validation loader yield no batch; ``num_workers`` loader processes
    load every split (a terminal's Ctrl-C reaches them too).
    """

    def __init__(self, batch_size: int = 128, empty_val: bool = False, num_workers: int = 0) -> None:
        super().__init__()
        x = torch.randn(1792, 16, generator=torch.Generator().manual_seed(0))
        self.x, self.y = x, (x[:, :4] * torch.tensor([1.0, -2.0, 0.5, 1.5])).argmax(1)
        self.batch_size, self.empty_val, self.num_workers = batch_size, empty_val, num_workers

    def _loader(self, start: int, stop: int, *, shuffle: bool = False) -> DataLoader:
        data = TensorDataset(self.x[start:stop], self.y[start:stop])
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(0))

    def train_dataloader(self) -> DataLoader:
        return self._loader(0, 1024, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1024, 1024 if self.empty_val else 1536)

    def test_dataloader(self) -> DataLoader:
        return self._loader(1536, 1792)


class NoValidationData(pl.LightningDataModule):
    """Training data only: no ``val_dataloader``, so nothing to search ranks on."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyData()

    def train_dataloader(self) -> DataLoader:
        return self.inner.train_dataloader()
