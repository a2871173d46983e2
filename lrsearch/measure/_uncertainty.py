"""How precisely a verification split measures an accuracy drop.

A 0.5-point budget checked on 2,000 samples sits at the noise floor of the split (one sample is
0.05 points, and a 92 % accuracy has a standard error near 0.6 points), so a drop that "holds"
may not hold on other data. The original and the compressed model are scored on the same
samples, so the drop is the mean of paired per-sample differences ``d_i ∈ {−1, 0, 1}`` and its
uncertainty is that of a mean: far smaller than two independent accuracies would suggest.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from lrsearch._errors import format_problem

__all__ = ["paired_drop", "paired_drop_interval"]


def paired_drop(base_correct: torch.Tensor, candidate_correct: torch.Tensor) -> tuple[float, float]:
    """``(mean, standard error)`` of the accuracy drop from per-sample hits of the same samples."""
    if base_correct.shape != candidate_correct.shape or base_correct.dim() != 1 or base_correct.numel() == 0:
        raise ValueError(format_problem(
            "The paired drop needs two hit vectors of one split",
            given=f"shapes {tuple(base_correct.shape)} and {tuple(candidate_correct.shape)}",
            expected="two non-empty 1-D tensors of the same length"))
    diff = base_correct.double() - candidate_correct.double()
    n = diff.numel()
    spread = float(diff.std(unbiased=True)) if n > 1 else 0.0
    return float(diff.mean()), spread / math.sqrt(n)


def paired_drop_interval(base_correct: torch.Tensor, candidate_correct: torch.Tensor, *,
                         confidence: float = 0.95) -> tuple[float, float]:
    """Normal-approximation ``confidence`` interval of the accuracy drop from per-sample hits.

    Both vectors hold one bool per sample of the same split, in the same order.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1) but got {confidence!r}.")
    mean, error = paired_drop(base_correct, candidate_correct)
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * error
    return mean - half, mean + half
