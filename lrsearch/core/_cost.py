"""Analytic cost model: parameters and multiply-adds of a layer, dense and at any rank.

Counts follow ``torch.utils.flop_counter`` (one multiply-add per weight per output position;
bias adds and activations are not counted), so per-layer sums can be checked against it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lrsearch.core._conv import ConvRank
from lrsearch.core._geometry import Cost, LayerGeometry
from lrsearch.core._kinds import kind_named, kind_of, supported_labels
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


def geometry_of(module: nn.Module, *, input_shape: tuple[int, ...] = (),
                output_shape: tuple[int, ...] = (), rows: int = 1) -> LayerGeometry:
    """Geometry of a dense layer of a supported kind, given per-sample shapes seen during calibration."""
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"no geometry for {type(module).__name__}; expected one of: {supported_labels()}")
    return kind.geometry(module, input_shape=input_shape, output_shape=output_shape, rows=rows)


def full_rank(geometry: LayerGeometry, scheme: str | None = None) -> ConvRank:
    """The rank at which the factorization is exact: ``min(m, n)`` for a Linear.

    ``scheme`` defaults to the kind's default scheme and is ignored by kinds with one scheme.
    """
    kind = kind_named(geometry.kind)
    return kind.full_rank(geometry, kind.scheme(scheme))


def dense_cost(geometry: LayerGeometry) -> Cost:
    return kind_named(geometry.kind).dense_cost(geometry)


def factorized_cost(geometry: LayerGeometry, rank: ConvRank, scheme: str | None = None) -> Cost:
    """Cost of the low-rank replacement at ``rank`` (a Tucker-2 int means ``(r, r)`` clipped)."""
    kind = kind_named(geometry.kind)
    return kind.factorized_cost(geometry, rank, kind.scheme(scheme))


def break_even_rank(geometry: LayerGeometry, scheme: str | None = None) -> int:
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


def candidate_ranks(geometry: LayerGeometry, scheme: str | None = None, *, multiple: int = 8) -> list[int]:
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
