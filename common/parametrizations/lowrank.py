"""``lowrank`` (EGGROLL-style): seeded rank-r moves of whole weight matrices.

The coordinates are the selected ``nn.Linear`` weights themselves (as in ``select``), but a
direction is low rank: for selected matrix t (``m x n``, ``tensor_index`` t),

    z_t(seed) = A_t B_t^T / r,  A_t = rademacher(seed, 2t, m r).view(m, r),
                                B_t = rademacher(seed, 2t + 1, n r).view(n, r),

so every entry of z is in [-1, 1] (exactly +-1 for r = 1), and a candidate perturbs each
matrix by a rank-r product regenerated from its seed. Steps stay ``(seed, coefficient)``.

**Canonical replay** (export and every holder, bit for bit on any device): for each step,
each selected matrix in ``tensor_index`` order, ``delta = float32(A B^T * (c / r))``, with
``A B^T`` computed in float64 (sums of r products of +-1: exact) and ``c / r`` exact (r is
a power of two), so ``delta`` is one correctly rounded value (exactly +-c for r = 1); then
``add_float32_(W, delta)``, the rounding rule of every seeded step. A one-at-a-time
candidate (``perturbed``) computes with exactly these bits, restored from a backup.

**The population in one batch** (:meth:`population`): each selected Linear gets a forward
hook that adds, to each group g of rows, ``(s_g / r) (x B_g) A_g^T``: the base matmul
``W x`` runs once over every group's rows, and each candidate's low-rank term costs
``O((m + n) r)`` a row: one thin batched matmul ``x_g B_g`` and one ``baddbmm_`` that adds
``(x_g B_g) A_g^T`` into the Linear's own output in place (no temporary of the output's
size, no second pass to add it). Every candidate's factors of every matrix are drawn once
per population in one vectorized pass (``rademacher_many``: the same bits as
:func:`low_rank_factors`), not per matrix per candidate.
This is not bit-equal to the merged weights ``(W + s A B^T / r) x`` (other rounding and
summation order): in float32 the scores agree with one-at-a-time evaluation to about 1e-6
relative (``tests/test_population.py`` asserts ``allclose`` with
rtol 1e-4, atol 1e-5 on the tiny model), and the log and export never use the batched form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from sottovoce.common.directions import add_float32_, rademacher, rademacher_many
from sottovoce.common.errors import ConfigError
from sottovoce.common.parametrizations.base import MAX_RANK, ParametrizationSpec
from sottovoce.common.parametrizations.select import (
    InPlaceParametrization,
    SelectedTensor,
    select_tensors,
)
from sottovoce.common.protocol.messages import Candidate
from sottovoce.common.steplog import as_float32


def check_rank(kind: str, rank: int) -> None:
    """A rank must be a power of two in 1..MAX_RANK (so ``c / r`` is exact)."""
    if not (1 <= rank <= MAX_RANK and rank & (rank - 1) == 0):
        raise ConfigError(f"parametrization {kind}: rank must be 1, 2, 4, 8 or 16 (got {rank})")


def linear_weights(kind: str, model: nn.Module, spec: ParametrizationSpec) -> list[SelectedTensor]:
    """The 2-D ``nn.Linear`` weights a spec selects (patterns, last_k_blocks)."""

    def is_linear_weight(_name: str, module: nn.Module, attribute: str) -> bool:
        return isinstance(module, nn.Linear) and attribute == "weight"

    tensors = select_tensors(model, spec, default_filter=is_linear_weight)
    for tensor in tensors:
        for module_name, module, attribute in tensor.owners:
            if not is_linear_weight(module_name, module, attribute):
                raise ConfigError(
                    f"parametrization {kind}: {module_name}.{attribute} "
                    f"({type(module).__name__}) is not a Linear weight"
                )
    return tensors


def factor_streams(
    seed: int, index: int, shape: tuple[int, int], rank: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The direction streams ``(seed, tensor_index, numel)`` of matrix ``index``'s A and B:
    A is stream ``2 index``, B stream ``2 index + 1`` (one layout for every caller)."""
    rows, columns = shape
    return (seed, 2 * index, rows * rank), (seed, 2 * index + 1, columns * rank)


def low_rank_factors(
    seed: int, index: int, shape: tuple[int, int], rank: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of ``z = A B^T / r`` for matrix ``index`` of ``shape`` (+-1, float32)."""
    rows, columns = shape
    a_stream, b_stream = factor_streams(seed, index, shape, rank)
    a = rademacher(*a_stream, device=device).view(rows, rank)
    b = rademacher(*b_stream, device=device).view(columns, rank)
    return a, b


def low_rank_delta(
    seed: int, index: int, shape: tuple[int, int], rank: int, coefficient: float, device: Any
) -> torch.Tensor:
    """``float32(A B^T * (c / r))``: the canonical delta of one matrix (see module doc)."""
    a, b = low_rank_factors(seed, index, shape, rank, torch.device(device))
    product = a.double() @ b.double().T  # integers of magnitude <= r: exact in float64
    return (product * (coefficient / rank)).to(torch.float32)


class LowRankParametrization(InPlaceParametrization):
    """Selected Linear weights moved along seeded rank-r directions (see the module doc)."""

    def __init__(self, spec: ParametrizationSpec):
        check_rank("lowrank", spec.rank)
        super().__init__(spec)

    def _select(self, model: nn.Module) -> list[SelectedTensor]:
        return linear_weights("lowrank", model, self.spec)

    @property
    def dimension(self) -> int:
        return sum(t.param.numel() for t in self._tensors)

    def direction_blocks(self) -> list[tuple[int, int]]:
        return [(t.index, t.param.numel()) for t in self._tensors]

    def add_direction_(self, x: torch.Tensor, seed: int, coefficient: float) -> None:
        offset = 0
        for tensor in self._tensors:
            size = tensor.param.numel()
            delta = low_rank_delta(
                seed, tensor.index, _shape(tensor), self.spec.rank, coefficient, x.device
            )
            x[offset : offset + size].add_(delta.view(-1))
            offset += size

    def _mover(self, seed: int, coefficient: float) -> Callable[[SelectedTensor], None]:
        def move(tensor: SelectedTensor) -> None:
            param = tensor.param
            delta = low_rank_delta(
                seed, tensor.index, _shape(tensor), self.spec.rank, coefficient, param.device
            )
            with torch.no_grad():
                add_float32_(param, delta)

        return move

    def population(self, models: Sequence[Candidate | None]) -> AbstractContextManager[None] | None:
        """One forward for all ``models`` (seeded candidates, None = incumbent)."""
        if any(model is not None and model.delta is not None for model in models):
            return None
        self._check_idle("population")
        return self._population(list(models))

    @contextmanager
    def _population(self, models: list[Candidate | None]) -> Iterator[None]:
        handles = []
        factors = self._population_factors(models)
        for tensor, (a_stack, b_stack) in zip(self._tensors, factors, strict=True):
            hook = _GroupLowRankHook(a_stack, b_stack)
            for _, module, _ in tensor.owners:
                handles.append(module.register_forward_hook(hook))
        self._busy = True
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._busy = False

    def _population_factors(
        self, models: list[Candidate | None]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per selected matrix, ``(G, m, r)`` A factors scaled by ``s_g / r`` and ``(G, n, r)``
        B factors (zeros for the incumbent, None), generated once for the whole population:
        every candidate's factors of every matrix in one vectorized pass
        (:func:`rademacher_many`, the same bits as :func:`low_rank_factors`)."""
        rank, count = self.spec.rank, len(models)
        streams: dict[torch.device, list[tuple[int, int, int]]] = {}
        for tensor in self._tensors:
            for model in models:
                if model is not None:
                    streams.setdefault(tensor.param.device, []).extend(
                        factor_streams(model.seed, tensor.index, _shape(tensor), rank)
                    )
        signs = {
            device: iter(rademacher_many(device_streams, device=device))
            for device, device_streams in streams.items()
        }
        factors = []
        for tensor in self._tensors:
            rows, columns = _shape(tensor)
            device = tensor.param.device
            a_parts, b_parts = [], []
            for model in models:
                if model is None:  # the incumbent: no term (zeros)
                    a_parts.append(torch.zeros(rows * rank, dtype=torch.float32, device=device))
                    b_parts.append(torch.zeros(columns * rank, dtype=torch.float32, device=device))
                else:
                    a_parts.append(next(signs[device]))
                    b_parts.append(next(signs[device]))
            coefficients = torch.tensor(
                [0.0 if model is None else as_float32(model.scale) / rank for model in models],
                dtype=torch.float32,
                device=device,
            )  # s / r: exact (r is a power of two), so each entry of A is exactly +-s/r
            a_stack = torch.stack(a_parts).view(count, rows, rank).mul_(coefficients.view(-1, 1, 1))
            b_stack = torch.stack(b_parts).view(count, columns, rank)
            dtype = tensor.param.dtype
            factors.append((a_stack.to(dtype), b_stack.to(dtype)))
        return factors


class _GroupLowRankHook:
    """Adds ``(x_g B_g) A_g^T`` to each group g of a Linear's output rows."""

    def __init__(self, a_stack: torch.Tensor, b_stack: torch.Tensor):
        self.left_t = a_stack.transpose(1, 2)  # (G, r, m)
        self.b_stack = b_stack

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return add_group_terms(args[0], output, self.b_stack, self.left_t)


def add_group_terms(
    inputs: torch.Tensor, output: torch.Tensor, right: torch.Tensor, left_t: torch.Tensor
) -> torch.Tensor:
    """``output`` plus ``(x_g right_g) left_t_g`` for each of the G row groups.

    ``inputs`` is ``(G*B, ..., n)``, ``output`` ``(G*B, ..., m)``, ``right`` ``(G, n, r)``
    and ``left_t`` ``(G, r, m)``. One thin batched matmul projects each group's rows to r
    values; one ``baddbmm_`` adds their products with ``left_t`` into ``output`` in place
    (the Linear's own fresh result: one pass over it, no temporary of its size). The base
    matmul is not redone. An output of another dtype or layout gets the term out of place.
    """
    groups = right.shape[0]
    if inputs.shape[0] % groups:
        raise ValueError(f"{inputs.shape[0]} rows do not split into {groups} groups")
    grouped = inputs.reshape(groups, -1, inputs.shape[-1])
    if grouped.dtype != right.dtype:
        grouped = grouped.to(right.dtype)
    projected = torch.bmm(grouped, right)  # (G, rows per group, r)
    if output.dtype == left_t.dtype and output.is_contiguous():
        output.view(groups, -1, output.shape[-1]).baddbmm_(projected, left_t)
        return output
    term = torch.bmm(projected, left_t)
    return output + term.reshape(output.shape).to(output.dtype)


def _shape(tensor: SelectedTensor) -> tuple[int, int]:
    rows, columns = tensor.param.shape
    return int(rows), int(columns)
