"""The search space: one categorical Optuna parameter per target layer.

A layer's choices are the aligned ranks that are cheaper than the dense layer (measured
faster, for the latency objective) plus ``"dense"``. A layer with no such rank is not searched
at all: it stays dense, and the space records why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from lrsearch.core import DENSE, Decomposition, candidate_ranks

__all__ = ["Choice", "LayerSpace", "SearchSpace", "param_name"]

Choice = Union[int, str]
PARAM_PREFIX = "rank:"


def param_name(layer: str) -> str:
    """The Optuna parameter of a layer: its dotted module name, prefixed (stable across runs)."""
    return PARAM_PREFIX + layer


def _encode(scheme: str, rank: int, *, multi_scheme: bool) -> Choice:
    return f"{scheme}:{rank}" if multi_scheme else rank


@dataclass(frozen=True)
class LayerSpace:
    """Choices of one layer, ascending in rank, ``"dense"`` last."""

    name: str
    choices: tuple[Choice, ...]
    options: Mapping[Choice, tuple[str, int]]

    def decode(self, choice: Choice) -> tuple[str, int] | None:
        """``(scheme, rank)`` of a choice, or None for ``"dense"``."""
        return None if choice == DENSE else self.options[choice]

    def nearest(self, rank: int | None, scheme: str | None = None) -> Choice:
        """The smallest choice whose rank is at least ``rank`` (``"dense"`` when none is)."""
        if rank is None:
            return DENSE
        fitting = [choice for choice, (s, r) in self.options.items()
                   if r >= rank and (scheme is None or s == scheme)]
        return min(fitting, key=lambda choice: self.options[choice][1]) if fitting else DENSE


@dataclass(frozen=True)
class SearchSpace:
    """Per-layer choices, plus the layers left dense with the reason."""

    layers: dict[str, LayerSpace]
    fixed_dense: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, decomposition: Decomposition, *, multiple: int = 8,
              schemes: Mapping[str, tuple[str, ...]] | None = None,
              is_faster: Callable[[str, str, int], bool] | None = None) -> SearchSpace:
        """Choices from the cost model's candidate ranks, filtered by ``is_faster(layer, scheme, rank)``.

        ``is_faster`` is how measured latency enters: a rank whose measured time is not
        below the dense layer's is never offered.
        """
        layers: dict[str, LayerSpace] = {}
        fixed: dict[str, str] = {}
        for name in decomposition.targets:
            layer_schemes = (schemes or {}).get(name, (decomposition.scheme(name),))
            multi = len(layer_schemes) > 1
            options: dict[Choice, tuple[str, int]] = {}
            for scheme in layer_schemes:
                for rank in candidate_ranks(decomposition.geometry(name), scheme, multiple=multiple):
                    if is_faster is None or is_faster(name, scheme, rank):
                        options[_encode(scheme, rank, multi_scheme=multi)] = (scheme, rank)
            if not options:
                fixed[name] = ("no aligned rank is faster than the dense layer" if is_faster
                               else f"no multiple of {multiple} is below the break-even rank")
                continue
            ordered = sorted(options, key=lambda choice: (options[choice][1], options[choice][0]))
            layers[name] = LayerSpace(name, (*ordered, DENSE), options)
        return cls(layers=layers, fixed_dense=fixed)

    def plan(self, params: Mapping[str, Any]) -> dict[str, tuple[str, int]]:
        """Decode Optuna params into ``{layer: (scheme, rank)}`` for the factorized layers."""
        plan: dict[str, tuple[str, int]] = {}
        for name, layer in self.layers.items():
            decoded = layer.decode(params[param_name(name)])
            if decoded is not None:
                plan[name] = decoded
        return plan

    def params(self, ranks: Mapping[str, Choice]) -> dict[str, Choice]:
        """Encode a ``{layer: choice}`` allocation as Optuna params (missing layers: dense)."""
        return {param_name(name): ranks.get(name, DENSE) for name in self.layers}

    def allocation(self, params: Mapping[str, Any]) -> dict[str, Choice]:
        """Decode Optuna params into a ``{layer: choice}`` allocation: the inverse of :meth:`params`."""
        return {name: params.get(param_name(name), DENSE) for name in self.layers}

    @staticmethod
    def key(params: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        """A hashable identity of a configuration, for skipping duplicates."""
        return tuple(sorted((name, str(value)) for name, value in params.items()))
