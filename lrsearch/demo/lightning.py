"""Lightning wrappers of the MNIST-1D demo (``lrsearch.demo.lightning``): module and datamodule.

They let the built-in demo, the benchmarks and the tests run the whole pipeline (search,
fine-tune, verify, checkpoint) on a real LightningModule without any download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrsearch.core import LowRankCheckpointMixin
from lrsearch.demo._mnist1d import (
    Mnist1dCNN,
    Mnist1dMLP,
    Mnist1dSplits,
    load_mnist1d,
    pretrained_cnn,
    pretrained_mlp,
)

ARCHITECTURES = ("mlp", "cnn")

__all__ = ["ARCHITECTURES", "ClassifierSteps", "Mnist1dClassifier", "Mnist1dDataModule", "pretrained_classifier"]


class ClassifierSteps(LowRankCheckpointMixin, pl.LightningModule):
    """Cross-entropy training, ``val_loss``/``val_acc`` logging and Adam at ``hparams.lr``: what every
    demo classifier shares, so the demos differ only in their network and data."""

    def training_step(self, batch: Any, _index: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, _index: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class Mnist1dClassifier(ClassifierSteps):
    """The demo MLP (or CNN) as a LightningModule (cross-entropy, Adam); compressed checkpoints reload.

    Args:
        arch: ``"mlp"`` (:class:`Mnist1dMLP`) or ``"cnn"`` (:class:`Mnist1dCNN`).
        hidden, depth: sizes of the MLP (ignored for the CNN).
        lr: Adam learning rate.
        pretrained: load the cached pretrained weights of the default-size network (trained on
            first use, see :func:`pretrained_mlp`), so a config file can name a trained model.
            Not saved as a hyperparameter: ``load_from_checkpoint`` never retrains.
        seed, cache_dir: which pretrained weights, and where they are cached.
    """

    def __init__(self, *, arch: Literal["mlp", "cnn"] = "mlp", hidden: int = 512, depth: int = 3,
                 lr: float = 1e-3, pretrained: bool = False, seed: int = 0,
                 cache_dir: Path | None = None) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {list(ARCHITECTURES)} but got {arch!r}.")
        self.save_hyperparameters(ignore=["pretrained", "seed", "cache_dir"])
        self.net: nn.Module = Mnist1dMLP(hidden=hidden, depth=depth) if arch == "mlp" else Mnist1dCNN()
        if pretrained:
            if arch == "mlp" and (hidden, depth) != (512, 3):
                raise ValueError(f"pretrained weights exist for hidden=512, depth=3 only but got "
                                 f"hidden={hidden}, depth={depth}.")
            trained, _ = (pretrained_mlp if arch == "mlp" else pretrained_cnn)(seed=seed, cache_dir=cache_dir)
            self.net.load_state_dict(trained.state_dict())
            self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)



class Mnist1dDataModule(pl.LightningDataModule):
    """MNIST-1D generated locally by the ``mnist1d`` package: train, validation and test splits."""

    def __init__(self, *, seed: int = 0, batch_size: int = 256, cache_dir: Path | None = None,
                 splits: Mnist1dSplits | None = None) -> None:
        super().__init__()
        self.seed, self.batch_size, self.cache_dir = seed, batch_size, cache_dir
        self.splits = splits

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_mnist1d(seed=self.seed, cache_dir=self.cache_dir)

    def _loader(self, x: torch.Tensor, y: torch.Tensor, *, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.splits.x_train, self.splits.y_train, shuffle=True)  # type: ignore[union-attr]

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.splits.x_val, self.splits.y_val, shuffle=False)  # type: ignore[union-attr]

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.splits.x_test, self.splits.y_test, shuffle=False)  # type: ignore[union-attr]


def pretrained_classifier(*, seed: int = 0, cache_dir: Path | None = None) -> tuple[Mnist1dClassifier, Mnist1dDataModule]:
    """The cached pretrained demo MLP inside a :class:`Mnist1dClassifier`, with its datamodule."""
    mlp, splits = pretrained_mlp(seed=seed, cache_dir=cache_dir)
    module = Mnist1dClassifier()
    module.net.load_state_dict(mlp.state_dict())
    return module.eval(), Mnist1dDataModule(seed=seed, cache_dir=cache_dir, splits=splits)
