"""Report statistics against known values."""

from __future__ import annotations

import math

import pytest

from sottovoce.common.bounds import generalization_slack, hoeffding_bits_bound
from sottovoce.common.errors import ConfigError
from sottovoce.common.stats import (
    McNemarResult,
    accuracy_interval,
    mcnemar_pvalue,
)


def test_wilson_interval_known_values() -> None:
    # 8 of 10 at 95%: Wilson interval (0.4902, 0.9433), e.g. Newcombe (1998) method 3.
    accuracy, low, high = accuracy_interval([True] * 8 + [False] * 2)
    assert accuracy == 0.8
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    # All correct: the interval still has width (unlike the normal approximation).
    accuracy, low, high = accuracy_interval([1] * 20)
    assert accuracy == 1.0 and high == pytest.approx(1.0) and low == pytest.approx(0.8389, abs=1e-4)


def test_wilson_interval_matches_formula_and_narrows_with_confidence() -> None:
    correct = [True] * 805 + [False] * 195
    z = 1.959963984540054
    p, n = 0.805, 1000
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    _, low, high = accuracy_interval(correct)
    assert (low, high) == (pytest.approx(centre - half), pytest.approx(centre + half))
    _, low90, high90 = accuracy_interval(correct, confidence=0.90)
    assert low < low90 < high90 < high


def test_accuracy_interval_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        accuracy_interval([])
    with pytest.raises(ConfigError):
        accuracy_interval([True], confidence=1.0)
    with pytest.raises(ConfigError):
        accuracy_interval([2, 0])


def test_mcnemar_exact_known_values() -> None:
    before = [False] * 5 + [True] + [True] * 10
    after = [True] * 5 + [False] + [True] * 10
    result = mcnemar_pvalue(before, after)
    assert (result.improved, result.worsened) == (5, 1)
    # Two-sided exact binomial: 2 * P(X <= 1), X ~ Bin(6, 1/2) = 2 * 7/64.
    assert result.p_value == pytest.approx(14 / 64)
    assert mcnemar_pvalue(after, before).p_value == pytest.approx(14 / 64)


def test_mcnemar_no_change_and_strong_change() -> None:
    same = [True, False, True]
    assert mcnemar_pvalue(same, same) == McNemarResult(improved=0, worsened=0, p_value=1.0)
    result = mcnemar_pvalue([False] * 12, [True] * 12)
    assert result.improved == 12
    assert result.p_value == pytest.approx(2 * 0.5**12)
    with pytest.raises(ConfigError, match="paired"):
        mcnemar_pvalue([True], [True, False])


def test_generalization_slack_design_example() -> None:
    # The design's example: n = 7,473 GSM8K problems, 300 one-bit comparisons, delta = 0.05.
    slack = generalization_slack(300, 7473, 0.05)
    assert slack == pytest.approx(0.1188, abs=1e-4)
    expected = math.sqrt((300 * math.log(2) + math.log(20)) / (2 * 7473))
    assert slack == pytest.approx(expected, rel=1e-12)
    assert generalization_slack(0, 100, 0.05) == pytest.approx(math.sqrt(math.log(20) / 200))
    assert hoeffding_bits_bound(0.3, 300, 7473, 0.05) == pytest.approx(0.3 + expected)


@pytest.mark.parametrize(
    ("bits", "n", "delta"),
    [(10, 0, 0.05), (10, 100, 0.0), (10, 100, 1.0), (-1, 100, 0.05), (math.nan, 100, 0.05)],
)
def test_generalization_slack_rejects_bad_input(bits: float, n: int, delta: float) -> None:
    with pytest.raises(ConfigError):
        generalization_slack(bits, n, delta)


def test_generalization_bound_rejects_bad_risk() -> None:
    with pytest.raises(ConfigError, match="train_risk"):
        hoeffding_bits_bound(1.5, 10, 100, 0.05)
