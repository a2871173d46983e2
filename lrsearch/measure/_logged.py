"""Score a LightningModule by a metric it logs itself (``self.log("val_acc", ...)``).

Users of the callback already compute their metric in ``validation_step``; naming it is
simpler and safer than re-implementing it as a torchmetrics object. The module's validation
hooks are run directly with ``self.log`` captured, because a ``Trainer.validate`` inside a
callback corrupts the outer fit's state and one Trainer per search trial would cost more
than the evaluation itself. Nothing here imports Lightning: the hooks are found by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torchmetrics
from torch import Tensor, nn

from lrsearch._errors import LrSearchError, format_problem
from lrsearch.core._runtime import batch_size_of

__all__ = ["LoggedMetric", "LoggedMetricError"]

_REDUCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mean": lambda values, sizes: (values * sizes).sum() / sizes.sum(),
    "sum": lambda values, sizes: values.sum(),
    "max": lambda values, sizes: values.max(),
    "min": lambda values, sizes: values.min(),
}
_REDUCE_ALIASES: dict[Any, str] = {torch.mean: "mean", torch.sum: "sum", torch.max: "max", torch.min: "min"}


class LoggedMetricError(LrSearchError, ValueError):
    """The module cannot be scored by the logged metric: no validation hook, or the name is never logged."""


@dataclass
class _Epoch:
    """What the hooks logged under ``target`` during one pass, plus the other names they logged.

    Only the target's values are kept and checked: whatever else the module logs is the
    module's business and must not fail an evaluation.
    """

    target: str
    steps: list[tuple[float, int]] = field(default_factory=list)
    reduction: str = "mean"
    metric: torchmetrics.Metric | None = None
    others: set[str] = field(default_factory=set)
    batch: Any = None

    def log(self, name: str, value: Any, *, reduce_fx: Any = "mean", batch_size: int | None = None,
            **_ignored: Any) -> None:
        """Stands in for ``LightningModule.log``; display and sync options do not change the value."""
        if name != self.target:
            self.others.add(name)
            return
        if isinstance(value, torchmetrics.Metric):
            self.metric = value
            return
        reduction = _REDUCE_ALIASES.get(reduce_fx, reduce_fx)
        if reduction not in _REDUCTIONS:
            raise LoggedMetricError(format_problem(
                f"self.log({name!r}, ...) uses reduce_fx={reduce_fx!r}, which lrsearch cannot replay",
                expected=f"one of {sorted(_REDUCTIONS)}",
                hint="log the value with a standard reduction, or pass metric= to lrsearch instead"))
        self.reduction = reduction
        self.steps.append((_number(name, value), batch_size if batch_size is not None else _rows(self.batch)))

    def log_dict(self, dictionary: Mapping[str, Any] | Any, **options: Any) -> None:
        """Stands in for ``LightningModule.log_dict`` (a dict or a torchmetrics ``MetricCollection``)."""
        for name, value in dictionary.items():
            self.log(name, value, **options)

    @property
    def logged(self) -> bool:
        return self.metric is not None or bool(self.steps)

    def value(self) -> float:
        if self.metric is not None:
            return _number(self.target, self.metric.compute())
        values = torch.tensor([value for value, _ in self.steps], dtype=torch.float64)
        sizes = torch.tensor([max(size, 1) for _, size in self.steps], dtype=torch.float64)
        return float(_REDUCTIONS[self.reduction](values, sizes))


class LoggedMetric:
    """The value a LightningModule logs under ``name`` in its validation hooks, reduced over the data.

    Pass it as ``metric=`` to :class:`Evaluator` (or ``monitor="val_acc"`` to the pipeline). An
    evaluation runs ``on_validation_epoch_start``, ``validation_step(batch, batch_idx)`` per
    batch and ``on_validation_epoch_end``, with ``self.log``/``self.log_dict`` captured: numbers
    and tensors are reduced as Lightning reduces them at epoch end (mean weighted by batch size
    unless ``reduce_fx`` says otherwise), torchmetrics objects are computed once at the end. Every
    torchmetrics object of the module is reset before and after, as Lightning resets logged
    metrics at the end of an epoch.
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise LoggedMetricError(format_problem(
                "The logged metric needs a name", given=repr(name),
                expected="the name the module passes to self.log in validation_step, e.g. 'val_acc'"))
        self.name = name

    def __repr__(self) -> str:
        return f"LoggedMetric({self.name!r})"

    def score(self, model: nn.Module, batches: Iterable[Any]) -> tuple[float, int]:
        """``(value, samples)`` over ``batches``; the caller sets eval and inference mode."""
        step = getattr(model, "validation_step", None)
        if not callable(step):
            raise LoggedMetricError(format_problem(
                f"The model cannot report the logged metric {self.name!r}: it has no validation_step",
                given=f"a {type(model).__qualname__}",
                expected="a LightningModule whose validation_step calls self.log(name, value)",
                hint="pass metric= (a torchmetrics Metric or fn(outputs, targets)) for a plain nn.Module"))
        epoch = _Epoch(self.name)
        samples = 0
        with _captured_logging(model, epoch):
            _call_hook(model, "on_validation_epoch_start")
            for index, batch in enumerate(batches):
                epoch.batch = batch
                step(batch, index)
                samples += _rows(batch)
            _call_hook(model, "on_validation_epoch_end")
            if not epoch.logged:
                logged = ", ".join(repr(name) for name in sorted(epoch.others)) or "nothing"
                raise LoggedMetricError(format_problem(
                    f"The module never logs {self.name!r} in its validation hooks",
                    given=f"the names {type(model).__qualname__}'s validation hooks log: {logged}",
                    hint="name one of those (monitor=...), or add self.log(name, value) to validation_step"))
            return epoch.value(), samples


def _call_hook(model: nn.Module, name: str) -> None:
    hook = getattr(model, name, None)
    if callable(hook):
        hook()


def _reset_metrics(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torchmetrics.Metric):
            module.reset()


@contextmanager
def _captured_logging(model: nn.Module, epoch: _Epoch) -> Any:
    """Route the model's ``log``/``log_dict`` to ``epoch`` and reset its metrics around the pass.

    The methods are replaced on the instance only, so the class and every other instance keep
    Lightning's own; the instance attributes are removed afterwards even if a hook raises.
    """
    shadowed = {name: model.__dict__[name] for name in ("log", "log_dict") if name in model.__dict__}
    _reset_metrics(model)
    object.__setattr__(model, "log", epoch.log)
    object.__setattr__(model, "log_dict", epoch.log_dict)
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in shadowed:
                object.__setattr__(model, name, shadowed[name])
            else:
                model.__dict__.pop(name, None)
        _reset_metrics(model)


def _rows(batch: Any) -> int:
    """Samples in a batch, as Lightning infers them for weighting; 1 when it cannot tell."""
    try:
        return batch_size_of(batch)
    except (TypeError, IndexError, StopIteration):
        return 1


def _number(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise LoggedMetricError(format_problem(
                f"self.log({name!r}, ...) got a tensor of shape {tuple(value.shape)}",
                expected="a number or a one-element tensor", hint="reduce it (e.g. .mean()) before logging"))
        return float(value.detach().double().item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise LoggedMetricError(format_problem(
        f"self.log({name!r}, ...) got a {type(value).__name__}",
        expected="a number, a one-element tensor or a torchmetrics Metric"))
