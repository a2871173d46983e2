"""scikit-learn's 8x8 digits as a LightningModule and a LightningDataModule (``configs/digits_mlp.yaml``).

The 1,797 images ship with scikit-learn, so nothing is downloaded. ``DigitsClassifier(pretrained=True)``
trains itself for a few seconds on the training split with a plain loop (seeded), which lets a
config file name a trained model without a checkpoint. Needs ``pip install scikit-learn``.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrsearch._errors import LrSearchError, format_problem
from lrsearch.demo.lightning import ClassifierSteps

__all__ = ["DigitsClassifier", "DigitsDataModule", "load_digits_splits"]

_FEATURES = 64
_CLASSES = 10


def load_digits_splits(*, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train/val/test splits (60/20/20 %, seeded permutation) of the digits, pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise LrSearchError(format_problem("The digits data set needs scikit-learn",
                                           hint="pip install scikit-learn")) from error
    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = n_test = len(y) // 5
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    return {name: (x[index], y[index]) for name, index in parts.items()}


class DigitsClassifier(ClassifierSteps):
    """An MLP ``64 -> hidden -> hidden -> 10`` for the digits (cross-entropy, Adam).

    Args:
        hidden: width of the two hidden layers.
        lr: Adam learning rate.
        pretrained: train for ``pretrain_epochs`` on the training split (seeded) when built;
            not saved as a hyperparameter, so ``load_from_checkpoint`` never retrains.
        pretrain_epochs, seed: the pretraining run.
    """

    def __init__(self, *, hidden: int = 256, lr: float = 1e-3, pretrained: bool = False,
                 pretrain_epochs: int = 30, seed: int = 0) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be at least 1 but got {hidden}.")
        self.save_hyperparameters(ignore=["pretrained", "pretrain_epochs", "seed"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                     nn.ReLU(), nn.Linear(hidden, _CLASSES))
        if pretrained:
            self._pretrain(epochs=pretrain_epochs, seed=seed)

    def _pretrain(self, *, epochs: int, seed: int) -> None:
        x, y = load_digits_splits(seed=seed)["train"]
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        generator = torch.Generator().manual_seed(seed)
        self.train()
        for _ in range(epochs):
            for index in torch.randperm(len(y), generator=generator).split(64):
                loss = nn.functional.cross_entropy(self(x[index]), y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))



class DigitsDataModule(pl.LightningDataModule):
    """The digits split 60/20/20 into train, validation and test (same seed, same split as the model)."""

    def __init__(self, *, seed: int = 0, batch_size: int = 64) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 but got {batch_size}.")
        self.seed, self.batch_size = seed, batch_size
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_digits_splits(seed=self.seed)

    def _loader(self, split: str, *, shuffle: bool) -> DataLoader:
        self.setup()
        x, y = self.splits[split]  # type: ignore[index]
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
