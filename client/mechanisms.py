"""Answer mechanisms: how a holder turns scores on its data into the one thing it releases.

This is the plug point for private answers. A mechanism knows three things:

* ``event``: what one answer is in DP terms (a :mod:`sottovoce.common.accounting` event),
  or None for a plain, bits-only answer; the ledger charges it before the answer leaves;
* ``release``: the answer computed on the examples (the only place data is read);
* ``default``: the answer given when computing it failed after data was read. It must not
  depend on the data, and it goes through the same randomization as a real answer, so a
  coordinator cannot tell a failure from an answer, nor learn anything from either.

A policy names the mechanisms it allows (``answer_mechanisms``, ``require_dp``); the run
spec's answer kind and DP settings pick one
(:func:`sottovoce.common.protocol.answers.answer_mechanism`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from sottovoce.client.evaluator import CandidateEvaluator
from sottovoce.client.private_answers import (
    SecureRandomness,
    noisy_mean,
    quantize,
    randomized_response,
)
from sottovoce.common.accounting import DpEvent, RandomizedResponse, answer_event
from sottovoce.common.data import Record
from sottovoce.common.protocol.answers import AnswerKind, AnswerMechanism, ranked_count
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
    """One way of answering a run's tasks (see the module docstring)."""

    name: ClassVar[AnswerMechanism]

    def __init__(self, spec: RunSpec, rng: SecureRandomness):
        self.spec = spec
        self.rng = rng

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
    cls.name: cls for cls in (PlainChoice, RandomizedResponseChoice, DpScalar)
}


def build_mechanism(spec: RunSpec, rng: SecureRandomness) -> Mechanism:
    """The mechanism a run's answers use (its spec has passed the policy's check)."""
    if spec.answer_kind is AnswerKind.RANKING:
        return PlainRanking(spec, rng)
    return MECHANISMS[spec.mechanism](spec, rng)
