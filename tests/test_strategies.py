"""The ask/tell strategies: the ES and its step-size rule, the vote, the registry."""

from __future__ import annotations

import math

import pytest
from helpers import run_config_data

from sottovoce.common.config import RunConfig
from sottovoce.common.errors import ConfigError
from sottovoce.common.protocol.answers import AnswerKind, decode_choice
from sottovoce.common.protocol.seeds import candidate_seed
from sottovoce.server.strategies import (
    ComparisonES,
    DPZero,
    RoundAnswers,
    StepSizeRule,
    build_strategy,
)
from sottovoce.server.strategies.comparison import FAILURE_FACTOR, SUCCESS_FACTOR
from sottovoce.server.strategies.votes import weighted_plurality


def make(candidates: int = 1, mirrored: bool = False) -> ComparisonES:
    rule = StepSizeRule(step=0.1, min_step=0.001, max_step=1.0)
    return ComparisonES(run_seed=7, candidates=candidates, step_rule=rule, mirrored=mirrored)


def test_one_fifth_rule_is_stationary_at_one_fifth() -> None:
    assert math.isclose(SUCCESS_FACTOR * FAILURE_FACTOR**4, 1.0)
    rule = StepSizeRule(step=0.1, min_step=0.01, max_step=0.2)
    rule.update(True)
    assert rule.step == 0.2
    rule.update(True)
    assert rule.step == 0.2  # clipped
    for _ in range(100):
        rule.update(False)
    assert rule.step == 0.01


def test_ask_is_deterministic_per_round_and_distinct() -> None:
    es = make(candidates=3)
    first = es.ask(4)
    assert first == make(candidates=3).ask(4)
    assert len({c.seed for c in first}) == 3
    assert es.ask(5) != first
    assert candidate_seed(7, 4, 0) == first[0].seed
    assert 0 <= first[0].seed < 2**64


def test_scales_never_exceed_the_max_step_after_float32_rounding() -> None:
    rule = StepSizeRule(step=0.2, min_step=0.001, max_step=0.2)
    es = ComparisonES(run_seed=1, candidates=1, step_rule=rule)
    (candidate,) = es.ask(0)
    assert candidate.scale <= 0.2 and 0.2 - candidate.scale < 1e-7


def test_mirrored_pairs_share_a_seed_with_opposite_scales() -> None:
    es = make(candidates=2, mirrored=True)
    plus, minus = es.ask(0)
    assert plus.seed == minus.seed and plus.scale == -minus.scale


def test_tell_accepts_winner_and_adapts_step() -> None:
    es = make()
    (candidate,) = es.ask(0)
    outcome = es.tell(RoundAnswers((candidate,), {"a": 1, "b": 1, "c": 0}))
    step = outcome.step
    assert step is not None and step.seed == candidate.seed and step.coefficient == candidate.scale
    assert outcome.winner == 0 and es.step_size == 0.2
    assert es.tell(RoundAnswers((candidate,), {"a": 0})).step is None
    assert math.isclose(es.step_size, 0.2 * FAILURE_FACTOR)


def test_the_registry_builds_each_algorithm_with_its_answer_kind() -> None:
    def config(**run: object) -> RunConfig:
        return RunConfig.model_validate(run_config_data(**run))

    assert build_strategy(config()).answer_kind is AnswerKind.COMPARE
    lam = config(run={"algorithm": "bboxer-1+lambda"}, optimizer={"candidates": 3})
    assert build_strategy(lam).answer_kind is AnswerKind.BEST_OF
    dp = config(run={"algorithm": "dpzero"}, evaluation={"mode": "poisson", "batch_size": 8})
    assert isinstance(build_strategy(dp), DPZero)
    resumed = build_strategy(config(), step_size=0.125)
    assert resumed.step_size == 0.125  # a restart takes the journaled step size back
    with pytest.raises(ConfigError, match="no strategy"):
        build_strategy(
            config().model_copy(update={"run": config().run.model_copy(update={"algorithm": "x"})})
        )


def test_weighted_plurality_ties_keep_incumbent() -> None:
    assert weighted_plurality({"a": 1, "b": 1, "c": 0}, {}) == 1
    assert weighted_plurality({"a": 1, "b": 0}, {}) == 0
    assert weighted_plurality({"a": 1, "b": 0, "c": 0}, {"a": 3.0}) == 1
    assert weighted_plurality({"a": 2, "b": 3}, {}) == 0
    assert weighted_plurality({}, {}) == 0
    assert decode_choice(0) is None and decode_choice(3) == 2
