"""Statistics for reports: accuracy intervals and paired tests.

Computed with maintained libraries (statsmodels) where one exists, so a reader can check the
method by name: Wilson score intervals and the exact (binomial) McNemar test. The
generalization bounds are :mod:`sottovoce.common.bounds`.

statsmodels (with pandas and scipy.stats: about half a second) is imported by the functions
that use it: a holder's process imports this module (through the quality figures) but
computes no report statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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
    from statsmodels.stats.proportion import proportion_confint

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
    from statsmodels.stats.contingency_tables import mcnemar

    result = mcnemar(table, exact=True)
    return McNemarResult(improved=improved, worsened=worsened, p_value=float(result.pvalue))


def _as_bools(values: Sequence[bool], name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ConfigError(f"{name} must be a flat sequence of booleans")
    if array.size and array.dtype != np.bool_:
        if not np.all((array == 0) | (array == 1)):
            raise ConfigError(f"{name} must hold booleans (or 0/1)")
        array = array.astype(bool)
    return array.astype(bool)
