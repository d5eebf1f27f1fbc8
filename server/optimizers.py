"""Comparison-based optimizers of the BBoxER family, as ask/tell objects.

The coordinator never sees a fitness value: ``tell`` receives only which candidate (if
any) the holders' vote preferred. That is what keeps the information per round to
log2(λ+1) bits. Candidate seeds are derived from the run seed and the round index, so a
restarted coordinator asks exactly the same questions again (and holders answer re-sent
task ids from their ledger cache without paying twice).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch

from sottovoce.common.directions import add_scaled_direction_, rademacher
from sottovoce.common.messages import Candidate
from sottovoce.common.steplog import Step, float32_toward_zero

# One-fifth success rule: multiply the step by SUCCESS_FACTOR on success and by
# FAILURE_FACTOR on failure; at a success rate of 1/5 the step size is stationary.
SUCCESS_FACTOR = 2.0
FAILURE_FACTOR = 2.0 ** (-1.0 / 4.0)


def candidate_seed(run_seed: int, round_index: int, candidate_index: int) -> int:
    """A uint64 direction seed determined by (run seed, round, candidate)."""
    material = struct.pack("<QQQ", run_seed, round_index, candidate_index)
    return int.from_bytes(hashlib.sha256(b"sottovoce-candidate" + material).digest()[:8], "little")


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
        pairs = []
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


class LowNormES(ComparisonES):
    """(1+λ)-ES whose λ candidates are, of ``pool`` seeded directions, the ones that keep the
    incumbent closest to the base model.

    A Rademacher direction moves every coordinate by ±step, and an accepted step keeps the
    part of it that did not help: after k plain steps the log-scales have drifted by about
    step·sqrt(k) per coordinate, which is how the old demo reached factors of 0.03..36. The
    coordinator knows the incumbent x exactly (its own log replayed in the parametrization's
    coordinates), so each round it draws ``pool`` seeds and proposes the λ whose candidate
    ``x + step·z`` has the smallest L2 norm, i.e. the most negative ``<z, x>`` (every z has
    the same norm). The holders still pick among those λ by fitness alone; the walk becomes
    mean-reverting, settling near ``||x|| ≈ step·d / (2c)`` with c the expected most negative
    of the pool's normalized inner products (about 2 for 64), whatever the number of rounds.

    x is the ``scale`` layout: ``add_scaled_direction_(x, seed, 0, coefficient)`` over the
    parametrization's ``dimension``, which a coordinator must be given (it has no model).
    A restarted coordinator rebuilds x by :meth:`observe` of every logged step before asking.
    """

    def __init__(
        self,
        *,
        run_seed: int,
        candidates: int,
        step_rule: StepSizeRule,
        dimension: int,
        pool: int,
    ):
        super().__init__(run_seed=run_seed, candidates=candidates, step_rule=step_rule)
        if dimension < 1 or pool < candidates:
            raise ValueError("need dimension >= 1 and pool >= candidates")
        self.dimension = dimension
        self.pool = pool
        self.x = torch.zeros(dimension, dtype=torch.float32)

    def observe(self, step: Step) -> None:
        """Move x by an accepted (logged) step, exactly as the holders' replay does."""
        add_scaled_direction_(self.x, step.seed, 0, step.coefficient)

    def ask(self, round_index: int) -> tuple[Candidate, ...]:
        scale = float32_toward_zero(self.step_rule.step)
        seeds = [candidate_seed(self.run_seed, round_index, i) for i in range(self.pool)]
        directions = torch.stack([rademacher(seed, 0, self.dimension) for seed in seeds])
        alignment = (directions.double() @ self.x.double()).tolist()
        chosen = sorted(
            sorted(range(self.pool), key=lambda i: (alignment[i], i))[: self.candidates]
        )
        return tuple(Candidate(seed=seeds[i], scale=scale) for i in chosen)

    def tell(self, candidates: tuple[Candidate, ...], winner: int | None) -> Step | None:
        step = super().tell(candidates, winner)
        if step is not None:
            self.observe(step)
        return step
