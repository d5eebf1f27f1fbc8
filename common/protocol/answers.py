"""Answers: what each kind of question may be answered with, and what an answer costs.

The one place that knows an answer's encoding and its information cost, for holders,
coordinator, ledger, reports and bounds alike:

* ``compare``: choice 1 if the candidate beat the incumbent, else 0: 1 bit;
* ``best-of``: choice 0 ("keep the incumbent") or 1 + the index of the best candidate:
  log2(lambda + 1) bits (whichever mechanism computed the choice: plain, randomized
  response or chunk votes release one choice all the same);
* ``dp-scalar``: a float32 (32 bits) or, quantized, one of 2**k levels (k bits);
* ``ranking``: the top ``mu`` of the lambda candidates in order (all of them: ``mu = lambda``),
  one of lambda!/(lambda-mu)! orders: log2(lambda!/(lambda-mu)!) bits. Ties are broken
  before release by the fixed rule of :func:`rank_candidates`, so the count is exact; the
  ledger and the journal keep a ranking as its index among those orders (:func:`encode_ranking`).

Which kinds an algorithm asks for is part of what a holder agrees to, so the algorithm
names live here too (the coordinator's strategies register under these names).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from typing import Literal

from sottovoce.common.protocol.limits import FLOAT32_BITS

KEEP_INCUMBENT = 0  # the choice that accepts no candidate


class AnswerKind(StrEnum):
    """What a task asks for; each kind has a fixed information cost (:func:`answer_bits`)."""

    COMPARE = "compare"  # one candidate vs the incumbent: better or not (1 bit)
    BEST_OF = "best-of"  # index of the best of lambda candidates, or none: log2(lambda+1) bits
    DP_SCALAR = "dp-scalar"  # DPZero: clipped, averaged, noised finite difference (32 or k bits)
    RANKING = "ranking"  # top mu of lambda candidates in order: log2(lambda!/(lambda-mu)!) bits


Algorithm = Literal[
    "bboxer-1+1", "bboxer-1+lambda", "dpzero", "cma-es", "cma-diagonal", "es-mu-lambda"
]
ALGORITHM_ANSWER_KINDS: dict[str, AnswerKind] = {
    "bboxer-1+1": AnswerKind.COMPARE,
    "bboxer-1+lambda": AnswerKind.BEST_OF,
    "dpzero": AnswerKind.DP_SCALAR,
    "cma-es": AnswerKind.RANKING,
    "cma-diagonal": AnswerKind.RANKING,
    "es-mu-lambda": AnswerKind.RANKING,
}
EXPLICIT_ALGORITHMS = frozenset({"cma-es", "cma-diagonal"})
"""Algorithms whose candidates and steps are explicit delta vectors, not ``z(seed)``.

CMA's samples come from its own adapted Gaussian, so they cannot follow the public seed
schedule: a holder that allows these lets the coordinator choose its candidates' directions
(bounded in size, in a parametrization of at most ``MAX_EXPLICIT_DIMENSION`` coordinates
it pins). The seed-based algorithms keep every direction on the schedule.
"""

AnswerMechanism = Literal["plain", "randomized-response", "dp-scalar", "chunk-vote"]
"""How a holder turns its scores into what it releases; a policy names those it allows.

* ``plain``: the true compare / best-of choice. Bounded in bits, but not record-private:
  one record can decide a close comparison.
* ``randomized-response``: the choice under k-ary randomized response (epsilon-DP).
* ``dp-scalar``: DPZero's clipped, Poisson-subsampled, Gaussian-noised finite difference.
* ``chunk-vote``: the compare / best-of choice as the noisy arg-max of K secret, disjoint
  chunks' votes (PATE's GNMax): one record moves one vote, so Gaussian noise on the
  histogram makes the choice (epsilon, delta)-DP. Same bits as a plain choice.
"""
ANSWER_MECHANISMS: tuple[AnswerMechanism, ...] = (
    "plain",
    "randomized-response",
    "dp-scalar",
    "chunk-vote",
)

DIVERGENCE_PENALTY_MECHANISMS: frozenset[AnswerMechanism] = frozenset(
    {"plain", "randomized-response"}
)
"""The mechanisms a fitness with a divergence penalty (``FitnessSpec.kl_weight``) may use.

The penalty reads the same fixed prompts on every answer. A choice's cost does not care
(bits are bits; randomized response is epsilon-DP whatever was computed), but dp-scalar's
accounting assumes each example enters one Poisson-sampled, clipped term of one answer:
a fixed subset read every round breaks that, so it is not allowed there. Nor with chunk
votes: the prompts enter every chunk's score, so one of those records could move every
chunk's vote, where the accounting assumes it moves one (sensitivity sqrt(2)). A ranking
is a "plain" answer, and it may carry the penalty: its bits are exact whatever it orders,
and it orders the same penalized fitness a choice compares (``CandidateEvaluator.rank``).
"""


def answer_mechanism(
    kind: AnswerKind, randomized_response_epsilon: float, chunks: int = 0
) -> AnswerMechanism:
    """The mechanism a run's answers use, from its answer kind and DP settings.

    A spec that sets both chunks and randomized response is refused by the holder's policy
    (``client/policy.py``); here chunk votes win. A ranking is always plain: the policy
    refuses a ranking run that asks for chunks or randomized response, so one that does
    cannot be charged as DP while its ranking leaves unprotected.
    """
    if kind is AnswerKind.DP_SCALAR:
        return "dp-scalar"
    if kind is AnswerKind.RANKING:
        return "plain"  # a ranking is released as it is; the policy refuses DP fields on it
    if chunks > 0:
        return "chunk-vote"
    return "randomized-response" if randomized_response_epsilon > 0 else "plain"


def answer_bits(
    kind: AnswerKind, n_candidates: int, quantization_bits: int = 0, *, rank_depth: int = 0
) -> float:
    """Information cost of one answer: log2 of the number of possible answers.

    A dp-scalar travels as a float32 (at most 32 bits of information), or as one of
    ``2**quantization_bits`` levels when quantized; either way it has a bit cost, so the
    bits-based generalization bound covers DPZero runs too.
    """
    if kind is AnswerKind.COMPARE:
        if n_candidates != 1:
            raise ValueError("a compare task has exactly one candidate")
        return 1.0
    if kind is AnswerKind.BEST_OF:
        return math.log2(n_candidates + 1)
    if kind is AnswerKind.DP_SCALAR:
        if n_candidates != 1:
            raise ValueError("a dp-scalar task has exactly one direction")
        return float(quantization_bits or FLOAT32_BITS)
    if kind is AnswerKind.RANKING:
        return ranking_bits(n_candidates, rank_depth)
    raise ValueError(f"unknown answer kind {kind}")


def choice_outcomes(
    kind: AnswerKind, n_candidates: int, quantization_bits: int = 0, *, rank_depth: int = 0
) -> int:
    """How many choices an answer of ``kind`` may be: they are 0 .. outcomes - 1."""
    if kind is AnswerKind.COMPARE:
        return 2
    if kind is AnswerKind.BEST_OF:
        return n_candidates + 1
    if kind is AnswerKind.RANKING:
        return math.perm(n_candidates, ranked_count(n_candidates, rank_depth))
    return 2**quantization_bits if quantization_bits else 0  # 0: a value, not a choice


def encode_choice(winner: int | None) -> int:
    """The choice for candidate ``winner`` (0-based), or for none: compare and best-of alike."""
    return KEEP_INCUMBENT if winner is None else winner + 1


def decode_choice(choice: int) -> int | None:
    """The 0-based candidate a choice names, or None for "keep the incumbent"."""
    return None if choice == KEEP_INCUMBENT else choice - 1


# -- rankings ------------------------------------------------------------------------------
def ranked_count(n_candidates: int, rank_depth: int) -> int:
    """How many candidates a ranking names: ``rank_depth`` (mu), or all of them when 0."""
    if n_candidates < 2:
        raise ValueError(f"a ranking needs >= 2 candidates, got {n_candidates}")
    if not 0 <= rank_depth <= n_candidates:
        raise ValueError(f"rank depth {rank_depth} is not in 0..{n_candidates} (0 = full)")
    return rank_depth or n_candidates


def ranking_bits(n_candidates: int, rank_depth: int = 0) -> float:
    """log2(lambda! / (lambda - mu)!): the information in a top-mu ranking of lambda.

    A full ranking (mu = lambda) and a top-(lambda - 1) one carry the same bits (the last
    place is implied). lambda = 8 in full: log2(40320) = 15.3 bits.
    """
    mu = ranked_count(n_candidates, rank_depth)
    return math.log2(math.perm(n_candidates, mu))


def rank_candidates(scores: Sequence[float], rank_depth: int = 0) -> tuple[int, ...]:
    """The top-mu candidates by score, best first; ties go to the lower index.

    The fixed tie rule is what makes the released ranking one of exactly
    lambda!/(lambda-mu)! orders: a holder never releases "a tie", whose encoding would
    need more outcomes than the bit count pays for. Scores must be finite.
    """
    values = [float(score) for score in scores]
    if not all(math.isfinite(value) for value in values):
        raise ValueError("rankings need finite scores")
    mu = ranked_count(len(values), rank_depth)
    order = sorted(range(len(values)), key=lambda index: (-values[index], index))
    return tuple(order[:mu])


def check_ranking(ranking: Sequence[int], n_candidates: int, rank_depth: int = 0) -> None:
    """ValueError unless ``ranking`` names ``mu`` distinct candidates of ``0..n-1``."""
    mu = ranked_count(n_candidates, rank_depth)
    if len(ranking) != mu:
        raise ValueError(f"a ranking of {n_candidates} candidates names {mu}, not {len(ranking)}")
    if len(set(ranking)) != len(ranking) or not all(0 <= i < n_candidates for i in ranking):
        raise ValueError(f"a ranking names distinct candidates of 0..{n_candidates - 1}")


def encode_ranking(ranking: Sequence[int], n_candidates: int, rank_depth: int = 0) -> int:
    """The ranking's index in 0 .. lambda!/(lambda-mu)! - 1 (lexicographic, Lehmer code).

    The one integer the ledger and the coordinator's journal keep for a ranking, so every
    plain answer is a choice among :func:`choice_outcomes` values.
    """
    check_ranking(ranking, n_candidates, rank_depth)
    mu = len(ranking)
    remaining = list(range(n_candidates))
    index = 0
    for place, candidate in enumerate(ranking):
        position = remaining.index(candidate)
        index += position * math.perm(n_candidates - place - 1, mu - place - 1)
        remaining.pop(position)
    return index


def decode_ranking(index: int, n_candidates: int, rank_depth: int = 0) -> tuple[int, ...]:
    """The ranking whose :func:`encode_ranking` is ``index``."""
    mu = ranked_count(n_candidates, rank_depth)
    if not 0 <= index < math.perm(n_candidates, mu):
        raise ValueError(f"ranking index {index} is out of range")
    remaining = list(range(n_candidates))
    ranking = []
    for place in range(mu):
        block = math.perm(n_candidates - place - 1, mu - place - 1)
        position, index = divmod(index, block)
        ranking.append(remaining.pop(position))
    return tuple(ranking)
