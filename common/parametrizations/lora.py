"""``lora``: LoRA adapters on chosen Linear weights; x holds the B factors, A is fixed.

For selected matrix t (``m x n``) the adapted layer computes ``W x + s B_t (A_t x)`` with
``s = lora_alpha / r = 1`` (``lora_alpha = r``). The coordinates x are every ``B_t``
(``m x r``, row-major) in ``tensor_index`` order, zero at the start, so x = 0 is the base
model (peft's standard init: B = 0) and every perturbation reaches B (with B = 0 and a
moving A there would be no signal). ``A_t`` is fixed by the spec's ``projection_seed``:

    A_t = rademacher(projection_seed, t, r n).view(r, n) * float32(1 / sqrt(3 n)),

the variance of peft's Kaiming-uniform init, from the counter-based generator instead of
``torch.manual_seed`` so that every holder and export has the same bits. Rank 1 on a few
matrices is a space of at most ``MAX_EXPLICIT_DIMENSION`` coordinates that CMA-ES can search
(576 per matrix of SmolLM2's width), and seeded ES can search any size.

Steps are ``(seed, coefficient)`` (``x += c z``, one Rademacher stream per matrix's B) or
explicit deltas; x is float32 and bit-identical everywhere. Evaluation never rewrites a
weight: forward hooks add ``s (x A_t^T) B_t^T`` (float32 math, cast to the activation
dtype); the population form (:meth:`population`) computes ``x A_t^T`` once for every group's
rows (A is shared) and one small batched matmul with each group's own B.

Export: ``export_state_dict`` folds ``W + s B A`` into the weights once (float32 math, cast
to the weight dtype), equal to the hook evaluation up to float rounding;
``adapter_tensors`` gives the A and B factors for a ``peft`` adapter
(``sottovoce export`` writes one next to the merged checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sottovoce.common.directions import add_scaled_direction_, rademacher
from sottovoce.common.errors import ConfigError
from sottovoce.common.parametrizations.base import Parametrization, ParametrizationSpec
from sottovoce.common.parametrizations.lowrank import check_rank, linear_weights
from sottovoce.common.parametrizations.select import SelectedTensor, touched_module_names
from sottovoce.common.protocol.messages import Candidate
from sottovoce.common.steplog import Step, as_float32

LORA_SCALING = 1.0  # lora_alpha / r with lora_alpha = r


@dataclass(frozen=True, eq=False)
class _Adapter:
    """One adapted matrix: its weight, where its B lives in x, and its fixed A."""

    tensor: SelectedTensor
    start: int
    rows: int
    a: torch.Tensor  # (r, n) float32

    @property
    def size(self) -> int:
        return self.rows * self.a.shape[0]


class LoraParametrization(Parametrization):
    """B factors of rank-r adapters over fixed seeded A factors (see the module doc)."""

    _supports_delta = True

    def __init__(self, spec: ParametrizationSpec):
        check_rank("lora", spec.rank)
        super().__init__(spec)
        self._model: nn.Module | None = None
        self._adapters: list[_Adapter] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._x = torch.zeros(0, dtype=torch.float32)
        self._b: torch.Tensor | None = None  # (G, total) group Bs while a population runs
        self._view = self._x
        self._busy = False

    # -- binding -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self.detach()
        tensors = linear_weights("lora", model, self.spec)
        rank, start = self.spec.rank, 0
        self._adapters = []
        for tensor in tensors:
            rows, columns = (int(d) for d in tensor.param.shape)
            device = tensor.param.device
            signs = rademacher(self.spec.projection_seed, tensor.index, rank * columns)
            a = (signs * as_float32(1.0 / math.sqrt(3.0 * columns))).view(rank, columns)
            self._adapters.append(_Adapter(tensor, start, rows, a.to(device)))
            start += rows * rank
        self._x = torch.zeros(start, dtype=torch.float32, device=tensors[0].param.device)
        self._view = self._x
        self._model = model
        for adapter in self._adapters:
            for _, module, _ in adapter.tensor.owners:
                self._handles.append(module.register_forward_hook(_LoraHook(self, adapter)))
        self.check_dimension()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- the space -----------------------------------------------------------------------------
    @property
    def dimension(self) -> int:
        return sum(adapter.size for adapter in self._adapters)

    def direction_blocks(self) -> list[tuple[int, int]]:
        return [(adapter.tensor.index, adapter.size) for adapter in self._adapters]

    @property
    def x(self) -> torch.Tensor:
        """The current B factors, concatenated (float32); a copy."""
        return self._x.clone()

    def touched_modules(self) -> list[str]:
        return touched_module_names([a.tensor for a in self._adapters], self._bound_model())

    def apply_step(self, step: Step) -> None:
        self._check_idle("apply_step")
        if step.delta is not None:
            self._x.add_(self._delta_tensor(step.delta).to(self._x.device))
        else:
            self._add_seeded(self._x, step.seed, step.coefficient)

    def _add_seeded(self, x: torch.Tensor, seed: int, coefficient: float) -> None:
        for adapter in self._adapters:
            part = x[adapter.start : adapter.start + adapter.size]
            add_scaled_direction_(part, seed, adapter.tensor.index, coefficient)

    def _candidate_x(self, candidate: Candidate) -> torch.Tensor:
        moved = self._x.clone()
        if candidate.delta is not None:
            moved.add_(self._delta_tensor(candidate.delta).to(moved.device))
        else:
            self._add_seeded(moved, candidate.seed, as_float32(candidate.scale))
        return moved

    def perturbed(self, seed: int, scale: float) -> AbstractContextManager[None]:
        self._check_idle("perturbed")
        return self._using(self._candidate_x(Candidate(seed=seed, scale=scale)))

    def _perturbed_delta(self, delta: torch.Tensor) -> AbstractContextManager[None]:
        self._check_idle("perturbed")
        return self._using(self._x + delta.to(self._x.device))

    @contextmanager
    def _using(self, moved: torch.Tensor) -> Iterator[None]:
        self._busy = True
        self._view = moved
        try:
            yield
        finally:
            self._view = self._x
            self._busy = False

    def population(self, models: Sequence[Candidate | None]) -> AbstractContextManager[None] | None:
        """One forward for all ``models``: group g's rows use its own B (None: the incumbent)."""
        self._check_idle("population")
        stack = [self._x if model is None else self._candidate_x(model) for model in models]
        return self._grouped(torch.stack(stack))

    @contextmanager
    def _grouped(self, b_stack: torch.Tensor) -> Iterator[None]:
        self._busy = True
        self._b = b_stack
        try:
            yield
        finally:
            self._b = None
            self._busy = False

    # -- what the hooks read ---------------------------------------------------------------------
    def adapter_term(
        self, adapter: _Adapter, inputs: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor:
        """``output + s (x A^T) B^T``, with each group's B while a population runs."""
        rank = adapter.a.shape[0]
        projected = torch.nn.functional.linear(inputs.to(torch.float32), adapter.a)  # (..., r)
        if self._b is None:
            b = self._view[adapter.start : adapter.start + adapter.size].view(adapter.rows, rank)
            term = torch.nn.functional.linear(projected, b) * LORA_SCALING
            return output + term.to(output.dtype)
        groups = self._b.shape[0]
        b_groups = self._b[:, adapter.start : adapter.start + adapter.size]
        b_groups = b_groups.reshape(groups, adapter.rows, rank)
        grouped = projected.reshape(groups, -1, rank)
        term = torch.bmm(grouped, b_groups.transpose(1, 2)) * LORA_SCALING
        return output + term.reshape(output.shape).to(output.dtype)

    # -- export ------------------------------------------------------------------------------------
    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights with ``W + s B A`` folded in once (float32 math, cast to the weight dtype)."""
        self._check_idle("export_state_dict")
        state = {k: v.detach().clone() for k, v in self._bound_model().state_dict().items()}
        for name, (a, b) in self.adapter_tensors().items():
            weight = state[name + ".weight"]
            merged = weight.to(torch.float32) + LORA_SCALING * (b.to(weight.device) @ a)
            state[name + ".weight"] = merged.to(weight.dtype)
        return state

    def adapter_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module name -> ``(A (r x n), B (m x r))`` float32: a peft adapter's lora_A/lora_B."""
        rank = self.spec.rank
        tensors = {}
        for adapter in self._adapters:
            b = self._x[adapter.start : adapter.start + adapter.size].view(adapter.rows, rank)
            for module_name, _, _ in adapter.tensor.owners:
                tensors[module_name] = (adapter.a.clone(), b.clone())
        return tensors

    # -- helpers ---------------------------------------------------------------------------------
    def _bound_model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("parametrization lora is not attached to a model")
        return self._model

    def _check_idle(self, what: str) -> None:
        self._bound_model()
        if self._busy:
            raise RuntimeError(f"{what} called inside perturbed(); leave the context first")


class _LoraHook:
    """Forward hook of an adapted Linear: adds its LoRA term."""

    def __init__(self, owner: LoraParametrization, adapter: _Adapter):
        self._owner = owner
        self._adapter = adapter

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise ConfigError("parametrization lora: a Linear returned a non-tensor")
        return self._owner.adapter_term(self._adapter, args[0], output)
