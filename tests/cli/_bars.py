"""Reading lrsearch's search progress bar back out of captured terminal output."""

from __future__ import annotations

import re

# tqdm's default format: "search (12 resumed):  40%|████      | 24/60 [00:03<00:05, ..., best 1.311 ms (trial 27)]"
_BAR = re.compile(r"search(?: \(\d+ resumed\))?: +\d+%\|[^|\r\n]*\| *(\d+)/(\d+)")


def search_bars(text: str) -> list[list[tuple[int, int]]]:
    """Each search bar in ``text`` as the (count, total) of its renders; a new bar starts when the
    total changes or the count goes back (which is what several bars look like)."""
    bars: list[list[tuple[int, int]]] = []
    for match in _BAR.finditer(text):
        render = (int(match.group(1)), int(match.group(2)))
        if not bars or render[1] != bars[-1][-1][1] or render[0] < bars[-1][-1][0]:
            bars.append([])
        bars[-1].append(render)
    return bars
