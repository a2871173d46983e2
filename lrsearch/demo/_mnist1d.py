"""MNIST-1D data, two small reference models and a plain training loop.

This module backs the built-in demo and the tests. It depends on torch, numpy and mnist1d only:
no Optuna, no Lightning. Generated data and the pretrained MLP are cached on disk (see
:func:`default_cache_dir`), so only the first call pays for generation and training.
"""

from __future__ import annotations

import io
import logging
import os
import random
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lrsearch._atomic import atomic_write_bytes
from lrsearch.core._runtime import model_device
from lrsearch.measure import Evaluator

ModelT = TypeVar("ModelT", bound=nn.Module)
_logger = logging.getLogger("lrsearch")

_CACHE_ENV_VAR = "LRSEARCH_CACHE_DIR"
# Part of every cache file name; bump when generation, splitting or training changes.
_CACHE_FORMAT = 2
# 50,000 samples: 32,000 train / 8,000 validation / 10,000 test, so that a 0.5-point budget
# on the test split is well above its noise, and the MLP reaches about 90 % test accuracy.
DEMO_SAMPLES = 50_000
_VAL_FRACTION = 0.2
_SIGNAL_LENGTH = 40
_NUM_CLASSES = 10
_PRETRAINED_EPOCHS = 30
_PRETRAINED_CNN_EPOCHS = 15


def default_cache_dir() -> Path:
    """Return ``$LRSEARCH_CACHE_DIR`` if set, else ``~/.cache/lrsearch``."""
    env = os.environ.get(_CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lrsearch"


@dataclass(frozen=True)
class Mnist1dSplits:
    """Train/validation/test tensors: ``x_*`` float32 ``(N, 40)``, ``y_*`` int64 ``(N,)``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_mnist1d(
    *, seed: int = 0, num_samples: int = DEMO_SAMPLES, cache_dir: Path | None = None
) -> Mnist1dSplits:
    """Generate (or load from the cache) an MNIST-1D data set and split it.

    mnist1d generates the signals locally; nothing is downloaded. It keeps 80 % of ``num_samples``
    for training and 20 % for test; the training part is split again 80/20 into train and
    validation with a permutation seeded by ``seed``. With the default ``num_samples=50_000`` the
    splits hold 32,000/8,000/10,000 samples (about 20 s to generate, once).

    Args:
        seed: Seed for generation and for the train/validation split.
        num_samples: Total number of samples; a multiple of 10 (one tenth per digit), at least 100.
        cache_dir: Where to cache the generated arrays; defaults to :func:`default_cache_dir`.

    Raises:
        ValueError: If ``seed`` or ``num_samples`` is out of range.
    """
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32) but got {seed}.")
    if num_samples < 100 or num_samples % _NUM_CLASSES:
        raise ValueError(f"num_samples must be a multiple of 10 and at least 100 but got {num_samples}.")
    path = _cache_root(cache_dir) / f"mnist1d-v{_CACHE_FORMAT}-seed{seed}-n{num_samples}.npz"
    arrays = _read_npz(path)
    if arrays is None:
        arrays = _generate(seed=seed, num_samples=num_samples)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())

    x = torch.from_numpy(arrays["x"]).float()
    y = torch.from_numpy(arrays["y"]).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * _VAL_FRACTION)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return Mnist1dSplits(
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_val=x[val_idx],
        y_val=y[val_idx],
        x_test=torch.from_numpy(arrays["x_test"]).float(),
        y_test=torch.from_numpy(arrays["y_test"]).long(),
    )


class Mnist1dMLP(nn.Module):
    """Fully connected classifier: ``depth`` hidden Linear+ReLU layers, then a linear head.

    Module names are ``layers.fc1`` … ``layers.fc{depth}`` and ``layers.head``.
    """

    def __init__(
        self,
        *,
        hidden: int = 512,
        depth: int = 3,
        num_classes: int = _NUM_CLASSES,
        in_features: int = _SIGNAL_LENGTH,
    ) -> None:
        super().__init__()
        sizes = {"hidden": hidden, "depth": depth, "num_classes": num_classes, "in_features": in_features}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1 but got {value}.")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_features
        for i in range(1, depth + 1):
            layers[f"fc{i}"] = nn.Linear(width, hidden)
            layers[f"act{i}"] = nn.ReLU()
            width = hidden
        layers["head"] = nn.Linear(width, num_classes)
        self.layers = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


class Mnist1dCNN(nn.Module):
    """Small CNN over the signal viewed as a ``(B, 1, 1, L)`` image, using ``(1, k)`` Conv2d kernels.

    Module names are ``features.conv1`` … ``features.conv3``, ``classifier.fc1`` and ``classifier.head``.
    Accepts inputs of shape ``(B, L)``.
    """

    def __init__(self, *, num_classes: int = _NUM_CLASSES, in_features: int = _SIGNAL_LENGTH) -> None:
        super().__init__()
        if num_classes < 1 or in_features < 1:
            raise ValueError(
                f"num_classes and in_features must be at least 1 but got {num_classes} and {in_features}."
            )
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(1, 32, (1, 5), padding=(0, 2)),
                act1=nn.ReLU(),
                conv2=nn.Conv2d(32, 64, (1, 5), padding=(0, 2)),
                act2=nn.ReLU(),
                conv3=nn.Conv2d(64, 64, (1, 3), padding=(0, 1)),
                act3=nn.ReLU(),
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(64 * in_features, 256),
                act1=nn.ReLU(),
                head=nn.Linear(256, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.reshape(x.shape[0], 1, 1, -1)))


def train_classifier(
    model: nn.Module,
    splits: Mnist1dSplits,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = False,
) -> float:
    """Train ``model`` in place with Adam and cross-entropy; return its validation accuracy.

    Runs on the device of the model's parameters. Batch order comes from a private generator seeded
    with ``seed`` (the global RNG is not touched), so repeated runs from the same initial weights
    give the same result on the same machine. The model is left in eval mode.

    Raises:
        ValueError: If ``epochs``, ``lr``, ``batch_size`` or ``weight_decay`` is out of range.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be at least 0 but got {epochs}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 but got {batch_size}.")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(
            f"lr must be positive and weight_decay non-negative but got {lr} and {weight_decay}."
        )
    device = model_device(model)
    x, y = splits.x_train.to(device), splits.y_train.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        if progress:
            _logger.info("  epoch %d/%d", epoch + 1, epochs)
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            idx = idx.to(device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return evaluate_accuracy(model, splits.x_val, splits.y_val)


def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``: the search's own evaluator on in-memory tensors."""
    return Evaluator(list(zip(x.split(batch_size), y.split(batch_size)))).evaluate(model).value


def calibration_batches(
    splits: Mnist1dSplits, *, num_batches: int = 4, batch_size: int = 256, seed: int = 0
) -> list[torch.Tensor]:
    """Return ``num_batches`` disjoint batches of training inputs, drawn with a seeded permutation."""
    if num_batches < 1 or batch_size < 1:
        raise ValueError(
            f"num_batches and batch_size must be at least 1 but got {num_batches} and {batch_size}."
        )
    if num_batches * batch_size > len(splits.x_train):
        raise ValueError(
            f"num_batches * batch_size = {num_batches * batch_size} exceeds the "
            f"{len(splits.x_train)} training samples."
        )
    perm = torch.randperm(len(splits.x_train), generator=torch.Generator().manual_seed(seed))
    return [splits.x_train[idx] for idx in perm[: num_batches * batch_size].split(batch_size)]


def pretrained_mlp(
    *, seed: int = 0, cache_dir: Path | None = None, epochs: int = _PRETRAINED_EPOCHS
) -> tuple[Mnist1dMLP, Mnist1dSplits]:
    """Return a default :class:`Mnist1dMLP` trained on MNIST-1D, and the data splits.

    The first call for a given ``(seed, epochs)`` trains the model on the CPU (initialized under
    ``seed`` without touching the global RNG) and caches its state_dict in ``cache_dir``; later
    calls load it. The model is returned on the CPU, in eval mode.

    Raises:
        ValueError: If ``seed`` is out of range or ``epochs`` is below 1.
    """
    return _pretrained("mlp", Mnist1dMLP, seed=seed, cache_dir=cache_dir, epochs=epochs)


def pretrained_cnn(
    *, seed: int = 0, cache_dir: Path | None = None, epochs: int = _PRETRAINED_CNN_EPOCHS
) -> tuple[Mnist1dCNN, Mnist1dSplits]:
    """Return a default :class:`Mnist1dCNN` trained on MNIST-1D, and the data splits.

    Same caching as :func:`pretrained_mlp`; only the first call trains (15 epochs).
    """
    return _pretrained("cnn", Mnist1dCNN, seed=seed, cache_dir=cache_dir, epochs=epochs)


def _pretrained(name: str, build: type[ModelT], *, seed: int, cache_dir: Path | None,
                epochs: int) -> tuple[ModelT, Mnist1dSplits]:
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1 but got {epochs}.")
    splits = load_mnist1d(seed=seed, cache_dir=cache_dir)
    path = _cache_root(cache_dir) / f"mnist1d-{name}-v{_CACHE_FORMAT}-seed{seed}-e{epochs}.pt"
    if path.exists():
        model = _seeded(build, seed)
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # any unreadable or mismatched cache entry is rebuilt
            warnings.warn(f"Ignoring unreadable cached weights {path} ({exc}); retraining.", stacklevel=3)
        else:
            return model.eval(), splits

    model = _seeded(build, seed)
    _logger.info("training the built-in MNIST-1D %s on %d samples for %d epochs (first use only; cached in %s)",
                 name.upper(), len(splits.y_train), epochs, path.parent)
    train_classifier(model, splits, epochs=epochs, seed=seed, progress=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return model, splits


def _seeded(build: type[ModelT], seed: int) -> ModelT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _cache_root(cache_dir: Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _generate(*, seed: int, num_samples: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset  # slow import (matplotlib, scipy)

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # make_dataset reseeds Python's and NumPy's global RNGs; put them back afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x": data["x"].astype(np.float32),
        "y": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int64),
    }


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        warnings.warn(f"Ignoring unreadable cached data {path} ({exc}); regenerating.", stacklevel=3)
        return None
