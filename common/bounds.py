"""The transcript bound: test risk from train risk and the outcomes the model depends on.

An exported model is a function of the run's public inputs (config, base model, seeds)
and of the *aggregated* outcome of each round: which candidate the vote accepted, or none.
So the final model is one of the hypotheses indexed by transcripts ``tau = (o_1..o_T)``, and
an Occam bound with a prior fixed before the data pays for the transcript actually
produced: ``-log2 prior(tau)`` bits, the length of ``tau`` in a prefix-free code chosen
from the config alone (:func:`choice_transcript_bits`). Most rounds of a converging run are
"none", so the code is much shorter than the worst-case ``T log2(K+1)`` bits heard.

With that prior, Maurer's kl bound (any loss in [0, 1], i.i.d. examples) gives, with
probability at least 1 - delta over the n training examples, for every transcript at once::

    kl(train_risk || test_risk) <= (bits * ln 2 + ln(xi(n) / delta)) / n

where ``xi(n) = sum_k C(n,k) (k/n)^k (1-k/n)^(n-k) <= 2 sqrt(n)``; inverting the binary kl
(:func:`kl_upper`) gives the bound. The derivation, its assumptions and when it does not
hold are in ``docs/bound.md``. :func:`hoeffding_bits_bound` is the old form (Hoeffding and a
union over ``2^B`` outcomes for all ``B`` bits heard), kept for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln, logsumexp, xlogy

from sottovoce.common.errors import ConfigError

_KL_TOLERANCE = 1e-12


# -- prefix-free codes --------------------------------------------------------------------------
def elias_delta_bits(value: int) -> int:
    """Length of the Elias delta code of a positive integer (prefix-free over 1, 2, ...)."""
    if value < 1:
        raise ConfigError(f"Elias delta codes integers >= 1, got {value}")
    length = value.bit_length()  # floor(log2 value) + 1
    return (length - 1) + 2 * (length.bit_length() - 1) + 1


def _kt_bits(symbols: Sequence[int], alphabet: int) -> float:
    """-log2 of the Krichevsky-Trofimov probability of a sequence over ``alphabet`` symbols."""
    counts = [0] * alphabet
    bits = 0.0
    for seen, symbol in enumerate(symbols):
        bits -= math.log2((counts[symbol] + 0.5) / (seen + alphabet / 2))
        counts[symbol] += 1
    return bits


def choice_transcript_bits(outcomes: Sequence[int], candidates: int) -> float:
    """Code length in bits of a transcript of choices: 0 = none, k = candidate k (1..K).

    The code is fixed before any data: the round count T in Elias delta (``T + 1``), then
    the better of two adaptive codes, with one flag bit to say which: (a) a KT code for
    "none or not" with ``log2 K`` bits to name each accepted candidate, which pays little
    for long runs of "none"; (b) a KT code over all ``K + 1`` outcomes. Each is a
    probability over transcripts of every length, so the flagged minimum is a prefix-free
    code (Kraft sum at most 1) and early stopping at any round is covered.
    """
    if candidates < 1:
        raise ConfigError(f"a choice transcript needs >= 1 candidate per round, got {candidates}")
    if any(not 0 <= o <= candidates for o in outcomes):
        raise ConfigError(f"outcomes must be in 0..{candidates}")
    length = elias_delta_bits(len(outcomes) + 1)
    accepted = [1 if o else 0 for o in outcomes]
    symbol_code = _kt_bits(list(outcomes), candidates + 1)
    return length + 1 + min(_rate_code_bits(accepted, candidates), symbol_code)


def accepted_rounds_bits(accepted: Sequence[bool], candidates: int) -> float:
    """The same code's length when only *which* rounds accepted a step is known, not which
    candidate: code (a) alone, with its flag bit. Never shorter than
    :func:`choice_transcript_bits` of any transcript with those rounds, so it is a valid
    (slightly larger) count; a holder computes it from its own log."""
    flags = [1 if a else 0 for a in accepted]
    return elias_delta_bits(len(flags) + 1) + 1 + _rate_code_bits(flags, candidates)


def _rate_code_bits(accepted: Sequence[int], candidates: int) -> float:
    return _kt_bits(accepted, 2) + sum(accepted) * math.log2(candidates)


def fixed_rate_transcript_bits(rounds: int, bits_per_round: float) -> float:
    """Code length of a transcript whose rounds each take one of ``2**bits_per_round`` values
    (a ranking, a quantized aggregate, a float32 step coefficient): no compression, plus the
    round count."""
    if rounds < 0 or not bits_per_round >= 0:
        raise ConfigError("rounds and bits_per_round must be >= 0")
    return elias_delta_bits(rounds + 1) + rounds * bits_per_round


# -- the kl bound -------------------------------------------------------------------------------
def kl_bernoulli(p: float, q: float) -> float:
    """kl(p || q) between Bernoulli(p) and Bernoulli(q), in nats."""

    def term(a: float, b: float) -> float:
        if a == 0.0:
            return 0.0
        if b == 0.0:
            return math.inf
        return a * math.log(a / b)

    return term(p, q) + term(1.0 - p, 1.0 - q)


def kl_upper(train_risk: float, budget: float) -> float:
    """The largest q >= train_risk with kl(train_risk || q) <= budget (bisection)."""
    if not 0.0 <= train_risk <= 1.0:
        raise ConfigError(f"train_risk must be in [0, 1], got {train_risk}")
    if not budget >= 0.0:
        raise ConfigError(f"the kl budget must be >= 0, got {budget}")
    low, high = train_risk, 1.0
    if kl_bernoulli(train_risk, high) <= budget:
        return 1.0
    while high - low > _KL_TOLERANCE:
        middle = (low + high) / 2
        if kl_bernoulli(train_risk, middle) <= budget:
            low = middle
        else:
            high = middle
    return high  # rounded up: never below the true inverse


def log_xi(n: int) -> float:
    """ln xi(n), xi(n) = E exp(n kl(mean || p)) at its worst (Bernoulli, p = k/n sums).

    Computed exactly in log space up to n = 10^6 (Maurer 2004: it is at most 2 sqrt(n)),
    and as ln(2 sqrt(n)) above.
    """
    if n < 1:
        raise ConfigError(f"the bound needs n >= 1 examples, got {n}")
    if n > 1_000_000:
        return math.log(2.0 * math.sqrt(n))
    k = np.arange(n + 1, dtype=np.float64)
    log_terms = (
        gammaln(n + 1)
        - gammaln(k + 1)
        - gammaln(n - k + 1)
        + xlogy(k, k / n)
        + xlogy(n - k, 1 - k / n)
    )
    return float(logsumexp(log_terms))


def kl_transcript_bound(train_risk: float, bits: float, n: int, delta: float) -> float:
    """Test risk bound for a hypothesis of prior ``2**-bits``, from its train risk on n."""
    _check(n, delta, bits)
    budget = (bits * math.log(2.0) + log_xi(n) - math.log(delta)) / n
    return kl_upper(train_risk, budget)


def generalization_slack(bits: float, n: int, delta: float) -> float:
    """``sqrt((bits * ln 2 + ln(1/delta)) / (2n))``: the old bound's train-to-test slack.

    An optimizer that heard ``bits`` bits can output at most ``2**bits`` models; Hoeffding
    for a loss in [0, 1] on ``n`` examples plus a union bound over those models gives, with
    probability >= 1 - delta, test risk <= train risk + this slack.
    """
    _check(n, delta, bits)
    return math.sqrt((bits * math.log(2.0) - math.log(delta)) / (2.0 * n))


def hoeffding_bits_bound(train_risk: float, bits: float, n: int, delta: float) -> float:
    """The old bound: train risk + :func:`generalization_slack`, B all bits heard.

    ``train_risk`` must be measured on the same ``n`` examples the answers were computed
    from (a loss in [0, 1]). Not clipped at 1, so a vacuous bound shows as one.
    """
    if not 0.0 <= train_risk <= 1.0:
        raise ConfigError(f"train_risk must be in [0, 1], got {train_risk}")
    return train_risk + generalization_slack(bits, n, delta)


def _check(n: int, delta: float, bits: float) -> None:
    if n < 1:
        raise ConfigError(f"the bound needs n >= 1 examples, got {n}")
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    if not bits >= 0.0 or math.isinf(bits):
        raise ConfigError(f"bits must be a finite number >= 0, got {bits}")


@dataclass(frozen=True)
class Complexity:
    """What a coordinator knows of the bound without any data: the transcript's cost.

    ``transcript_bits`` is the code length of the aggregated transcript; ``grid_bits``
    pays for choosing the run's setting among a fixed grid on the training data (0 when
    it was chosen on dev data, which needs no union); ``heard_bits`` is every answer's
    bits, what the old bound pays; ``code`` says which code measured the transcript.
    """

    transcript_bits: float
    grid_bits: float
    heard_bits: float
    rounds: int
    code: str = "choice transcript (Elias delta + min of two KT codes)"

    @property
    def bits(self) -> float:
        return self.transcript_bits + self.grid_bits

    def bound(self, train_risk: float, n: int, delta: float) -> float:
        return kl_transcript_bound(train_risk, self.bits, n, delta)

    def old_bound(self, train_risk: float, n: int, delta: float) -> float:
        return hoeffding_bits_bound(train_risk, self.heard_bits, n, delta)

    def to_json(self) -> dict[str, object]:
        return {
            "transcript_bits": self.transcript_bits,
            "grid_bits": self.grid_bits,
            "heard_bits": self.heard_bits,
            "rounds": self.rounds,
            "code": self.code,
        }


ASSUMPTIONS = (
    "the n training examples are i.i.d. from the distribution the test risk is measured on, "
    "and the train risk is the final model's error on all n of them",
    "the model depends only on the public config and seeds and the aggregated outcome of "
    "each round, not on any holder's own answers",
    "the prior is fixed before the data: a prefix code over transcripts of every length, "
    "chosen from the config alone (lambda and the answer kind)",
    "the loss is in [0, 1] (the 0-1 error); Maurer's kl bound, inverted",
)


def bound_report(
    complexity: Complexity,
    train_risk: float,
    n: int,
    delta: float,
    *,
    measured_test_risk: float | None = None,
    extra_assumptions: Sequence[str] = (),
) -> dict[str, object]:
    """The bound section of a report: new bound beside the old, and what they assume."""
    new, old = complexity.bound(train_risk, n, delta), complexity.old_bound(train_risk, n, delta)
    return {
        "train_risk": train_risk,
        "n": n,
        "delta": delta,
        **complexity.to_json(),
        "transcript_bound": new,
        "old_bound": old,
        "old_bound_is": "Hoeffding plus a union over 2^(bits heard) outcomes",
        "measured_test_risk": measured_test_risk,
        "vacuous": new >= 1.0,
        "assumptions": [*ASSUMPTIONS, *extra_assumptions],
    }
