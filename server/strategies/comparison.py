"""BBoxER's comparison-based evolution strategies: (1+1) and (1+lambda), one-fifth rule.

``ask`` proposes lambda candidates around the incumbent, each ``step * z(seed)``; with
``mirrored`` they come in pairs ``+step*z`` and ``-step*z`` of one seed, which halves the
chance that a good direction is missed by its sign. ``tell`` takes the weighted plurality
of the holders' choices (ties keep the incumbent) and returns the accepted step, if any.
The information per round is log2(lambda + 1) bits an answer, whatever the holders saw.
"""

from __future__ import annotations

from dataclasses import dataclass

from sottovoce.common.config import RunConfig
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.messages import Candidate
from sottovoce.common.protocol.seeds import candidate_seed
from sottovoce.common.steplog import Step, float32_toward_zero
from sottovoce.server.strategies.base import RoundAnswers, RoundOutcome, Strategy, register
from sottovoce.server.strategies.votes import plurality_winner

# One-fifth success rule: multiply the step by SUCCESS_FACTOR on success and by
# FAILURE_FACTOR on failure; at a success rate of 1/5 the step size is stationary.
SUCCESS_FACTOR = 2.0
FAILURE_FACTOR = 2.0 ** (-1.0 / 4.0)


@dataclass
class StepSizeRule:
    """Success-based step-size adaptation (the one-fifth rule), clipped to [min, max]."""

    step: float
    min_step: float
    max_step: float

    def update(self, success: bool) -> None:
        factor = SUCCESS_FACTOR if success else FAILURE_FACTOR
        self.step = min(self.max_step, max(self.min_step, self.step * factor))


class ComparisonES(Strategy):
    """(1+lambda)-ES over directions z(seed); lambda = 1 is BBoxER's (1+1)-ES (one bit)."""

    def __init__(
        self,
        *,
        run_seed: int,
        candidates: int,
        step_rule: StepSizeRule,
        mirrored: bool = False,
        weights: dict[str, float] | None = None,
    ):
        if candidates < 1:
            raise ValueError("need at least one candidate")
        self.run_seed = run_seed
        self.candidates = candidates
        self.mirrored = mirrored
        self.step_rule = step_rule
        self.weights = dict(weights or {})
        self.answer_kind = AnswerKind.COMPARE if candidates == 1 else AnswerKind.BEST_OF

    @property
    def step_size(self) -> float:
        return self.step_rule.step

    def ask(self, round_index: int) -> tuple[Candidate, ...]:
        scale = float32_toward_zero(self.step_rule.step)
        if not self.mirrored:
            return tuple(
                Candidate(seed=candidate_seed(self.run_seed, round_index, i), scale=scale)
                for i in range(self.candidates)
            )
        pairs = []  # pair i shares lane i's seed: the holder's schedule knows no other
        for i in range(self.candidates // 2):
            seed = candidate_seed(self.run_seed, round_index, i)
            pairs += [Candidate(seed=seed, scale=scale), Candidate(seed=seed, scale=-scale)]
        return tuple(pairs)

    def tell(self, answers: RoundAnswers) -> RoundOutcome:
        winner = plurality_winner(answers.choices, self.weights)
        self.step_rule.update(success=winner is not None)
        if winner is None:
            return RoundOutcome()
        chosen = answers.candidates[winner]
        return RoundOutcome.of(Step(seed=chosen.seed, coefficient=chosen.scale), winner=winner)


@register("bboxer-1+1", "bboxer-1+lambda")
def comparison_es(config: RunConfig, step_size: float | None) -> ComparisonES:
    opt = config.optimizer
    return ComparisonES(
        run_seed=config.run.seed,
        candidates=opt.candidates,
        mirrored=opt.mirrored,
        step_rule=StepSizeRule(
            step=step_size if step_size is not None else opt.initial_step,
            min_step=opt.min_step,
            max_step=opt.max_step,
        ),
        weights=config.server.holder_weights,
    )
