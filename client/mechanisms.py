"""Answer mechanisms: how a holder turns scores on its data into the one thing it releases.

This is the plug point for private answers. A mechanism knows three things:

* ``event``: what one answer is in DP terms (a :mod:`sottovoce.common.accounting` event),
  or None for a plain, bits-only answer; the ledger charges it before the answer leaves;
* ``release``: the answer computed on the examples (the only place data is read);
* ``default``: the answer given when computing it failed after data was read. It must not
  depend on the data, and it goes through the same randomization as a real answer, so a
  coordinator cannot tell a failure from an answer, nor learn anything from either.

The mechanisms: the plain choice, the choice under randomized response, DPZero's noised
scalar, and chunk votes (the noisy arg-max of K secret chunks' votes, :class:`ChunkVote`).
A policy names the mechanisms it allows (``answer_mechanisms``, ``require_dp``,
``min_chunks``, ``max_answer_epsilon``); the run spec's answer kind and DP settings pick one
(:func:`sottovoce.common.protocol.answers.answer_mechanism`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from sottovoce.client.dataset_identity import chunk_assignment
from sottovoce.client.evaluator import CandidateEvaluator
from sottovoce.client.private_answers import (
    SecureRandomness,
    noisy_argmax,
    noisy_mean,
    quantize,
    randomized_response,
)
from sottovoce.common.accounting import DpEvent, RandomizedResponse, answer_event
from sottovoce.common.data import Record
from sottovoce.common.protocol.answers import (
    KEEP_INCUMBENT,
    AnswerKind,
    AnswerMechanism,
    choice_outcomes,
    ranked_count,
)
from sottovoce.common.protocol.limits import MAX_ABS_SCALE
from sottovoce.common.protocol.messages import RunSpec, Task
from sottovoce.common.steplog import as_float32


@dataclass(frozen=True)
class Release:
    """What leaves the holder (``choice``, ``value`` or ``ranking``) and what stays (``stats``)."""

    choice: int | None
    value: float | None = None
    stats: dict[str, float] = field(default_factory=dict)
    ranking: tuple[int, ...] | None = None


class ScoringFailed(RuntimeError):
    """The scores are unusable (not finite): the mechanism answers its default instead."""


class Mechanism(ABC):
    """One way of answering a run's tasks (see the module docstring).

    ``record_key`` is the holder's secret key (``holder.key``, the one its ledger ids are
    keyed with); only chunk votes use it, to assign records to chunks.
    """

    name: ClassVar[AnswerMechanism]

    def __init__(self, spec: RunSpec, rng: SecureRandomness, record_key: bytes | None = None):
        self.spec = spec
        self.rng = rng
        self.record_key = record_key

    @abstractmethod
    def event(self, n_candidates: int, sampling_rate: float) -> DpEvent | None:
        """The DP event of one answer with ``n_candidates`` at ``sampling_rate``."""

    @abstractmethod
    def release(
        self, evaluator: CandidateEvaluator, examples: Sequence[Record], task: Task
    ) -> Release:
        """The answer on ``examples``; raises on failure (then :meth:`default` answers)."""

    @abstractmethod
    def default(self, task: Task) -> Release:
        """The data-independent answer after a failure, randomized like a real one."""


class PlainChoice(Mechanism):
    """The true choice: 0 keeps the incumbent, k is candidate k-1 (compare: 1 = better)."""

    name: ClassVar[AnswerMechanism] = "plain"

    def event(self, n_candidates: int, sampling_rate: float) -> DpEvent | None:
        return None

    def release(
        self, evaluator: CandidateEvaluator, examples: Sequence[Record], task: Task
    ) -> Release:
        choice, stats = evaluator.choose(examples, task.candidates, task.answer_kind)
        if not all(math.isfinite(value) for value in stats.values()):
            raise ScoringFailed(f"non-finite scores {stats}")
        return Release(choice=self._randomize(choice, task), stats=stats)

    def default(self, task: Task) -> Release:
        return Release(choice=self._randomize(0, task))

    def _randomize(self, choice: int, task: Task) -> int:
        return choice


class RandomizedResponseChoice(PlainChoice):
    """The choice under k-ary randomized response: epsilon-DP whatever the data."""

    name: ClassVar[AnswerMechanism] = "randomized-response"

    def event(self, n_candidates: int, sampling_rate: float) -> DpEvent | None:
        return answer_event(self.spec.dp, self.spec.answer_kind, n_candidates, None)

    def _randomize(self, choice: int, task: Task) -> int:
        event = answer_event(self.spec.dp, task.answer_kind, len(task.candidates), None)
        if not isinstance(event, RandomizedResponse):  # check_run makes this unreachable
            raise ScoringFailed("the run has no randomized-response epsilon")
        return randomized_response(choice, event, self.rng)


class DpScalar(Mechanism):
    """DPZero: clipped per-example finite differences, averaged, plus Gaussian noise."""

    name: ClassVar[AnswerMechanism] = "dp-scalar"

    def event(self, n_candidates: int, sampling_rate: float) -> DpEvent | None:
        return answer_event(self.spec.dp, AnswerKind.DP_SCALAR, n_candidates, sampling_rate)

    def release(
        self, evaluator: CandidateEvaluator, examples: Sequence[Record], task: Task
    ) -> Release:
        differences, mean_score = evaluator.finite_differences(examples, task.candidates[0])
        stats = {} if mean_score is None else {"incumbent_mean_score": mean_score}
        return self._noised(differences, task, stats)

    def default(self, task: Task) -> Release:
        """No differences at all: the noise alone, as an empty Poisson batch would give."""
        return self._noised([], task, {})

    def _noised(
        self, differences: Sequence[float] | np.ndarray, task: Task, stats: dict[str, float]
    ) -> Release:
        dp = self.spec.dp
        value = noisy_mean(
            differences,
            clip=dp.clip,
            expected_batch=task.batch.batch_size,
            noise_multiplier=dp.noise_multiplier,
            rng=self.rng,
        )
        if dp.quantization_bits:
            level = quantize(value, dp.quantization_bits, dp.quantization_range, self.rng)
            return Release(choice=level, stats=stats)
        # What the wire carries; clamping a DP value is post-processing, free in epsilon.
        clamped = max(-MAX_ABS_SCALE, min(MAX_ABS_SCALE, value))
        return Release(choice=None, value=as_float32(clamped), stats=stats)


class ChunkVote(Mechanism):
    """The choice as the noisy arg-max of K secret chunks' votes (PATE's GNMax).

    Every record belongs to one of K chunks by a keyed hash of the record
    (:func:`~sottovoce.client.dataset_identity.chunk_assignment`). The candidates are scored
    once per record, exactly as for a plain choice (one forward pass per candidate and
    record, none more); each chunk then sums its records' scores per model and votes for
    the candidate with the largest sum if it beats the incumbent's sum, else for keeping
    the incumbent (ties: the lowest index, then "keep"; an empty chunk votes "keep"). The
    holder adds N(0, vote_noise^2) to each count of the K votes and releases the arg-max if
    it leads every other noisy count by more than ``keep_margin``, else "keep"
    (post-processing of the noisy counts; with lambda = 1 this is ``keep_margin`` votes
    added to "keep").

    One record added or removed changes its own chunk's vote only: the histogram moves by
    at most (-1, +1) in two bins, L2 sensitivity sqrt(2), so an answer is the Gaussian event
    :func:`~sottovoce.common.accounting.chunk_vote_event` whatever the coordinator asks.
    """

    name: ClassVar[AnswerMechanism] = "chunk-vote"

    def __init__(self, spec: RunSpec, rng: SecureRandomness, record_key: bytes | None = None):
        super().__init__(spec, rng, record_key)
        if record_key is None:
            raise ValueError("chunk votes need the holder's record key")
        self._key = record_key
        # The chunk of each record of the last example list (the holder passes its one
        # record list in full mode, so the hashes are computed once a run).
        self._assigned: tuple[Sequence[Record], np.ndarray] | None = None

    @property
    def chunks(self) -> int:
        return self.spec.dp.chunks

    def event(self, n_candidates: int, sampling_rate: float) -> DpEvent | None:
        return answer_event(self.spec.dp, self.spec.answer_kind, n_candidates, None)

    def assign(self, examples: Sequence[Record]) -> np.ndarray:
        """Each example's chunk (a keyed hash of the record; see the class docstring)."""
        if self._assigned is None or self._assigned[0] is not examples:
            self._assigned = (examples, chunk_assignment(examples, self._key, self.chunks))
        return self._assigned[1]

    def votes(
        self, incumbent: np.ndarray, per_candidate: Sequence[np.ndarray], chunk_of: np.ndarray
    ) -> np.ndarray:
        """Each chunk's vote (a choice: 0 keeps the incumbent, k is candidate k-1)."""
        return chunk_votes(incumbent, per_candidate, chunk_of, self.chunks)

    def histogram(self, votes: np.ndarray, task: Task) -> np.ndarray:
        """How many chunks voted for each choice: what the noise is added to."""
        outcomes = choice_outcomes(task.answer_kind, len(task.candidates))
        return np.bincount(votes, minlength=outcomes).astype(np.float64)

    def release(
        self, evaluator: CandidateEvaluator, examples: Sequence[Record], task: Task
    ) -> Release:
        incumbent, per_candidate = evaluator.score(examples, task.candidates)
        scores = [incumbent, *per_candidate]
        if not all(np.isfinite(s).all() for s in scores):
            raise ScoringFailed("non-finite scores")
        counts = self.histogram(self.votes(incumbent, per_candidate, self.assign(examples)), task)
        stats = {
            "incumbent_mean_score": float(incumbent.mean()) if len(incumbent) else 0.0,
            "best_candidate_mean": max(float(s.mean()) if len(s) else 0.0 for s in per_candidate),
        }
        return Release(choice=self.noisy_choice(counts), stats=stats)

    def default(self, task: Task) -> Release:
        """Every chunk votes "keep the incumbent", then the same noise: data-independent."""
        outcomes = choice_outcomes(task.answer_kind, len(task.candidates))
        counts = np.zeros(outcomes)
        counts[KEEP_INCUMBENT] = self.chunks
        return Release(choice=self.noisy_choice(counts))

    def noisy_choice(self, counts: np.ndarray) -> int:
        """GNMax on the vote counts, noise from the holder's secure randomness, then the
        keep margin: the winner must lead every other noisy count by it (so noise alone
        seldom accepts a candidate)."""
        dp = self.spec.dp
        return noisy_argmax(counts, dp.vote_noise, self.rng, lead=dp.keep_margin)


def chunk_votes(
    incumbent: np.ndarray,
    per_candidate: Sequence[np.ndarray],
    chunk_of: np.ndarray,
    chunks: int,
) -> np.ndarray:
    """The vote of each of ``chunks`` chunks from per-example scores (see :class:`ChunkVote`).

    Scores are summed per chunk (``np.bincount``), so gathering the chunks' scores costs no
    forward pass beyond the per-example scores a plain choice needs. Candidate k's sum must
    be strictly above the incumbent's to get the vote; among equal best sums the lowest
    index wins.
    """
    sums = [np.bincount(chunk_of, weights=s, minlength=chunks) for s in (incumbent, *per_candidate)]
    candidates = np.stack(sums[1:])  # (lambda, K)
    best = np.argmax(candidates, axis=0)  # first of equal maxima
    better = candidates[best, np.arange(chunks)] > sums[0]
    return np.where(better, best + 1, KEEP_INCUMBENT).astype(np.int64)


class PlainRanking(Mechanism):
    """The true top-mu ranking of a task's candidates (ties to the lower index).

    Bits-only, like :class:`PlainChoice`: log2(lambda!/(lambda-mu)!) bits an answer and no
    DP event (a policy refuses randomized response on rankings). The default after a
    failure is the identity order ``0, 1, ..., mu-1``, which depends on nothing.
    """

    name: ClassVar[AnswerMechanism] = "plain"

    def event(self, n_candidates: int, sampling_rate: float) -> DpEvent | None:
        return None

    def release(
        self, evaluator: CandidateEvaluator, examples: Sequence[Record], task: Task
    ) -> Release:
        try:
            ranking, stats = evaluator.rank(examples, task.candidates, self.spec.rank_depth)
        except ValueError as exc:  # a non-finite mean score
            raise ScoringFailed(str(exc)) from None
        return Release(choice=None, ranking=ranking, stats=stats)

    def default(self, task: Task) -> Release:
        mu = ranked_count(len(task.candidates), self.spec.rank_depth)
        return Release(choice=None, ranking=tuple(range(mu)))


MECHANISMS: dict[AnswerMechanism, type[Mechanism]] = {
    cls.name: cls for cls in (PlainChoice, RandomizedResponseChoice, DpScalar, ChunkVote)
}


def build_mechanism(
    spec: RunSpec, rng: SecureRandomness, record_key: bytes | None = None
) -> Mechanism:
    """The mechanism a run's answers use (its spec has passed the policy's check)."""
    if spec.answer_kind is AnswerKind.RANKING:
        return PlainRanking(spec, rng, record_key)
    return MECHANISMS[spec.mechanism](spec, rng, record_key)
