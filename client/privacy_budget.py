"""Can this data set afford a DP run? Decided at join, from the ledger and the declared size.

A coordinator calibrates its noise for the sampling rate it assumes; the holder never takes
that on trust. With its own accountant, its own delta, the sampling rate its policy
declares (``min_examples``, never the real count, so the decision is no oracle on n) and
everything its records have spent (this ledger's other runs and what overlapping ledgers
spent on them), it computes the noise the run's ``max_rounds`` steps would need and refuses
a run that offers less. Each answer is checked against the whole ledger again.
"""

from __future__ import annotations

from sottovoce.client.ledger import Ledger
from sottovoce.common.accounting import (
    Gaussian,
    PoissonGaussian,
    PrivacyAccountant,
    RandomizedResponse,
    answer_event,
    calibrate_noise_multiplier,
)
from sottovoce.common.errors import AccountingError, PolicyViolation, RefusalCode
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.messages import BatchSpec, RunSpec


def declared_sampling_rate(batch: BatchSpec, declared_examples: int) -> float:
    """The Poisson rate every decision assumes: expected batch / the declared size.

    The real rate (expected batch / the real n) is at most this, and a subsampled
    Gaussian's epsilon grows with the rate, so charging at this rate is conservative.
    """
    return min(1.0, batch.batch_size / declared_examples)


def check_run_affordable(spec: RunSpec, ledger: Ledger, declared_examples: int) -> None:
    """Raise ``PolicyViolation`` (over-budget) for a DP run this data set cannot afford."""
    limit = ledger.privacy
    rate = declared_sampling_rate(spec.batch, declared_examples)
    event = answer_event(spec.dp, spec.answer_kind, 1, rate)
    if limit is None or event is None:
        return  # a policy's require_dp refuses non-DP runs in check_run already
    # This run's own earlier answers (a restart, a rejoin) are part of its max_rounds
    # steps, not spending before it: count every other run's answers as prior.
    prior = ledger.dp_events(except_run=spec.run_id)
    base = None if ledger.inherited is None else ledger.inherited.curve
    if isinstance(event, PoissonGaussian):
        try:
            needed = calibrate_noise_multiplier(
                limit.max_epsilon,
                limit.delta,
                spec.max_rounds,
                event.sampling_rate,
                prior,
                base_curve=base,
            )
        except AccountingError as exc:
            raise PolicyViolation(
                f"run {spec.run_id}: this data set cannot afford {spec.max_rounds} DP "
                f"answers at any noise: {exc}",
                RefusalCode.OVER_BUDGET,
            ) from None
        if event.noise_multiplier < needed * (1 - 1e-6):
            spent = PrivacyAccountant(prior, base_curve=base).epsilon(limit.delta)
            raise PolicyViolation(
                f"run {spec.run_id}: noise_multiplier {event.noise_multiplier:.4g} is below "
                f"the {needed:.4g} this data set needs for {spec.max_rounds} steps at its "
                f"declared sampling rate {event.sampling_rate:.4g} (max_epsilon "
                f"{limit.max_epsilon:g} at delta {limit.delta:g}, {spent:.3g} spent by "
                "earlier runs)",
                RefusalCode.OVER_BUDGET,
            )
        return
    if isinstance(event, RandomizedResponse) and spec.answer_kind is AnswerKind.BEST_OF:
        return  # the number of candidates is per task; each answer is checked then
    # A chunk vote's event does not depend on the number of candidates: check it whole.
    total = PrivacyAccountant(prior, base_curve=base).epsilon_with(
        event, limit.delta, spec.max_rounds
    )
    if total > limit.max_epsilon:
        raise PolicyViolation(
            f"run {spec.run_id}: {spec.max_rounds} {_describe(event)} would bring this data "
            f"set to epsilon {total:.3g} > max_epsilon {limit.max_epsilon:g}",
            RefusalCode.OVER_BUDGET,
        )


def _describe(event: RandomizedResponse | Gaussian) -> str:
    if isinstance(event, RandomizedResponse):
        return f"randomized-response answers at epsilon {event.epsilon:g}"
    return f"chunk-vote answers with noise std {event.noise_std:.4g} votes"
