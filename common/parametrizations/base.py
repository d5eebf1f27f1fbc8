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
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from sottovoce.common.steplog import Step
from sottovoce.common.storage import canonical_json

if TYPE_CHECKING:  # torch is imported by whoever attaches a model (seconds to import)
    import torch
    from torch import nn

ParametrizationKind = Literal["full", "select", "subspace", "scale"]
Granularity = Literal["tensor", "channel"]


@dataclass(frozen=True)
class ParametrizationSpec:
    """What the optimizer moves; pinned in the run config and checked by every holder.

    * ``patterns``: fnmatch patterns over parameter names (``model.state_dict()`` names);
      empty means every floating-point tensor. Used by ``select``, ``subspace`` and ``scale``.
    * ``last_k_blocks``: if set, keep only tensors of the last k decoder blocks (plus
      tensors after the blocks, such as the final norm) among those the patterns match.
    * ``dimension`` and ``projection_seed``: for ``subspace`` only.
    * ``granularity``: for ``scale`` only; one log-scale per tensor or per output channel.
    """

    kind: ParametrizationKind = "scale"
    patterns: tuple[str, ...] = ()
    last_k_blocks: int | None = None
    dimension: int = 0
    projection_seed: int = 0
    granularity: Granularity = "channel"

    def canonical_id(self) -> str:
        """A stable string naming this parametrization; it is hashed into the log's genesis."""
        return canonical_json(asdict(self))


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

    @abstractmethod
    def apply_step(self, step: Step) -> None:
        """Make ``x <- x + step.coefficient * z(step.seed)`` permanent."""

    @abstractmethod
    def perturbed(self, seed: int, scale: float) -> AbstractContextManager[None]:
        """Inside, the model computes with ``x + scale * z(seed)``; exact restore on exit."""

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
