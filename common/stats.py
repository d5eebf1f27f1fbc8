"""Statistics for reports: accuracy intervals, paired tests, and the bits generalization bound.

Computed with maintained libraries (statsmodels) where one exists, so a reader can check the
method by name: Wilson score intervals, the exact (binomial) McNemar test, and the
Hoeffding-plus-union bound of DESIGN.md §4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from sottovoce.common.errors import ConfigError


def accuracy_interval(
    correct: Sequence[bool], confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(accuracy, low, high)`` with a Wilson score interval at ``confidence``.

    Wilson rather than the normal approximation: it stays inside [0, 1] and keeps its
    coverage near 0% and 100% accuracy and for small test sets.
    """
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    flags = _as_bools(correct, "correct")
    if flags.size == 0:
        raise ConfigError("accuracy_interval needs at least one example")
    hits = int(flags.sum())
    low, high = proportion_confint(hits, flags.size, alpha=1.0 - confidence, method="wilson")
    return hits / flags.size, float(low), float(high)


@dataclass(frozen=True)
class McNemarResult:
    """Paired comparison of two models on the same examples.

    ``improved``: wrong before, right after; ``worsened``: right before, wrong after;
    ``p_value``: exact two-sided binomial McNemar test on those discordant pairs.
    """

    improved: int
    worsened: int
    p_value: float


def mcnemar_pvalue(before: Sequence[bool], after: Sequence[bool]) -> McNemarResult:
    """Exact McNemar test: did the change of model change accuracy on these examples?

    Only the discordant pairs carry information; with none, nothing changed and p = 1.
    """
    old = _as_bools(before, "before")
    new = _as_bools(after, "after")
    if old.shape != new.shape:
        raise ConfigError(
            f"mcnemar_pvalue needs paired results: {old.size} before, {new.size} after"
        )
    improved = int(np.sum(~old & new))
    worsened = int(np.sum(old & ~new))
    if improved + worsened == 0:
        return McNemarResult(improved=0, worsened=0, p_value=1.0)
    table = [[int(np.sum(old & new)), worsened], [improved, int(np.sum(~old & ~new))]]
    result = mcnemar(table, exact=True)
    return McNemarResult(improved=improved, worsened=worsened, p_value=float(result.pvalue))


def generalization_slack(bits: float, n: int, delta: float) -> float:
    """``sqrt((bits * ln 2 + ln(1/delta)) / (2n))``: how far test risk can exceed train risk.

    An optimizer that heard ``bits`` bits can output at most ``2**bits`` models; Hoeffding
    for a loss in [0, 1] on ``n`` examples plus a union bound over those models gives, with
    probability >= 1 - delta, test risk <= train risk + this slack (DESIGN.md §4).
    """
    if n < 1:
        raise ConfigError(f"the bound needs n >= 1 examples, got {n}")
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    if not bits >= 0.0 or math.isinf(bits):
        raise ConfigError(f"bits must be a finite number >= 0, got {bits}")
    return math.sqrt((bits * math.log(2.0) + math.log(1.0 / delta)) / (2.0 * n))


def generalization_bound(train_risk: float, bits: float, n: int, delta: float) -> float:
    """Upper bound on test risk: ``train_risk + generalization_slack(bits, n, delta)``.

    ``train_risk`` must be measured on the same ``n`` examples the answers were computed
    from, with a loss in [0, 1] (e.g. 1 - accuracy). Not clipped at 1, so a vacuous bound
    shows as one.
    """
    if not 0.0 <= train_risk <= 1.0:
        raise ConfigError(f"train_risk must be in [0, 1], got {train_risk}")
    return train_risk + generalization_slack(bits, n, delta)


def _as_bools(values: Sequence[bool], name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ConfigError(f"{name} must be a flat sequence of booleans")
    if array.size and array.dtype != np.bool_:
        if not np.all((array == 0) | (array == 1)):
            raise ConfigError(f"{name} must hold booleans (or 0/1)")
        array = array.astype(bool)
    return array.astype(bool)
