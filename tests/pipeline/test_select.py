"""Fine-tuning-aware selection: the bisection along the front, and the three data roles."""

from __future__ import annotations

import math

import pytest

from lrsearch.pipeline._select import Bisection


def _judge(holds_from: int, tried: list[int]):
    """Candidates are their front indices; those at ``holds_from`` and dearer hold after fine-tuning."""
    def judge(index: int) -> bool:
        assert index not in tried, "a candidate is never fine-tuned twice"
        tried.append(index)
        return index >= holds_from
    return judge


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 33])
@pytest.mark.parametrize("share", [0.0, 0.3, 0.5, 0.99])
def test_finds_the_cheapest_candidate_that_holds(size: int, share: float) -> None:
    holds_from = min(size - 1, int(share * size))
    tried: list[int] = []
    best, verdicts = Bisection(list(range(size)), max_finetunes=20).run(_judge(holds_from, tried))
    assert best is not None and best.candidate == holds_from
    assert len(tried) <= math.floor(math.log2(size)) + 1
    assert [v.candidate for v in verdicts] == tried


def test_moves_cheaper_after_a_success_and_dearer_after_a_failure() -> None:
    tried: list[int] = []
    Bisection(list(range(15)), max_finetunes=20).run(_judge(10, tried))
    assert tried[0] == 7                       # the middle first
    for previous, current, held in zip(tried, tried[1:], [i >= 10 for i in tried]):
        assert (current < previous) == held    # cheaper (lower index) only after a success


def test_stops_within_its_fine_tune_limit_and_keeps_the_best_so_far() -> None:
    tried: list[int] = []
    best, verdicts = Bisection(list(range(64)), max_finetunes=2).run(_judge(5, tried))
    assert len(tried) == 2 and len(verdicts) == 2
    assert best is not None and best.candidate == min(i for i in tried if i >= 5)


def test_the_last_fine_tune_without_a_success_goes_to_the_dearest_candidate() -> None:
    tried: list[int] = []
    best, _ = Bisection(list(range(64)), max_finetunes=3).run(_judge(62, tried))
    assert tried[-1] == 63 and best is not None and best.candidate == 63


def test_nothing_holds() -> None:
    tried: list[int] = []
    best, verdicts = Bisection(list(range(9)), max_finetunes=10).run(_judge(99, tried))
    assert best is None and tried[-1] == 8 and all(not v.holds for v in verdicts)


def test_empty_front_fine_tunes_nothing() -> None:
    best, verdicts = Bisection([], max_finetunes=3).run(_judge(0, []))
    assert best is None and verdicts == []


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "3"])
def test_limit_is_validated(limit) -> None:
    with pytest.raises(ValueError, match="max_finetunes"):
        Bisection([1, 2], max_finetunes=limit)
