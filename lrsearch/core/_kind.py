"""``LayerKind``: everything lrsearch knows about one kind of dense layer, in one object.

Like PEFT's dispatchers, each supported layer type is one entry (see
:mod:`lrsearch.core._kinds`) that answers every question the library asks about it: does a
module belong to the kind and can it be replaced safely, its geometry and cost, which
calibration statistics it needs, how its weight is folded and decomposed, its low-rank
replacement, and how that replacement is written to and rebuilt from a recipe. Targets,
calibration, decomposition, cost, serialization and the latency table only ask the kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from lrsearch._errors import format_problem
from lrsearch.core._conv import ConvRank
from lrsearch.core._factors import MatrixFactors, TuckerFactors, matrix_factors
from lrsearch.core._geometry import Cost, LayerGeometry
from lrsearch.core._linear import check_rank
from lrsearch.core._statistics import LayerStatistics

__all__ = ["Factors", "HostKind", "LayerKind"]

Factors = MatrixFactors | TuckerFactors


class LayerKind(ABC):
    """One kind of dense layer. Subclasses fill in the class attributes and abstract methods.

    ``name`` is the kind's id in geometries and latency tables; ``recipe_type`` the
    ``"type"`` of its recipe entries (kinds whose replacement has the same structure share
    one); ``schemes`` are its factorization schemes, the default first, and
    ``whitened_schemes`` those with a data-aware (whitened) decomposition.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    recipe_type: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]
    whitened_schemes: ClassVar[tuple[str, ...]]
    low_rank_type: ClassVar[type[nn.Module]]

    # ------------------------------------------------------------------ which modules
    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this kind (subclasses included; see :meth:`unsupported_reason`)."""

    @abstractmethod
    def reference_forward(self, module: nn.Module) -> Callable[..., Any]:
        """The ``forward`` the kind's replacement reproduces; a subclass overriding it is refused."""

    def shape_reason(self, module: nn.Module) -> str | None:
        """A kind-specific reason the module cannot be factorized exactly (e.g. grouped convs)."""
        return None

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why ``module`` cannot be replaced without changing what the model computes, or None."""
        if type(module).forward is not self.reference_forward(module):
            return f"{type(module).__name__} overrides forward(), so a replacement could change what it computes"
        weight = getattr(module, "weight", None)
        if isinstance(weight, UninitializedParameter):
            return "lazy module is not initialized yet; run one forward pass first"
        if parametrize.is_parametrized(module):
            return "the module has a parametrization (torch.nn.utils.parametrize)"
        return self.shape_reason(module)

    @abstractmethod
    def describe(self, module: nn.Module) -> str:
        """A short human description, e.g. ``"Linear 64→32"``."""

    # ------------------------------------------------------------------ schemes and ranks
    def scheme(self, scheme: str | None) -> str:
        """The scheme to use: the default for None (and for a kind with a single scheme)."""
        if scheme is None or len(self.schemes) == 1:
            return self.schemes[0]
        if scheme not in self.schemes:
            raise ValueError(format_problem(f"A {self.label} has no scheme {scheme!r}",
                                            expected=f"one of {list(self.schemes)}"))
        return scheme

    @abstractmethod
    def full_rank(self, geometry: LayerGeometry, scheme: str) -> ConvRank:
        """The rank at which the factorization reproduces the layer exactly."""

    def check_rank(self, rank: object, geometry: LayerGeometry, scheme: str, *, what: str) -> ConvRank:
        """Validate ``rank`` for the scheme; an int in ``[1, full rank]`` unless overridden."""
        return check_rank(rank, int(self.full_rank(geometry, scheme)), what=what)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ cost
    @abstractmethod
    def geometry(self, module: nn.Module, *, input_shape: tuple[int, ...] = (),
                 output_shape: tuple[int, ...] = (), rows: int = 1) -> LayerGeometry:
        """The layer's shapes, given per-sample shapes seen during calibration."""

    @abstractmethod
    def dense_cost(self, geometry: LayerGeometry) -> Cost:
        """Parameters and MACs per sample of the dense layer."""

    @abstractmethod
    def factorized_cost(self, geometry: LayerGeometry, rank: ConvRank, scheme: str) -> Cost:
        """Parameters and MACs per sample of the replacement at ``rank``."""

    # ------------------------------------------------------------------ calibration
    @abstractmethod
    def accumulate(self, stats: LayerStatistics, module: nn.Module, x: torch.Tensor, *,
                   covariance: bool) -> None:
        """Record one input ``x`` of the layer (its second moment when ``covariance``)."""

    @abstractmethod
    def output_shape(self, output: torch.Tensor) -> tuple[int, ...]:
        """The per-sample shape of one output."""

    # ------------------------------------------------------------------ decomposition
    @abstractmethod
    def weight_matrix(self, module: nn.Module, scheme: str) -> torch.Tensor:
        """The ``out × in`` matrix the scheme factors as ``left @ right``."""

    def whitening_gram(self, module: nn.Module, scheme: str, gram: torch.Tensor) -> torch.Tensor:
        """The input statistics of :meth:`weight_matrix` (the calibration gram unless the fold differs)."""
        return gram

    def decompose(self, module: nn.Module, scheme: str, *, gram: torch.Tensor | None,
                  ridge: float) -> Factors:
        """Factors from which any rank is a slice: whitened when ``gram`` is given."""
        weight = module.weight
        if gram is not None:
            gram = self.whitening_gram(module, scheme, gram)
        return matrix_factors(self.weight_matrix(module, scheme), gram=gram, ridge=ridge, dtype=weight.dtype)

    @abstractmethod
    def from_dense(self, module: nn.Module, rank: ConvRank, scheme: str, factors: Factors) -> nn.Module:
        """The low-rank replacement of ``module`` at ``rank``, loaded from ``factors``."""

    # ------------------------------------------------------------------ serialization
    @abstractmethod
    def recipe_entry(self, low_rank: nn.Module) -> dict[str, Any]:
        """The JSON recipe entry (primitive types only) of a replacement of type ``low_rank_type``."""

    @abstractmethod
    def rebuild(self, dense: nn.Module, entry: Mapping[str, Any]) -> nn.Module:
        """An untrained replacement of ``dense`` with the structure ``entry`` describes.

        Raises ``ValueError`` when the entry does not fit ``dense``.
        """


class HostKind(ABC):
    """A module lrsearch does not factorize itself but converts, so its sublayers become targets.

    ``nn.MultiheadAttention`` reads its projection weights directly; its explicit form calls
    them as modules. Decomposition works on a copy of the model whose hosts are converted
    (sharing every tensor), and a built model converts only the hosts it factorizes.
    """

    label: ClassVar[str]
    recipe_type: ClassVar[str]
    explicit_type: ClassVar[type[nn.Module]]

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this kind (subclasses included; see :meth:`unsupported_reason`)."""

    @abstractmethod
    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why the host cannot be converted exactly (it then stays as it is), or None."""

    @abstractmethod
    def convert(self, module: nn.Module, *, share: bool) -> nn.Module:
        """The explicit equivalent; ``share=True`` reuses the host's tensors instead of copying them."""

    @abstractmethod
    def recipe_entry(self, explicit: nn.Module) -> dict[str, Any]:
        """The JSON recipe entry of a converted host."""

    @abstractmethod
    def rebuild(self, dense: nn.Module, entry: Mapping[str, Any]) -> nn.Module:
        """An untrained explicit form of ``dense`` as ``entry`` describes it (``ValueError`` if it does not fit)."""


def check_entry(entry: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless the recipe entry holds exactly these geometry values."""
    given = {key: entry[key] for key in wanted}
    if given != dict(wanted):
        raise ValueError(f"the layer is {dict(wanted)} in the model but {given} in the recipe")


def factory_options(module: nn.Module) -> dict[str, Any]:
    """``device=`` and ``dtype=`` of the module's first parameter, for building its replacement."""
    parameter = next(module.parameters())
    return {"device": parameter.device, "dtype": parameter.dtype}
