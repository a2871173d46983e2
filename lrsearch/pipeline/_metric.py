"""What the pipeline scores with: the caller's metric, or a metric the module logs by name."""

from __future__ import annotations

from typing import Any

from lrsearch._errors import format_problem
from lrsearch.measure import LoggedMetric, LoggedMetricError
from lrsearch.measure._evaluate import check_metric

__all__ = ["resolve_metric"]


def resolve_metric(*, metric: Any, monitor: str | None, metric_name: str | None) -> tuple[Any, str | None]:
    """``(metric, metric_name)`` for the search and verification; ``monitor`` names a logged metric.

    ``monitor`` mirrors Lightning's ``ModelCheckpoint(monitor=...)``: the name the module passes
    to ``self.log`` in ``validation_step``. It and ``metric`` are two ways to say the same thing,
    so giving both is an error rather than a silent preference. ``metric`` is checked here, so
    that a callback rejects a misspelt ``metric="los"`` when it is built, not after training.
    """
    check_metric(metric)
    if monitor is None:
        return metric, metric_name
    if metric is not None:
        raise LoggedMetricError(format_problem(
            f"Both metric= and monitor={monitor!r} say what to score",
            expected="one of them", hint="drop metric= to use the value the module logs, or drop monitor="))
    return LoggedMetric(monitor), metric_name or monitor
