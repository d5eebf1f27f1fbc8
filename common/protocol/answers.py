"""Answers: what each kind of question may be answered with, and what an answer costs.

The one place that knows an answer's encoding and its information cost, for holders,
coordinator, ledger, reports and bounds alike:

* ``compare``: choice 1 if the candidate beat the incumbent, else 0: 1 bit;
* ``best-of``: choice 0 ("keep the incumbent") or 1 + the index of the best candidate:
  log2(lambda + 1) bits (whichever mechanism computed the choice: plain, randomized
  response or chunk votes release one choice all the same);
* ``dp-scalar``: a float32 (32 bits) or, quantized, one of 2**k levels (k bits).

Which kinds an algorithm asks for is part of what a holder agrees to, so the algorithm
names live here too (the coordinator's strategies register under these names).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Literal

from sottovoce.common.protocol.limits import FLOAT32_BITS

KEEP_INCUMBENT = 0  # the choice that accepts no candidate


class AnswerKind(StrEnum):
    """What a task asks for; each kind has a fixed information cost (:func:`answer_bits`)."""

    COMPARE = "compare"  # one candidate vs the incumbent: better or not (1 bit)
    BEST_OF = "best-of"  # index of the best of lambda candidates, or none: log2(lambda+1) bits
    DP_SCALAR = "dp-scalar"  # DPZero: clipped, averaged, noised finite difference (32 or k bits)


Algorithm = Literal["bboxer-1+1", "bboxer-1+lambda", "dpzero"]
ALGORITHM_ANSWER_KINDS: dict[str, AnswerKind] = {
    "bboxer-1+1": AnswerKind.COMPARE,
    "bboxer-1+lambda": AnswerKind.BEST_OF,
    "dpzero": AnswerKind.DP_SCALAR,
}

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
chunk's vote, where the accounting assumes it moves one (sensitivity sqrt(2)).
"""


def answer_mechanism(
    kind: AnswerKind, randomized_response_epsilon: float, chunks: int = 0
) -> AnswerMechanism:
    """The mechanism a run's answers use, from its answer kind and DP settings.

    A spec that sets both chunks and randomized response is refused by the holder's policy
    (``client/policy.py``); here chunk votes win.
    """
    if kind is AnswerKind.DP_SCALAR:
        return "dp-scalar"
    if chunks > 0:
        return "chunk-vote"
    return "randomized-response" if randomized_response_epsilon > 0 else "plain"


def answer_bits(kind: AnswerKind, n_candidates: int, quantization_bits: int = 0) -> float:
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
    raise ValueError(f"unknown answer kind {kind}")


def choice_outcomes(kind: AnswerKind, n_candidates: int, quantization_bits: int = 0) -> int:
    """How many choices an answer of ``kind`` may be: they are 0 .. outcomes - 1."""
    if kind is AnswerKind.COMPARE:
        return 2
    if kind is AnswerKind.BEST_OF:
        return n_candidates + 1
    return 2**quantization_bits if quantization_bits else 0  # 0: a value, not a choice


def encode_choice(winner: int | None) -> int:
    """The choice for candidate ``winner`` (0-based), or for none: compare and best-of alike."""
    return KEEP_INCUMBENT if winner is None else winner + 1


def decode_choice(choice: int) -> int | None:
    """The 0-based candidate a choice names, or None for "keep the incumbent"."""
    return None if choice == KEEP_INCUMBENT else choice - 1
