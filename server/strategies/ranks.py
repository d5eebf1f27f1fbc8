"""Combining several holders' rankings into one, and what a library optimizer is told.

**Aggregation: Copeland's pairwise-majority rule.** For each pair of candidates (i, j), a
holder prefers i if it ranks i above j, or ranks i and not j (a top-mu ranking puts every
named candidate above the unnamed ones and says nothing between two unnamed ones). i beats
j if the holders preferring i outweigh those preferring j (weights from the run config;
equal by default). A candidate's Copeland score is its wins minus its losses; the
aggregate orders candidates by score, ties to the lower index (a fixed, data-free rule),
and keeps the top mu.

Why Copeland and not Borda: if every honest holder ranks i above j, i beats j as soon as
the honest weight exceeds the liars'. With three or more equal holders and one liar, every
pairwise order the honest holders share survives, so the aggregate keeps any order they all
share (for a top-mu ranking: their shared top mu, in order, since a named candidate beats
all unnamed ones and loses only to those named above it). Borda sums rank points, so one
liar who puts the honest runner-up first and the honest winner last can reverse them
(``tests/test_ranks.py`` shows both). A pairwise majority is also what one comparison bit
is, so the rule is BBoxER's vote carried over to rankings.

**What the optimizer is told.** The coordinator never sees a fitness value. A library such
as pycma wants a "loss" per candidate; it gets :func:`derived_losses`: the aggregated rank
itself (0 for the first, 1 for the second, ...), and ``mu`` for every candidate the
ranking does not name. These are computed from the aggregate alone, and the strategies
configure the library so that the tie among the unnamed cannot matter (their recombination
weight is zero: ``tests/test_cma.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sottovoce.common.protocol.answers import decode_ranking, ranked_count


def copeland_ranking(
    rankings: Mapping[str, Sequence[int]],
    n_candidates: int,
    rank_depth: int = 0,
    weights: Mapping[str, float] | None = None,
) -> tuple[int, ...]:
    """The top-mu aggregate of the holders' top-mu rankings (see the module docstring)."""
    mu = ranked_count(n_candidates, rank_depth)
    weights = weights or {}
    # preference[i][j]: weight of the holders that prefer i to j
    preference = [[0.0] * n_candidates for _ in range(n_candidates)]
    for holder, ranking in rankings.items():
        weight = weights.get(holder, 1.0)
        place = {candidate: position for position, candidate in enumerate(ranking)}
        for i in range(n_candidates):
            for j in range(n_candidates):
                if i != j and _prefers(place, i, j):
                    preference[i][j] += weight
    score = [0] * n_candidates
    for i in range(n_candidates):
        for j in range(n_candidates):
            if preference[i][j] > preference[j][i]:
                score[i] += 1
            elif preference[i][j] < preference[j][i]:
                score[i] -= 1
    order = sorted(range(n_candidates), key=lambda c: (-score[c], c))
    return tuple(order[:mu])


def _prefers(place: Mapping[int, int], i: int, j: int) -> bool:
    if i not in place:
        return False
    return j not in place or place[i] < place[j]


def borda_ranking(rankings: Mapping[str, Sequence[int]], n_candidates: int) -> tuple[int, ...]:
    """Borda's count (lambda - 1 - position points, unnamed 0), ties to the lower index.

    Not used by any strategy: kept so the tests can show the liar that flips it.
    """
    points = [0] * n_candidates
    for ranking in rankings.values():
        for position, candidate in enumerate(ranking):
            points[candidate] += n_candidates - 1 - position
    return tuple(sorted(range(n_candidates), key=lambda c: (-points[c], c)))


def aggregate_choices(
    choices: Mapping[str, int],
    n_candidates: int,
    rank_depth: int = 0,
    weights: Mapping[str, float] | None = None,
) -> tuple[int, ...]:
    """The Copeland aggregate of rankings as the journal keeps them (their indexes)."""
    rankings = {h: decode_ranking(c, n_candidates, rank_depth) for h, c in choices.items()}
    return copeland_ranking(rankings, n_candidates, rank_depth, weights)


def derived_losses(ranking: Sequence[int], n_candidates: int) -> list[float]:
    """Per-candidate "losses" from an aggregated ranking alone: its place, or mu if unnamed."""
    mu = len(ranking)
    losses = [float(mu)] * n_candidates
    for position, candidate in enumerate(ranking):
        losses[candidate] = float(position)
    return losses
