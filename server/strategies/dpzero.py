"""DPZero's zeroth-order step as an ask/tell strategy (Zhang et al., ICML 2024).

``ask`` gives one direction per round, z(seed) scaled by the smoothing lambda: each holder
evaluates the incumbent at +-lambda z and answers its clipped, noised finite difference.
``tell`` aggregates those scalars (mean, or a robust rule against poisoning) into g and
returns the step ``x <- x - learning_rate * g * z(seed)``: a ``(seed, coefficient)`` in the
log like any other. The coefficient is clamped to ``max_coefficient`` (post-processing of
the answers, so free in privacy terms) so that one very noisy round cannot produce a step
that holders' policies refuse to apply.
"""

from __future__ import annotations

import math

from sottovoce.common.config import RunConfig
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.messages import Candidate
from sottovoce.common.protocol.seeds import candidate_seed
from sottovoce.common.steplog import Step, float32_toward_zero
from sottovoce.server.strategies.aggregation import AggregateRule, aggregate_scalars
from sottovoce.server.strategies.base import RoundAnswers, RoundOutcome, Strategy, register


class DPZero(Strategy):
    """One seeded direction a round; the aggregated finite difference sets the step."""

    answer_kind = AnswerKind.DP_SCALAR

    def __init__(
        self,
        *,
        run_seed: int,
        smoothing: float,
        learning_rate: float,
        max_coefficient: float,
        aggregate: AggregateRule = "mean",
        trim_fraction: float = 0.2,
        weights: dict[str, float] | None = None,
    ):
        if not (smoothing > 0 and learning_rate > 0 and max_coefficient > 0):
            raise ValueError("smoothing, learning_rate and max_coefficient must be > 0")
        self.run_seed = run_seed
        self.smoothing = float32_toward_zero(smoothing)
        self.learning_rate = learning_rate
        self.max_coefficient = max_coefficient
        self.aggregate = aggregate
        self.trim_fraction = trim_fraction
        self.weights = dict(weights or {})

    @property
    def step_size(self) -> float:
        """The learning rate (journaled where the ES journals its step size)."""
        return self.learning_rate

    def ask(self, round_index: int) -> tuple[Candidate, ...]:
        return (
            Candidate(seed=candidate_seed(self.run_seed, round_index, 0), scale=self.smoothing),
        )

    def tell(self, answers: RoundAnswers) -> RoundOutcome:
        estimate = aggregate_scalars(
            answers.values, self.aggregate, weights=self.weights, trim_fraction=self.trim_fraction
        )
        return RoundOutcome.of(self.step_for(answers.candidates[0], estimate), estimate=estimate)

    def step_for(self, candidate: Candidate, estimate: float) -> Step | None:
        """The step for an aggregated estimate; None when it rounds to a zero coefficient."""
        if not math.isfinite(estimate):
            return None
        raw = -self.learning_rate * estimate
        # Toward zero, so a clamped coefficient stays within the cap after float32 rounding.
        coefficient = float32_toward_zero(
            max(-self.max_coefficient, min(self.max_coefficient, raw))
        )
        if coefficient == 0.0:
            return None
        return Step(seed=candidate.seed, coefficient=coefficient)


@register("dpzero")
def dpzero(config: RunConfig, step_size: float | None) -> DPZero:
    return DPZero(
        run_seed=config.run.seed,
        smoothing=config.dpzero.smoothing,
        learning_rate=config.dpzero.learning_rate,
        max_coefficient=config.dpzero.max_coefficient,
        aggregate=config.dpzero.aggregate,
        trim_fraction=config.dpzero.trim_fraction,
        weights=config.server.holder_weights,
    )
