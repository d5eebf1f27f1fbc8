"""The grid a quantized dp-scalar answer lives on, shared by holder and coordinator.

A k-bit answer is a level ``j`` in ``0 .. 2**k - 1`` standing for the value
``-bound + j * 2 * bound / (2**k - 1)``: evenly spaced, both ends included, so the grid
is symmetric and 0 is on it only for odd level counts (never, for k >= 1): a 1-bit answer
is a sign times ``bound``. The holder rounds stochastically onto this grid with its own
secure randomness (see ``client/private_answers.py``), which keeps the estimate unbiased.
"""

from __future__ import annotations

import math

from sottovoce.common.protocol.limits import MAX_QUANTIZATION_BITS


def levels(bits: int) -> int:
    """Number of levels of a ``bits``-bit answer."""
    if isinstance(bits, bool) or not (isinstance(bits, int) and 1 <= bits <= MAX_QUANTIZATION_BITS):
        raise ValueError(f"quantization bits must be 1..{MAX_QUANTIZATION_BITS} (got {bits!r})")
    return int(2**bits)


def spacing(bits: int, bound: float) -> float:
    """Distance between two neighbouring levels."""
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"quantization range must be a finite number > 0 (got {bound!r})")
    return 2.0 * bound / (levels(bits) - 1)


def dequantize(level: int, bits: int, bound: float) -> float:
    """The value a level stands for; raises ``ValueError`` for a level off the grid."""
    if isinstance(level, bool) or not (isinstance(level, int) and 0 <= level < levels(bits)):
        raise ValueError(f"level {level!r} is not in 0..{levels(bits) - 1}")
    return -bound + level * spacing(bits, bound)
