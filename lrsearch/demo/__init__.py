"""Built-in MNIST-1D demo: data, reference models and a plain training loop (torch, numpy, mnist1d only)."""

from lrsearch.demo._mnist1d import (
    Mnist1dCNN,
    Mnist1dMLP,
    Mnist1dSplits,
    calibration_batches,
    default_cache_dir,
    evaluate_accuracy,
    load_mnist1d,
    pretrained_cnn,
    pretrained_mlp,
    train_classifier,
)

__all__ = [
    "Mnist1dCNN",
    "Mnist1dMLP",
    "Mnist1dSplits",
    "calibration_batches",
    "default_cache_dir",
    "evaluate_accuracy",
    "load_mnist1d",
    "pretrained_cnn",
    "pretrained_mlp",
    "train_classifier",
]
