"""The protocol every method goes through after proposing its ladder of candidates.

1. Fine-tune each candidate in order, cheapest first, with the same :class:`FinetuneConfig`
   (distillation from the original model), at most ``candidates`` of them; accept the first
   whose drop on the validation split after fine-tuning is within the final budget. Tasks
   without fine-tuning take the first candidate (the search budget is then the final one).
   If none holds, the tried candidate with the smallest validation drop is reported, marked.
2. Evaluate the accepted model once on the test split, which no method ever saw.
3. Measure params, MACs per sample and whole-model latency at batch 1 and at the large batch:
   all models of a task (dense included) are timed in interleaved rounds with
   :func:`lrsearch.measure.time_call` (each the fastest of 3 ``blocked_autorange`` medians, which
   discards bursts of load from other processes), and each figure is the median of the rounds.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lrsearch.core import count_params, macs_per_sample
from lrsearch.core._runtime import default_forward
from lrsearch.measure import Evaluator, parse_budget, time_call
from lrsearch.pipeline import finetune

from benchmarks._methods import Proposal
from benchmarks._tasks import Task

__all__ = ["Outcome", "accept", "measure_latency", "model_figures"]


@dataclass
class Outcome:
    """What one method delivered on one task after fine-tuning and verification."""

    model: nn.Module
    label: str
    ranks: dict[str, Any]
    search_drop: float
    val_drop: float | None
    meets_val: bool
    tried: int
    finetune_seconds: float
    attempts: list[dict[str, Any]] = field(default_factory=list)


def accept(task: Task, proposal: Proposal, *, budget: str, candidates: int) -> Outcome:
    evaluator = Evaluator(task.search, metric=task.metric, batch_fn=task.batch_fn)
    baseline = evaluator.evaluate(task.model).value
    allowed = parse_budget(budget).allowed_drop(baseline)
    attempts: list[dict[str, Any]] = []
    best: Outcome | None = None
    started = time.perf_counter()
    ladder = proposal.candidates[:candidates] if task.finetune is not None else proposal.candidates[:1]
    for candidate in ladder:
        model = candidate.build()
        if task.finetune is not None and candidate.ranks:
            with tempfile.TemporaryDirectory() as root:
                model = finetune(model, teacher=copy.deepcopy(task.model), root_dir=root, config=task.finetune,
                                 train_dataloaders=task.train, forward=task.forward)
        drop = baseline - evaluator.evaluate(model).value
        holds = drop <= allowed
        attempts.append({"label": candidate.label, "ranks": _jsonable(candidate.ranks),
                         "search_drop": candidate.search_drop, "val_drop": drop, "holds": holds})
        outcome = Outcome(model=model.eval(), label=candidate.label, ranks=dict(candidate.ranks),
                          search_drop=candidate.search_drop, val_drop=drop, meets_val=holds, tried=len(attempts),
                          finetune_seconds=0.0, attempts=attempts)
        if best is None or holds or (not best.meets_val and drop < (best.val_drop or 0.0)):
            best = outcome
        if holds:
            break
    assert best is not None
    best.finetune_seconds = time.perf_counter() - started
    best.tried = len(attempts)
    return best


def _jsonable(ranks: dict[str, Any]) -> dict[str, Any]:
    return {name: list(rank) if isinstance(rank, tuple) else rank for name, rank in ranks.items()}


def model_figures(task: Task, model: nn.Module) -> dict[str, float]:
    """Test metric, params and MACs per sample (on the large latency batch)."""
    forward = task.forward or default_forward
    test = Evaluator(task.test, metric=task.metric, batch_fn=task.batch_fn).evaluate(model).value
    return {"test_metric": test, "params": count_params(model),
            "macs": macs_per_sample(model, task.latency_inputs[task.large_batch], forward=forward)}


def measure_latency(task: Task, models: dict[str, nn.Module], *, threads: int, rounds: int,
                    min_run_time: float) -> dict[str, dict[int, float]]:
    """Median milliseconds per forward of every model at every latency batch size, interleaved."""
    forward = task.forward or default_forward
    samples: dict[str, dict[int, list[float]]] = {name: {size: [] for size in task.latency_inputs} for name in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for size, batch in task.latency_inputs.items():
                for name, model in models.items():
                    model.eval()
                    seconds = time_call(lambda model=model, batch=batch: forward(model, batch), device="cpu",
                                        threads=threads, min_run_time=min_run_time, repeats=3)
                    samples[name][size].append(seconds * 1e3)
    return {name: {size: statistics.median(values) for size, values in by_size.items()}
            for name, by_size in samples.items()}
