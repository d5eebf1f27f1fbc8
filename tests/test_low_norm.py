"""Low-norm candidates: the (1+λ)-ES walk that stays near the base model (LowNormES)."""

from __future__ import annotations

import random

import pytest
import torch

from sottovoce.common.directions import rademacher
from sottovoce.common.protocol.seeds import candidate_seed
from sottovoce.common.steplog import Step
from sottovoce.server.strategies import ComparisonES, RoundAnswers, StepSizeRule
from sottovoce.server.strategies.low_norm import LowNormES

D = 576


def _rule(step: float = 0.05) -> StepSizeRule:
    return StepSizeRule(step=step, min_step=step, max_step=step)


def _walk(optimizer: ComparisonES, rounds: int, dimension: int) -> list[float]:
    """Accept a random candidate every round (a fitness blind to the drift); the RMS of x
    after each round."""
    rng = random.Random(0)
    x = torch.zeros(dimension, dtype=torch.float32)
    rms = []
    for index in range(rounds):
        candidates = optimizer.ask(index)
        vote = 1 + rng.randrange(len(candidates))  # one holder's choice: that candidate
        step = optimizer.tell(RoundAnswers(candidates, {"h": vote})).step
        assert step is not None
        x += step.coefficient * rademacher(step.seed, 0, dimension)
        rms.append(float(x.pow(2).mean().sqrt()))
    if isinstance(optimizer, LowNormES):
        assert torch.equal(x, optimizer.x)  # x tracked by tell() is the replayed log
    return rms


def test_candidates_are_the_most_inward_of_the_pool_and_deterministic() -> None:
    optimizer = LowNormES(run_seed=5, candidates=7, step_rule=_rule(), dimension=D, pool=64)
    optimizer.observe(Step(seed=candidate_seed(9, 0, 0), coefficient=0.25))
    x = optimizer.x.double()
    chosen = optimizer.ask(3)
    assert chosen == optimizer.ask(3)  # a re-asked round carries the same questions
    pool = [candidate_seed(5, 3, i) for i in range(64)]
    alignment = {s: float(rademacher(s, 0, D).double() @ x) for s in pool}
    worst_chosen = max(alignment[c.seed] for c in chosen)
    assert sum(a < worst_chosen for a in alignment.values()) == 6  # the 7 lowest, no other
    assert [pool.index(c.seed) for c in chosen] == sorted(pool.index(c.seed) for c in chosen)
    with pytest.raises(ValueError):
        LowNormES(run_seed=5, candidates=7, step_rule=_rule(), dimension=D, pool=6)


def test_the_walk_is_mean_reverting_where_plain_es_drifts() -> None:
    rounds, dimension = 160, 64
    plain = _walk(ComparisonES(run_seed=1, candidates=7, step_rule=_rule()), rounds, dimension)
    low = LowNormES(run_seed=1, candidates=7, step_rule=_rule(), dimension=dimension, pool=16)
    anchored = _walk(low, rounds, dimension)
    assert plain[-1] == pytest.approx(0.05 * rounds**0.5, rel=0.2)  # step * sqrt(k)
    assert plain[-1] / plain[rounds // 2 - 1] == pytest.approx(2**0.5, rel=0.2)  # still growing
    assert anchored[-1] < plain[-1] / 2
    assert max(anchored[rounds // 2 :]) < 1.2 * max(anchored[: rounds // 2])  # settled
