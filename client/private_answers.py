"""The randomized parts of a data holder's DP answers, and where their randomness comes from.

Every random draw that protects privacy (the Poisson minibatch, the Gaussian noise of a
DPZero scalar, the stochastic rounding of a quantized one, the coin of randomized
response, the Gaussian noise on a chunk-vote histogram) comes from
:class:`SecureRandomness`: ``secrets.SystemRandom``, i.e. the operating system's entropy.
It has no seed and no way to set one, so no configuration, coordinator message or test can
make the noise predictable, and two holders given the same task draw independent noise.
Direction seeds (which the coordinator chooses) never reach it.

A caveat a privacy engineer will ask about: the Gaussian is sampled in floating point
(``random.normalvariate`` over 53-bit uniforms), not by an exact discrete sampler, so the
low-order bits of an unquantized answer are not covered by the textbook analysis
(Mironov, CCS 2012, for the Laplace case). Quantizing the answer (``quantization_bits``)
rounds those bits away; use it where this matters.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np

from sottovoce.common.accounting import RandomizedResponse
from sottovoce.common.quantization import levels, spacing


class SecureRandomness:
    """OS-entropy randomness for privacy: deliberately unseedable."""

    def __init__(self) -> None:
        self._rng = secrets.SystemRandom()

    def gaussian(self, std: float) -> float:
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"noise std must be a finite number >= 0 (got {std!r})")
        return self._rng.normalvariate(0.0, std) if std > 0 else 0.0

    def uniform(self) -> float:
        """A float in [0, 1)."""
        return self._rng.random()

    def below(self, n: int) -> int:
        """An integer in [0, n)."""
        return self._rng.randrange(n)

    def poisson_subsample(self, n: int, rate: float) -> list[int]:
        """Indices of ``range(n)``, each kept independently with probability ``rate``."""
        if not 0 < rate <= 1:
            raise ValueError(f"sampling rate must be in (0, 1] (got {rate!r})")
        return [i for i in range(n) if self._rng.random() < rate]

    def sample(self, n: int, k: int) -> list[int]:
        """``k`` distinct indices of ``range(n)``, uniformly (a fixed-size minibatch)."""
        return self._rng.sample(range(n), k)


def noisy_mean(
    differences: Sequence[float] | np.ndarray,
    *,
    clip: float,
    expected_batch: float,
    noise_multiplier: float,
    rng: SecureRandomness,
) -> float:
    """DPZero's private scalar: clip each difference, sum, divide by the expected batch
    size, add N(0, (noise_multiplier * clip / expected_batch)^2).

    Dividing by the *expected* size (not the drawn one) keeps the sensitivity at
    ``clip / expected_batch`` under add/remove-one neighbours: the drawn size itself would
    otherwise leak, and is never released.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0 (got {clip!r})")
    if not expected_batch > 0:
        raise ValueError(f"expected batch size must be > 0 (got {expected_batch!r})")
    values = np.asarray(differences, dtype=np.float64)
    # A non-finite difference (a diverged candidate) is clipped like any other: its sign
    # is kept, NaN counts as 0, so one example still moves the sum by at most `clip`.
    clipped = np.clip(np.nan_to_num(values, nan=0.0, posinf=clip, neginf=-clip), -clip, clip)
    mean = float(clipped.sum()) / expected_batch
    return mean + rng.gaussian(noise_multiplier * clip / expected_batch)


def quantize(value: float, bits: int, bound: float, rng: SecureRandomness) -> int:
    """Clamp ``value`` to [-bound, bound] and round it stochastically to a ``bits``-bit level.

    Rounds up with probability equal to the distance past the lower level, so the level's
    value is unbiased for the clamped input. Post-processing of a DP value: costs no ε.
    """
    step = spacing(bits, bound)
    top = levels(bits) - 1
    position = (min(bound, max(-bound, value)) + bound) / step
    lower = min(top, math.floor(position))
    return min(top, lower + (1 if rng.uniform() < position - lower else 0))


def randomized_response(choice: int, mechanism: RandomizedResponse, rng: SecureRandomness) -> int:
    """Keep ``choice`` (in ``0 .. outcomes-1``) or replace it by a uniform one.

    With probability ``mechanism.uniform_probability`` the answer is uniform over all
    outcomes (the true one included), which makes the true one come out with probability
    e^ε / (e^ε + outcomes - 1): dp-accounting's RandomizedResponseDpEvent, exactly.
    """
    if not 0 <= choice < mechanism.outcomes:
        raise ValueError(f"choice {choice} is not in 0..{mechanism.outcomes - 1}")
    if rng.uniform() < mechanism.uniform_probability:
        return rng.below(mechanism.outcomes)
    return choice


def noisy_argmax(
    counts: Sequence[float] | np.ndarray,
    std: float,
    rng: SecureRandomness,
    *,
    lead: float = 0.0,
) -> int:
    """GNMax: the index of the largest count after adding N(0, std^2) to each count, or 0
    ("keep the incumbent" in a choice histogram) unless that count beats every other noisy
    count by more than ``lead``.

    The lead is a function of the noisy counts only, so it costs no epsilon. With two
    counts it is the same as adding ``lead`` to the first one; with more it also asks the
    winner to beat the runner-up candidate by ``lead``: with mirrored candidates (+z, -z)
    almost no chunk votes keep, so a lead over keep alone would let the noise pick among
    candidates that no chunk clearly prefers. Ties (only possible without noise, or at float
    resolution) go to the lowest index, keep first: a fixed rule. With ``std`` = 0 and
    ``lead`` = 0 this is the plain arg-max.
    """
    noisy = noisy_counts(counts, std, rng)
    if not len(noisy):
        return 0
    winner = int(np.argmax(noisy))  # np.argmax returns the first of equal maxima
    if winner == 0 or lead == 0:
        return winner
    runner_up = float(np.max(np.delete(noisy, winner)))
    return winner if noisy[winner] - runner_up > lead else 0


def noisy_counts(
    counts: Sequence[float] | np.ndarray, std: float, rng: SecureRandomness
) -> np.ndarray:
    """``counts`` plus independent N(0, std^2) noise on each one, from secure randomness."""
    values = np.asarray(counts, dtype=np.float64)
    noise = np.array([rng.gaussian(std) for _ in range(len(values))], dtype=np.float64)
    noisy: np.ndarray = values + noise
    return noisy
