"""What every parametrization provides: a vector space the optimizer moves in.

A parametrization binds to a model and maps a step ``x <- x + c * z(seed)`` in its own
coordinates to a change of the model's behaviour. The contract the rest of the system
relies on:

* ``apply_step`` makes a step permanent (the incumbent moves). Replaying the same steps
  on the same base weights in the same order gives the same bits (the canonical replay).
* ``perturbed(seed, scale)`` is a context manager: inside it, a forward pass sees the
  incumbent moved by ``scale * z(seed)``; on exit every weight byte is exactly what it was
  before (restored from a backup, never by subtracting), even if the forward raised.
  Peak extra memory is about the largest perturbed tensor, never a copy of the model.
* ``export_state_dict`` returns the weights with the parametrization folded in, for a
  plain Hugging Face checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from sottovoce.common.errors import ConfigError
from sottovoce.common.protocol.limits import MAX_EXPLICIT_DIMENSION
from sottovoce.common.steplog import Step
from sottovoce.common.storage import canonical_json

if TYPE_CHECKING:
    # torch is imported by whoever attaches a model (seconds to import: a config check
    # must not wait for it); messages imports this module (the spec is part of a RunSpec).
    import torch
    from torch import nn

    from sottovoce.common.protocol.messages import Candidate

ParametrizationKind = Literal["full", "select", "subspace", "scale", "lowrank", "lora"]
MAX_RANK = 16  # lowrank / lora: the rank r of each perturbation or adapter
Granularity = Literal["tensor", "channel"]


@dataclass(frozen=True)
class ParametrizationSpec:
    """What the optimizer moves; pinned in the run config and checked by every holder.

    * ``patterns``: fnmatch patterns over parameter names (``model.state_dict()`` names);
      empty means every floating-point tensor. Used by ``select``, ``subspace`` and ``scale``.
    * ``last_k_blocks``: if set, keep only tensors of the last k decoder blocks (plus
      tensors after the blocks, such as the final norm) among those the patterns match.
    * ``dimension``: for ``subspace``, its dimension; for any other kind, 0 or the exact
      number of coordinates x must have (checked at attach). Explicit-coordinate optimizers
      (CMA) need it set, so that the coordinator, which never loads the model, knows it.
    * ``projection_seed``: for ``subspace`` (the projection) and ``lora`` (the A factors).
    * ``granularity``: for ``scale`` only; one log-scale per tensor or per output channel.
    * ``rank``: for ``lowrank`` and ``lora`` only (1..16; 0 for every other kind).
    """

    kind: ParametrizationKind = "scale"
    patterns: tuple[str, ...] = ()
    last_k_blocks: int | None = None
    dimension: int = 0
    projection_seed: int = 0
    granularity: Granularity = "channel"
    rank: int = 0

    def canonical_id(self) -> str:
        """A stable string naming this parametrization; it is hashed into the log's genesis.

        ``rank`` is left out at 0, so the kinds that have no rank keep the ids (and logs)
        they had before it existed.
        """
        fields = asdict(self)
        if not fields["rank"]:
            del fields["rank"]
        return canonical_json(fields)


class Parametrization(ABC):
    """A vector space over a model's weights; see the module docstring for the contract."""

    def __init__(self, spec: ParametrizationSpec):
        self.spec = spec

    @abstractmethod
    def attach(self, model: nn.Module) -> None:
        """Bind to ``model`` (at its base weights). Raises ConfigError if nothing is selected."""

    @property
    @abstractmethod
    def dimension(self) -> int:
        """Number of coordinates of x (the length of z)."""

    def direction_blocks(self) -> list[tuple[int, int]]:
        """How z is laid out: ``z = concat(rademacher(seed, t, n) for t, n in blocks)``.

        The default is one block ``(0, dimension)``; ``select``/``full`` generate each
        tensor's part under its own ``tensor_index``. Drift caps replay x from these.
        """
        return [(0, self.dimension)]

    def add_direction_(self, x: torch.Tensor, seed: int, coefficient: float) -> None:
        """``x += coefficient * z(seed)`` on a flat float32 copy of x (drift tracking).

        The default lays z out by :meth:`direction_blocks`; a kind whose z is not one
        Rademacher stream per block (``lowrank``'s outer products) overrides it.
        """
        from sottovoce.common.directions import add_scaled_direction_

        offset = 0
        for tensor_index, size in self.direction_blocks():
            add_scaled_direction_(x[offset : offset + size], seed, tensor_index, coefficient)
            offset += size

    @property
    def explicit_coordinates(self) -> bool:
        """Whether explicit delta candidates and steps (CMA's) can move this space.

        True for kinds that implement :meth:`_apply_delta` and :meth:`_perturbed_delta`
        when the dimension is at most ``MAX_EXPLICIT_DIMENSION``.
        """
        return self._supports_delta and self.dimension <= MAX_EXPLICIT_DIMENSION

    _supports_delta = False

    @abstractmethod
    def apply_step(self, step: Step) -> None:
        """Make ``x <- x + step.coefficient * z(step.seed)`` (or ``x + step.delta``) permanent."""

    @abstractmethod
    def perturbed(self, seed: int, scale: float) -> AbstractContextManager[None]:
        """Inside, the model computes with ``x + scale * z(seed)``; exact restore on exit."""

    def perturbed_candidate(self, candidate: Candidate) -> AbstractContextManager[None]:
        """Inside, the model computes with the candidate (seeded or explicit)."""
        if candidate.delta is None:
            return self.perturbed(candidate.seed, candidate.scale)
        return self._perturbed_delta(self._delta_tensor(candidate.delta))

    def population(self, models: Sequence[Candidate | None]) -> AbstractContextManager[None] | None:
        """A context in which one forward computes several models at once, or None.

        Inside it, a forward over ``len(models)`` equal groups of rows (group-major: rows
        ``g*B .. g*B+B-1``) computes group g with ``models[g]`` (None: the incumbent). Kinds
        whose perturbation is a low-rank term added to a shared matmul (``lowrank``,
        ``lora``) implement it; the default (None) makes the evaluator score one at a time.
        """
        return None

    def _perturbed_delta(self, delta: torch.Tensor) -> AbstractContextManager[None]:
        raise ConfigError(f"parametrization {self.spec.kind} has no explicit coordinates")

    def _apply_delta(self, delta: torch.Tensor) -> None:
        raise ConfigError(f"parametrization {self.spec.kind} has no explicit coordinates")

    def _delta_tensor(self, delta: tuple[float, ...]) -> torch.Tensor:
        """An explicit delta as a float32 tensor, checked against this space."""
        if not self.explicit_coordinates:
            raise ConfigError(
                f"parametrization {self.spec.kind} ({self.dimension} coordinates) takes no "
                f"explicit deltas (at most {MAX_EXPLICIT_DIMENSION} coordinates, scale, select "
                "or lora)"
            )
        if len(delta) != self.dimension:
            raise ConfigError(
                f"an explicit delta has {len(delta)} coordinates, the space {self.dimension}"
            )
        import torch

        return torch.tensor(delta, dtype=torch.float32)

    def check_dimension(self) -> None:
        """ConfigError if the spec states a dimension this parametrization does not have."""
        if self.spec.kind != "subspace" and self.spec.dimension not in (0, self.dimension):
            raise ConfigError(
                f"parametrization {self.spec.kind}: the spec says dimension "
                f"{self.spec.dimension}, the model gives {self.dimension}"
            )

    @abstractmethod
    def touched_modules(self) -> list[str]:
        """Names of the modules whose computation this parametrization can change.

        The evaluator uses it to reuse activations computed before the first touched block.
        """

    @abstractmethod
    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state dict with the current x folded into the weights."""

    def detach(self) -> None:  # noqa: B027 (optional hook; most kinds install nothing)
        """Remove any hooks this parametrization installed. Default: nothing to remove."""


def iter_unique_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters in sorted-name order, each tied tensor once under its first sorted name.

    This order defines the ``tensor_index`` used for directions, so it must never change.
    """
    seen: set[int] = set()
    for name, param in sorted(model.named_parameters(remove_duplicate=False)):
        if id(param) in seen:
            continue
        seen.add(id(param))
        yield name, param
