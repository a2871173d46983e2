"""The demo LightningModules the shipped configs name: MNIST-1D MLP/CNN and scikit-learn digits."""

from __future__ import annotations

import pytest
import torch

from lrsearch.demo.lightning import Mnist1dClassifier


def test_mnist1d_classifier_arch_and_hparams() -> None:
    cnn = Mnist1dClassifier(arch="cnn")
    assert type(cnn.net).__name__ == "Mnist1dCNN" and cnn(torch.randn(2, 40)).shape == (2, 10)
    assert cnn.hparams["arch"] == "cnn"
    # pretrained/seed/cache_dir are not hyperparameters: load_from_checkpoint must never retrain.
    assert not {"pretrained", "seed", "cache_dir"} & set(cnn.hparams)
    with pytest.raises(ValueError, match="arch must be one of"):
        Mnist1dClassifier(arch="rnn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hidden=512, depth=3 only"):
        Mnist1dClassifier(hidden=64, pretrained=True)


def test_digits_splits_and_classifier() -> None:
    pytest.importorskip("sklearn")
    from lrsearch.demo.digits import DigitsClassifier, DigitsDataModule, load_digits_splits

    splits = load_digits_splits(seed=0)
    assert {name: len(y) for name, (_, y) in splits.items()} == {"test": 359, "val": 359, "train": 1079}
    rows = {name: {tuple(row.tolist()) for row in x} for name, (x, _) in splits.items()}
    assert len(rows["train"] & rows["test"]) < 5  # a few digits images are exact duplicates in the data set
    data = DigitsDataModule(batch_size=100)
    x, y = next(iter(data.test_dataloader()))
    assert x.shape == (100, 64) and float(x.max()) <= 1.0
    model = DigitsClassifier(hidden=32)
    assert model(x).shape == (100, 10) and "pretrained" not in model.hparams
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and immune to a busy machine
    try:
        trained = DigitsClassifier(hidden=64, pretrained=True, pretrain_epochs=15)
    finally:
        torch.set_num_threads(threads)
    test_x, test_y = splits["test"]
    assert (trained(test_x).argmax(1) == test_y).float().mean() > 0.9
