"""The shape facts the cost model reads about one layer, and what a layer costs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Cost", "LayerGeometry", "area"]


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
    """The shape facts the cost model needs about one layer.

    ``kind`` names the layer kind (``"linear"``, ``"conv2d"``, ...; see
    :mod:`lrsearch.core._registry`). ``rows`` is the number of input rows per sample for a
    Linear-like layer (tokens for a sequence model); ``in_hw``/``out_hw`` are a conv's spatial
    sizes per sample (one entry per spatial dimension), ``None`` if unknown.
    """

    kind: str
    in_features: int
    out_features: int
    bias: bool
    kernel_size: tuple[int, ...] = (1, 1)
    rows: int = 1
    in_hw: tuple[int, ...] | None = None
    out_hw: tuple[int, ...] | None = None

    @property
    def kernel_area(self) -> int:
        return math.prod(self.kernel_size)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias, "kernel_size": list(self.kernel_size), "rows": self.rows,
                "in_hw": list(self.in_hw) if self.in_hw else None,
                "out_hw": list(self.out_hw) if self.out_hw else None}


def area(hw: tuple[int, ...] | None) -> int | None:
    """Positions per sample of a spatial size, or None when unknown."""
    return None if hw is None else math.prod(hw)
