"""The paired interval of an accuracy drop: what one verification split can and cannot tell."""

from __future__ import annotations

import math

import pytest
import torch

from lrsearch.measure import paired_drop_interval


def _hits(pattern: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in pattern])


def test_identical_predictions_have_no_uncertainty() -> None:
    hits = _hits("1101001110")
    assert paired_drop_interval(hits, hits.clone()) == (0.0, 0.0)


def test_matches_the_normal_interval_of_the_paired_differences() -> None:
    base, candidate = _hits("1111111111" * 20), _hits("1111111110" * 20)  # 20 of 200 lost
    low, high = paired_drop_interval(base, candidate)
    diff = base.double() - candidate.double()
    half = 1.959963984540054 * float(diff.std(unbiased=True)) / math.sqrt(200)
    assert (low, high) == pytest.approx((0.1 - half, 0.1 + half))
    assert paired_drop_interval(base, candidate, confidence=0.5)[1] < high


def test_four_times_the_samples_halve_the_width() -> None:
    base, candidate = _hits("11110111" * 50), _hits("11011101" * 50)
    low, high = paired_drop_interval(base, candidate)
    low4, high4 = paired_drop_interval(base.repeat(4), candidate.repeat(4))
    assert (high4 - low4) == pytest.approx((high - low) / 2, rel=0.01)


def test_paired_is_tighter_than_two_independent_accuracies() -> None:
    """Changed predictions, not the accuracies' own spread, set the width."""
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(2000, generator=generator) < 0.92
    candidate = base.clone()
    candidate[:10] = ~candidate[:10]
    low, high = paired_drop_interval(base, candidate)
    independent = 2 * 1.96 * math.sqrt(2 * 0.92 * 0.08 / 2000)
    assert high - low < independent / 3


@pytest.mark.parametrize(("base", "candidate"), [(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)),
                                                 (torch.ones(0, dtype=torch.bool), torch.ones(0, dtype=torch.bool)),
                                                 (torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool))])
def test_mismatched_or_empty_hit_vectors_are_refused(base: torch.Tensor, candidate: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="two hit vectors of one split"):
        paired_drop_interval(base, candidate)


def test_confidence_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="confidence"):
        paired_drop_interval(_hits("10"), _hits("11"), confidence=1.0)
