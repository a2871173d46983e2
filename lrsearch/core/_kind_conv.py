"""Conv layer kinds: ``nn.Conv2d`` (channel, spatial and Tucker-2 schemes) and ``nn.Conv1d`` (channel)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from lrsearch.core._conv import (
    CONV1D_SCHEMES,
    CONV_SCHEMES,
    ConvRank,
    LowRankConv1d,
    LowRankConv2d,
    check_conv_rank,
    conv_full_rank,
    conv_weight_matrix,
    follow_memory_format,
)
from lrsearch.core._factors import compute_dtype, tucker2_factors
from lrsearch.core._geometry import Cost, LayerGeometry, area
from lrsearch.core._kind import Factors, LayerKind, check_entry, factory_options
from lrsearch.core._statistics import LayerStatistics, conv_patches, spatial_gram

__all__ = ["CONV1D", "CONV2D", "Conv1dKind", "Conv2dKind", "ConvKind"]

_MAX_PATCH_ELEMENTS = 1 << 24


class ConvKind(LayerKind):
    """A dense ``nn.Conv1d`` or ``nn.Conv2d`` with ``groups=1``; calibrated on im2col patches."""

    dense_type: ClassVar[type[nn.Conv1d | nn.Conv2d]]
    dims: ClassVar[int]

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, self.dense_type)

    def reference_forward(self, module: nn.Module) -> Callable[..., Any]:
        return self.dense_type.forward

    def shape_reason(self, module: nn.Module) -> str | None:
        if module.groups == 1:
            return None
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} convolution (groups={module.groups}) cannot be factorized correctly"

    def describe(self, module: nn.Module) -> str:
        return (f"{self.label} {module.in_channels}→{module.out_channels}, "
                f"{'×'.join(map(str, module.kernel_size))}")

    # ------------------------------------------------------------------ ranks and cost
    def full_rank(self, geometry: LayerGeometry, scheme: str) -> ConvRank:
        return conv_full_rank(geometry.out_features, geometry.in_features, geometry.kernel_size, scheme)

    def check_rank(self, rank: object, geometry: LayerGeometry, scheme: str, *, what: str) -> ConvRank:
        return check_conv_rank(rank, self.full_rank(geometry, scheme), what=what)

    def geometry(self, module: nn.Module, *, input_shape: tuple[int, ...] = (),
                 output_shape: tuple[int, ...] = (), rows: int = 1) -> LayerGeometry:
        def spatial(shape: tuple[int, ...]) -> tuple[int, ...] | None:
            return tuple(shape[-self.dims:]) if len(shape) > self.dims else None

        return LayerGeometry(self.name, module.in_channels, module.out_channels, module.bias is not None,
                             kernel_size=tuple(module.kernel_size), in_hw=spatial(input_shape),
                             out_hw=spatial(output_shape))

    def dense_cost(self, geometry: LayerGeometry) -> Cost:
        m = geometry.out_features
        weights = m * geometry.in_features * geometry.kernel_area
        out_area = area(geometry.out_hw)
        return Cost(weights + (m if geometry.bias else 0), None if out_area is None else weights * out_area)

    def factorized_cost(self, geometry: LayerGeometry, rank: ConvRank, scheme: str) -> Cost:
        """Cost at ``rank`` (a Tucker-2 int means ``(r, r)`` clipped to the channel counts)."""
        m, n = geometry.out_features, geometry.in_features
        bias = m if geometry.bias else 0
        rank = self.check_rank(rank, geometry, scheme, what="cost model")
        out_area, in_area = area(geometry.out_hw), area(geometry.in_hw)
        if scheme == "channel":
            r = int(rank)  # type: ignore[arg-type]
            first, second = r * n * geometry.kernel_area, m * r
            return Cost(first + second + bias, None if out_area is None else (first + second) * out_area)
        kh, kw = geometry.kernel_size
        if scheme == "spatial":
            r = int(rank)  # type: ignore[arg-type]
            first, second = r * n * kh, m * r * kw
            macs = None
            if geometry.out_hw is not None and geometry.in_hw is not None:
                middle_area = geometry.out_hw[0] * geometry.in_hw[1]
                macs = first * middle_area + second * out_area  # type: ignore[operator]
            return Cost(first + second + bias, macs)
        r_in, r_out = rank  # type: ignore[misc]
        first, core, last = n * r_in, r_in * r_out * kh * kw, r_out * m
        macs = None
        if out_area is not None and in_area is not None:
            macs = first * in_area + (core + last) * out_area
        return Cost(first + core + last + bias, macs)

    # ------------------------------------------------------------------ calibration
    def accumulate(self, stats: LayerStatistics, module: nn.Module, x: torch.Tensor, *,
                   covariance: bool) -> None:
        batched = x if x.dim() == self.dims + 2 else x.unsqueeze(0)
        stats.samples += batched.shape[0]
        stats.input_shape = tuple(batched.shape[1:])
        if not covariance:
            return
        work = compute_dtype(x.device)
        per_chunk = max(1, _MAX_PATCH_ELEMENTS // max(1, batched[:1].numel() * math.prod(module.kernel_size)))
        for chunk in batched.split(per_chunk):
            patches = conv_patches(module, chunk).to(work)
            gram = torch.einsum("bdl,bel->de", patches, patches)
            stats.gram = gram if stats.gram is None else stats.gram + gram
            stats.rows += patches.shape[0] * patches.shape[2]

    def output_shape(self, output: torch.Tensor) -> tuple[int, ...]:
        return tuple(output.shape[1:] if output.dim() == self.dims + 2 else output.shape)

    # ------------------------------------------------------------------ decomposition
    def weight_matrix(self, module: nn.Module, scheme: str) -> torch.Tensor:
        return conv_weight_matrix(module.weight, scheme)

    def whitening_gram(self, module: nn.Module, scheme: str, gram: torch.Tensor) -> torch.Tensor:
        if scheme == "spatial":
            return spatial_gram(gram, module.in_channels, tuple(module.kernel_size))  # type: ignore[arg-type]
        return gram

    def decompose(self, module: nn.Module, scheme: str, *, gram: torch.Tensor | None,
                  ridge: float) -> Factors:
        if scheme == "tucker2":
            return tucker2_factors(module.weight)
        return super().decompose(module, scheme, gram=gram, ridge=ridge)

    def from_dense(self, module: nn.Module, rank: ConvRank, scheme: str, factors: Factors) -> nn.Module:
        return self.low_rank_type.from_dense(module, rank, scheme=scheme, factors=factors)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ serialization
    @staticmethod
    def _layout(conv: nn.Module) -> dict[str, Any]:
        padding = conv.padding if isinstance(conv.padding, str) else [int(p) for p in conv.padding]
        return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
                "kernel_size": [int(k) for k in conv.kernel_size], "stride": [int(s) for s in conv.stride],
                "padding": padding, "dilation": [int(d) for d in conv.dilation],
                "padding_mode": conv.padding_mode, "bias": conv.bias is not None}

    def recipe_entry(self, low_rank: nn.Module) -> dict[str, Any]:
        rank = list(low_rank.rank) if isinstance(low_rank.rank, tuple) else low_rank.rank
        return {"type": self.recipe_type, "scheme": low_rank.scheme, "rank": rank, **self._layout(low_rank)}

    def rebuild(self, dense: nn.Module, entry: Mapping[str, Any]) -> nn.Module:
        check_entry(entry, self._layout(dense))
        rank = entry["rank"]
        layer = self.low_rank_type(dense.in_channels, dense.out_channels, tuple(dense.kernel_size),
                                   tuple(rank) if isinstance(rank, list) else int(rank),
                                   scheme=entry["scheme"], stride=tuple(dense.stride), padding=dense.padding,
                                   dilation=tuple(dense.dilation), bias=dense.bias is not None,
                                   padding_mode=dense.padding_mode, **factory_options(dense))
        return follow_memory_format(layer, dense.weight)


class Conv2dKind(ConvKind):
    name = recipe_type = "conv2d"
    label = "Conv2d"
    schemes = CONV_SCHEMES
    whitened_schemes = ("channel", "spatial")
    low_rank_type = LowRankConv2d
    dense_type = nn.Conv2d
    dims = 2


class Conv1dKind(ConvKind):
    name = recipe_type = "conv1d"
    label = "Conv1d"
    schemes = CONV1D_SCHEMES
    whitened_schemes = CONV1D_SCHEMES
    low_rank_type = LowRankConv1d
    dense_type = nn.Conv1d
    dims = 1


CONV2D = Conv2dKind()
CONV1D = Conv1dKind()
