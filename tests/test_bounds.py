"""The transcript bound: its codes are prefix-free, its kl inversion is right, and it covers.

The coverage test is the one that matters: many simulated runs on a task whose true risk
is known exactly (pure-noise labels: every classifier's true risk is 0.5), each selecting
its model by train risk over 64^24 possible transcripts. The bound may fail in at most a
delta fraction of runs (with a binomial tolerance), and the same test must reject a
bound that drops the union over transcripts.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from sottovoce.common.bounds import (
    Complexity,
    choice_transcript_bits,
    elias_delta_bits,
    fixed_rate_transcript_bits,
    hoeffding_bits_bound,
    kl_bernoulli,
    kl_transcript_bound,
    kl_upper,
    log_xi,
)
from sottovoce.common.errors import ConfigError


def test_elias_delta_is_prefix_free_with_its_known_lengths() -> None:
    assert [elias_delta_bits(v) for v in (1, 2, 3, 4, 7, 8, 16, 100)] == [1, 4, 4, 5, 5, 8, 9, 11]
    assert sum(2.0 ** -elias_delta_bits(v) for v in range(1, 100_000)) <= 1.0


@pytest.mark.parametrize("candidates", [1, 2, 3])
def test_the_transcript_code_satisfies_kraft_over_every_length(candidates: int) -> None:
    """Sum of 2^-L over all transcripts of every length up to 6 stays below 1."""
    total = 0.0
    for rounds in range(7):
        for outcomes in itertools.product(range(candidates + 1), repeat=rounds):
            total += 2.0 ** -choice_transcript_bits(outcomes, candidates)
    assert total <= 1.0


def test_mostly_none_transcripts_cost_far_less_than_the_bits_heard() -> None:
    quiet = [0] * 140 + [3, 1, 0, 2, 0, 0, 5, 0, 0, 0]
    heard = 150 * math.log2(8)  # one holder; the demo's three hear three times this
    assert choice_transcript_bits(quiet, 7) < heard / 4
    assert choice_transcript_bits([1] * 150, 1) < 20  # constant outcomes are cheap too
    assert fixed_rate_transcript_bits(150, 32) == elias_delta_bits(151) + 4800


def test_kl_inverse() -> None:
    for p, budget in [(0.0, 0.1), (0.163, 0.11), (0.5, 0.01), (0.9, 0.5)]:
        q = kl_upper(p, budget)
        assert q >= p and (q == 1.0 or kl_bernoulli(p, q) == pytest.approx(budget, abs=1e-9))
    assert kl_upper(0.3, 0.0) == pytest.approx(0.3)
    assert kl_upper(0.3, 10.0) > 0.9999
    with pytest.raises(ConfigError):
        kl_upper(1.5, 0.1)


def test_xi_is_maurers_sum_and_below_two_sqrt_n() -> None:
    assert math.exp(log_xi(1)) == pytest.approx(2.0)
    assert math.exp(log_xi(2)) == pytest.approx(2.5)  # 1 + 2 * (1/2)^1 * (1/2)^1 + 1
    for n in (8, 100, 1500, 20_000):
        assert math.sqrt(n) <= math.exp(log_xi(n)) <= 2 * math.sqrt(n)


def test_the_demo_figures_the_issue_expects() -> None:
    """Today's demo: 150 rounds, 35 steps accepted among 7 candidates, n = 1500, measured
    test risk 0.163: the old bound is 0.71, the transcript bound about 0.36."""
    rng = np.random.default_rng(0)
    outcomes = [0] * 150
    for position in rng.choice(150, 35, replace=False):
        outcomes[int(position)] = int(rng.integers(1, 8))
    complexity = Complexity(
        transcript_bits=choice_transcript_bits(outcomes, 7),
        grid_bits=0.0,
        heard_bits=1350.0,
        rounds=150,
    )
    assert complexity.old_bound(0.163, 1500, 0.05) == pytest.approx(0.72, abs=0.02)
    assert 0.3 < complexity.bound(0.163, 1500, 0.05) < 0.4


def _selection_runs(
    runs: int, n: int = 100, candidates: int = 63, rounds: int = 24, seed: int = 7
) -> list[tuple[float, float]]:
    """(train risk, transcript bits) of the final model of each simulated (1+lambda) run."""
    rng = np.random.default_rng(seed)
    results = []
    for _ in range(runs):
        labels = rng.integers(0, 2, n)
        incumbent = float((rng.integers(0, 2, n) != labels).mean())
        outcomes = []
        for _ in range(rounds):
            risks = (rng.integers(0, 2, (candidates, n)) != labels).mean(axis=1)
            best = int(np.argmin(risks))
            if risks[best] < incumbent:
                incumbent = float(risks[best])
                outcomes.append(best + 1)
            else:
                outcomes.append(0)
        results.append((incumbent, choice_transcript_bits(outcomes, candidates)))
    return results


def test_the_bound_covers_the_true_risk_and_a_bound_without_the_union_does_not() -> None:
    n, delta, runs = 100, 0.05, 400
    results = _selection_runs(runs, n=n)
    tolerance = 3 * math.sqrt(delta * (1 - delta) / runs)
    violated = np.mean([kl_transcript_bound(r, bits, n, delta) < 0.5 for r, bits in results])
    assert violated <= delta + tolerance
    union_dropped = np.mean([kl_transcript_bound(r, 0.0, n, delta) < 0.5 for r, _ in results])
    assert union_dropped > delta + tolerance  # the same check catches the wrong bound
    assert np.mean([r for r, _ in results]) < 0.36  # selection really did overfit


def test_the_old_bound_is_looser_than_the_new_one_on_the_same_runs() -> None:
    results = _selection_runs(50)
    heard = 24 * math.log2(64)
    for risk, bits in results:
        assert kl_transcript_bound(risk, bits, 100, 0.05) < hoeffding_bits_bound(
            risk, heard, 100, 0.05
        )
