"""``subspace``: x in R^d moves the selected tensors through a seeded random projection.

Weights are ``W = W_base + P x`` with ``P`` a count-sketch (hashing) projection: every
weight element e gets one bucket ``b_e`` in [0, d) and one sign ``s_e``, so each row of P has
a single nonzero, the columns of P have disjoint supports (exactly orthogonal), applying P
costs O(numel), not O(d * numel), and P is never stored. The hashes come from the counter
generator of :mod:`sottovoce.common.directions`, keyed by ``(projection_seed, t)`` where t is
the tensor's ``tensor_index``, with elements taken in groups of 32 (``G = e >> 5``) so that
hashing costs 1/32 of the elements, as for directions::

    s_e = +1 if (hash_words(1, projection_seed, t, G) >> (e & 31)) & 1 else -1
    b_e = hash_words(2, projection_seed, t, G) mod d        (bias <= d / 2**32)
    delta_e = gain * s_e * x[b_e],     gain = 1

So 32 consecutive elements share a bucket (with independent signs): each coordinate of x
drives random runs of 32 weights (about ``numel / d`` weights per tensor), still a random
subspace with orthogonal basis vectors. ``gain = 1`` keeps a weight's move per step
``±coefficient``, the same size as a ``full`` step, so step sizes carry over; it is also a
power of two, so the delta is exact.

Direction of a step: ``z = rademacher(seed, 0, d)``. Canonical replay, per step: first
``x += coefficient * z`` (float32, one add per coordinate); then for each selected tensor
in ``tensor_index`` order, one rounded add of its delta ``s_e * (coefficient * z)[b_e]``
(exactly ``±coefficient``) per element, with the rounding rule of ``add_scaled_direction_``.
So the weights are the replay of the per-step deltas, which equals ``W_base + P x`` up to
float rounding; the replay is what export and evaluation share, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sottovoce.common.directions import (
    BITS_PER_WORD,
    DEFAULT_CHUNK_ELEMENTS,
    PROJECTION_BUCKET_DOMAIN,
    PROJECTION_SIGN_DOMAIN,
    add_float32_,
    add_scaled_direction_,
    expand_signs,
    hash_words,
    rademacher,
)
from sottovoce.common.errors import ConfigError
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.parametrizations.select import InPlaceParametrization, SelectedTensor
from sottovoce.common.steplog import Step

GAIN = 1.0


def add_projected_(
    tensor: torch.Tensor,
    projection_seed: int,
    tensor_index: int,
    step_vector: torch.Tensor,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> None:
    """In place ``tensor += P v`` for one tensor and a float32 ``v`` in R^d, chunk by chunk."""
    dimension = step_vector.numel()
    with torch.no_grad():
        flat = tensor.view(-1)
        step_vector = step_vector.to(device=flat.device, dtype=torch.float32)
        for start in range(0, flat.numel(), chunk_elements):
            end = min(flat.numel(), start + chunk_elements)
            first_group = start // BITS_PER_WORD
            groups = (end - 1) // BITS_PER_WORD - first_group + 1
            words = (projection_seed, tensor_index, first_group, groups, flat.device)
            signs = expand_signs(hash_words(PROJECTION_SIGN_DOMAIN, *words))
            buckets = torch.remainder(hash_words(PROJECTION_BUCKET_DOMAIN, *words), dimension)
            values = torch.index_select(step_vector, 0, buckets).unsqueeze(1)
            delta = (signs.view(groups, BITS_PER_WORD).to(torch.float32) * values).view(-1)
            offset = start - first_group * BITS_PER_WORD
            add_float32_(flat[start:end], delta[offset : offset + end - start])


class SubspaceParametrization(InPlaceParametrization):
    """A d-dimensional random subspace of the selected tensors (count-sketch projection).

    Explicit deltas (CMA) are vectors of the subspace itself (d <= MAX_EXPLICIT_DIMENSION):
    the weights move by ``P delta`` and x by ``delta``, as a seeded step moves them by
    ``P (c z)`` and ``c z``.
    """

    _supports_delta = True

    def __init__(self, spec: ParametrizationSpec):
        if spec.dimension < 1:
            raise ConfigError(
                f"parametrization subspace: dimension must be >= 1, got {spec.dimension}"
            )
        super().__init__(spec)
        self._x = torch.zeros(spec.dimension, dtype=torch.float32)

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self._x = torch.zeros(
            self.spec.dimension, dtype=torch.float32, device=self._tensors[0].param.device
        )

    @property
    def dimension(self) -> int:
        return self.spec.dimension

    @property
    def x(self) -> torch.Tensor:
        """The current coordinates (float32, on the model's device); a copy."""
        return self._x.clone()

    def apply_step(self, step: Step) -> None:
        self._check_idle("apply_step")
        if step.delta is not None:
            self._x.add_(self._delta_tensor(step.delta).to(self._x.device))
        else:
            add_scaled_direction_(self._x, step.seed, 0, step.coefficient)
        super().apply_step(step)

    def _delta_mover(self, delta: torch.Tensor) -> Callable[[SelectedTensor], None]:
        step_vector = delta.to(device=self._x.device, dtype=torch.float32)

        def move(tensor: SelectedTensor) -> None:
            add_projected_(tensor.param, self.spec.projection_seed, tensor.index, step_vector)

        return move

    def _mover(self, seed: int, coefficient: float) -> Callable[[SelectedTensor], None]:
        step_vector = rademacher(seed, 0, self.spec.dimension, device=self._x.device)
        step_vector.mul_(coefficient * GAIN)  # exactly ±coefficient: gain is a power of two

        def move(tensor: SelectedTensor) -> None:
            add_projected_(tensor.param, self.spec.projection_seed, tensor.index, step_vector)

        return move
