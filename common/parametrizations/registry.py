"""Build a parametrization from its spec: the one place that maps a kind to a class."""

from __future__ import annotations

from sottovoce.common.errors import ConfigError
from sottovoce.common.parametrizations.base import Parametrization, ParametrizationSpec
from sottovoce.common.parametrizations.full import FullParametrization
from sottovoce.common.parametrizations.lora import LoraParametrization
from sottovoce.common.parametrizations.lowrank import LowRankParametrization
from sottovoce.common.parametrizations.scale import ScaleParametrization
from sottovoce.common.parametrizations.select import SelectParametrization
from sottovoce.common.parametrizations.subspace import SubspaceParametrization

_CLASSES: dict[str, type[Parametrization]] = {
    "full": FullParametrization,
    "select": SelectParametrization,
    "subspace": SubspaceParametrization,
    "scale": ScaleParametrization,
    "lowrank": LowRankParametrization,
    "lora": LoraParametrization,
}

PARAMETRIZATION_KINDS: tuple[str, ...] = tuple(_CLASSES)


def build_parametrization(spec: ParametrizationSpec) -> Parametrization:
    """A fresh, unattached parametrization for ``spec``; ConfigError for a bad spec."""
    cls = _CLASSES.get(spec.kind)
    if cls is None:
        known = ", ".join(PARAMETRIZATION_KINDS)
        raise ConfigError(f"parametrization kind {spec.kind!r} is unknown (known: {known})")
    return cls(spec)
