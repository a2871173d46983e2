"""Fine-tuning-aware selection: the bisection, and the uniform ladder then the cheaper front."""

from __future__ import annotations

import math

import pytest

from lrsearch.pipeline._select import Bisection, Selection


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


LADDER = [("uniform", rank, rank * 10) for rank in (8, 16, 24, 32, 48, 64, 96, 128)]  # (family, rank, cost)


def _cost(candidate: tuple[str, int, int]) -> float:
    return candidate[2]


def _recording(holds, tried: list) -> object:
    def judge(candidate) -> bool:
        assert candidate not in tried, "a candidate is never fine-tuned twice"
        tried.append(candidate)
        return holds(candidate)
    return judge


def test_the_ladder_is_bisected_first_then_only_cheaper_front_candidates() -> None:
    front = [("front", 0, cost) for cost in (50, 150, 250, 300, 400, 900)]
    tried: list = []
    best, verdicts = Selection(LADDER, front, _cost, max_finetunes=6).run(
        _recording(lambda c: c[1] >= 32 if c[0] == "uniform" else c[2] >= 250, tried))
    ladder_tried = [c for c in tried if c[0] == "uniform"]
    assert tried[:len(ladder_tried)] == ladder_tried                  # the ladder comes first
    assert ("uniform", 32, 320) in ladder_tried and ("uniform", 24, 240) in ladder_tried
    assert all(c[2] < 320 for c in tried if c[0] == "front")          # then only what beats its winner
    assert best is not None and best.candidate == ("front", 0, 250)   # the cheapest that held
    assert len(verdicts) == len(tried) <= 6


def test_the_ladders_winner_stands_when_nothing_cheaper_holds() -> None:
    front = [("front", 0, cost) for cost in (50, 100, 200, 900)]
    tried: list = []
    best, _ = Selection(LADDER, front, _cost, max_finetunes=6).run(
        _recording(lambda c: c[0] == "uniform" and c[1] >= 48, tried))
    assert best is not None and best.candidate == ("uniform", 48, 480)
    assert ("front", 0, 900) not in tried                             # dearer than the winner: never tried


@pytest.mark.parametrize("limit", [1, 2, 3, 6, 10])
def test_stays_within_its_limit_and_leaves_the_front_two_fine_tunes(limit: int) -> None:
    front = [("front", 0, cost) for cost in range(5, 400, 5)]
    tried: list = []
    Selection(LADDER, front, _cost, max_finetunes=limit).run(_recording(lambda c: c[2] >= 150, tried))
    assert 1 <= len(tried) <= limit
    if limit >= 3:
        assert sum(c[0] == "front" for c in tried) >= min(2, limit - 1)


def test_rungs_on_the_front_are_left_to_the_ladder() -> None:
    front = [LADDER[0], ("front", 0, 100), LADDER[3], ("front", 0, 500)]
    tried: list = []
    best, _ = Selection(LADDER, front, _cost, max_finetunes=8).run(_recording(lambda c: c[2] >= 320, tried))
    assert tried.count(LADDER[3]) == 1
    assert LADDER[0] not in tried              # narrower than a rung that failed: settled by the ladder
    assert ("front", 0, 100) in tried and best is not None and best.candidate == LADDER[3]


def test_without_a_ladder_the_front_is_bisected_alone() -> None:
    front = [("front", 0, cost) for cost in range(10)]
    tried: list = []
    best, _ = Selection([], front, _cost, max_finetunes=6).run(_recording(lambda c: c[2] >= 6, tried))
    assert best is not None and best.candidate == ("front", 0, 6) and tried[0] == ("front", 0, 4)


def test_when_no_rung_holds_the_whole_front_is_open() -> None:
    front = [("front", 0, cost) for cost in (2000, 3000)]
    tried: list = []
    best, _ = Selection(LADDER[:3], front, _cost, max_finetunes=6).run(_recording(lambda c: c[0] == "front", tried))
    assert best is not None and best.candidate == ("front", 0, 2000)


def test_selection_limit_is_validated() -> None:
    with pytest.raises(ValueError, match="max_finetunes"):
        Selection(LADDER, [], _cost, max_finetunes=0)


def _descent(calls: list, costs: tuple[int, ...] = (300, 290, 280)):
    """A descent that records what it was given and offers ``costs`` below the winner, most cut first."""
    def descend(winner, failed, points):
        calls.append((winner, failed, points))
        return [("descent", winner[1], cost) for cost in sorted(costs)][:points]
    return descend


def test_the_descent_follows_the_ladder_and_starts_from_its_winner() -> None:
    calls: list = []
    tried: list = []
    best, verdicts = Selection(LADDER, [("front", 0, 100)], _cost, max_finetunes=6, descend=_descent(calls)).run(
        _recording(lambda c: c[2] >= 290 if c[0] != "uniform" else c[1] >= 32, tried))
    (winner, failed, points), = calls
    assert winner == ("uniform", 32, 320) and failed == ("uniform", 24, 240)   # the next narrower rung failed
    families = [c[0] for c in tried]
    assert points == 2 ** (6 - families.count("uniform")) - 1                  # what the fine-tunes left can bisect
    assert families == sorted(families, key=["uniform", "descent", "front"].index)
    assert best is not None and best.candidate == ("descent", 32, 290)          # cheaper than the rung, and held
    assert len(verdicts) <= 6


def test_a_descent_that_never_holds_leaves_the_ladders_winner() -> None:
    tried: list = []
    best, _ = Selection(LADDER, [], _cost, max_finetunes=6, descend=_descent([])).run(
        _recording(lambda c: c[0] == "uniform" and c[1] >= 48, tried))
    assert best is not None and best.candidate == ("uniform", 48, 480)
    assert any(c[0] == "descent" for c in tried)


def test_no_descent_without_a_winner_or_without_fine_tunes_left() -> None:
    calls: list = []
    Selection(LADDER, [], _cost, max_finetunes=6, descend=_descent(calls)).run(_recording(lambda c: False, []))
    assert calls == []
    Selection(LADDER, [], _cost, max_finetunes=1, descend=_descent(calls)).run(_recording(lambda c: True, []))
    assert calls == []                        # the one fine-tune went to the ladder


def test_a_descent_point_already_judged_is_not_fine_tuned_again() -> None:
    tried: list = []

    def descend(winner, failed, points):
        return [failed, ("descent", 0, 300)]    # the failed rung again, then a new point

    best, _ = Selection(LADDER, [], _cost, max_finetunes=6, descend=descend).run(
        _recording(lambda c: c[0] == "descent" or c[1] >= 32, tried))
    assert len(tried) == len(set(tried))      # _recording asserts it too
    assert best is not None and best.candidate == ("descent", 0, 300)
