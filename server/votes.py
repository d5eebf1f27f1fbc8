"""Combining several holders' answers into one decision.

Each holder's answer is a vote for one choice (0 = keep the incumbent, k = candidate k-1);
votes are weighted (equal by default, or by the run config's holder weights). Ties keep
the incumbent: a step is taken only when a strict weighted plurality prefers it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping


def weighted_plurality(choices: Mapping[str, int], weights: Mapping[str, float]) -> int:
    """The choice with the largest total weight; 0 (keep the incumbent) on a tie or no votes."""
    totals: dict[int, float] = defaultdict(float)
    for holder, choice in choices.items():
        totals[choice] += weights.get(holder, 1.0)
    if not totals:
        return 0
    best = max(totals.values())
    leaders = [choice for choice, total in totals.items() if total == best]
    return leaders[0] if len(leaders) == 1 else 0


def winner_index(choice: int) -> int | None:
    """Map an answer choice to a candidate index (None for 'keep the incumbent')."""
    return None if choice == 0 else choice - 1
