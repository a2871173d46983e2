"""Score a model on a fixed evaluation set, fast enough to run once per search trial.

The batches are read once and kept (on CPU, or on the model's device after the first
evaluation), so a search that evaluates hundreds of candidates pays the DataLoader once.
The default score is micro top-1 accuracy plus a per-sample correctness vector that paired
statistics (McNemar, bootstrap) need; ``"loss"``, a torchmetrics ``Metric`` or a plain function
can replace it. Hugging Face conventions work without hooks: dict batches with ``labels``,
outputs with ``.logits``, and causal language models scored on their next token.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lrsearch._errors import LrSearchError, format_problem
from lrsearch.core._runtime import (
    LABELS,
    describe,
    evaluating,
    model_device,
    move_to_device,
    output_field,
    split_labels,
)
from lrsearch.measure._logged import LoggedMetric

__all__ = ["BUILTIN_METRICS", "IGNORE_INDEX", "BatchFn", "Evaluation", "EvaluationError", "Evaluator", "MetricFn",
           "check_metric", "default_batch_fn"]

BatchFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor]]
MetricFn = Callable[[Tensor, Tensor], Tensor | float]
BuiltinMetric = Literal["accuracy", "loss"]

BUILTIN_METRICS: tuple[BuiltinMetric, ...] = ("accuracy", "loss")
"""Metrics named by a string: top-1 accuracy (the default) and mean cross-entropy (lower is better)."""
IGNORE_INDEX = -100
"""The target that marks a position as unscored (torch's and Hugging Face's ``ignore_index``)."""

_BATCH_FN_HINT = ("pass batch_fn=lambda model, batch: (model(inputs), targets) to say how a batch "
                  "is fed and where its targets are")


class EvaluationError(LrSearchError, ValueError):
    """Evaluation data, its batches or the metric do not fit the model."""


@dataclass(frozen=True, eq=False)
class Evaluation:
    """One score of one model.

    ``samples`` counts scored rows: batch items, or every position of a ``(batch, ..., classes)``
    output with the default accuracy (every scored token of a language model). ``correct`` is the
    per-row hit vector (bool, CPU) that paired tests need; only the default accuracy has one.
    ``metric_name`` says what was scored, e.g. ``"accuracy"`` or ``"next-token accuracy"``, for
    studies and reports.
    """

    value: float
    samples: int
    correct: Tensor | None = None
    metric_name: str | None = None


@dataclass(frozen=True)
class _Scored:
    """What one batch gives the scorer: outputs and targets row for row, and whether they are next tokens."""

    output: Tensor
    target: Tensor
    next_token: bool = False


def default_batch_fn(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """``(logits, targets)`` of one batch, by the ``(inputs, targets)`` or the Hugging Face convention.

    A tuple or list batch is fed as ``model(batch[0])`` with targets ``batch[1]``; a dict (or a
    ``BatchEncoding``) as ``model(**inputs)`` with its ``labels`` as targets. ``labels`` is not
    fed to the model, which would otherwise compute a loss nobody reads. The logits are the
    output itself when it is a tensor, else its ``logits`` (``ModelOutput``, dict or attribute).
    Targets of ``-100`` are left out. When the targets are the input tokens (``labels`` equal to
    ``input_ids`` wherever they are not -100, as Hugging Face causal-LM data has them, or a dict
    with no ``labels``), each position is scored on the next token: logits shift by one and
    padding (``attention_mask`` 0) is left out.
    """
    scored = _default_batch(model, batch)
    return scored.output, scored.target


def _default_batch(model: nn.Module, batch: Any) -> _Scored:
    if isinstance(batch, Mapping):
        inputs, labels = split_labels(batch)
        tokens, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if labels is None and tokens is None:
            raise _no_labels(batch, None)  # before the forward pass, which would fail less clearly
        logits = _logits(model(**inputs))
        if labels is None:
            if not _same_tokens(logits, tokens, tokens):
                raise _no_labels(batch, logits)
            labels = tokens
        return _scored(logits, labels, tokens, mask)
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise EvaluationError(format_problem(
            "The batch has no targets", expected="(inputs, targets) batches, or dicts with a 'labels' entry",
            given=describe(batch), hint=_BATCH_FN_HINT))
    return _scored(_logits(model(batch[0])), batch[1], batch[0], None)


def _no_labels(batch: Mapping[str, Any], logits: Tensor | None) -> EvaluationError:
    given = describe(batch) if logits is None else f"{describe(batch)}, and logits of shape {tuple(logits.shape)}"
    return EvaluationError(format_problem(
        f"The dict batch has no {LABELS!r} entry to score the model against",
        expected=f"a {LABELS!r} entry (the Hugging Face convention), or 'input_ids' and logits "
                 "(batch, seq, vocab) of a causal language model", given=given,
        hint="name the targets 'labels' (e.g. rename the dataset's label column), or pass "
             "batch_fn=lambda model, batch: (model(batch['x']), batch['y'])"))


def _logits(output: Any) -> Tensor:
    """The model's class scores: the output if it is a tensor, else its ``logits``."""
    if isinstance(output, Tensor):
        return output
    logits = output_field(output, "logits")
    if isinstance(logits, Tensor):
        return logits
    raise EvaluationError(format_problem(
        f"The model's output, a {type(output).__name__}, has no logits to score",
        expected="a tensor of logits, or an output with a 'logits' entry or attribute (a Hugging Face "
                 "ModelOutput)", given=describe(output),
        hint="pass batch_fn=lambda model, batch: (<logits picked from the output>, <targets>), or "
             "metric=fn(outputs, targets) together with such a batch_fn"))


def _same_tokens(logits: Tensor, tokens: Any, labels: Any) -> bool:
    """Whether ``labels`` are the input ``tokens`` of a causal LM (equal wherever not ignored)."""
    if not (isinstance(tokens, Tensor) and isinstance(labels, Tensor) and logits.dim() == 3
            and tokens.dim() == 2 and tokens.shape == labels.shape == logits.shape[:2]):
        return False
    if tokens.is_floating_point() or labels.is_floating_point():
        return False
    scored = labels != IGNORE_INDEX
    return bool(scored.any()) and torch.equal(labels[scored], tokens[scored])


def _scored(logits: Tensor, labels: Any, tokens: Any, mask: Any) -> _Scored:
    """Rows to score: next tokens for a causal LM, else every position whose target is not -100."""
    if not isinstance(labels, Tensor):
        raise EvaluationError(format_problem(
            "The batch's targets are not a tensor", expected="a tensor of class indices",
            given=describe(labels), hint="collate the targets into a tensor (a DataLoader does), or " + _BATCH_FN_HINT))
    if _same_tokens(logits, tokens, labels):
        logits, labels = logits[:, :-1], labels[:, 1:]
        keep = labels != IGNORE_INDEX
        if isinstance(mask, Tensor) and mask.shape == tokens.shape:
            keep &= mask[:, 1:].bool()
        return _Scored(logits[keep], labels[keep], next_token=True)
    if labels.is_floating_point() or labels.shape != logits.shape[:-1]:
        return _Scored(logits, labels)  # the scorer's own checks explain what does not fit
    keep = labels != IGNORE_INDEX
    return _Scored(logits, labels) if bool(keep.all()) else _Scored(logits[keep], labels[keep])


def check_metric(metric: Any) -> None:
    """Raise :class:`EvaluationError` unless ``metric`` is one that :class:`Evaluator` accepts."""
    if isinstance(metric, str):
        if metric not in BUILTIN_METRICS:
            raise EvaluationError(format_problem(
                f"Unknown metric name {metric!r}", expected=f"one of {', '.join(map(repr, BUILTIN_METRICS))}",
                hint='e.g. metric="loss" for cross-entropy, or pass a torchmetrics Metric or fn(outputs, targets)'))
        return
    if metric is not None and not isinstance(metric, (torchmetrics.Metric, LoggedMetric)) and not callable(metric):
        raise EvaluationError(format_problem(
            "The metric is neither a torchmetrics Metric nor a function",
            given=f"{type(metric).__name__}", expected="a torchmetrics.Metric, fn(outputs, targets) "
            f"returning a float, a LoggedMetric, one of {', '.join(map(repr, BUILTIN_METRICS))}, or None for "
            "top-1 accuracy", hint='e.g. metric=torchmetrics.Accuracy(task="multiclass", num_classes=10)'))


class _Scorer(Protocol):
    def update(self, output: Tensor, target: Tensor) -> None: ...

    def result(self) -> Evaluation: ...


def _check_class_scores(output: Tensor, target: Tensor, metric: str) -> None:
    """Fail unless ``output`` holds logits (batch, ..., classes) and ``target`` class indices of the same rows."""
    if output.dim() < 2 or output.shape[:-1] != target.shape or output.shape[-1] < 2:
        raise EvaluationError(format_problem(
            f"The {metric} cannot score this output", given=(
                f"output {tuple(output.shape)} and target {tuple(target.shape)}"),
            expected="logits (batch, ..., classes) with at least 2 classes and integer "
                     "targets (batch, ...)",
            hint="pass metric= (a torchmetrics Metric or fn(outputs, targets)) for other tasks"))
    if target.is_floating_point() or target.is_complex():
        raise EvaluationError(format_problem(
            f"The {metric} needs class-index targets", given=f"{target.dtype} targets",
            expected="an integer tensor of class indices",
            hint="convert one-hot or soft labels with target.argmax(-1) in batch_fn"))
    classes = output.shape[-1]
    if target.numel() and bool(((target < 0) | (target >= classes)).any()):
        raise EvaluationError(format_problem(
            "A target is not a class index of the output", expected=f"targets in [0, {classes})",
            given=f"targets from {int(target.min())} to {int(target.max())}",
            hint=f"mark unscored positions with {IGNORE_INDEX} (the default batch_fn leaves them out), "
                 "or check that the model's number of classes matches the labels"))


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
        _check_class_scores(output, target, "default accuracy")
        classes = output.shape[-1]
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


class _Loss:
    """Mean cross-entropy per scored row (per token for a language model), summed batch by batch.

    Kept as a running sum rather than concatenated logits: a language model's logits over a whole
    evaluation set would not fit in memory. A non-finite logit gives a non-finite loss.
    """

    def __init__(self) -> None:
        self._total = 0.0
        self._rows = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        _check_class_scores(output, target, "loss")
        classes = output.shape[-1]
        loss = F.cross_entropy(output.float().reshape(-1, classes), target.reshape(-1), reduction="sum")
        self._total += float(loss)
        self._rows += target.numel()

    def result(self) -> Evaluation:
        return Evaluation(self._total / self._rows if self._rows else float("nan"), self._rows)


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
                given=f"{len(self._outputs)} batches, the first {describe(self._outputs[0])}",
                hint="batches must agree in every dim but the first; for per-batch logic pass a "
                     "torchmetrics Metric instead")) from error
        return Evaluation(_as_float(value, "the metric function"), _rows(outputs))


class Evaluator:
    """Scores models on batches read once from ``data``.

    ``metric`` is micro top-1 accuracy by default (``"accuracy"``); ``"loss"`` is the mean
    cross-entropy per scored row (lower is better); a torchmetrics ``Metric`` is cloned once
    (the caller's object is never touched) and reset, updated per batch and computed per
    evaluation; a plain ``fn(outputs, targets) -> float`` is called on all outputs and targets
    concatenated along dim 0; a :class:`LoggedMetric` runs the LightningModule's own validation
    hooks and reads what they log. ``batch_fn(model, batch) -> (outputs, targets)`` says how a
    batch is fed (default :func:`default_batch_fn`, which also knows Hugging Face batches and
    outputs; not used with a ``LoggedMetric``, whose ``validation_step`` takes the batch).
    Batches are kept on ``device`` (CPU by default) and copied once to the model's device when
    that differs; ``max_batches`` caps how many are read.
    """

    def __init__(self, data: Iterable[Any], *,
                 metric: torchmetrics.Metric | MetricFn | LoggedMetric | BuiltinMetric | None = None,
                 batch_fn: BatchFn | None = None, device: torch.device | str | None = None,
                 max_batches: int | None = None) -> None:
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 1):
            raise EvaluationError(format_problem(
                "max_batches must be a positive integer", given=repr(max_batches),
                expected="an int of 1 or more, or None for all batches"))
        check_metric(metric)
        if isinstance(metric, LoggedMetric) and batch_fn is not None:
            raise EvaluationError(format_problem(
                f"batch_fn cannot be combined with the logged metric {metric.name!r}",
                expected="either a logged metric (the module's validation_step reads each batch) or batch_fn",
                hint="drop batch_fn; validation_step already says how a batch is fed"))
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self._batch_fn = batch_fn
        self._metric: torchmetrics.Metric | MetricFn | LoggedMetric | BuiltinMetric = (
            "accuracy" if metric is None else metric.clone() if isinstance(metric, torchmetrics.Metric) else metric)
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

    @property
    def higher_is_better(self) -> bool | None:
        """Whether a higher score is better: known for ``"accuracy"`` and ``"loss"``, None for the user's metric."""
        return self._metric == "accuracy" if isinstance(self._metric, str) else None

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
            yield Evaluation(value, samples, metric_name=self._metric.name)
            return
        scorer = self._scorer(device)
        next_token = False
        for start in range(0, len(batches), chunk_batches):
            with evaluating(model), torch.inference_mode():
                for index in range(start, min(start + chunk_batches, len(batches))):
                    next_token |= self._score_batch(model, index, batches[index], scorer)
                evaluation = scorer.result()
            yield replace(evaluation, metric_name=self._metric_name(next_token))

    def _metric_name(self, next_token: bool) -> str:
        """What the score measures; a language model's built-in scores say they are per next token."""
        if isinstance(self._metric, str):
            return f"next-token {self._metric}" if next_token else self._metric
        return str(getattr(self._metric, "__name__", type(self._metric).__name__))

    def _batches_on(self, device: torch.device) -> list[Any]:
        if device == self._device:
            return self._batches
        if self._moved is None or self._moved[0] != device:
            self._moved = (device, [move_to_device(batch, device) for batch in self._batches])
        return self._moved[1]

    def _scorer(self, device: torch.device) -> _Scorer:
        if isinstance(self._metric, str):  # checked first: a torchmetrics Metric overloads ==
            return _Accuracy(device) if self._metric == "accuracy" else _Loss()
        if isinstance(self._metric, torchmetrics.Metric):
            return _TorchMetric(self._metric, device)
        assert callable(self._metric) and not isinstance(self._metric, LoggedMetric)
        return _Function(self._metric)

    def _score_batch(self, model: nn.Module, index: int, batch: Any, scorer: _Scorer) -> bool:
        """Score one batch; True when its rows are next tokens of a language model."""
        scored = self._run_batch(model, index, batch)
        try:
            scorer.update(scored.output, scored.target)
        except EvaluationError as error:
            raise EvaluationError(f"Evaluation batch {index}: {error}") from error
        except Exception as error:
            raise EvaluationError(format_problem(
                f"The metric failed on evaluation batch {index}: {type(error).__name__}: {error}",
                given=f"output {tuple(scored.output.shape)} and target {tuple(scored.target.shape)}",
                hint="check that batch_fn returns what the metric's update(preds, target) expects"),
            ) from error
        return scored.next_token

    def _run_batch(self, model: nn.Module, index: int, batch: Any) -> _Scored:
        try:
            result = _default_batch(model, batch) if self._batch_fn is None else self._batch_fn(model, batch)
        except EvaluationError as error:
            raise EvaluationError(f"Evaluation batch {index}: {error}") from error
        except torch.OutOfMemoryError:
            raise  # not a data problem: callers (the search) handle it as such
        except Exception as error:
            raise EvaluationError(format_problem(
                f"Evaluation failed on batch {index}: {type(error).__name__}: {error}",
                given=describe(batch), hint=_BATCH_FN_HINT)) from error
        if isinstance(result, _Scored):
            return result
        if (not isinstance(result, (tuple, list)) or len(result) != 2
                or not all(isinstance(part, Tensor) for part in result)):
            raise EvaluationError(format_problem(
                f"batch_fn returned the wrong thing for evaluation batch {index}",
                expected="a pair (outputs, targets) of tensors", given=describe(result),
                hint="if the model returns a tuple or an object, pick the logits in batch_fn"))
        return _Scored(result[0], result[1])


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
        given=describe(value), hint="reduce the result (e.g. .mean()) or pick one entry of a dict"))
