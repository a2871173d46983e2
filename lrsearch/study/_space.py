"""The search space: one categorical Optuna parameter per target layer.

A layer's choices are the aligned ranks that are cheaper than the dense layer (measured
faster, for the latency objective) plus ``"dense"``. A layer with no such rank is not searched
at all: it stays dense, and the space records why. A searched layer also keeps the ranks of the
uniform ladder (:func:`ladder_ranks`) below its break-even rank, even where they were measured
no faster: a person tries them by hand, and fine-tuning may reward one (on the MNIST-1D MLP,
the 40-input first layer at rank 32 recovered about a point more than left dense).

A choice is stored in the study as zero-padded text (``"008"``, ``"120"``, ``"dense"``): the
dashboard sorts a categorical parameter's values as text, so plain integers came out as
96, 80, 72, ..., 248, 24, 224. Padded, they sort by rank with ``"dense"`` last, and the
sampler sees the same categorical as before. An integer distribution would order them too, but
cannot hold exactly these choices (the measured-faster ranks have gaps, and dense sits far
above them). Studies begun with plain integer values keep them (:meth:`SearchSpace.matching`).
Warm starts and everything else speak choices (``8``, ``"dense"``); only Optuna params are encoded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Union

from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial

from lrsearch.core import DENSE, Decomposition, candidate_ranks

__all__ = ["Choice", "LayerSpace", "SearchSpace", "ladder_ranks", "param_name"]

Choice = Union[int, str]
PARAM_PREFIX = "rank:"


def ladder_ranks(step: int, top: int) -> list[int]:
    """One rank for every layer, as a person tries it: 1, 2, 3, 4, 6, 8, 12, ... times ``step``, up to ``top``.

    Each rung is about 1.4x the last (8, 16, 24, 32, 48, 64, 96, ... for a step of 8).
    """
    ladder: set[int] = set()
    power = 1
    while power * step <= top:
        ladder.update(rung for rung in (power * step, 3 * power * step // 2) if rung <= top and rung % step == 0)
        power *= 2
    return sorted(ladder)


def param_name(layer: str) -> str:
    """The Optuna parameter of a layer: its dotted module name, prefixed (stable across runs)."""
    return PARAM_PREFIX + layer


def _encode(scheme: str, rank: int, *, multi_scheme: bool) -> Choice:
    return f"{scheme}:{rank}" if multi_scheme else rank


@dataclass(frozen=True)
class LayerSpace:
    """Choices of one layer, ascending in rank, ``"dense"`` last; ``plain`` stores them unpadded."""

    name: str
    choices: tuple[Choice, ...]
    options: Mapping[Choice, tuple[str, int]]
    plain: bool = False

    @cached_property
    def _codes(self) -> dict[Choice, Choice]:
        """Choice -> Optuna value: the rank zero-padded to the layer's widest rank, ``"dense"`` as is."""
        if self.plain:
            return {choice: choice for choice in self.choices}
        width = len(str(max(rank for _, rank in self.options.values())))
        codes: dict[Choice, Choice] = {DENSE: DENSE}
        for choice, (scheme, rank) in self.options.items():
            codes[choice] = f"{rank:0{width}d}" if isinstance(choice, int) else f"{scheme}:{rank:0{width}d}"
        return codes

    @cached_property
    def _choices_by_value(self) -> dict[Choice, Choice]:
        return {value: choice for choice, value in self._codes.items()}

    @property
    def values(self) -> tuple[Choice, ...]:
        """The Optuna categorical choices, in the order of :attr:`choices`."""
        return tuple(self._codes[choice] for choice in self.choices)

    def encode(self, choice: Choice) -> Choice:
        """The Optuna value of a choice."""
        return self._codes[choice]

    def choice_of(self, value: Any) -> Choice:
        """The choice an Optuna value stands for: the inverse of :meth:`encode`."""
        return self._choices_by_value[value]

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
        below the dense layer's is offered only as a rung of the uniform ladder, and only in a
        layer that has a faster rank.
        """
        layers: dict[str, LayerSpace] = {}
        fixed: dict[str, str] = {}
        for name in decomposition.targets:
            layer_schemes = (schemes or {}).get(name, (decomposition.scheme(name),))
            multi = len(layer_schemes) > 1
            options: dict[Choice, tuple[str, int]] = {}
            rungs: dict[Choice, tuple[str, int]] = {}
            for scheme in layer_schemes:
                ranks = candidate_ranks(decomposition.geometry(name), scheme, multiple=multiple)
                ladder = set(ladder_ranks(multiple, max(ranks, default=0)))
                for rank in ranks:
                    choice = _encode(scheme, rank, multi_scheme=multi)
                    if is_faster is None or is_faster(name, scheme, rank):
                        options[choice] = (scheme, rank)
                    elif rank in ladder:
                        rungs[choice] = (scheme, rank)
            if options:
                options.update(rungs)
            else:
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
            decoded = layer.decode(layer.choice_of(params[param_name(name)]))
            if decoded is not None:
                plan[name] = decoded
        return plan

    def params(self, ranks: Mapping[str, Choice]) -> dict[str, Choice]:
        """Encode a ``{layer: choice}`` allocation as Optuna params (missing layers: dense)."""
        return {param_name(name): layer.encode(ranks.get(name, DENSE)) for name, layer in self.layers.items()}

    def allocation(self, params: Mapping[str, Any]) -> dict[str, Choice]:
        """Decode Optuna params into a ``{layer: choice}`` allocation: the inverse of :meth:`params`."""
        return {name: layer.choice_of(params.get(param_name(name), DENSE)) for name, layer in self.layers.items()}

    def distributions(self) -> dict[str, CategoricalDistribution]:
        """The Optuna distribution of every searched layer's parameter."""
        return {param_name(name): CategoricalDistribution(layer.values) for name, layer in self.layers.items()}

    def matching(self, trials: Iterable[FrozenTrial]) -> SearchSpace:
        """This space in the encoding a study's trials already use, layer by layer.

        A layer whose finished trials hold plain (unpadded) choices, or whose enqueued trials fix
        one, keeps plain values: Optuna refuses a categorical whose choices change.
        """
        trials = list(trials)
        layers = {name: replace(layer, plain=True) if _stored_plain(layer, trials) else layer
                  for name, layer in self.layers.items()}
        return replace(self, layers=layers)

    @staticmethod
    def key(params: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        """A hashable identity of a configuration, for skipping duplicates."""
        return tuple(sorted((name, str(value)) for name, value in params.items()))


def _stored_plain(layer: LayerSpace, trials: list[FrozenTrial]) -> bool:
    """Whether the first trial that says how ``layer`` is stored says: plain choices."""
    name = param_name(layer.name)
    for trial in trials:
        distribution = trial.distributions.get(name)
        if isinstance(distribution, CategoricalDistribution):
            return tuple(distribution.choices) == layer.choices
        fixed = trial.system_attrs.get("fixed_params", {}).get(name)
        if fixed is not None and fixed != DENSE:
            return fixed in layer.choices and fixed not in layer.values
    return False
