"""Score a model on a fixed evaluation set, fast enough to run once per search trial.

The batches are read once and kept (on CPU, or on the model's device after the first
evaluation), so a search that evaluates hundreds of candidates pays the DataLoader once.
The default score is micro top-1 accuracy plus a per-sample correctness vector that paired
statistics (McNemar, bootstrap) need; a torchmetrics ``Metric`` or a plain function can
replace it.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torchmetrics
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lrsearch._errors import LrSearchError, format_problem
from lrsearch.core._runtime import evaluating, model_device, move_to_device
from lrsearch.measure._logged import LoggedMetric

__all__ = ["BatchFn", "Evaluation", "EvaluationError", "Evaluator", "MetricFn", "default_batch_fn"]

BatchFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor]]
MetricFn = Callable[[Tensor, Tensor], Tensor | float]

_BATCH_FN_HINT = ("pass batch_fn=lambda model, batch: (model(inputs), targets) to say how a batch "
                  "is fed and where its targets are")


class EvaluationError(LrSearchError, ValueError):
    """Evaluation data, its batches or the metric do not fit the model."""


@dataclass(frozen=True, eq=False)
class Evaluation:
    """One score of one model.

    ``samples`` counts scored rows: batch items, or every position of a ``(batch, ..., classes)``
    output with the default accuracy. ``correct`` is the per-row hit vector (bool, CPU) that
    paired tests need; only the default accuracy has one.
    """

    value: float
    samples: int
    correct: Tensor | None = None


def default_batch_fn(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """``(model(batch[0]), batch[1])``: the ``(inputs, targets)`` DataLoader convention."""
    if isinstance(batch, Mapping):
        raise EvaluationError(format_problem(
            "A dict batch does not say which entries are inputs and which are targets",
            expected="(inputs, targets) batches", given=f"a dict with keys {sorted(map(str, batch))}",
            hint="pass batch_fn=lambda model, batch: (model(batch['input']), batch['label'])"))
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise EvaluationError(format_problem(
            "The batch has no targets", expected="(inputs, targets) batches",
            given=_describe(batch), hint=_BATCH_FN_HINT))
    return model(batch[0]), batch[1]


class _Scorer(Protocol):
    def update(self, output: Tensor, target: Tensor) -> None: ...

    def result(self) -> Evaluation: ...


class _Accuracy:
    """Micro top-1 accuracy through torchmetrics, plus the per-row hit vector.

    Rows with any non-finite logit are forced wrong: ``argmax`` over NaN picks an arbitrary
    class, which could otherwise count a broken model's output as a hit.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._metric: MulticlassAccuracy | None = None
        self._hits: list[Tensor] = []

    def update(self, output: Tensor, target: Tensor) -> None:
        if output.dim() < 2 or output.shape[:-1] != target.shape or output.shape[-1] < 2:
            raise EvaluationError(format_problem(
                "The default accuracy cannot score this output", given=(
                    f"output {tuple(output.shape)} and target {tuple(target.shape)}"),
                expected="logits (batch, ..., classes) with at least 2 classes and integer "
                         "targets (batch, ...)",
                hint="pass metric= (a torchmetrics Metric or fn(outputs, targets)) for other tasks"))
        if target.is_floating_point() or target.is_complex():
            raise EvaluationError(format_problem(
                "The default accuracy needs class-index targets", given=f"{target.dtype} targets",
                expected="an integer tensor of class indices",
                hint="convert one-hot or soft labels with target.argmax(-1) in batch_fn"))
        classes = output.shape[-1]
        if bool(((target < 0) | (target >= classes)).any()):
            raise EvaluationError(format_problem(
                "A target is not a class index of the output", expected=f"targets in [0, {classes})",
                given=f"targets from {int(target.min())} to {int(target.max())}",
                hint="drop padding such as -100 in batch_fn, or pass metric=MulticlassAccuracy("
                     "num_classes, average=\"micro\", ignore_index=-100)"))
        if self._metric is None:
            # Shapes, dtype and range are checked above, and torchmetrics' own check syncs again.
            self._metric = MulticlassAccuracy(classes, top_k=1, average="micro", validate_args=False,
                                              sync_on_compute=False).to(self._device)
        logits, target = output.reshape(-1, classes), target.reshape(-1)
        wrong_class = (target + 1) % classes
        prediction = torch.where(logits.isfinite().all(-1), logits.argmax(-1), wrong_class)
        self._metric.update(prediction, target)
        self._hits.append(prediction == target)

    def result(self) -> Evaluation:
        assert self._metric is not None  # update() ran: the evaluator has at least one batch
        with torch.inference_mode(False):
            hits = torch.cat(self._hits).cpu()  # an ordinary tensor: callers may edit it in place
        return Evaluation(float(self._metric.compute()), hits.numel(), hits)


class _TorchMetric:
    """A user's torchmetrics ``Metric``: reset, one ``update`` per batch, ``compute`` when asked."""

    def __init__(self, metric: torchmetrics.Metric, device: torch.device) -> None:
        self._metric = metric.to(device)
        self._metric.reset()
        self._samples = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        self._metric.update(output, target)
        self._samples += _rows(output)

    def result(self) -> Evaluation:
        return Evaluation(_as_float(self._metric.compute(), "metric.compute()"), self._samples)


class _Function:
    """A plain ``fn(outputs, targets)``, called on all outputs so far, concatenated along dim 0."""

    def __init__(self, fn: MetricFn) -> None:
        self._fn = fn
        self._outputs: list[Tensor] = []
        self._targets: list[Tensor] = []

    def update(self, output: Tensor, target: Tensor) -> None:
        self._outputs.append(output)
        self._targets.append(target)

    def result(self) -> Evaluation:
        try:
            outputs, targets = torch.cat(self._outputs), torch.cat(self._targets)
            value = self._fn(outputs, targets)
        except Exception as error:
            raise EvaluationError(format_problem(
                f"The metric function failed: {type(error).__name__}: {error}",
                expected="fn(outputs, targets) -> float, called on all batches concatenated along dim 0",
                given=f"{len(self._outputs)} batches, the first {_describe(self._outputs[0])}",
                hint="batches must agree in every dim but the first; for per-batch logic pass a "
                     "torchmetrics Metric instead")) from error
        return Evaluation(_as_float(value, "the metric function"), _rows(outputs))


class Evaluator:
    """Scores models on batches read once from ``data``.

    ``metric`` is micro top-1 accuracy by default; a torchmetrics ``Metric`` is cloned once
    (the caller's object is never touched) and reset, updated per batch and computed per
    evaluation; a plain ``fn(outputs, targets) -> float`` is called on all outputs and targets
    concatenated along dim 0; a :class:`LoggedMetric` runs the LightningModule's own validation
    hooks and reads what they log. ``batch_fn(model, batch) -> (outputs, targets)`` says how a batch
    is fed (not used with a ``LoggedMetric``, whose ``validation_step`` takes the batch). Batches are kept on ``device`` (CPU by default) and copied once to the model's
    device when that differs; ``max_batches`` caps how many are read.
    """

    def __init__(self, data: Iterable[Any], *,
                 metric: torchmetrics.Metric | MetricFn | LoggedMetric | None = None,
                 batch_fn: BatchFn | None = None, device: torch.device | str | None = None,
                 max_batches: int | None = None) -> None:
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 1):
            raise EvaluationError(format_problem(
                "max_batches must be a positive integer", given=repr(max_batches),
                expected="an int of 1 or more, or None for all batches"))
        if (metric is not None and not isinstance(metric, (torchmetrics.Metric, LoggedMetric))
                and not callable(metric)):
            raise EvaluationError(format_problem(
                "The metric is neither a torchmetrics Metric nor a function",
                given=f"{type(metric).__name__}", expected="a torchmetrics.Metric, fn(outputs, targets) "
                "returning a float, a LoggedMetric, or None for top-1 accuracy",
                hint='e.g. metric=torchmetrics.Accuracy(task="multiclass", num_classes=10)'))
        if isinstance(metric, LoggedMetric) and batch_fn is not None:
            raise EvaluationError(format_problem(
                f"batch_fn cannot be combined with the logged metric {metric.name!r}",
                expected="either a logged metric (the module's validation_step reads each batch) or batch_fn",
                hint="drop batch_fn; validation_step already says how a batch is fed"))
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self._batch_fn = batch_fn or default_batch_fn
        self._metric = metric.clone() if isinstance(metric, torchmetrics.Metric) else metric
        if isinstance(self._metric, torchmetrics.Metric) and hasattr(self._metric, "sync_on_compute"):
            # Evaluation runs on one process; a process group must not turn compute() into a gather.
            self._metric.sync_on_compute = False
        self._batches = [move_to_device(batch, self._device)
                         for batch in itertools.islice(data, max_batches)]
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # non_blocking copies to CPU must land before batches are read
        if not self._batches:
            raise EvaluationError(format_problem(
                "The evaluation data is empty", expected="at least one batch",
                given=f"an empty {type(data).__name__}",
                hint="pass a DataLoader or a list of (inputs, targets) batches"))
        self._moved: tuple[torch.device, list[Any]] | None = None

    def evaluate(self, model: nn.Module) -> Evaluation:
        """Score ``model`` on every batch (eval mode, inference mode; modes restored after)."""
        *_, evaluation = self.iter_chunks(model, chunk_batches=len(self._batches))
        return evaluation

    def iter_chunks(self, model: nn.Module, *, chunk_batches: int = 1) -> Iterator[Evaluation]:
        """Yield the running score after every ``chunk_batches`` batches; the last equals ``evaluate``.

        Lets a search abandon a hopeless candidate after part of the data. Eval and inference
        mode hold only while a chunk runs, so the caller's code between chunks is unaffected.
        """
        if isinstance(chunk_batches, bool) or not isinstance(chunk_batches, int) or chunk_batches < 1:
            raise EvaluationError(format_problem(
                "chunk_batches must be a positive integer", given=repr(chunk_batches),
                expected="an int of 1 or more"))
        return self._chunks(model, chunk_batches)

    def _chunks(self, model: nn.Module, chunk_batches: int) -> Iterator[Evaluation]:
        device = model_device(model)
        batches = self._batches_on(device)
        if isinstance(self._metric, LoggedMetric):
            # Epoch-end hooks may produce the value, so there is no running score to yield early.
            with evaluating(model), torch.inference_mode():
                value, samples = self._metric.score(model, batches)
            yield Evaluation(value, samples)
            return
        scorer = self._scorer(device)
        for start in range(0, len(batches), chunk_batches):
            with evaluating(model), torch.inference_mode():
                for index in range(start, min(start + chunk_batches, len(batches))):
                    self._score_batch(model, index, batches[index], scorer)
                evaluation = scorer.result()
            yield evaluation

    def _batches_on(self, device: torch.device) -> list[Any]:
        if device == self._device:
            return self._batches
        if self._moved is None or self._moved[0] != device:
            self._moved = (device, [move_to_device(batch, device) for batch in self._batches])
        return self._moved[1]

    def _scorer(self, device: torch.device) -> _Scorer:
        if self._metric is None:
            return _Accuracy(device)
        if isinstance(self._metric, torchmetrics.Metric):
            return _TorchMetric(self._metric, device)
        return _Function(self._metric)

    def _score_batch(self, model: nn.Module, index: int, batch: Any, scorer: _Scorer) -> None:
        output, target = self._run_batch(model, index, batch)
        try:
            scorer.update(output, target)
        except EvaluationError as error:
            raise EvaluationError(f"Evaluation batch {index}: {error}") from error
        except Exception as error:
            raise EvaluationError(format_problem(
                f"The metric failed on evaluation batch {index}: {type(error).__name__}: {error}",
                given=f"output {tuple(output.shape)} and target {tuple(target.shape)}",
                hint="check that batch_fn returns what the metric's update(preds, target) expects"),
            ) from error

    def _run_batch(self, model: nn.Module, index: int, batch: Any) -> tuple[Tensor, Tensor]:
        try:
            result = self._batch_fn(model, batch)
        except EvaluationError as error:
            raise EvaluationError(f"Evaluation batch {index}: {error}") from error
        except torch.OutOfMemoryError:
            raise  # not a data problem: callers (the search) handle it as such
        except Exception as error:
            raise EvaluationError(format_problem(
                f"Evaluation failed on batch {index}: {type(error).__name__}: {error}",
                given=_describe(batch), hint=_BATCH_FN_HINT)) from error
        if (not isinstance(result, (tuple, list)) or len(result) != 2
                or not all(isinstance(part, Tensor) for part in result)):
            raise EvaluationError(format_problem(
                f"batch_fn returned the wrong thing for evaluation batch {index}",
                expected="a pair (outputs, targets) of tensors", given=_describe(result),
                hint="if the model returns a tuple or an object, pick the logits in batch_fn"))
        return result[0], result[1]


def _rows(output: Tensor) -> int:
    return output.shape[0] if output.dim() else 1


def _as_float(value: Any, source: str) -> float:
    """A metric result as a float; NaN passes through so that callers decide what it means."""
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise EvaluationError(format_problem(
        f"{source} did not return a single number", expected="a float or a one-element tensor",
        given=_describe(value), hint="reduce the result (e.g. .mean()) or pick one entry of a dict"))


def _describe(value: Any) -> str:
    """A short account of a batch or result for error messages: types and tensor shapes."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return "a dict with " + ", ".join(f"{key}: {_describe(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of [" + ", ".join(_describe(item) for item in value) + "]"
    return f"a {type(value).__name__}"
