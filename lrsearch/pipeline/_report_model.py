"""The report dict, typed, and the sentences both renderings share (see :mod:`lrsearch.pipeline._report`).

Every value is read defensively: a missing, non-numeric or NaN figure becomes None and is shown
as a dash, so a hand-edited or older ``report.json`` still renders.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from lrsearch.study._figures import TrialPoint, cost_axis, feasible_front, pareto_figure, rank_rows, ranks_figure

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["Attempt", "Final", "ModelFigures", "Report", "TrialCounts", "change", "drop_cell", "drop_note",
           "interval_text", "ms", "percent", "plain", "points", "rank_text", "ranks_text", "ratio", "times",
           "undecided_warning"]

MISSING = "—"


def _number(value: object) -> float | None:
    """A finite float, or None for anything missing, non-numeric or NaN (shown as a dash)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _section(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = report.get(key)
    return value if isinstance(value, Mapping) else {}


def _entries(report: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = report.get(key)
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _interval_of(value: object) -> tuple[float, float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    low, high = (_number(bound) for bound in value)
    return None if low is None or high is None else (low, high)


@dataclass(frozen=True)
class ModelFigures:
    """What was measured of one model (dense or final); None where the report has no finite value."""

    params: float | None = None
    macs: float | None = None
    latency_ms: float | None = None
    predicted_latency_ms: float | None = None
    search_metric: float | None = None
    select_metric: float | None = None
    verify_metric: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelFigures:
        return cls(**{f.name: _number(data.get(f.name)) for f in fields(cls)})


@dataclass(frozen=True)
class Attempt:
    """One candidate fine-tuned and verified."""

    trial: int | None
    ranks: Mapping[str, Any]
    search_drop: float | None
    verify_drop: float | None
    interval: tuple[float, float] | None
    meets_budget: bool | None
    family: str | None = None
    start: str | None = None  # the factors the fine-tune started from: "svd" or "search"
    start_drop: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Attempt:
        ranks = data.get("ranks")
        held = data.get("meets_budget")
        family, start = data.get("family"), data.get("start")
        return cls(trial=_integer(data.get("trial")), ranks=ranks if isinstance(ranks, Mapping) else {},
                   family=family if isinstance(family, str) else None,
                   start=start if isinstance(start, str) else None, start_drop=_number(data.get("start_drop")),
                   search_drop=_number(data.get("search_drop")),
                   # The final model's drop is its test verdict; a fine-tuned attempt's is its selection score.
                   verify_drop=_number(data.get("verify_drop", data.get("select_drop"))),
                   interval=_interval_of(data.get("verify_drop_interval", data.get("select_drop_interval"))),
                   meets_budget=held if isinstance(held, bool) else None)


@dataclass(frozen=True)
class Final:
    """The kept (or, when none held, the last tried) configuration."""

    figures: ModelFigures
    attempt: Attempt
    full_ranks: Mapping[str, Any]
    speedup: float | None
    predicted_speedup: float | None


@dataclass(frozen=True)
class TrialCounts:
    """Search trials by how they ended; ``duplicates`` are among the complete and pruned ones."""

    complete: int
    pruned: int
    failed: int
    duplicates: int

    def sentence(self) -> str:
        total = self.complete + self.pruned + self.failed
        text = (f"{total} trial{'s' if total != 1 else ''}: {self.complete} complete, {self.pruned} stopped early "
                f"(certain to exceed the budget), {self.failed} failed")
        if self.duplicates:
            text += (f"; {self.duplicates} of them repeated an earlier configuration and reused its result "
                     "instead of being evaluated again")
        return text + "."


@dataclass(frozen=True)
class Report:
    """A report dict, typed: what both renderings read. Odd or missing values become None."""

    budget: str
    allowed_drop: float | None
    search_budget: str | None  # the search's constraint before fine-tuning
    search_allowed_drop: float | None
    metric: str
    objective: str
    meets_budget: bool
    warnings: tuple[str, ...]
    dense: ModelFigures | None
    final: Final | None
    layers: tuple[str, ...]
    attempts: tuple[Attempt, ...]
    counts: TrialCounts | None
    trials: tuple[TrialPoint, ...]
    unplotted: int  # trials without a finite cost or drop
    trials_recorded: bool
    front: tuple[int, ...]
    search_split: str | None
    select_split: str | None
    verify_split: str | None
    threads: int | None
    batch_size: int | None
    settings: tuple[tuple[str, str], ...]
    paths: Mapping[str, str]

    @classmethod
    def from_dict(cls, report: Mapping[str, Any]) -> Report:
        dense, final, splits = _section(report, "dense"), _section(report, "final"), _section(report, "splits")
        trials, unplotted = [], 0
        for row in _entries(report, "trials"):
            cost, drop, number = _number(row.get("cost")), _number(row.get("drop")), _integer(row.get("number"))
            if cost is None or drop is None or number is None:
                unplotted += 1
            else:
                trials.append(TrialPoint(number, cost, drop, row.get("feasible") is True))
        recorded = report.get("pareto")
        front = ([n for n in recorded if _integer(n) is not None] if isinstance(recorded, list)
                 else feasible_front(trials))
        ranks, full = _section(final, "ranks"), _section(final, "full_ranks")
        order = report.get("layer_order")
        layers = [n for n in order if isinstance(n, str)] if isinstance(order, list) else []
        layers += [n for n in dict.fromkeys((*full, *ranks)) if n not in layers]
        counts = _section(report, "trial_counts")
        count_values = [_integer(counts.get(f.name)) for f in fields(TrialCounts)]
        # The required keys are checked when a report is written or loaded; one in memory may lack them.
        budget, allowed = str(report.get("budget", MISSING)), _number(report.get("allowed_drop"))
        metric, objective = str(report.get("metric", "accuracy")), str(report.get("objective", MISSING))
        settings = (("Budget", f"{budget} (allowed drop {points(allowed)})"),
                    ("Metric", metric), ("Objective", objective),
                    ("Search split", splits.get("search")), ("Verify split", splits.get("verify")),
                    ("Device", report.get("device")), ("Threads", report.get("threads")),
                    ("Batch size", report.get("batch_size")), ("Created", report.get("created")),
                    ("lrsearch version", report.get("lrsearch_version")))
        warnings = report.get("warnings")
        return cls(
            budget=budget, allowed_drop=allowed, search_budget=_text_or_none(report.get("search_budget")),
            search_allowed_drop=_number(report.get("search_allowed_drop")), metric=metric, objective=objective,
            meets_budget=report.get("meets_budget") is True,
            warnings=tuple(str(w) for w in warnings) if isinstance(warnings, list) else (),
            dense=ModelFigures.from_dict(dense) if dense else None,
            final=Final(ModelFigures.from_dict(final), Attempt.from_dict(final), full,
                        _number(final.get("speedup")), _number(final.get("predicted_speedup"))) if final else None,
            layers=tuple(n for n in layers if n in full or n in ranks),
            attempts=tuple(Attempt.from_dict(a) for a in _entries(report, "attempts")),
            counts=TrialCounts(*count_values) if None not in count_values else None,  # type: ignore[arg-type]
            trials=tuple(trials), unplotted=unplotted, trials_recorded=isinstance(report.get("trials"), list),
            front=tuple(front),
            search_split=_text_or_none(splits.get("search")), select_split=_text_or_none(splits.get("select")),
            verify_split=_text_or_none(splits.get("verify")),
            threads=_integer(report.get("threads")), batch_size=_integer(report.get("batch_size")),
            settings=tuple((k, str(v)) for k, v in settings if v is not None),
            paths={str(k): str(v) for k, v in _section(report, "paths").items()})

    def on(self, split: str | None) -> str:
        """The metric as the user named it, and the split it was measured on: ``val_acc (test split)``."""
        if split is None:
            return self.metric
        base, _, detail = split.partition(" (")
        return f"{self.metric} ({base} split{', ' + detail.rstrip(')') if detail else ''})"

    def headline(self) -> str:
        """The outcome in one sentence, drops in points."""
        allowed = f"the budget {self.budget} allows a drop of {points(self.allowed_drop)}"
        verify = self.on(self.verify_split or "verify")
        if self.meets_budget and self.final:
            attempt = self.final.attempt
            return (f"Trial {plain(attempt.trial)} {change(attempt.verify_drop)} of {verify} after fine-tuning; "
                    f"{allowed}.")
        tried = f" ({len(self.attempts)} tried)" if self.attempts else ""
        return (f"No configuration kept its drop of {verify} within the budget {self.budget} "
                f"({points(self.allowed_drop)}) after fine-tuning{tried}; nothing was saved as compressed.")

    def constraint(self) -> tuple[str, float]:
        """The search's constraint before fine-tuning and its allowed drop; a report written before
        lrsearch recorded it falls back to the budget."""
        if self.search_budget is not None and self.search_allowed_drop is not None:
            return self.search_budget, self.search_allowed_drop
        return self.budget, self.allowed_drop or 0.0

    def pareto_figure(self) -> go.Figure:
        """The trials' cost against drop, the recorded feasible front, the budget and the dense model's cost."""
        dense = self.dense or ModelFigures()
        dense_cost = {"latency": dense.predicted_latency_ms, "macs": dense.macs, "params": dense.params}.get(
            self.objective)
        constraint, constraint_drop = self.constraint()
        return pareto_figure(self.trials, front=set(self.front), constraint=constraint, constraint_drop=constraint_drop,
                             budget=self.budget, budget_drop=self.allowed_drop,
                             cost_title=cost_axis(self.objective)[0], metric=self.metric,
                             dense_cost=dense_cost, final=self.final.attempt.trial if self.final else None)

    def ranks_figure(self) -> go.Figure:
        """The final configuration's rank per layer against the layer's full rank."""
        assert self.final is not None, "drawn only for a report with a final configuration"
        rows = list(rank_rows(self.final.attempt.ranks, self.final.full_ranks, self.layers))
        return ranks_figure(rows, title=f"Ranks of trial {plain(self.final.attempt.trial)}")

    def search_sentence(self) -> str:
        """How many trials the study ran (the search's and the descent's) and how they ended; empty when unknown."""
        if self.counts is not None:
            return "The study ran " + self.counts.sentence()
        if not self.trials_recorded:
            return ""
        return (f"The search recorded {len(self.trials) + self.unplotted} complete trials "
                "(this report does not count those stopped early or failed).")


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def undecided_warning(trial: int, interval: Sequence[float] | None, allowed: float, split: str) -> str | None:
    """The warning for a verified drop whose 95 % interval straddles the allowed drop, else None.

    Then the split is too small to tell whether the budget holds, and the verdict is luck.
    """
    if interval is None or not interval[0] <= allowed < interval[1]:
        return None
    span = interval_text((interval[0], interval[1]))
    return (f"Trial {trial}: the 95 % interval of its drop on the {split} split, {span}, "
            f"contains the allowed drop of {points(allowed)}, so the split is too small to tell whether the budget "
            "holds; a larger verification split would tell.")


def points(value: float | None) -> str:
    return MISSING if value is None else f"{value * 100:.2f} points"


def change(drop: float | None) -> str:
    """``loses 0.31 points`` / ``gains 0.25 points`` of the metric, never a negative loss."""
    if drop is None:
        return "has an unknown change"
    if drop < 0:
        return f"gains {points(-drop)}"
    return f"loses {points(drop)}" if drop > 0 else "loses nothing"


def drop_cell(drop: float | None) -> str:
    """A drop for a table cell: ``0.31 points``, or ``gain of 0.25 points`` when the metric improved."""
    if drop is not None and drop < 0:
        return f"gain of {points(-drop)}"
    return points(drop)


def drop_note(drop: float | None) -> str:
    """A drop in a sentence fragment: ``drop 0.31 points`` or ``gain 0.25 points``."""
    return f"gain {points(-drop)}" if drop is not None and drop < 0 else f"drop {points(drop)}"


def interval_text(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f"{interval[0] * 100:.2f} to {interval[1] * 100:.2f} points"


def percent(value: float | None) -> str:
    return MISSING if value is None else f"{value * 100:.2f}%"


def plain(value: object) -> str:
    return MISSING if value is None else str(value)


def ms(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:.3f} ms" if abs(value) >= 0.1 else f"{value:.3g} ms"


def times(value: float | None, word: str = "") -> str:
    return MISSING if value is None else f"{value:.2f}x{' ' + word if word else ''}"


def ratio(dense: float | None, final: float | None, word: str) -> str:
    return "" if not dense or not final else times(dense / final, word)


def rank_text(value: object) -> str:
    return "(" + ", ".join(map(str, value)) + ")" if isinstance(value, (list, tuple)) else str(value)


def ranks_text(ranks: Mapping[str, Any], layers: Sequence[str]) -> str:
    names = [n for n in layers if n in ranks] + [n for n in ranks if n not in layers]
    return ", ".join(f"{name}={rank_text(ranks[name])}" for name in names) or MISSING
