"""Membership-inference attacks and how they are scored.

Two attacks, both black-box on the target model's per-example confidence in the right label:

- **Loss threshold** (Yeom et al., 2018): an example is called a member if the model's loss
  on it is low. Score = the right label's log-probability.
- **Offline LiRA** (Carlini et al., "Membership Inference Attacks From First Principles",
  2022): reference models trained without the target examples give, per example, the
  distribution of the logit-scaled confidence phi = log(p / (1 - p)) on that example when it
  was not trained on. Score = how far the target's phi lies above it, in units of the
  reference models' spread. With few reference models the paper fits one global variance
  instead of one per example; so do we.

Scores are judged the way that community reports them: ROC AUC and the true-positive rate at
a low false-positive rate (1 %, 0.1 %), each with a bootstrap confidence interval. A TPR at
FPR alpha is reported only where the non-members can resolve it (at least 1/alpha of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from sottovoce.common.errors import SottovoceError

Scores = npt.NDArray[np.float64]
DEFAULT_FPRS = (0.01, 0.001)
_MIN_PROB_GAP = 1e-12  # keeps log(p / (1 - p)) finite when p rounds to 1


class AttackError(SottovoceError):
    """The inputs of an attack do not fit (sizes, too few reference models, NaN scores)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95 % confidence interval."""

    value: float
    low: float
    high: float

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "ci95_low": self.low, "ci95_high": self.high}


@dataclass(frozen=True)
class AttackResult:
    """One attack on one model: AUC and TPR at low FPR, with intervals, and the ROC curve."""

    attack: str
    members: int
    nonmembers: int
    auc: Interval
    tpr_at_fpr: dict[float, Interval | None]
    fpr: npt.NDArray[np.float64]
    tpr: npt.NDArray[np.float64]

    def to_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "members": self.members,
            "nonmembers": self.nonmembers,
            "auc": self.auc.to_json(),
            "tpr_at_fpr": {
                f"{alpha:g}": None if value is None else value.to_json()
                for alpha, value in self.tpr_at_fpr.items()
            },
        }


def logit_confidence(log_prob: Scores) -> Scores:
    """phi = log(p / (1 - p)) of the right label, from its log-probability (stable near 1)."""
    log_prob = np.minimum(np.asarray(log_prob, dtype=np.float64), -_MIN_PROB_GAP)
    return log_prob - np.log(-np.expm1(log_prob))


def loss_threshold_scores(target_log_prob: Scores) -> Scores:
    """Higher = more likely a member: the right label's log-probability (minus the loss)."""
    return _finite(np.asarray(target_log_prob, dtype=np.float64), "target log-probabilities")


def offline_lira_scores(target_log_prob: Scores, reference_log_probs: Sequence[Scores]) -> Scores:
    """Offline LiRA with a global variance: (phi_target - mean phi_out) / std of phi_out.

    ``reference_log_probs[k][i]`` is reference model k's log-probability on example i; none
    of the reference models was trained on any example scored here.
    """
    if len(reference_log_probs) < 2:
        raise AttackError("offline LiRA needs at least 2 reference models")
    target = logit_confidence(_finite(np.asarray(target_log_prob), "target log-probabilities"))
    reference = np.stack([logit_confidence(np.asarray(r)) for r in reference_log_probs])
    if reference.shape[1] != target.shape[0]:
        raise AttackError(
            f"reference scores cover {reference.shape[1]} examples, the target {target.shape[0]}"
        )
    _finite(reference, "reference log-probabilities")
    mean_out = reference.mean(axis=0)
    spread = float((reference - mean_out).std(ddof=1)) or 1.0
    return np.asarray((target - mean_out) / spread, dtype=np.float64)


def evaluate_attack(
    attack: str,
    member_scores: Scores,
    nonmember_scores: Scores,
    *,
    fprs: Sequence[float] = DEFAULT_FPRS,
    resamples: int = 1000,
    seed: int = 0,
) -> AttackResult:
    """AUC and TPR at each FPR, with percentile-bootstrap 95 % intervals.

    Members and non-members are resampled independently (two samples); ``seed`` makes the
    intervals reproducible (this is measurement, not privacy noise).
    """
    members = _finite(np.asarray(member_scores, dtype=np.float64), f"{attack} member scores")
    nonmembers = _finite(np.asarray(nonmember_scores, dtype=np.float64), f"{attack} scores")
    if members.size < 2 or nonmembers.size < 2:
        raise AttackError(f"{attack}: needs at least 2 members and 2 non-members")
    labels, scores = _labelled(members, nonmembers)
    fpr, tpr, _ = roc_curve(labels, scores)
    rng = np.random.default_rng(seed)
    auc = _with_interval(_auc, members, nonmembers, resamples, rng)
    at_fpr: dict[float, Interval | None] = {}
    for alpha in fprs:
        if nonmembers.size * alpha < 1.0:
            at_fpr[alpha] = None  # fewer than 1/alpha non-members cannot resolve this FPR
            continue
        at_fpr[alpha] = _with_interval(_tpr_at(alpha), members, nonmembers, resamples, rng)
    return AttackResult(
        attack=attack,
        members=int(members.size),
        nonmembers=int(nonmembers.size),
        auc=auc,
        tpr_at_fpr=at_fpr,
        fpr=fpr.astype(np.float64),
        tpr=tpr.astype(np.float64),
    )


def tpr_at_fpr(members: Scores, nonmembers: Scores, alpha: float) -> float:
    """The highest TPR of any threshold whose FPR is at most ``alpha``."""
    labels, scores = _labelled(members, nonmembers)
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(tpr[fpr <= alpha].max())


def _tpr_at(alpha: float) -> Any:
    def statistic(members: Scores, nonmembers: Scores) -> float:
        return tpr_at_fpr(members, nonmembers, alpha)

    return statistic


def _auc(members: Scores, nonmembers: Scores) -> float:
    labels, scores = _labelled(members, nonmembers)
    return float(roc_auc_score(labels, scores))


def _with_interval(
    statistic: Any, members: Scores, nonmembers: Scores, resamples: int, rng: np.random.Generator
) -> Interval:
    value = float(statistic(members, nonmembers))
    if resamples < 1:
        return Interval(value, value, value)
    result = stats.bootstrap(
        (members, nonmembers),
        statistic,
        n_resamples=resamples,
        vectorized=False,
        paired=False,
        method="percentile",
        random_state=rng,
    )
    low, high = result.confidence_interval
    return Interval(value, float(low), float(high))


def _labelled(members: Scores, nonmembers: Scores) -> tuple[npt.NDArray[np.int64], Scores]:
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)]).astype(np.int64)
    return labels, np.concatenate([members, nonmembers])


def _finite(values: npt.NDArray[Any], what: str) -> Scores:
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise AttackError(f"{what}: {int((~np.isfinite(array)).sum())} values are NaN or inf")
    return array
