"""Layer 2 of lrsearch: the accuracy-drop budget, the evaluation loop and the latency table.

Depends on torch, torchmetrics and ``lrsearch.core``; never imports Optuna or Lightning.
"""

from lrsearch.measure._budget import Budget, parse_budget
from lrsearch.measure._compare import LatencyComparison, compare_latency
from lrsearch.measure._deployment import REDUCTIONS, DeploymentLatency
from lrsearch.measure._evaluate import Evaluation, EvaluationError, Evaluator, default_batch_fn
from lrsearch.measure._latency import (
    LatencyTable,
    LatencyTableError,
    LayerLatency,
    build_latency_table,
    resize_batch,
    time_call,
)
from lrsearch.measure._logged import LoggedMetric, LoggedMetricError
from lrsearch.measure._uncertainty import paired_drop, paired_drop_interval

__all__ = [
    "Budget",
    "DeploymentLatency",
    "Evaluation",
    "EvaluationError",
    "Evaluator",
    "LatencyComparison",
    "LatencyTable",
    "LatencyTableError",
    "LayerLatency",
    "LoggedMetric",
    "LoggedMetricError",
    "REDUCTIONS",
    "build_latency_table",
    "compare_latency",
    "default_batch_fn",
    "paired_drop",
    "paired_drop_interval",
    "parse_budget",
    "resize_batch",
    "time_call",
]
