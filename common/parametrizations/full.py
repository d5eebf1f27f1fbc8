"""``full``: every floating-point parameter is a coordinate (MeZO / DPZero style).

``full`` is ``select`` with no filter: every floating-point tensor of the model, each tied
tensor once, in :func:`iter_unique_parameters` order; see ``select.py`` for the canonical
replay and the in-place evaluation. Bit-identity across devices is promised here.
"""

from __future__ import annotations

from sottovoce.common.errors import ConfigError
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.parametrizations.select import SelectParametrization


class FullParametrization(SelectParametrization):
    """Every floating-point tensor; a spec that narrows the selection is a mistake."""

    def __init__(self, spec: ParametrizationSpec):
        if spec.patterns or spec.last_k_blocks is not None:
            raise ConfigError(
                "parametrization full: takes no patterns or last_k_blocks (use kind 'select')"
            )
        super().__init__(spec)
