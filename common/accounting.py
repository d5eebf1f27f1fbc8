"""Differential-privacy accounting: what one DP answer costs, and what a lifetime of them does.

Three kinds of DP answer exist (docs/architecture.md), each described by a small event record
that the holder's ledger stores next to the answer:

* :class:`PoissonGaussian`: a DPZero scalar. The holder Poisson-samples its examples at
  rate ``q`` with a secret RNG, sums the clipped per-example finite differences, divides
  by the *expected* batch size and adds Gaussian noise of ``noise_multiplier`` times the
  sensitivity. Neighbouring data sets differ by adding or removing one example
  (``ADD_OR_REMOVE_ONE``), which is the relation Poisson subsampling amplification is
  proved for; the sensitivity of the normalized sum is then ``clip / expected_batch``.
* :class:`RandomizedResponse`: a BBoxER choice among ``outcomes`` answers kept with
  probability ``e^ε / (e^ε + outcomes - 1)``, else replaced by one of the others
  uniformly. Its ε holds for *any* two data sets, so for either neighbouring relation and
  whatever examples the choice was computed on (no amplification is claimed).
* :class:`Gaussian`: a Gaussian mechanism without subsampling on a statistic of known L2
  sensitivity: a chunk-vote answer's histogram of K chunk votes, noised with ``noise_std``
  on every count, of which only the arg-max is released (post-processing). One record
  added or removed changes only its own chunk's vote, so the histogram moves by -1 in one
  bin and +1 in another: ``sensitivity = sqrt(2)`` (:data:`CHUNK_VOTE_SENSITIVITY`), and the
  event is dp-accounting's ``GaussianDpEvent(noise_std / sqrt(2))``.

The accounting itself is Google's ``dp-accounting`` RDP accountant (a maintained library:
no privacy formula is written here); tests cross-check it against Opacus's. RDP composes
additively over its orders, so a lifetime of events costs one vector of numbers, and
"would one more answer cross the budget?" is a copy and one more composition.

dp-accounting computes randomized response's RDP only under replace-one neighbours and
Poisson-subsampled Gaussians only under add/remove-one (a plain Gaussian's curve is the same
under both; its sensitivity is stated for add/remove-one). They are composed by adding the
two RDP curves (RDP composes additively across mechanisms): randomized response's curve
bounds the divergence between its outputs on *any* two inputs, so it holds for add/remove
neighbours too, and the sum is a valid add/remove-one RDP curve of the whole ledger.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sottovoce.common.errors import AccountingError
from sottovoce.common.protocol.answers import AnswerKind, choice_outcomes
from sottovoce.common.protocol.messages import DpSpec

# dp-accounting (with scipy.stats and scipy.signal: most of a second) is imported where an
# event is first composed or calibrated: every holder's process opens a ledger, and one
# that never releases a DP answer never needs the accountant.
if TYPE_CHECKING:
    import dp_accounting
ACCOUNTANT_NAME = "dp-accounting 0.6.0 RDP (add/remove-one neighbours)"
NEIGHBOURING_RELATION = "add-or-remove-one"
# dp-accounting's default RDP orders, plus larger ones: a long-lived ledger at a small
# sampling rate reaches its best epsilon at high orders.
RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(11, 64),
    128.0,
    256.0,
    512.0,
    1024.0,
)
MAX_CALIBRATED_NOISE_MULTIPLIER = 1e4
# A chunk-vote histogram under add/remove-one: one record moves one chunk's vote from one
# bin to another, (-1, +1) in two bins.
CHUNK_VOTE_SENSITIVITY = math.sqrt(2.0)


@dataclass(frozen=True)
class PoissonGaussian:
    """One Gaussian answer on a Poisson subsample at rate ``sampling_rate``."""

    noise_multiplier: float
    sampling_rate: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise AccountingError(
                f"noise_multiplier must be a finite number > 0 (got {self.noise_multiplier!r})"
            )
        if not (math.isfinite(self.sampling_rate) and 0 < self.sampling_rate <= 1):
            raise AccountingError(f"sampling_rate must be in (0, 1] (got {self.sampling_rate!r})")

    def to_dp_event(self) -> dp_accounting.DpEvent:
        import dp_accounting

        return dp_accounting.PoissonSampledDpEvent(
            self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "mechanism": "poisson-gaussian",
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
        }


@dataclass(frozen=True)
class RandomizedResponse:
    """One ε-DP choice among ``outcomes`` answers (k-ary randomized response)."""

    epsilon: float
    outcomes: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise AccountingError(f"epsilon must be a finite number > 0 (got {self.epsilon!r})")
        if isinstance(self.outcomes, bool) or not (
            isinstance(self.outcomes, int) and self.outcomes >= 2
        ):
            raise AccountingError(f"outcomes must be an integer >= 2 (got {self.outcomes!r})")

    @property
    def uniform_probability(self) -> float:
        """Probability of answering uniformly at random instead of truthfully.

        ``k / (e^ε + k - 1)``, computed as ``k e^-ε / (1 + (k - 1) e^-ε)`` so that no ε
        overflows ``exp``.
        """
        shrink = math.exp(-self.epsilon)
        return self.outcomes * shrink / (1.0 + (self.outcomes - 1) * shrink)

    @property
    def truth_probability(self) -> float:
        """Probability that the released choice is the true one: ``e^ε / (e^ε + k - 1)``."""
        shrink = math.exp(-self.epsilon)
        return 1.0 / (1.0 + (self.outcomes - 1) * shrink)

    def to_dp_event(self) -> dp_accounting.DpEvent:
        import dp_accounting

        return dp_accounting.RandomizedResponseDpEvent(self.uniform_probability, self.outcomes)

    def to_json(self) -> dict[str, Any]:
        return {
            "mechanism": "randomized-response",
            "epsilon": self.epsilon,
            "outcomes": self.outcomes,
        }


@dataclass(frozen=True)
class Gaussian:
    """One Gaussian mechanism on all the data: noise of std ``noise_std`` on a statistic
    whose L2 sensitivity under add/remove-one is ``sensitivity``."""

    noise_std: float
    sensitivity: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_std) and self.noise_std > 0):
            raise AccountingError(f"noise_std must be a finite number > 0 (got {self.noise_std!r})")
        if not (math.isfinite(self.sensitivity) and self.sensitivity > 0):
            raise AccountingError(
                f"sensitivity must be a finite number > 0 (got {self.sensitivity!r})"
            )

    @property
    def noise_multiplier(self) -> float:
        """Noise std in units of the sensitivity: what dp-accounting's Gaussian takes."""
        return self.noise_std / self.sensitivity

    def to_dp_event(self) -> dp_accounting.DpEvent:
        import dp_accounting

        return dp_accounting.GaussianDpEvent(self.noise_multiplier)

    def to_json(self) -> dict[str, Any]:
        return {
            "mechanism": "gaussian",
            "noise_std": self.noise_std,
            "sensitivity": self.sensitivity,
        }


DpEvent = PoissonGaussian | RandomizedResponse | Gaussian


def chunk_vote_event(noise_std: float) -> Gaussian:
    """One chunk-vote answer: the noisy histogram of the chunks' votes (see the module doc)."""
    return Gaussian(noise_std, CHUNK_VOTE_SENSITIVITY)


def answer_event(
    dp: DpSpec, kind: AnswerKind, n_candidates: int, sampling_rate: float | None
) -> DpEvent | None:
    """What one answer of a run is in DP terms; None when it is not DP at all.

    A dp-scalar with noise is a Poisson-subsampled Gaussian at ``sampling_rate`` (the
    answering holder's own rate; None if unknown); a compare or best-of choice by noisy
    chunk votes is a Gaussian on the vote histogram, whatever ``n_candidates``; under
    randomized response it is RR over its ``2`` or ``n_candidates + 1`` possible answers.
    """
    if kind is AnswerKind.DP_SCALAR:
        if dp.noise_multiplier <= 0 or sampling_rate is None:
            return None
        return PoissonGaussian(dp.noise_multiplier, sampling_rate)
    if dp.chunks > 0:
        return chunk_vote_event(dp.vote_noise) if dp.vote_noise > 0 else None
    if dp.randomized_response_epsilon > 0:
        outcomes = choice_outcomes(kind, n_candidates)
        return RandomizedResponse(dp.randomized_response_epsilon, outcomes)
    return None


def event_from_json(raw: Mapping[str, Any]) -> DpEvent:
    """The event a ledger record stores; raises :class:`AccountingError` if malformed."""
    mechanism = raw.get("mechanism")
    try:
        if mechanism == "poisson-gaussian" and set(raw) == {
            "mechanism",
            "noise_multiplier",
            "sampling_rate",
        }:
            return PoissonGaussian(
                noise_multiplier=_real(raw["noise_multiplier"]),
                sampling_rate=_real(raw["sampling_rate"]),
            )
        if mechanism == "randomized-response" and set(raw) == {
            "mechanism",
            "epsilon",
            "outcomes",
        }:
            outcomes = raw["outcomes"]
            if isinstance(outcomes, bool) or not isinstance(outcomes, int):
                raise AccountingError(f"outcomes {outcomes!r} is not an integer")
            return RandomizedResponse(epsilon=_real(raw["epsilon"]), outcomes=outcomes)
        if mechanism == "gaussian" and set(raw) == {"mechanism", "noise_std", "sensitivity"}:
            return Gaussian(
                noise_std=_real(raw["noise_std"]), sensitivity=_real(raw["sensitivity"])
            )
    except TypeError as exc:
        raise AccountingError(str(exc)) from None
    raise AccountingError(f"unknown DP event {dict(raw)!r}")


def _real(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AccountingError(f"{value!r} is not a number")
    return float(value)


class PrivacyAccountant:
    """The (ε, δ) spent by a multiset of DP events, composed with dp-accounting's RDP.

    Each distinct event's RDP curve is computed once by dp-accounting (and cached: a
    ledger holds thousands of copies of a few events); composing is adding curves, and ε
    is dp-accounting's ``compute_epsilon`` on the sum. So "what if one more answer?" is
    one vector addition, not a recomputation.
    """

    def __init__(self, events: Iterable[DpEvent] = (), base_curve: np.ndarray | None = None):
        """``base_curve``: an RDP curve over ``RDP_ORDERS`` already spent (see
        :func:`events_curve`), e.g. what a data set's records cost in other ledgers."""
        self._counts: Counter[DpEvent] = Counter()
        self._rdp = np.zeros(len(RDP_ORDERS))
        self._has_base = False
        if base_curve is not None and np.any(base_curve > 0):
            if base_curve.shape != self._rdp.shape:
                raise AccountingError(f"an RDP curve needs {len(RDP_ORDERS)} orders")
            self._rdp = self._rdp + base_curve
            self._has_base = True
        for event, count in Counter(events).items():
            self.compose(event, count)

    @property
    def answers(self) -> int:
        return sum(self._counts.values())

    def compose(self, event: DpEvent, count: int = 1) -> None:
        if count < 1:
            raise AccountingError(f"count must be >= 1 (got {count})")
        self._rdp = self._rdp + count * _event_rdp(event)
        self._counts[event] += count

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` for everything composed so far (0 when nothing was)."""
        _check_delta(delta)
        if not self._counts and not self._has_base:
            return 0.0
        return _epsilon(self._rdp, delta)

    @property
    def curve(self) -> np.ndarray:
        """The composed RDP curve (a copy)."""
        return self._rdp.copy()

    def epsilon_with(self, event: DpEvent, delta: float, count: int = 1) -> float:
        """ε if ``count`` more of ``event`` were composed (this accountant is not changed)."""
        _check_delta(delta)
        return _epsilon(self._rdp + count * _event_rdp(event), delta)


def events_curve(events: Iterable[DpEvent]) -> np.ndarray:
    """The RDP curve of a multiset of events (zeros for none): what they cost together."""
    return PrivacyAccountant(events).curve


@functools.lru_cache(maxsize=1024)
def _event_rdp(event: DpEvent) -> np.ndarray:
    """One event's RDP curve over ``RDP_ORDERS``, by dp-accounting (see the module doc)."""
    from dp_accounting import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    relation = (
        NeighboringRelation.REPLACE_ONE
        if isinstance(event, RandomizedResponse)
        else NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    accountant = RdpAccountant(list(RDP_ORDERS), relation)
    with _quiet_absl():
        accountant.compose(event.to_dp_event())
    curve = np.array(accountant.rdp, dtype=np.float64)
    curve.setflags(write=False)
    return curve


def _epsilon(rdp: np.ndarray, delta: float) -> float:
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    epsilon, _ = compute_epsilon(RDP_ORDERS, rdp.tolist(), delta)
    return float(epsilon)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    steps: int,
    sampling_rate: float,
    prior: Iterable[DpEvent] = (),
    *,
    base_curve: np.ndarray | None = None,
) -> float:
    """Smallest noise multiplier with which ``steps`` answers (after ``prior``) fit the target.

    Uses dp-accounting's ``calibrate_dp_mechanism`` (bisection on the accountant itself),
    so the result is what the same accountant will later charge. ``base_curve`` is an RDP
    curve spent besides ``prior`` (a data set's inheritance). Raises
    :class:`AccountingError` if even ``MAX_CALIBRATED_NOISE_MULTIPLIER`` does not fit, e.g. because
    ``prior`` events already spent the target.
    """
    return _calibrate(
        lambda sigma: PoissonGaussian(sigma, sampling_rate),
        target_epsilon,
        delta,
        steps,
        prior,
        base_curve,
        f"at sampling rate {sampling_rate:g} ",
    )


def calibrate_vote_noise(
    target_epsilon: float,
    delta: float,
    answers: int,
    prior: Iterable[DpEvent] = (),
    *,
    base_curve: np.ndarray | None = None,
) -> float:
    """Smallest noise std on each vote count with which ``answers`` chunk-vote answers (after
    ``prior``) fit the target: the same bisection on the same accountant as
    :func:`calibrate_noise_multiplier`, for :func:`chunk_vote_event`."""
    multiplier = _calibrate(
        lambda m: chunk_vote_event(m * CHUNK_VOTE_SENSITIVITY),
        target_epsilon,
        delta,
        answers,
        prior,
        base_curve,
        "",
    )
    return multiplier * CHUNK_VOTE_SENSITIVITY


def calibrate_randomized_response(
    target_epsilon: float, delta: float, answers: int, outcomes: int
) -> float:
    """Largest per-answer ε with which ``answers`` randomized-response choices among
    ``outcomes`` fit the target at ``delta``: the same bisection, on 1/ε."""
    inverse = _calibrate(
        lambda m: RandomizedResponse(1.0 / m, outcomes),
        target_epsilon,
        delta,
        answers,
        (),
        None,
        f"of randomized response over {outcomes} outcomes ",
    )
    return 1.0 / inverse


def _calibrate(
    make_event: Callable[[float], DpEvent],
    target_epsilon: float,
    delta: float,
    steps: int,
    prior: Iterable[DpEvent],
    base_curve: np.ndarray | None,
    where: str,
) -> float:
    """The smallest noise multiplier ``m`` with which ``steps`` copies of ``make_event(m)``
    fit the target after ``prior`` (see :func:`calibrate_noise_multiplier`)."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise AccountingError(f"epsilon must be a finite number > 0 (got {target_epsilon!r})")
    _check_delta(delta)
    if steps < 1:
        raise AccountingError(f"steps must be >= 1 (got {steps})")
    prior = tuple(prior)
    base = PrivacyAccountant(prior, base_curve=base_curve)
    if base.epsilon(delta) >= target_epsilon:
        raise AccountingError(
            f"epsilon {base.epsilon(delta):.3f} is already spent, target is {target_epsilon:g}"
        )
    if base.epsilon_with(make_event(MAX_CALIBRATED_NOISE_MULTIPLIER), delta, steps) > (
        target_epsilon
    ):
        raise AccountingError(
            f"no noise multiplier up to {MAX_CALIBRATED_NOISE_MULTIPLIER:g} keeps {steps} steps "
            f"{where}within epsilon {target_epsilon:g}"
        )
    import dp_accounting

    batch, trial = _calibration_types()
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: trial(base),
        lambda sigma: batch(make_event(sigma), steps),
        target_epsilon,
        delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-4,
    )
    return float(sigma)


def answer_epsilon(event: DpEvent, delta: float) -> float:
    """ε of one answer alone at ``delta``: what a policy's ``max_answer_epsilon`` bounds."""
    return PrivacyAccountant([event]).epsilon(delta)


@functools.cache
def _calibration_types() -> tuple[type[Any], type[Any]]:
    """``(_Batch, _Trial)``: dp-accounting's interfaces around our events and accountant,
    defined on first use (they subclass dp-accounting's classes; see the module's imports)."""
    import dp_accounting

    @dataclass(frozen=True)
    class _Batch(dp_accounting.DpEvent):
        """``count`` copies of one of our events, as a dp-accounting event for calibration."""

        event: DpEvent
        count: int

    class _Trial(dp_accounting.PrivacyAccountant):
        """A throw-away copy of a :class:`PrivacyAccountant` in dp-accounting's interface, so
        ``calibrate_dp_mechanism`` bisects on exactly the accountant that will later charge."""

        def __init__(self, base: PrivacyAccountant) -> None:
            super().__init__(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
            self._inner = copy.deepcopy(base)

        def supports(self, event: dp_accounting.DpEvent) -> bool:
            return isinstance(event, _Batch)

        def _maybe_compose(
            self, event: dp_accounting.DpEvent, count: int, do_compose: bool
        ) -> None:
            if not isinstance(event, _Batch):
                return dp_accounting.privacy_accountant.CompositionErrorDetails(
                    invalid_event=event, error_message="not a calibration batch"
                )
            if do_compose:
                self._inner.compose(event.event, event.count * count)
            return None

        def get_epsilon(self, target_delta: float) -> float:
            return self._inner.epsilon(target_delta)

        def get_delta(self, target_epsilon: float) -> float:
            raise NotImplementedError("calibration only asks for epsilon")

    return _Batch, _Trial


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs a warning per RDP order it cannot compute at small noise and drops
    it; dropping an order can only make ε larger, and calibration probes such noise often."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise AccountingError(f"delta must be in (0, 1) (got {delta!r})")
