"""Comparison-based optimizers of the BBoxER family, as ask/tell objects.

The coordinator never sees a fitness value: ``tell`` receives only which candidate (if
any) the holders' vote preferred. That is what keeps the information per round to
log2(λ+1) bits. Candidate seeds are derived from the run seed and the round index, so a
restarted coordinator asks exactly the same questions again (and holders answer re-sent
task ids from their ledger cache without paying twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sottovoce.common.messages import Candidate
from sottovoce.common.seeds import candidate_seed
from sottovoce.common.steplog import Step, float32_toward_zero

# One-fifth success rule: multiply the step by SUCCESS_FACTOR on success and by
# FAILURE_FACTOR on failure; at a success rate of 1/5 the step size is stationary.
SUCCESS_FACTOR = 2.0
FAILURE_FACTOR = 2.0 ** (-1.0 / 4.0)


@dataclass
class StepSizeRule:
    """Success-based step-size adaptation (the one-fifth rule), clipped to [min, max]."""

    step: float
    min_step: float
    max_step: float

    def update(self, success: bool) -> None:
        factor = SUCCESS_FACTOR if success else FAILURE_FACTOR
        self.step = min(self.max_step, max(self.min_step, self.step * factor))


class ComparisonES:
    """(1+λ)-ES over directions z(seed); λ = 1 is BBoxER's (1+1)-ES with one-bit answers.

    ``ask`` proposes λ candidates around the incumbent, each ``step * z(seed)``; with
    ``mirrored`` they come in pairs ``+step*z`` and ``-step*z`` of one seed, which halves
    the chance that a good direction is missed by its sign. ``tell`` takes the index of
    the preferred candidate, or None when no candidate beat the incumbent, and returns the
    accepted log step, if any.
    """

    def __init__(
        self,
        *,
        run_seed: int,
        candidates: int,
        step_rule: StepSizeRule,
        mirrored: bool = False,
    ):
        if candidates < 1:
            raise ValueError("need at least one candidate")
        self.run_seed = run_seed
        self.candidates = candidates
        self.mirrored = mirrored
        self.step_rule = step_rule

    @property
    def step(self) -> float:
        return self.step_rule.step

    def ask(self, round_index: int) -> tuple[Candidate, ...]:
        scale = float32_toward_zero(self.step_rule.step)
        if not self.mirrored:
            return tuple(
                Candidate(seed=candidate_seed(self.run_seed, round_index, i), scale=scale)
                for i in range(self.candidates)
            )
        pairs = []  # pair i shares lane i's seed: the holder's schedule knows no other
        for i in range(self.candidates // 2):
            seed = candidate_seed(self.run_seed, round_index, i)
            pairs += [Candidate(seed=seed, scale=scale), Candidate(seed=seed, scale=-scale)]
        return tuple(pairs)

    def tell(self, candidates: tuple[Candidate, ...], winner: int | None) -> Step | None:
        self.step_rule.update(success=winner is not None)
        if winner is None:
            return None
        chosen = candidates[winner]
        return Step(seed=chosen.seed, coefficient=chosen.scale)

    def bits_per_answer(self) -> float:
        """log2 of the number of possible answers: λ candidates or none (1 bit for λ = 1)."""
        return 1.0 if self.candidates == 1 else math.log2(self.candidates + 1)


class DPZero:
    """DPZero's zeroth-order step as an ask/tell object (Zhang et al., ICML 2024).

    ``ask`` gives one direction per round, z(seed) scaled by the smoothing λ: each holder
    evaluates the incumbent at ±λz and answers its clipped, noised finite difference.
    ``tell`` takes the aggregate g of those scalars and returns the step
    ``x <- x - learning_rate * g * z(seed)``: a ``(seed, coefficient)`` in the log like any
    other. The coefficient is clamped to ``max_coefficient`` (post-processing of the
    answers, so free in privacy terms) so that one very noisy round cannot produce a step
    that holders' policies refuse to apply.
    """

    def __init__(
        self, *, run_seed: int, smoothing: float, learning_rate: float, max_coefficient: float
    ):
        if not (smoothing > 0 and learning_rate > 0 and max_coefficient > 0):
            raise ValueError("smoothing, learning_rate and max_coefficient must be > 0")
        self.run_seed = run_seed
        self.smoothing = float32_toward_zero(smoothing)
        self.learning_rate = learning_rate
        self.max_coefficient = max_coefficient

    @property
    def step(self) -> float:
        """The learning rate (journaled where the ES journals its step size)."""
        return self.learning_rate

    def ask(self, round_index: int) -> tuple[Candidate, ...]:
        return (
            Candidate(seed=candidate_seed(self.run_seed, round_index, 0), scale=self.smoothing),
        )

    def tell(self, candidate: Candidate, estimate: float) -> Step | None:
        """The step for the aggregated estimate; None when it rounds to a zero coefficient."""
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
