"""Combining several holders' DPZero scalars into one estimate (docs/architecture.md).

``mean`` is DPZero's own rule (weighted by the run config's holder weights); it averages
the holders' independent noise too. ``median`` and ``trimmed-mean`` give up a little of
that averaging to stay sane when some holders lie: a poisoned holder can move a mean
arbitrarily far (within the answer's range), but the median of 2k+1 answers only within
the range of the honest ones. The trimmed mean is SciPy's ``trim_mean``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from scipy import stats

AggregateRule = Literal["mean", "median", "trimmed-mean"]


def aggregate_scalars(
    values: Mapping[str, float],
    rule: AggregateRule,
    *,
    weights: Mapping[str, float] | None = None,
    trim_fraction: float = 0.2,
) -> float:
    """The estimate from the holders' answers; needs at least one answer."""
    if not values:
        raise ValueError("no answers to aggregate")
    holders = sorted(values)
    array = np.array([values[h] for h in holders], dtype=np.float64)
    if rule == "mean":
        w = np.array([(weights or {}).get(h, 1.0) for h in holders], dtype=np.float64)
        return float(np.dot(w, array) / w.sum())
    if rule == "median":
        return float(np.median(array))
    if rule == "trimmed-mean":
        return float(stats.trim_mean(array, trim_fraction))
    raise ValueError(f"unknown aggregate rule {rule!r}")
