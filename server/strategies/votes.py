"""Combining several holders' choices into one decision.

Each holder's answer is a vote for one choice (0 = keep the incumbent, k = candidate k-1);
votes are weighted (equal by default, or by the run config's holder weights). Ties keep
the incumbent: a step is taken only when a strict weighted plurality prefers it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from sottovoce.common.protocol.answers import KEEP_INCUMBENT, decode_choice


def weighted_plurality(choices: Mapping[str, int], weights: Mapping[str, float]) -> int:
    """The choice with the largest total weight; keep the incumbent on a tie or no votes."""
    totals: dict[int, float] = defaultdict(float)
    for holder, choice in choices.items():
        totals[choice] += weights.get(holder, 1.0)
    if not totals:
        return KEEP_INCUMBENT
    best = max(totals.values())
    leaders = [choice for choice, total in totals.items() if total == best]
    return leaders[0] if len(leaders) == 1 else KEEP_INCUMBENT


def plurality_winner(choices: Mapping[str, int], weights: Mapping[str, float]) -> int | None:
    """The candidate index the weighted plurality accepts, or None."""
    return decode_choice(weighted_plurality(choices, weights))
