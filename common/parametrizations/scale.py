"""``scale`` (BBoxER's form): x holds log-scales; effective weights are ``W_base * exp(x)``.

One log-scale per selected tensor (``granularity="tensor"``) or one per output channel, i.e.
per row along dim 0 of each weight (``"channel"``; a 1-D weight such as a norm's gets one per
element). x = 0 is the base model. x is float32 on the model's device, laid out as the
concatenation of each selected tensor's log-scales in ``tensor_index`` order
(:func:`iter_unique_parameters` order among the selected). A step's direction is
``z = rademacher(seed, 0, dimension)`` and the canonical replay is
``add_scaled_direction_(x, seed, 0, coefficient)``: one rounded float32 add per coordinate,
so x itself is bit-identical on every device.

Evaluation never rewrites a weight: forward hooks, installed at attach and always active,
scale the owning modules' outputs, since scaling row r of a weight scales output feature r:

* ``nn.Linear``: ``y * exp(x)`` over output features; with a bias only W's part is scaled:
  ``y + (y - b) * expm1(x)`` (exact identity at x = 0);
* norm modules with a 1-D weight (``LlamaRMSNorm``, ``nn.LayerNorm``, ...): the same over
  the last dimension;
* ``nn.Embedding``: output row of token v times ``exp(x_v)`` (channel) or ``exp(x)`` (tensor).

A tied tensor (input embedding and LM head) has one x shared by both users, consistent with
``W[v, :] * exp(x_v)``. The scaling is computed in float32 and the result cast back to the
activation dtype, so small log-scales are not lost in bfloat16.

Exactness is weaker than for ``full``/``select`` (docs/architecture.md allows it when stated): x is
bit-identical everywhere, but ``exp`` may differ by an ulp between CPU and GPU, and
``export_state_dict`` folds ``W * exp(x)`` into the weights once (computed in float32, cast to
the weight dtype), so an exported checkpoint equals the hook evaluation only up to float
rounding: ``(W x)_r * e_r`` and ``(W_r * e_r) x`` round differently.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from sottovoce.common.directions import add_scaled_direction_
from sottovoce.common.errors import ConfigError
from sottovoce.common.parametrizations.base import Parametrization, ParametrizationSpec
from sottovoce.common.parametrizations.select import (
    SelectedTensor,
    select_tensors,
    touched_module_names,
)
from sottovoce.common.steplog import Step, as_float32

NORM_CLASS_NAMES = frozenset(
    {
        "LlamaRMSNorm",
        "MistralRMSNorm",
        "Qwen2RMSNorm",
        "Qwen3RMSNorm",
        "Phi3RMSNorm",
        "OlmoLayerNorm",
        "LayerNorm",
        "RMSNorm",
    }
)
"""Norm classes computing ``weight * normalized(+ bias)``, so output * e == (weight * e) use.

Deliberately a list, not "anything called *Norm": Gemma's RMSNorm uses ``1 + weight``, where
scaling the output would not be scaling the weight.
"""


def module_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"embedding"`` or ``"norm"``: how a hook scales this module's output."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    weight = getattr(module, "weight", None)
    if type(module).__name__ in NORM_CLASS_NAMES and isinstance(weight, torch.Tensor):
        return "norm" if weight.dim() == 1 else None
    return None


def _default_owner(_module_name: str, module: nn.Module, attribute: str) -> bool:
    return attribute == "weight" and module_kind(module) is not None


@dataclass(frozen=True)
class _Slot:
    """Where a selected tensor's log-scales live in x."""

    tensor: SelectedTensor
    start: int
    size: int


class ScaleParametrization(Parametrization):
    """Per-tensor or per-channel log-scales applied to module outputs by forward hooks.

    An explicit delta (CMA) is added to x directly, one float32 add a coordinate.
    """

    _supports_delta = True

    def __init__(self, spec: ParametrizationSpec):
        if spec.granularity not in ("tensor", "channel"):
            raise ConfigError(
                f"parametrization scale: granularity {spec.granularity!r} is not tensor/channel"
            )
        super().__init__(spec)
        self._model: nn.Module | None = None
        self._slots: list[_Slot] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._x = torch.zeros(0, dtype=torch.float32)
        self._exp = self._x
        self._expm1 = self._x
        self._busy = False

    # -- binding -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self.detach()
        tensors = select_tensors(model, self.spec, default_filter=_default_owner)
        for tensor in tensors:
            _check_supported(tensor)
        self._slots = self._layout(tensors)
        device = tensors[0].param.device
        self._x = torch.zeros(self.dimension, dtype=torch.float32, device=device)
        self._use(self._x)
        self._model = model
        self._install_hooks()
        self.check_dimension()

    def _layout(self, tensors: list[SelectedTensor]) -> list[_Slot]:
        slots, start = [], 0
        for tensor in tensors:
            size = 1 if self.spec.granularity == "tensor" else tensor.param.shape[0]
            slots.append(_Slot(tensor, start, size))
            start += size
        return slots

    def _install_hooks(self) -> None:
        for slot in self._slots:
            for _, module, _ in slot.tensor.owners:
                if isinstance(module, nn.Embedding):
                    handle = module.register_forward_hook(
                        _EmbeddingHook(self, slot), with_kwargs=True
                    )
                else:
                    handle = module.register_forward_hook(_OutputHook(self, slot))
                self._handles.append(handle)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- the space -----------------------------------------------------------------------------
    @property
    def dimension(self) -> int:
        return sum(slot.size for slot in self._slots)

    @property
    def x(self) -> torch.Tensor:
        """The current log-scales (float32, on the model's device); a copy."""
        return self._x.clone()

    @property
    def tensors(self) -> list[SelectedTensor]:
        return [slot.tensor for slot in self._slots]

    def touched_modules(self) -> list[str]:
        return touched_module_names(self.tensors, self._bound_model())

    def apply_step(self, step: Step) -> None:
        """Canonical replay: ``x += coefficient * rademacher(seed, 0, dimension)``."""
        self._check_idle("apply_step")
        if step.delta is not None:
            self._x.add_(self._delta_tensor(step.delta).to(self._x.device))
        else:
            add_scaled_direction_(self._x, step.seed, 0, step.coefficient)
        self._use(self._x)

    def perturbed(self, seed: int, scale: float) -> AbstractContextManager[None]:
        """Hooks use ``x + scale * z(seed)`` (``scale`` rounded to float32); no weight changes."""
        self._check_idle("perturbed")
        candidate = self._x.clone()
        add_scaled_direction_(candidate, seed, 0, as_float32(scale))
        return self._using(candidate)

    def _perturbed_delta(self, delta: torch.Tensor) -> AbstractContextManager[None]:
        """Hooks use ``x + delta``: the bits of x after ``apply_step(Step.explicit(delta))``."""
        self._check_idle("perturbed")
        return self._using(self._x + delta.to(self._x.device))

    @contextmanager
    def _using(self, candidate: torch.Tensor) -> Iterator[None]:
        self._busy = True
        self._use(candidate)
        try:
            yield
        finally:
            self._use(self._x)
            self._busy = False

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights with ``W * exp(x)`` folded in once (float32 math, cast to the weight dtype).

        Equal to the hook evaluation only up to float rounding (see the module docstring).
        """
        self._check_idle("export_state_dict")
        state = {k: v.detach().clone() for k, v in self._bound_model().state_dict().items()}
        for slot in self._slots:
            weight = slot.tensor.param.detach()
            factor = torch.exp(self._x[slot.start : slot.start + slot.size])
            if slot.size > 1 and weight.dim() > 1:
                factor = factor.view(-1, *([1] * (weight.dim() - 1)))
            folded = (weight.to(torch.float32) * factor).to(weight.dtype)
            for alias in slot.tensor.aliases:
                if alias in state:
                    state[alias] = folded.clone()
        return state

    # -- hooks' view of x ------------------------------------------------------------------------
    def _use(self, x: torch.Tensor) -> None:
        """Point the hooks at log-scales ``x`` (exp computed once, not once per module)."""
        self._exp = torch.exp(x)
        self._expm1 = torch.expm1(x)

    def factors(self, slot: _Slot) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp(x), expm1(x))`` of one slot, as the hooks currently see them."""
        end = slot.start + slot.size
        return self._exp[slot.start : end], self._expm1[slot.start : end]

    def _bound_model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("parametrization scale is not attached to a model")
        return self._model

    def _check_idle(self, what: str) -> None:
        self._bound_model()
        if self._busy:
            raise RuntimeError(f"{what} called inside perturbed(); leave the context first")


def _check_supported(tensor: SelectedTensor) -> None:
    for module_name, module, attribute in tensor.owners:
        if attribute != "weight" or module_kind(module) is None:
            raise ConfigError(
                f"parametrization scale: {module_name}.{attribute} ({type(module).__name__}) "
                "is not supported; only weights of Linear, Embedding and norm modules"
            )


def scale_features(
    output: torch.Tensor, factor: torch.Tensor, factor_m1: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Scale the last dimension of ``output`` as if the weight rows were scaled (float32 math)."""
    out32 = output.to(torch.float32)
    factor, factor_m1 = factor.to(output.device), factor_m1.to(output.device)
    if bias is None:
        scaled = out32 * factor
    else:
        scaled = out32 + (out32 - bias.to(torch.float32)) * factor_m1
    return scaled.to(output.dtype)


class _OutputHook:
    """Forward hook of a Linear or norm module: scales its output features."""

    def __init__(self, owner: ScaleParametrization, slot: _Slot):
        self._owner = owner
        self._slot = slot

    def __call__(self, module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        factor, factor_m1 = self._owner.factors(self._slot)
        return scale_features(output, factor, factor_m1, getattr(module, "bias", None))


class _EmbeddingHook:
    """Forward hook of an embedding: row of token v scaled by exp(x_v) (or the tensor's scalar)."""

    def __init__(self, owner: ScaleParametrization, slot: _Slot):
        self._owner = owner
        self._slot = slot

    def __call__(
        self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> torch.Tensor:
        factor = self._owner.factors(self._slot)[0].to(output.device)
        if self._slot.size > 1:
            ids = args[0] if args else kwargs["input"]
            factor = factor[ids].unsqueeze(-1)
        return cast(torch.Tensor, (output.to(torch.float32) * factor).to(output.dtype))
