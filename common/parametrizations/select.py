"""``select``: the weights of chosen tensors themselves are the coordinates (MeZO style).

x is the offset of the selected tensors from their base values; a step adds
``coefficient * z(seed, tensor_index)`` to each selected tensor, where ``tensor_index`` is the
tensor's position among the selected ones in :func:`iter_unique_parameters` order.

Canonical replay (what export and every holder share, bit for bit on any device): for each
step in log order, for each selected tensor in ``tensor_index`` order,
``add_scaled_direction_(tensor, seed, tensor_index, coefficient)``: one rounded add of
``±coefficient`` per element (see :mod:`sottovoce.common.directions` for the rounding rule).

Evaluation perturbs in place inside forward hooks (docs/architecture.md): just before a module that
owns a selected tensor runs, the tensor is backed up and moved by ``scale * z``; after its
last user module of the forward has run (a tied embedding / LM head has two users), it is
restored by copying the backup back. So at most one module's tensors, plus a tied tensor
waiting for its second user, are backed up at any time, never a copy of the model.

This module also holds what ``full`` and ``subspace`` share: tensor selection and the
in-place hook machinery.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sottovoce.common.directions import add_float32_, add_scaled_direction_
from sottovoce.common.errors import ConfigError
from sottovoce.common.parametrizations.base import (
    Parametrization,
    ParametrizationSpec,
    iter_unique_parameters,
)
from sottovoce.common.steplog import Step, as_float32

BLOCK_PATTERN = re.compile(r"^(?:.*\.)?layers\.(\d+)\.")

OwnerFilter = Callable[[str, nn.Module, str], bool]
"""Decides from one owner ``(module name, module, attribute)`` if a tensor is a default pick."""


@dataclass(frozen=True, eq=False)
class SelectedTensor:
    """One selected tensor, with everything the hooks and the replay need to know about it.

    * ``name``: its name in :func:`iter_unique_parameters` (a tied tensor's first sorted name);
    * ``aliases``: every ``state_dict`` name it appears under (two for a tied tensor);
    * ``index``: its ``tensor_index`` (position among the selected tensors);
    * ``owners``: ``(module name, module, attribute)`` of each module holding it directly,
      in module order; these are the modules whose forward uses it.
    """

    name: str
    aliases: tuple[str, ...]
    param: nn.Parameter
    index: int
    owners: tuple[tuple[str, nn.Module, str], ...]

    @property
    def nbytes(self) -> int:
        return self.param.numel() * self.param.element_size()


# -- selection ---------------------------------------------------------------------------------
def select_tensors(
    model: nn.Module,
    spec: ParametrizationSpec,
    *,
    default_filter: OwnerFilter | None = None,
) -> list[SelectedTensor]:
    """The floating-point tensors ``spec`` selects, in ``tensor_index`` order.

    ``spec.patterns`` are fnmatch patterns (case-sensitive) over ``state_dict`` names; a tied
    tensor is selected if any of its names matches. Without patterns, ``default_filter``
    (if given) keeps tensors whose every owner it accepts, else every floating-point
    tensor is kept. ``spec.last_k_blocks``
    then keeps only tensors of the last k ``layers.N.`` blocks and tensors after the blocks.
    """
    aliases = _aliases(model)
    owners = _owners(model)
    candidates = [(n, p) for n, p in iter_unique_parameters(model) if p.is_floating_point()]
    if spec.patterns:
        kept = _match_patterns(candidates, aliases, spec)
    else:
        kept = [
            (name, param)
            for name, param in candidates
            if default_filter is None
            or all(default_filter(*owner) for owner in owners.get(id(param), []))
        ]
    if spec.last_k_blocks is not None:
        in_last = _last_k_blocks(model, spec.last_k_blocks)
        kept = [(name, param) for name, param in kept if id(param) in in_last]
    if not kept:
        raise ConfigError(f"parametrization {spec.kind}: the selection matches no tensor")
    return [
        SelectedTensor(
            name=name,
            aliases=tuple(aliases[id(param)]),
            param=param,
            index=index,
            owners=tuple(owners.get(id(param), [])),
        )
        for index, (name, param) in enumerate(kept)
    ]


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules():
        for attribute, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module_name, module, attribute))
    return owners


def _match_patterns(
    candidates: list[tuple[str, nn.Parameter]],
    aliases: dict[int, list[str]],
    spec: ParametrizationSpec,
) -> list[tuple[str, nn.Parameter]]:
    for pattern in spec.patterns:
        if not any(
            fnmatch.fnmatchcase(alias, pattern) for _, p in candidates for alias in aliases[id(p)]
        ):
            raise ConfigError(
                f"parametrization {spec.kind}: pattern {pattern!r} matches no "
                "floating-point parameter"
            )
    return [
        (name, param)
        for name, param in candidates
        if any(
            fnmatch.fnmatchcase(alias, pattern)
            for alias in aliases[id(param)]
            for pattern in spec.patterns
        )
    ]


def _last_k_blocks(model: nn.Module, k: int) -> set[int]:
    """Ids of parameters in the last k ``layers.N.`` blocks or after the blocks.

    "After the blocks" is module registration order (for Llama: ``model.norm``, an untied
    ``lm_head``). A tensor with any use before the blocks is not after them: a tied input
    embedding / LM head changes the first computation of the model, so it stays out.
    """
    named = list(model.named_parameters(remove_duplicate=False))
    block_of = [_block_index(name) for name, _ in named]
    blocks = sorted({b for b in block_of if b is not None})
    if not blocks:
        raise ConfigError("last_k_blocks: the model has no 'layers.N.' blocks")
    if not 1 <= k <= len(blocks):
        raise ConfigError(f"last_k_blocks: {k} is not in [1, {len(blocks)}] (the model's blocks)")
    kept_blocks = set(blocks[-k:])
    last_block_position = max(i for i, b in enumerate(block_of) if b is not None)
    verdict: dict[int, bool] = {}
    for position, ((_, param), block) in enumerate(zip(named, block_of, strict=True)):
        ok = block in kept_blocks if block is not None else position > last_block_position
        verdict[id(param)] = verdict.get(id(param), True) and ok
    return {pid for pid, ok in verdict.items() if ok}


def _block_index(name: str) -> int | None:
    match = BLOCK_PATTERN.match(name)
    return int(match.group(1)) if match else None


def touched_module_names(tensors: list[SelectedTensor], model: nn.Module) -> list[str]:
    """Names of the modules owning any of ``tensors``, in the model's module order."""
    wanted = {name for t in tensors for name, _, _ in t.owners}
    return [name for name, _ in model.named_modules() if name in wanted]


# -- in-place evaluation with exact restore ------------------------------------------------------
class _InPlacePerturbation:
    """Forward hooks that perturb each tensor just before its users run and restore it after.

    ``add`` moves one tensor by the candidate's perturbation (in place). A tensor is backed
    up and perturbed by the pre-hook of the first user module that runs; it is restored by
    copying the backup back after the forward hook of its last user (users are counted per
    forward). A later forward in the same context simply perturbs it again, which gives the
    same bits. :meth:`close` removes the hooks and restores whatever is still perturbed.
    """

    def __init__(
        self,
        tensors: list[SelectedTensor],
        add: Callable[[SelectedTensor], None],
        meter: BackupMeter,
    ):
        self._add = add
        self._meter = meter
        self._backups: dict[int, torch.Tensor] = {}
        self._pending_users: dict[int, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        by_module: dict[int, tuple[nn.Module, list[SelectedTensor]]] = {}
        for tensor in tensors:
            for _, module, _ in tensor.owners:
                by_module.setdefault(id(module), (module, []))[1].append(tensor)
        for module, owned in by_module.values():
            self._handles.append(
                module.register_forward_pre_hook(functools.partial(self._before, owned))
            )
            self._handles.append(
                module.register_forward_hook(functools.partial(self._after, owned))
            )

    def _before(self, owned: list[SelectedTensor], _module: nn.Module, _args: Any) -> None:
        for tensor in owned:
            if tensor.index not in self._backups:
                with torch.no_grad():
                    self._backups[tensor.index] = tensor.param.detach().clone()
                    self._meter.add(tensor.nbytes)
                    self._add(tensor)
                self._pending_users[tensor.index] = len(tensor.owners)

    def _after(
        self, owned: list[SelectedTensor], _module: nn.Module, _args: Any, _output: Any
    ) -> None:
        for tensor in owned:
            if tensor.index in self._backups:
                self._pending_users[tensor.index] -= 1
                if self._pending_users[tensor.index] <= 0:
                    self._restore(tensor)

    def _restore(self, tensor: SelectedTensor) -> None:
        with torch.no_grad():
            tensor.param.copy_(self._backups.pop(tensor.index))
        self._pending_users.pop(tensor.index, None)
        self._meter.remove(tensor.nbytes)

    def close(self, tensors: list[SelectedTensor]) -> None:
        for handle in self._handles:
            handle.remove()
        for tensor in tensors:
            if tensor.index in self._backups:
                self._restore(tensor)


class BackupMeter:
    """Counts the bytes of backups alive at once; tests read ``peak`` (the memory rule)."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def remove(self, nbytes: int) -> None:
        self.current -= nbytes


class InPlaceParametrization(Parametrization):
    """Base of ``full``, ``select`` and ``subspace``: steps rewrite the selected tensors.

    Subclasses say how one tensor moves for a vector ``coefficient * z(seed)`` of their space
    (:meth:`_mover`); replay, hooks, backups and export are shared.
    """

    def __init__(self, spec: ParametrizationSpec):
        super().__init__(spec)
        self._model: nn.Module | None = None
        self._tensors: list[SelectedTensor] = []
        self._busy = False
        self._meter = BackupMeter()

    # -- binding ---------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self._tensors = self._select(model)
        self._model = model
        self.check_dimension()

    def _select(self, model: nn.Module) -> list[SelectedTensor]:
        return select_tensors(model, self.spec)

    @property
    def tensors(self) -> list[SelectedTensor]:
        """The selected tensors in ``tensor_index`` order."""
        return list(self._tensors)

    @property
    def max_backup_bytes(self) -> int:
        """Most bytes of weight backups alive at once since attach (or the last reset)."""
        return self._meter.peak

    def reset_backup_peak(self) -> None:
        self._meter.peak = self._meter.current

    def touched_modules(self) -> list[str]:
        return touched_module_names(self._tensors, self._bound_model())

    # -- moving --------------------------------------------------------------------------------
    @abstractmethod
    def _mover(self, seed: int, coefficient: float) -> Callable[[SelectedTensor], None]:
        """A function moving one tensor (in place) by its part of ``coefficient * z(seed)``."""

    def _delta_mover(self, delta: torch.Tensor) -> Callable[[SelectedTensor], None]:
        """A function moving one tensor (in place) by its part of an explicit ``delta``."""
        raise ConfigError(f"parametrization {self.spec.kind} has no explicit coordinates")

    def apply_step(self, step: Step) -> None:
        """Canonical replay of one step: each selected tensor in ``tensor_index`` order."""
        self._check_idle("apply_step")
        if step.delta is not None:
            move = self._delta_mover(self._delta_tensor(step.delta))
        else:
            move = self._mover(step.seed, step.coefficient)
        for tensor in self._tensors:
            move(tensor)

    @contextmanager
    def perturbed(self, seed: int, scale: float) -> Iterator[None]:
        """Evaluate at ``x + scale * z(seed)`` (``scale`` rounded to float32), restoring exactly.

        The rounding makes ``perturbed(seed, c)`` compute with the same bits as the model
        after ``apply_step(Step(seed, c))``.
        """
        self._check_idle("perturbed")
        with self._hooked(self._mover(seed, as_float32(scale))):
            yield

    def _perturbed_delta(self, delta: torch.Tensor) -> AbstractContextManager[None]:
        """Evaluate at ``x + delta``: the bits of ``apply_step(Step.explicit(delta))``."""
        self._check_idle("perturbed")
        return self._hooked(self._delta_mover(delta))

    @contextmanager
    def _hooked(self, move: Callable[[SelectedTensor], None]) -> Iterator[None]:
        hooks = _InPlacePerturbation(self._tensors, move, self._meter)
        self._busy = True
        try:
            yield
        finally:
            hooks.close(self._tensors)
            self._busy = False

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as they are (steps are already materialized in them), cloned."""
        self._check_idle("export_state_dict")
        return {k: v.detach().clone() for k, v in self._bound_model().state_dict().items()}

    # -- helpers ---------------------------------------------------------------------------------
    def _bound_model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError(f"parametrization {self.spec.kind} is not attached to a model")
        return self._model

    def _check_idle(self, what: str) -> None:
        self._bound_model()
        if self._busy:
            raise RuntimeError(f"{what} called inside perturbed(); leave the context first")


class SelectParametrization(InPlaceParametrization):
    """Named tensors (``spec.patterns``) and/or the last k blocks; their weights are x.

    An explicit delta (CMA, at most ``MAX_EXPLICIT_DIMENSION`` elements in all) is laid out
    like z: the selected tensors' elements in ``tensor_index`` order, each added with the
    same float32 rounding rule as a seeded step.
    """

    _supports_delta = True

    @property
    def dimension(self) -> int:
        return sum(t.param.numel() for t in self._tensors)

    def direction_blocks(self) -> list[tuple[int, int]]:
        return [(t.index, t.param.numel()) for t in self._tensors]

    def _mover(self, seed: int, coefficient: float) -> Callable[[SelectedTensor], None]:
        def move(tensor: SelectedTensor) -> None:
            add_scaled_direction_(tensor.param, seed, tensor.index, coefficient)

        return move

    def _delta_mover(self, delta: torch.Tensor) -> Callable[[SelectedTensor], None]:
        offsets, start = {}, 0
        for tensor in self._tensors:
            offsets[tensor.index] = start
            start += tensor.param.numel()

        def move(tensor: SelectedTensor) -> None:
            begin = offsets[tensor.index]
            part = delta[begin : begin + tensor.param.numel()].to(tensor.param.device)
            with torch.no_grad():
                add_float32_(tensor.param.view(-1), part)

        return move
