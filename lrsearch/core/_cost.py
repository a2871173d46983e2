"""Analytic cost model: parameters and multiply-adds of a layer, dense and at any rank.

Counts follow ``torch.utils.flop_counter`` (one multiply-add per weight per output position;
bias adds and activations are not counted), so per-layer sums can be checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lrsearch.core._conv import ConvRank, check_conv_rank, conv_full_rank
from lrsearch.core._runtime import (
    ForwardFn,
    batch_size_of,
    default_forward,
    evaluating,
    model_device,
    move_to_device,
)

__all__ = [
    "Cost",
    "LayerGeometry",
    "break_even_rank",
    "candidate_ranks",
    "count_macs",
    "count_params",
    "dense_cost",
    "factorized_cost",
    "full_rank",
    "geometry_of",
    "macs_per_sample",
]


@dataclass(frozen=True)
class Cost:
    """Parameters and multiply-adds per sample; ``macs`` is None when the input shape is unknown."""

    params: int
    macs: int | None

    def cheaper_than(self, other: Cost) -> bool:
        """Strictly fewer parameters and (when both are known) strictly fewer MACs."""
        if self.params >= other.params:
            return False
        return self.macs is None or other.macs is None or self.macs < other.macs


@dataclass(frozen=True)
class LayerGeometry:
    """The shape facts the cost model needs about one Linear or Conv2d layer.

    ``rows`` is the number of input rows per sample for a Linear (tokens for a sequence
    model); ``in_hw``/``out_hw`` are a conv's spatial sizes per sample, ``None`` if unknown.
    """

    kind: Literal["linear", "conv2d"]
    in_features: int
    out_features: int
    bias: bool
    kernel_size: tuple[int, int] = (1, 1)
    rows: int = 1
    in_hw: tuple[int, int] | None = None
    out_hw: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias, "kernel_size": list(self.kernel_size), "rows": self.rows,
                "in_hw": list(self.in_hw) if self.in_hw else None,
                "out_hw": list(self.out_hw) if self.out_hw else None}


def geometry_of(module: nn.Module, *, input_shape: tuple[int, ...] = (),
                output_shape: tuple[int, ...] = (), rows: int = 1) -> LayerGeometry:
    """Geometry of a dense Linear or Conv2d, given per-sample shapes seen during calibration."""
    if isinstance(module, nn.Linear):
        return LayerGeometry("linear", module.in_features, module.out_features,
                             module.bias is not None, rows=rows)
    if isinstance(module, nn.Conv2d):
        in_hw = tuple(input_shape[-2:]) if len(input_shape) >= 2 else None
        out_hw = tuple(output_shape[-2:]) if len(output_shape) >= 2 else None
        return LayerGeometry("conv2d", module.in_channels, module.out_channels,
                             module.bias is not None, kernel_size=tuple(module.kernel_size),  # type: ignore[arg-type]
                             in_hw=in_hw, out_hw=out_hw)  # type: ignore[arg-type]
    raise TypeError(f"no geometry for {type(module).__name__}; expected nn.Linear or nn.Conv2d")


def _area(hw: tuple[int, int] | None) -> int | None:
    return None if hw is None else hw[0] * hw[1]


def full_rank(geometry: LayerGeometry, scheme: str = "channel") -> ConvRank:
    """The rank at which the factorization is exact: ``min(m, n)`` for a Linear."""
    if geometry.kind == "linear":
        return min(geometry.in_features, geometry.out_features)
    return conv_full_rank(geometry.out_features, geometry.in_features, geometry.kernel_size, scheme)


def dense_cost(geometry: LayerGeometry) -> Cost:
    m, n = geometry.out_features, geometry.in_features
    kh, kw = geometry.kernel_size
    weights = m * n * kh * kw
    params = weights + (m if geometry.bias else 0)
    if geometry.kind == "linear":
        return Cost(params, weights * geometry.rows)
    out_area = _area(geometry.out_hw)
    return Cost(params, None if out_area is None else weights * out_area)


def factorized_cost(geometry: LayerGeometry, rank: ConvRank, scheme: str = "channel") -> Cost:
    """Cost of the low-rank replacement at ``rank`` (a Tucker-2 int means ``(r, r)`` clipped)."""
    m, n = geometry.out_features, geometry.in_features
    bias = m if geometry.bias else 0
    if geometry.kind == "linear":
        r = int(rank)  # type: ignore[arg-type]
        weights = r * (m + n)
        return Cost(weights + bias, weights * geometry.rows)
    kh, kw = geometry.kernel_size
    rank = check_conv_rank(rank, full_rank(geometry, scheme), what="cost model")
    out_area, in_area = _area(geometry.out_hw), _area(geometry.in_hw)
    if scheme == "channel":
        r = int(rank)  # type: ignore[arg-type]
        first, second = r * n * kh * kw, m * r
        macs = None if out_area is None else (first + second) * out_area
        return Cost(first + second + bias, macs)
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


def break_even_rank(geometry: LayerGeometry, scheme: str = "channel") -> int:
    """The largest rank whose factorization is strictly cheaper than the dense layer; 0 if none."""
    dense = dense_cost(geometry)
    top = full_rank(geometry, scheme)
    top = max(top) if isinstance(top, tuple) else top
    low, high = 0, top
    while low < high:  # cost grows monotonically with rank, so bisect
        middle = (low + high + 1) // 2
        if factorized_cost(geometry, middle, scheme).cheaper_than(dense):
            low = middle
        else:
            high = middle - 1
    return low


def candidate_ranks(geometry: LayerGeometry, scheme: str = "channel", *, multiple: int = 8) -> list[int]:
    """Ranks worth trying: multiples of ``multiple`` (hardware-friendly) below break-even."""
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1 but got {multiple}.")
    limit = break_even_rank(geometry, scheme)
    return list(range(multiple, limit + 1, multiple))


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, *args: Any, **kwargs: Any) -> int:
    """Multiply-adds of one eval-mode forward call ``model(*args, **kwargs)``.

    Uses ``torch.utils.flop_counter`` (matmuls, convolutions and attention; FLOPs / 2).
    """
    counter = FlopCounterMode(display=False)
    with evaluating(model), torch.no_grad(), counter:
        model(*args, **kwargs)
    return counter.get_total_flops() // 2


def macs_per_sample(model: nn.Module, batch: Any, *, forward: ForwardFn | None = None) -> float:
    """Multiply-adds per sample of feeding ``batch`` to ``model`` (see :func:`count_macs`)."""
    forward = forward or default_forward
    counter = FlopCounterMode(display=False)
    batch = move_to_device(batch, model_device(model))
    with evaluating(model), torch.no_grad(), counter:
        forward(model, batch)
    return counter.get_total_flops() / 2 / batch_size_of(batch)
