"""What every strategy is to the coordinator: ask for candidates, be told a round's answers.

The coordinator never sees a fitness value: ``tell`` gets the holders' choices (or their
noised scalars, for DPZero), aggregates them as its algorithm prescribes, and returns the
round's outcome: the accepted step, if any, and what the journal records. Candidate seeds
come from the public schedule (:mod:`sottovoce.common.protocol.seeds`), so a restarted
coordinator asks exactly the same questions again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sottovoce.common.config import RunConfig
from sottovoce.common.errors import ConfigError
from sottovoce.common.protocol.answers import ALGORITHM_ANSWER_KINDS, AnswerKind
from sottovoce.common.protocol.messages import Candidate
from sottovoce.common.steplog import Step


@dataclass(frozen=True)
class RoundAnswers:
    """What one round heard: each answering holder's choice, or its (dequantized) value."""

    candidates: tuple[Candidate, ...]
    choices: Mapping[str, int] = field(default_factory=dict)
    values: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundOutcome:
    """What a round decided: the steps to log (often one, or none), and what led to it.

    ``es-mu-lambda`` logs one step for each of a round's mu best seeds; every other
    strategy at most one.
    """

    steps: tuple[Step, ...] = ()
    winner: int | None = None  # comparison strategies: the accepted candidate's index
    estimate: float | None = None  # DPZero: the aggregated scalar
    ranking: tuple[int, ...] | None = None  # rank strategies: the aggregated ranking

    @classmethod
    def of(
        cls, step: Step | None, *, winner: int | None = None, estimate: float | None = None
    ) -> RoundOutcome:
        """An outcome with one step (or none)."""
        return cls(steps=() if step is None else (step,), winner=winner, estimate=estimate)

    @property
    def step(self) -> Step | None:
        """The first step, or None: what a one-step strategy took."""
        return self.steps[0] if self.steps else None


class Strategy(ABC):
    """An ask/tell optimizer over seeded directions (nevergrad's shape, seeds instead of points)."""

    answer_kind: AnswerKind

    @abstractmethod
    def ask(self, round_index: int) -> tuple[Candidate, ...]:
        """The candidates of round ``round_index`` (the same every time it is asked)."""

    @abstractmethod
    def tell(self, answers: RoundAnswers) -> RoundOutcome:
        """Aggregate one round's answers and update the strategy's state."""

    @property
    @abstractmethod
    def step_size(self) -> float:
        """The state a restart needs back (journaled with every round)."""

    def resume(self, history: Sequence[tuple[int, RoundAnswers | None]]) -> None:  # noqa: B027
        """Rebuild state a restart needs beyond the step size, from the journaled rounds.

        ``history`` is every closed round in order: its index and its answers, or None if it
        closed without a quorum (nothing was told). The default needs nothing: the seeded
        strategies' next question depends only on the step size. A library optimizer (CMA)
        is replayed: asked and told again, which reproduces its state exactly.
        """


Factory = Callable[[RunConfig, float | None], Strategy]
_REGISTRY: dict[str, Factory] = {}


def register(*names: str) -> Callable[[Factory], Factory]:
    """Register a strategy factory ``(config, restored step size) -> Strategy`` by name."""

    def decorate(factory: Factory) -> Factory:
        for name in names:
            if name not in ALGORITHM_ANSWER_KINDS:
                raise ValueError(f"strategy {name!r} is not an algorithm of the protocol")
            _REGISTRY[name] = factory
        return factory

    return decorate


def build_strategy(config: RunConfig, step_size: float | None = None) -> Strategy:
    """The strategy of ``config.run.algorithm``; ``step_size`` is a resumed run's journaled one."""
    factory = _REGISTRY.get(config.run.algorithm)
    if factory is None:
        raise ConfigError(
            f"run.algorithm: no strategy for {config.run.algorithm!r} (known: {sorted(_REGISTRY)})"
        )
    strategy = factory(config, step_size)
    if strategy.answer_kind is not ALGORITHM_ANSWER_KINDS[config.run.algorithm]:
        raise ConfigError(f"run.algorithm: {config.run.algorithm!r} asks for another answer kind")
    return strategy
