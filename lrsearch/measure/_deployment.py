"""Latency at every batch size a model is deployed at, combined into one objective.

Per-layer speedups depend strongly on the batch size: a factorized 40→512 first layer of the
MNIST-1D MLP buys 3 % at batch 256 and costs about 10 % at batch 1, where everything is
overhead-bound. A user who serves both sizes names both; each gets its own
:class:`LatencyTable`, and the objective is the weighted mean of the relative latencies
(compressed / dense at that batch size) or their worst case, expressed in seconds of the first
(primary) batch size so that a single batch size gives exactly the table's own prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lrsearch._errors import format_problem
from lrsearch.measure._latency import LatencyTable, LatencyTableError, Plan

__all__ = ["REDUCTIONS", "DeploymentLatency"]

REDUCTIONS = ("mean", "max")
FORMAT = "lrsearch-deployment-latency"


@dataclass(frozen=True)
class DeploymentLatency:
    """One latency table per deployment batch size (the first is the primary one), and how to combine them."""

    tables: tuple[LatencyTable, ...]
    weights: tuple[float, ...]
    reduce: str = "mean"

    def __post_init__(self) -> None:
        if not self.tables or len(self.weights) != len(self.tables):
            raise LatencyTableError(format_problem(
                "A deployment needs one weight per latency table",
                given=f"{len(self.tables)} tables and {len(self.weights)} weights"))
        if self.reduce not in REDUCTIONS:
            raise LatencyTableError(format_problem("Unknown latency reduction", expected=" or ".join(REDUCTIONS),
                                                   given=repr(self.reduce)))
        sizes = [table.batch_size for table in self.tables]
        if len(set(sizes)) != len(sizes):
            raise LatencyTableError(format_problem("Each deployment batch size must appear once",
                                                   given=str(sizes)))

    @classmethod
    def single(cls, table: LatencyTable) -> DeploymentLatency:
        return cls((table,), (1.0,))

    @property
    def primary(self) -> LatencyTable:
        return self.tables[0]

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(table.batch_size for table in self.tables)

    @property
    def threads(self) -> int:
        return self.primary.threads

    @property
    def dense_model(self) -> float:
        """Seconds of the dense model at the primary batch size: the scale of :meth:`predict`."""
        return self.primary.dense_model

    def _normalized(self) -> list[float]:
        total = sum(self.weights)
        return [weight / total for weight in self.weights]

    def predict_each(self, plan: Plan) -> dict[int, float]:
        """Predicted seconds of one forward at each batch size."""
        return {table.batch_size: table.predict(plan) for table in self.tables}

    def predict(self, plan: Plan) -> float:
        """The objective: the combined relative latency times the primary dense latency (seconds)."""
        ratios = [table.predict(plan) / table.dense_model for table in self.tables]
        combined = max(ratios) if self.reduce == "max" else sum(w * r for w, r in zip(self._normalized(), ratios))
        return combined * self.dense_model

    def faster_ranks(self, name: str, scheme: str) -> list[int]:
        """Ranks worth offering: with one table the measured-faster ones; with several, those that
        lower the weighted relative latency (also under ``reduce="max"``, whose worst case no
        single layer decides)."""
        if len(self.tables) == 1:
            return self.primary.faster_ranks(name, scheme)
        weights = self._normalized()

        def change(rank: int) -> float:
            return sum(weight * table.layers[name].calls
                       * (table.factorized_time(name, scheme, rank) - table.layers[name].dense) / table.dense_model
                       for weight, table in zip(weights, self.tables))

        return sorted(rank for rank in self.primary.layers[name].factorized[scheme] if change(rank) < 0)

    def dense_layer(self, name: str) -> float:
        """What the dense layer costs per forward, on the scale of :meth:`predict`."""
        share = sum(weight * table.layers[name].calls * table.layers[name].dense / table.dense_model
                    for weight, table in zip(self._normalized(), self.tables))
        return share * self.dense_model

    def matches(self, *, device: str, threads: int, batch_sizes: Sequence[int],
                layers: Mapping[str, Mapping[str, Any]]) -> bool:
        return (self.batch_sizes == tuple(batch_sizes)
                and all(table.matches(device=device, threads=threads, batch_size=table.batch_size, layers=layers)
                        for table in self.tables))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "reduce": self.reduce, "weights": list(self.weights),
                "tables": [table.to_dict() for table in self.tables]}

    @classmethod
    def from_dict(cls, data: Any) -> DeploymentLatency:
        """Parse :meth:`to_dict` output; a bare table (older studies and files) is a single deployment."""
        if isinstance(data, Mapping) and data.get("format") == FORMAT:
            try:
                return cls(tuple(LatencyTable.from_dict(table) for table in data["tables"]),
                           tuple(float(weight) for weight in data["weights"]), str(data["reduce"]))
            except (KeyError, TypeError, ValueError) as error:
                raise LatencyTableError(format_problem(
                    "The deployment latency is malformed", given=f"{type(error).__name__}: {error}",
                    hint="delete it and measure it again.")) from error
        return cls.single(LatencyTable.from_dict(data))
