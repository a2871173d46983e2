"""Linear-like layer kinds: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's transposed Linear).

Both compute ``x ↦ W x + b`` on the last dimension and become a :class:`LowRankLinear`; only
how the weight is stored differs. lrsearch never imports transformers: its ``Conv1D`` is
recognised by class name, defining module and attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lrsearch.core._conv import ConvRank
from lrsearch.core._factors import MatrixFactors, compute_dtype
from lrsearch.core._geometry import Cost, LayerGeometry
from lrsearch.core._kind import Factors, LayerKind, check_entry, factory_options
from lrsearch.core._linear import LowRankLinear
from lrsearch.core._statistics import LayerStatistics, add_gram

__all__ = ["HF_CONV1D", "LINEAR", "HFConv1DKind", "LinearKind", "hf_conv1d_class"]


class LinearKind(LayerKind):
    """``nn.Linear`` (and subclasses that keep its forward, like attention's ``out_proj``)."""

    name = "linear"
    label = "Linear"
    recipe_type = "linear"
    schemes = ("linear",)
    whitened_schemes = ("linear",)
    low_rank_type = LowRankLinear

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def reference_forward(self, module: nn.Module) -> Callable[..., Any]:
        return nn.Linear.forward

    def features(self, module: nn.Module) -> tuple[int, int, bool]:
        """``(in, out, bias)`` of the dense layer."""
        return module.in_features, module.out_features, module.bias is not None

    def describe(self, module: nn.Module) -> str:
        n, m, _ = self.features(module)
        return f"{self.label} {n}→{m}"

    def full_rank(self, geometry: LayerGeometry, scheme: str) -> ConvRank:
        return min(geometry.in_features, geometry.out_features)

    def geometry(self, module: nn.Module, *, input_shape: tuple[int, ...] = (),
                 output_shape: tuple[int, ...] = (), rows: int = 1) -> LayerGeometry:
        n, m, bias = self.features(module)
        return LayerGeometry(self.name, n, m, bias, rows=rows)

    def dense_cost(self, geometry: LayerGeometry) -> Cost:
        weights = geometry.out_features * geometry.in_features
        return Cost(weights + (geometry.out_features if geometry.bias else 0), weights * geometry.rows)

    def factorized_cost(self, geometry: LayerGeometry, rank: ConvRank, scheme: str) -> Cost:
        weights = int(rank) * (geometry.out_features + geometry.in_features)  # type: ignore[arg-type]
        return Cost(weights + (geometry.out_features if geometry.bias else 0), weights * geometry.rows)

    def accumulate(self, stats: LayerStatistics, module: nn.Module, x: torch.Tensor, *,
                   covariance: bool) -> None:
        rows = x.reshape(-1, x.shape[-1])
        stats.samples += x.shape[0] if x.dim() > 1 else 1
        stats.rows += rows.shape[0]
        stats.input_shape = tuple(x.shape[1:]) if x.dim() > 1 else tuple(x.shape)
        if covariance:
            add_gram(stats, rows.to(compute_dtype(x.device)))

    def output_shape(self, output: torch.Tensor) -> tuple[int, ...]:
        return tuple(output.shape[1:] if output.dim() > 1 else output.shape)

    def weight_matrix(self, module: nn.Module, scheme: str) -> torch.Tensor:
        return module.weight

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return module.bias

    def from_dense(self, module: nn.Module, rank: ConvRank, scheme: str, factors: Factors) -> nn.Module:
        assert isinstance(factors, MatrixFactors), "linear layers are factored as matrices"
        return LowRankLinear.from_weight(self.weight_matrix(module, scheme), self.bias(module), int(rank),  # type: ignore[arg-type]
                                         factors=factors)

    def recipe_entry(self, low_rank: nn.Module) -> dict[str, Any]:
        return {"type": self.recipe_type, "scheme": "linear", "rank": low_rank.rank,
                "in_features": low_rank.in_features, "out_features": low_rank.out_features,
                "bias": low_rank.second.bias is not None}

    def rebuild(self, dense: nn.Module, entry: Mapping[str, Any]) -> nn.Module:
        n, m, bias = self.features(dense)
        check_entry(entry, {"in_features": n, "out_features": m, "bias": bias})
        return LowRankLinear(n, m, int(entry["rank"]), bias=bias, **factory_options(dense))


def hf_conv1d_class(module: nn.Module) -> type[nn.Module] | None:
    """transformers' ``Conv1D`` class if ``module`` is one (or a subclass), without importing transformers."""
    for cls in type(module).__mro__:
        if cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers":
            return cls
    return None


class HFConv1DKind(LinearKind):
    """transformers' ``Conv1D`` (GPT-2, GPT, ...): ``x ↦ x W + b`` with ``W`` stored ``in × out``."""

    name = "hf_conv1d"
    label = "transformers Conv1D"

    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return (hf_conv1d_class(module) is not None and isinstance(weight, torch.Tensor)
                and weight.dim() == 2 and tuple(weight.shape) == (getattr(module, "nx", None),
                                                                  getattr(module, "nf", None)))

    def reference_forward(self, module: nn.Module) -> Callable[..., Any]:
        cls = hf_conv1d_class(module)
        assert cls is not None, "matches() checked the class"
        return cls.forward

    def features(self, module: nn.Module) -> tuple[int, int, bool]:
        return int(module.nx), int(module.nf), module.bias is not None

    def weight_matrix(self, module: nn.Module, scheme: str) -> torch.Tensor:
        return module.weight.T


LINEAR = LinearKind()
HF_CONV1D = HFConv1DKind()
