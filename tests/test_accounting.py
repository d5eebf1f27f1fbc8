"""The accountant: dp-accounting's RDP, cross-checked against Opacus and closed forms."""

from __future__ import annotations

import math

import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from sottovoce.common.accounting import (
    RDP_ORDERS,
    PoissonGaussian,
    PrivacyAccountant,
    RandomizedResponse,
    calibrate_noise_multiplier,
    event_from_json,
)
from sottovoce.common.errors import AccountingError


def opacus_epsilon(sigma: float, rate: float, steps: int, delta: float) -> float:
    rdp = compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=list(RDP_ORDERS))
    epsilon, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(epsilon)


@pytest.mark.parametrize(
    ("sigma", "rate", "steps", "delta"),
    [
        (1.1, 256 / 60_000, 14_060, 1e-5),  # Abadi et al.'s MNIST setting (60 epochs)
        (8.78, 64 / 500, 1000, 1e-5),  # the DPZero benchmark's shape at epsilon 2
        (0.8, 0.01, 100, 1e-6),
        (3.0, 1.0, 1, 1e-5),  # no sampling: one plain Gaussian
    ],
)
def test_poisson_gaussian_agrees_with_opacus(
    sigma: float, rate: float, steps: int, delta: float
) -> None:
    ours = PrivacyAccountant([PoissonGaussian(sigma, rate)] * steps).epsilon(delta)
    theirs = opacus_epsilon(sigma, rate, steps, delta)
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_abadi_mnist_setting_is_near_its_published_epsilon() -> None:
    # Opacus/TF-privacy's tutorial value for q=256/60000, sigma=1.1, 60 epochs: about 3.0.
    epsilon = PrivacyAccountant([PoissonGaussian(1.1, 256 / 60_000)] * 14_060).epsilon(1e-5)
    assert 2.5 < epsilon < 3.5


def test_mixed_events_compose_and_grow() -> None:
    gaussian = PoissonGaussian(2.0, 0.1)
    rr = RandomizedResponse(0.5, 2)
    only_gaussian = PrivacyAccountant([gaussian] * 50).epsilon(1e-5)
    mixed = PrivacyAccountant([gaussian] * 50 + [rr] * 10).epsilon(1e-5)
    assert mixed > only_gaussian


def test_randomized_response_within_pure_dp_composition_bounds() -> None:
    # One epsilon-DP answer: (epsilon, 0)-DP, so at any delta the accountant must say
    # <= epsilon plus RDP's conversion slack, and T answers <= T * epsilon (basic) and
    # close to advanced composition (Dwork, Rothblum, Vadhan 2010).
    eps, delta, steps = 0.5, 1e-5, 200
    one = PrivacyAccountant([RandomizedResponse(eps, 2)]).epsilon(delta)
    assert eps * 0.9 <= one <= eps * 1.1
    many = PrivacyAccountant([RandomizedResponse(eps, 2)] * steps).epsilon(delta)
    advanced = math.sqrt(2 * steps * math.log(1 / delta)) * eps + steps * eps * (math.exp(eps) - 1)
    assert many < min(steps * eps, advanced)
    assert many > math.sqrt(steps) * eps  # and composition is not free


def test_randomized_response_probabilities_match_its_epsilon() -> None:
    mechanism = RandomizedResponse(1.0, 4)
    keep = mechanism.truth_probability
    other = (1 - keep) / 3
    assert keep / other == pytest.approx(math.e)
    assert 1 - mechanism.uniform_probability + mechanism.uniform_probability / 4 == pytest.approx(
        keep
    )


def test_calibration_hits_the_target_from_above() -> None:
    sigma = calibrate_noise_multiplier(2.0, 1e-5, 300, 0.05)
    at = PrivacyAccountant([PoissonGaussian(sigma, 0.05)] * 300).epsilon(1e-5)
    below = PrivacyAccountant([PoissonGaussian(sigma * 0.99, 0.05)] * 300).epsilon(1e-5)
    assert at <= 2.0 < below
    assert at == pytest.approx(2.0, rel=1e-3)


def test_calibration_accounts_for_what_was_spent_before() -> None:
    fresh = calibrate_noise_multiplier(2.0, 1e-5, 100, 0.1)
    prior = [PoissonGaussian(fresh, 0.1)] * 50
    after_spending = calibrate_noise_multiplier(2.0, 1e-5, 100, 0.1, prior)
    assert after_spending > fresh
    with pytest.raises(AccountingError, match="already spent"):
        calibrate_noise_multiplier(2.0, 1e-5, 100, 0.1, [PoissonGaussian(fresh, 0.1)] * 110)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: PoissonGaussian(0.0, 0.1), "noise_multiplier"),
        (lambda: PoissonGaussian(1.0, 1.5), "sampling_rate"),
        (lambda: RandomizedResponse(-1.0, 2), "epsilon"),
        (lambda: RandomizedResponse(1.0, 1), "outcomes"),
        (lambda: PrivacyAccountant().epsilon(1.0), "delta"),
        (lambda: calibrate_noise_multiplier(0.0, 1e-5, 10, 0.1), "epsilon"),
        (lambda: event_from_json({"mechanism": "laplace", "b": 1}), "unknown DP event"),
        (
            lambda: event_from_json(
                {"mechanism": "poisson-gaussian", "noise_multiplier": "1", "sampling_rate": 0.1}
            ),
            "not a number",
        ),
    ],
)
def test_bad_events_and_targets_are_named(call: object, message: str) -> None:
    with pytest.raises(AccountingError, match=message):
        call()  # type: ignore[operator]


def test_events_round_trip_through_json() -> None:
    for event in (PoissonGaussian(2.5, 0.125), RandomizedResponse(0.75, 5)):
        assert event_from_json(event.to_json()) == event
