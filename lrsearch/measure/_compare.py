"""Whole-model latency of several models, timed in interleaved rounds in one process.

Two one-shot timings taken one after the other compare two different states of a shared
machine: a burst of load during one of them can make a 3.5x speedup read as 10x or 1.4x.
Here every round times each model once at each batch size, in turn, so load hits the models
alike; each figure is the median over rounds, and the spread of the rounds says how busy the
machine was.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrsearch.core._runtime import ForwardFn, default_forward, move_to_device
from lrsearch.measure._latency import time_call

__all__ = ["LatencyComparison", "compare_latency"]

# A round-to-round spread above this share of the median says the machine was busy.
BUSY_SPREAD = 0.2


@dataclass(frozen=True)
class Timing:
    """Milliseconds per forward: the median over rounds, and the fastest and slowest round."""

    median_ms: float
    low_ms: float
    high_ms: float

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: 0 on a quiet machine."""
        return (self.high_ms - self.low_ms) / self.median_ms

    def to_dict(self) -> dict[str, float]:
        return {"median_ms": self.median_ms, "low_ms": self.low_ms, "high_ms": self.high_ms}


@dataclass(frozen=True)
class LatencyComparison:
    """Timings of every model at every batch size, from the same interleaved rounds."""

    timings: dict[str, dict[int, Timing]]
    rounds: int
    threads: int
    device: str

    def speedup(self, model: str, reference: str, batch_size: int) -> float:
        """How many times faster ``model`` runs than ``reference`` (ratio of medians)."""
        return self.timings[reference][batch_size].median_ms / self.timings[model][batch_size].median_ms

    @property
    def busy(self) -> bool:
        """True when some round-to-round spread says the machine was busy while timing."""
        return any(t.spread > BUSY_SPREAD for by_size in self.timings.values() for t in by_size.values())

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "threads": self.threads, "device": self.device,
                "timings": {name: {str(size): t.to_dict() for size, t in by_size.items()}
                            for name, by_size in self.timings.items()}}


def compare_latency(models: Mapping[str, nn.Module], batches: Mapping[int, Any], *, device: str | torch.device,
                    threads: int, forward: ForwardFn | None = None, rounds: int = 7,
                    min_run_time: float = 0.05) -> LatencyComparison:
    """Time ``forward(model, batch)`` of every model at every batch size in interleaved rounds.

    ``batches`` maps each deployment batch size to an input batch of that size. The models are
    moved to ``device`` for the timing and moved back (with their train/eval modes) after.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer of at least 1 but got {rounds!r}.")
    forward = forward or default_forward
    target = torch.device(device)
    homes = {name: next(model.parameters()).device for name, model in models.items()}
    modes = {module: module.training for model in models.values() for module in model.modules()}
    on_device = {size: move_to_device(batch, target) for size, batch in batches.items()}
    samples: dict[str, dict[int, list[float]]] = {name: {size: [] for size in batches} for name in models}
    try:
        for model in models.values():
            model.to(target).eval()
        with torch.inference_mode():
            for round_ in range(rounds):
                for size, batch in on_device.items():
                    for name, model in models.items():
                        call: Callable[[], Any] = lambda model=model, batch=batch: forward(model, batch)
                        seconds = time_call(call, device=target, threads=threads, min_run_time=min_run_time,
                                            repeats=1, warmup=2 if round_ == 0 else 0)
                        samples[name][size].append(seconds * 1e3)
    finally:
        for name, model in models.items():
            model.to(homes[name])
        for module, training in modes.items():
            module.training = training
    timings = {name: {size: Timing(statistics.median(values), min(values), max(values))
                      for size, values in by_size.items()} for name, by_size in samples.items()}
    return LatencyComparison(timings=timings, rounds=rounds, threads=threads, device=str(target))
