"""``LowRankLinear``: a dense ``nn.Linear`` replaced by two skinny ones."""

from __future__ import annotations

import torch
from torch import nn

from lrsearch._errors import InvalidRankError, format_problem
from lrsearch.core._factors import MatrixFactors, matrix_factors

__all__ = ["LowRankLinear", "assign_", "check_rank"]


def check_rank(rank: object, max_rank: int, *, what: str) -> int:
    """Validate one integer rank in ``[1, max_rank]``; ``what`` names the layer in the message."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise InvalidRankError(format_problem(
            f"Rank of {what} must be an integer", expected=f"an int in [1, {max_rank}]",
            given=repr(rank)))
    if not 1 <= rank <= max_rank:
        raise InvalidRankError(format_problem(
            f"Rank {rank} is out of range for {what}", expected=f"an int in [1, {max_rank}] (its full rank)",
            given=str(rank), hint="pick a smaller rank, or 'dense' to keep the layer as it is."))
    return rank


def assign_(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``parameter`` without recording autograd history.

    Copying (instead of wrapping ``value`` in a new ``Parameter``) keeps parameters
    trainable even when the factors were computed under ``torch.inference_mode``.
    """
    with torch.no_grad():
        parameter.copy_(value.reshape(parameter.shape))


class LowRankLinear(nn.Module):
    """``x ↦ second(first(x))`` with ``first: in → rank`` (no bias) and ``second: rank → out``.

    Both stages are real ``nn.Linear`` modules, so the layer runs at the speed of two GEMMs
    and trains, quantizes and exports like any other Linear.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_rank(rank, min(in_features, out_features),
                   what=f"LowRankLinear({in_features}→{out_features})")
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    @property
    def rank(self) -> int:
        return self.first.out_features

    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int, *,
                   factors: MatrixFactors | None = None) -> LowRankLinear:
        """Build from a dense Linear; ``factors`` (e.g. whitened) default to its plain SVD."""
        return cls.from_weight(linear.weight, linear.bias, rank, factors=factors)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, rank: int, *,
                    factors: MatrixFactors | None = None) -> LowRankLinear:
        """Build the low-rank form of ``x ↦ x weightᵀ + bias`` (``weight`` is ``out × in``).

        Any layer that computes a linear map (a transposed transformers ``Conv1D``, one
        projection of an attention module) becomes a :class:`LowRankLinear` this way.
        """
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, rank, bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
        if factors is None:
            factors = matrix_factors(weight)
        left, right = factors.truncate(rank)
        assign_(layer.first.weight, right)
        assign_(layer.second.weight, left)
        if bias is not None:
            assign_(layer.second.bias, bias)
        return layer

    def to_dense(self) -> nn.Linear:
        """The equivalent single Linear (same outputs up to float rounding)."""
        weight = self.first.weight
        dense = nn.Linear(self.in_features, self.out_features, bias=self.second.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        assign_(dense.weight, self.second.weight @ self.first.weight)
        if self.second.bias is not None:
            assign_(dense.bias, self.second.bias)
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.second.bias is not None}")
