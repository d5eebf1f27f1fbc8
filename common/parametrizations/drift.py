"""How far a log has moved the model from its base, in the parametrization's coordinates.

x = 0 is the base model for every parametrization, and a log of steps puts it at
``x = sum_i c_i z(seed_i)``. A cap on each step's ``|c|`` alone does not bound x: a
thousand small steps add up. So a holder tracks x itself, step by step, and refuses a task
whose steps would take ``||x||_inf`` or ``||x||_2`` past its policy's caps, before it reads
any data (``client/policy.py``).

Exact where it is cheap: for up to :data:`EXPLICIT_LIMIT` coordinates (every ``scale`` and
``subspace`` parametrization, and ``select`` of a few tensors) the tracker keeps x itself,
replayed with the parametrization's own direction layout (``direction_blocks``) and the
same float32 adds, so the figures are x's own. Above it (``full`` on a real model, where x
is as large as the model) it keeps only ``S = sum_i |c_i|`` and reports the exact
worst cases ``||x||_inf <= S`` and ``||x||_2 <= sqrt(d) S`` (every entry of z is in
[-1, 1]: Rademacher signs, or ``lowrank``'s scaled outer products of them): O(1) a step
instead of replaying the log, and never an underestimate.

An explicit step (CMA's, ``x <- x + delta``) is added as it is, one float32 add a coordinate,
as the parametrizations replay it; in the bound it counts ``max |delta_i|`` towards S.
A parametrization whose z is not one Rademacher stream per block passes its own ``add``
(:meth:`Parametrization.add_direction_`), so the exact figures stay x's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sottovoce.common.directions import add_scaled_direction_
from sottovoce.common.steplog import Step

EXPLICIT_LIMIT = 1 << 22  # coordinates kept explicitly (16 MiB of float32)

DirectionAdder = Callable[[torch.Tensor, int, float], None]
"""``add(x, seed, coefficient)``: ``x += coefficient * z(seed)`` on a flat float32 x."""


@dataclass(frozen=True)
class Drift:
    """The displacement of x from the base: exact, or an upper bound (``exact=False``)."""

    linf: float
    l2: float
    steps: int
    exact: bool


@dataclass(frozen=True)
class PendingDrift:
    """Where x would be after some more steps; :meth:`DriftTracker.commit` makes it so."""

    drift: Drift
    x: torch.Tensor | None
    sum_abs: float


class DriftTracker:
    """x's distance from the base, updated as steps are applied (see the module doc)."""

    def __init__(
        self,
        blocks: Sequence[tuple[int, int]],
        *,
        explicit_limit: int = EXPLICIT_LIMIT,
        add: DirectionAdder | None = None,
    ):
        self.blocks = [(int(index), int(size)) for index, size in blocks]
        self._add_direction = add
        self.dimension = sum(size for _, size in self.blocks)
        if self.dimension < 1:
            raise ValueError("a drift tracker needs at least one coordinate")
        explicit = self.dimension <= explicit_limit
        x = torch.zeros(self.dimension, dtype=torch.float32) if explicit else None
        self._state = PendingDrift(Drift(0.0, 0.0, 0, explicit), x, 0.0)

    @property
    def drift(self) -> Drift:
        return self._state.drift

    def preview(self, steps: Sequence[Step]) -> PendingDrift:
        """The drift after ``steps`` on top of the committed ones; nothing changes."""
        state = self._state
        sum_abs = state.sum_abs + sum(_largest_move(step) for step in steps)
        count = state.drift.steps + len(steps)
        if state.x is None:
            bound = Drift(sum_abs, math.sqrt(self.dimension) * sum_abs, count, exact=False)
            return PendingDrift(bound, None, sum_abs)
        x = state.x.clone()
        for step in steps:
            self._add(x, step)
        drift = Drift(float(x.abs().max()), float(x.double().norm()), count, exact=True)
        return PendingDrift(drift, x, sum_abs)

    def commit(self, pending: PendingDrift) -> None:
        self._state = pending

    def _add(self, x: torch.Tensor, step: Step) -> None:
        if step.delta is not None:
            if len(step.delta) != self.dimension:
                raise ValueError(
                    f"an explicit step has {len(step.delta)} coordinates, x has {self.dimension}"
                )
            x.add_(torch.tensor(step.delta, dtype=torch.float32))
            return
        if self._add_direction is not None:
            self._add_direction(x, step.seed, step.coefficient)
            return
        offset = 0
        for tensor_index, size in self.blocks:
            add_scaled_direction_(
                x[offset : offset + size], step.seed, tensor_index, step.coefficient
            )
            offset += size


def _largest_move(step: Step) -> float:
    """The most one coordinate of x can move in ``step``: |c|, or max |delta_i|."""
    if step.delta is None:
        return abs(step.coefficient)
    return max(abs(value) for value in step.delta)
