"""The benchmark's models and data: everything is generated locally or ships with a package.

A :class:`Task` bundles a trained model with the splits every method uses the same way:

* ``search``: the validation split. Every method chooses its configuration on it, before
  fine-tuning, under the same search budget; after fine-tuning, a candidate is accepted only
  if its drop on this split is within the final budget.
* ``test``: the held-out split, evaluated once per method at the end (the reported figures).
* ``calibration``: training inputs for whitening; ``train``: the fine-tuning data (None: the
  task is not fine-tuned).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrsearch.pipeline import FinetuneConfig

__all__ = ["MODELS", "Scale", "Task", "build_task"]

MODELS = ("mnist1d_mlp", "mnist1d_cnn", "digits_mlp", "minilm")


@dataclass(frozen=True)
class Scale:
    """How much work a run does: the full benchmark, ``--quick``, or the tests' tiny size."""

    trials: int = 300                # MLPs: 150 reached the cheapest feasible region only on some seeds
    cnn_trials: int = 80
    minilm_trials: int = 100
    epochs: int = 20
    cnn_epochs: int = 10
    cnn_lr_scale: float = 0.1
    max_steps: int = -1
    candidates: int = 3
    ratios: int = 10                 # AIMET-style sensitivity table: ratios 1/N ... (N-1)/N
    minilm_ratios: int = 4
    samples: int | None = None       # cap on search and test samples of the classification tasks
    minilm_sizes: tuple[int, int, int] = (896, 1280, 256)  # search, test, calibration: 2,432 of 2,469 on 3.10
    latency_rounds: int = 7
    minilm_latency_rounds: int = 5
    latency_min_run_time: float = 0.2
    table_repeats: int = 5
    minilm_table_repeats: int = 2
    table_min_run_time: float = 0.05


FULL = Scale()
QUICK = Scale(trials=30, cnn_trials=20, minilm_trials=12, epochs=3, cnn_epochs=1, candidates=2, ratios=5,
              minilm_ratios=2, minilm_sizes=(128, 256, 128), latency_rounds=3, minilm_latency_rounds=3,
              latency_min_run_time=0.05, table_repeats=2, minilm_table_repeats=1, table_min_run_time=0.02)
TINY = Scale(trials=6, cnn_trials=4, minilm_trials=3, epochs=1, cnn_epochs=1, max_steps=3, candidates=1, ratios=3,
             minilm_ratios=2, samples=512, minilm_sizes=(64, 64, 64), latency_rounds=1, minilm_latency_rounds=1,
             latency_min_run_time=0.01, table_repeats=1, minilm_table_repeats=1, table_min_run_time=0.005)


@dataclass
class Task:
    """One trained model and its splits, metric and deployment inputs."""

    key: str
    title: str
    model: nn.Module
    search: list[Any]
    test: list[Any]
    calibration: list[Any]
    train: Any
    finetune: FinetuneConfig | None
    metric_name: str = "accuracy"
    metric: Callable[..., Any] | None = None
    batch_fn: Callable[..., Any] | None = None
    forward: Callable[..., Any] | None = None
    latency_inputs: dict[int, Any] = field(default_factory=dict)   # batch size -> batch fed by forward
    multiple: int = 8
    trials: int = 300                # MLPs: 150 reached the cheapest feasible region only on some seeds
    ratios: int = 10
    table_repeats: int = 5
    latency_rounds: int = 7
    notes: list[str] = field(default_factory=list)

    @property
    def large_batch(self) -> int:
        return max(self.latency_inputs)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.split(size), y.split(size), strict=True))


def _cap(x: torch.Tensor, y: torch.Tensor, samples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return (x, y) if samples is None else (x[:samples], y[:samples])


def _classifier_finetune(scale: Scale, epochs: int, lr_scale: float) -> FinetuneConfig:
    return FinetuneConfig(epochs=epochs, max_steps=scale.max_steps, lr_scale=lr_scale, progress=False,
                          accelerator="cpu", limit_val_batches=0)


def _classification_task(key: str, title: str, model: nn.Module, splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
                         train_batch: int, scale: Scale, *, epochs: int, trials: int,
                         lr_scale: float = 1.0) -> Task:
    x_train, y_train = splits["train"]
    x_val, y_val = _cap(*splits["val"], scale.samples)
    x_test, y_test = _cap(*splits["test"], scale.samples)
    generator = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x_train), generator=generator)
    calibration = [x_train[idx] for idx in perm[:1024].split(256)]
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=train_batch, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    large = min(256, len(x_test))
    return Task(key=key, title=title, model=model, search=_batches(x_val, y_val), test=_batches(x_test, y_test),
                calibration=calibration, train=train, finetune=_classifier_finetune(scale, epochs, lr_scale),
                latency_inputs={1: x_test[:1], large: x_test[:large]}, trials=trials, ratios=scale.ratios,
                table_repeats=scale.table_repeats, latency_rounds=scale.latency_rounds)


def _mnist1d(arch: str, scale: Scale) -> Task:
    from lrsearch.demo import load_mnist1d
    from lrsearch.demo.lightning import Mnist1dClassifier

    model = Mnist1dClassifier(arch=arch, pretrained=True).eval()
    data = load_mnist1d()
    splits = {"train": (data.x_train, data.y_train), "val": (data.x_val, data.y_val),
              "test": (data.x_test, data.y_test)}
    title = {"mlp": "MNIST-1D MLP", "cnn": "MNIST-1D CNN"}[arch]
    if arch == "cnn":
        # About 3x the MLP's compute per sample: fewer trials. Fine-tuning at lr x1 made whitened conv
        # factors worse (measured: 5.3 -> 6.1 pts after 3 epochs; lr x0.1 for 10 epochs: 0.06 pts).
        return _classification_task("mnist1d_cnn", title, model, splits, 256, scale, epochs=scale.cnn_epochs,
                                    trials=scale.cnn_trials, lr_scale=scale.cnn_lr_scale)
    return _classification_task("mnist1d_mlp", title, model, splits, 256, scale, epochs=scale.epochs,
                                trials=scale.trials)


def _digits(scale: Scale) -> Task:
    from lrsearch.demo.digits import DigitsClassifier, load_digits_splits

    model = DigitsClassifier(pretrained=True).eval()
    return _classification_task("digits_mlp", "sklearn digits MLP", model, load_digits_splits(), 64, scale,
                                epochs=scale.epochs, trials=scale.trials)


def _minilm(scale: Scale) -> Task:
    from benchmarks import _minilm

    search, test, calibration = scale.minilm_sizes
    data = _minilm.load_minilm(search=search, test=test, calibration=calibration)
    ordered = sorted(data.sentences["test"], key=len)
    typical = ordered[len(ordered) // 2]
    middle = max(0, len(ordered) // 2 - 16)
    latency_inputs = {1: (data.encode([typical]), None), 32: (data.encode(ordered[middle:middle + 32]), None)}
    scored = sum(int(batch[1][:, 3].sum()) for batch in data.search)
    scored_test = sum(int(batch[1][:, 3].sum()) for batch in data.test)
    # The budget's granularity: one changed neighbour costs 100 / scored points of agreement.
    step = (f"one changed neighbour = {100 / max(scored, 1):.2f} pts on search, "
            f"{100 / max(scored_test, 1):.2f} on test")
    return Task(key="minilm", title="all-MiniLM-L6-v2", model=data.model, search=data.search, test=data.test,
                calibration=data.calibration, train=None, finetune=None, metric_name="NN agreement",
                metric=_minilm.nn_agreement, batch_fn=_minilm.batch_fn, forward=_minilm.forward,
                latency_inputs=latency_inputs, multiple=16, trials=scale.minilm_trials, ratios=scale.minilm_ratios,
                table_repeats=scale.minilm_table_repeats, latency_rounds=scale.minilm_latency_rounds,
                notes=[f"{search} search / {test} test / {calibration} calibration sentences from pydoc_data.topics "
                       f"(groups of 64; {scored} / {scored_test} with an unambiguous neighbour are scored, so {step}); "
                       "no fine-tuning for any method (the metric has no labels); latency at batch 1 and 32 "
                       "(SentenceTransformer.encode's default batch), ranks in multiples of 16"])


def build_task(key: str, scale: Scale) -> Task:
    if key == "mnist1d_mlp":
        return _mnist1d("mlp", scale)
    if key == "mnist1d_cnn":
        return _mnist1d("cnn", scale)
    if key == "digits_mlp":
        return _digits(scale)
    if key == "minilm":
        return _minilm(scale)
    raise ValueError(f"unknown model {key!r}; choose from {list(MODELS)}")
