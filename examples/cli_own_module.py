"""``lrsearch tune`` on your own LightningModule: train it, save a checkpoint, compress it from the CLI.

    python examples/cli_own_module.py            # train 5 epochs, then `lrsearch tune` (a few minutes)
    python examples/cli_own_module.py --small    # or LRSEARCH_SMALL=1: a quick check

This file plays the part of your project: ``OwnClassifier`` and ``OwnDataModule`` are an ordinary
LightningModule and LightningDataModule (here on synthetic data, so nothing is downloaded). The
CLI finds them by class path, so their module must be importable: run from the repository root
with ``PYTHONPATH=examples``, exactly what this script does:

    PYTHONPATH=examples lrsearch tune --config examples/cli_own_module.yaml \\
        --ckpt_path lrsearch-runs/own-module/trained.ckpt

Only ``LowRankCheckpointMixin`` is lrsearch-specific: it lets ``OwnClassifier.load_from_checkpoint``
reload the compressed checkpoint the CLI writes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrsearch

HERE = Path(__file__).resolve().parent


class OwnClassifier(lrsearch.LowRankCheckpointMixin, pl.LightningModule):
    """An MLP classifier, as you might have one: save_hyperparameters, training/validation steps."""

    def __init__(self, features: int = 32, hidden: int = 512, classes: int = 8, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, _index):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _index):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class OwnDataModule(pl.LightningDataModule):
    """Synthetic data: 3 Gaussian clusters per class in 32 dimensions, 5 % of labels flipped at random."""

    def __init__(self, features: int = 32, classes: int = 8, samples: int = 12_000, batch_size: int = 256,
                 seed: int = 0) -> None:
        super().__init__()
        self.features, self.classes, self.samples = features, classes, samples
        self.batch_size, self.seed = batch_size, seed
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        generator = torch.Generator().manual_seed(self.seed)
        centers = torch.randn(self.classes, 3, self.features, generator=generator)  # 3 clusters per class
        y = torch.randint(self.classes, (self.samples,), generator=generator)
        cluster = torch.randint(3, (self.samples,), generator=generator)
        x = centers[y, cluster] + 1.2 * torch.randn(self.samples, self.features, generator=generator)
        noisy = torch.rand(self.samples, generator=generator) < 0.05
        y[noisy] = torch.randint(self.classes, (int(noisy.sum()),), generator=generator)
        n_val = n_test = self.samples // 6
        self.splits = {"test": TensorDataset(x[:n_test], y[:n_test]),
                       "val": TensorDataset(x[n_test:n_test + n_val], y[n_test:n_test + n_val]),
                       "train": TensorDataset(x[n_test + n_val:], y[n_test + n_val:])}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", default=os.environ.get("LRSEARCH_SMALL") == "1",
                        help="2 training epochs, 6 trials scored by MACs, 1 fine-tuning epoch "
                             "(also LRSEARCH_SMALL=1)")
    parser.add_argument("--run-dir", default="lrsearch-runs/own-module")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)

    # 1. Your training, as usual: the CLI starts from its checkpoint.
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2 if args.small else 5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(OwnClassifier(), datamodule=OwnDataModule())
    checkpoint = run_dir / "trained.ckpt"
    trainer.save_checkpoint(checkpoint)
    print(f"trained; checkpoint {checkpoint}")

    # 2. The command line, with the config next to this file; flags after --config override it.
    command = [sys.executable, "-m", "lrsearch", "tune", "--config", str(HERE / "cli_own_module.yaml"),
               "--ckpt_path", str(checkpoint), "--run_dir", str(run_dir / "compressed")]
    if args.small:
        command += ["--search.n_trials", "6", "--search.objective", "macs", "--finetune.epochs", "1",
                    "--finetune.progress", "false"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    print("PYTHONPATH=examples", " ".join(["lrsearch", *command[3:]]), flush=True)
    status = subprocess.run(command, env=env, check=False).returncode
    if status == 2:
        return 2

    # 3. The compressed checkpoint reloads into your own class.
    compressed = run_dir / "compressed" / "compressed.ckpt"
    if compressed.is_file():
        model = OwnClassifier.load_from_checkpoint(compressed).eval()
        factorized = [name for name, m in model.named_modules() if isinstance(m, lrsearch.LowRankLinear)]
        print(f"reloaded with OwnClassifier.load_from_checkpoint: {lrsearch.count_params(model):,} parameters, "
              f"factorized layers {factorized}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
