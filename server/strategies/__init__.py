"""The coordinator's ask/tell strategies, one per algorithm, found by name in the registry.

Add an algorithm: write a :class:`~sottovoce.server.strategies.base.Strategy` in a module
here, register it under its name with ``@register``, and add the name and its answer kind
to :data:`sottovoce.common.protocol.answers.ALGORITHM_ANSWER_KINDS` (what holders agree to).
"""

from sottovoce.server.strategies.base import (
    RoundAnswers,
    RoundOutcome,
    Strategy,
    build_strategy,
    register,
)
from sottovoce.server.strategies.cma_es import CMAStrategy
from sottovoce.server.strategies.comparison import ComparisonES, StepSizeRule
from sottovoce.server.strategies.dpzero import DPZero
from sottovoce.server.strategies.weighted_es import WeightedES

__all__ = [
    "CMAStrategy",
    "ComparisonES",
    "DPZero",
    "RoundAnswers",
    "RoundOutcome",
    "StepSizeRule",
    "Strategy",
    "WeightedES",
    "build_strategy",
    "register",
]
