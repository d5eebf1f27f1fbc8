"""A (1+lambda)-ES that proposes the candidates pulling the model back toward the base.

Kept for the drift study (``bench/sweep_drift.py``, issue 11): it bounded the walk but did
not beat a small step and few rounds on dev, so the default demo does not use it.
"""

from __future__ import annotations

import torch

from sottovoce.common.directions import add_scaled_direction_, rademacher
from sottovoce.common.protocol.messages import Candidate
from sottovoce.common.protocol.seeds import candidate_seed
from sottovoce.common.steplog import Step, float32_toward_zero
from sottovoce.server.strategies.base import RoundAnswers, RoundOutcome
from sottovoce.server.strategies.comparison import ComparisonES, StepSizeRule


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

    Study only (``bench/sweep_drift.py``): it is registered under no algorithm name, and its
    candidates use lanes up to ``pool`` of the seed schedule, so holders must allow
    ``max_lambda >= pool``: choosing among ``pool`` directions a round is a choice the
    holder's policy bounds.
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

    def tell(self, answers: RoundAnswers) -> RoundOutcome:
        outcome = super().tell(answers)
        if outcome.step is not None:
            self.observe(outcome.step)
        return outcome
