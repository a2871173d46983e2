"""When a partly evaluated trial can no longer meet the budget.

The candidate and the original model are compared on the same samples (paired), so the drop
is an average of per-sample differences ``d_i = base_correct_i − cand_correct_i ∈ {−1, 0, 1}``.
"""

from __future__ import annotations

import torch

from lrsearch.measure import paired_drop

__all__ = ["drop_is_hopeless"]


def drop_is_hopeless(base_correct: torch.Tensor, seen_correct: torch.Tensor, allowed_drop: float, *,
                     z: float = 4.0, min_samples: int = 64) -> bool:
    """True once the full-data drop must exceed, or almost surely exceeds, ``allowed_drop``.

    Two tests, either suffices:

    * certain: even if the candidate is right on every remaining sample the original gets
      wrong, the final drop is above the budget;
    * statistical: after ``min_samples``, the one-sided ``z``-sigma lower bound of the mean
      paired difference is above the budget (z = 4: about 3 in 100,000 per look for a
      trial that would in fact fit). It assumes the batches are in random order.
    """
    total = base_correct.numel()
    seen = seen_correct.numel()
    if seen == 0 or total == 0:
        return False
    diff = base_correct[:seen].double() - seen_correct.double()
    remaining_gain = float((~base_correct[seen:]).sum())
    if (float(diff.sum()) - remaining_gain) / total > allowed_drop:
        return True
    if seen < min_samples or seen == total:
        return False
    mean, error = paired_drop(base_correct[:seen], seen_correct)
    return mean - z * error > allowed_drop
