"""Rank answers: their bit cost and charge, the tie rule, the wire, and rank aggregation."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    DIRECTION_SEED,
    make_policy,
    make_task,
    run_spec,
    scheduled_candidates,
    tiny_records,
)

from sottovoce.client.holder import DataHolder
from sottovoce.client.ledger import Ledger
from sottovoce.client.policy import check_steps
from sottovoce.common.errors import PolicyViolation, RefusalCode
from sottovoce.common.models import load_model
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.parametrizations.drift import DriftTracker
from sottovoce.common.protocol.answers import (
    AnswerKind,
    answer_bits,
    choice_outcomes,
    decode_ranking,
    encode_ranking,
    rank_candidates,
)
from sottovoce.common.protocol.messages import Answer, Candidate, RunSpec
from sottovoce.common.protocol.seeds import SeedSchedule, candidate_seed
from sottovoce.common.steplog import Step, genesis_hash
from sottovoce.common.transport.wire import (
    WireError,
    answer_from_proto,
    answer_to_proto,
    task_from_proto,
    task_to_proto,
)
from sottovoce.server.strategies.ranks import borda_ranking, copeland_ranking, derived_losses


def test_a_full_ranking_of_eight_costs_log2_of_eight_factorial() -> None:
    assert answer_bits(AnswerKind.RANKING, 8) == pytest.approx(math.log2(40320))
    assert round(answer_bits(AnswerKind.RANKING, 8), 1) == 15.3
    # top-mu: log2(lambda! / (lambda - mu)!); mu = lambda - 1 says as much as the full order
    assert answer_bits(AnswerKind.RANKING, 8, rank_depth=3) == pytest.approx(math.log2(8 * 7 * 6))
    assert answer_bits(AnswerKind.RANKING, 8, rank_depth=7) == answer_bits(AnswerKind.RANKING, 8)
    assert choice_outcomes(AnswerKind.RANKING, 5, rank_depth=2) == 20
    with pytest.raises(ValueError):
        answer_bits(AnswerKind.RANKING, 1)


@pytest.mark.parametrize(("n", "depth"), [(4, 0), (5, 2), (6, 1), (3, 3)])
def test_every_ranking_has_its_own_index(n: int, depth: int) -> None:
    rankings = list(itertools.permutations(range(n), depth or n))
    indexes = [encode_ranking(r, n, depth) for r in rankings]
    assert sorted(indexes) == list(range(choice_outcomes(AnswerKind.RANKING, n, rank_depth=depth)))
    assert all(decode_ranking(i, n, depth) == r for i, r in zip(indexes, rankings, strict=True))


def test_ties_are_broken_before_release_by_the_lower_index() -> None:
    assert rank_candidates([0.5, 0.7, 0.5, 0.7]) == (1, 3, 0, 2)
    assert rank_candidates([1.0, 1.0, 1.0], rank_depth=2) == (0, 1)
    with pytest.raises(ValueError):
        rank_candidates([0.1, math.nan])


def test_a_ranking_answer_crosses_the_wire_and_bad_ones_do_not() -> None:
    answer = Answer(task_id="t1", choice=None, ranking=(3, 0, 2))
    message = answer_to_proto(answer)
    assert answer_from_proto(message) == answer
    assert len(message.SerializeToString()) < 200
    for bad in [(1, 1), (), (64,)]:
        with pytest.raises(WireError):
            answer_to_proto(Answer(task_id="t1", choice=None, ranking=bad))
    with pytest.raises(WireError):
        answer_to_proto(Answer(task_id="t1", choice=2, ranking=(0, 1)))


def test_explicit_candidates_cross_the_wire_exactly() -> None:
    spec = dataclasses.replace(
        run_spec(algorithm="bboxer-1+lambda"), answer_kind=AnswerKind.RANKING
    )
    exact = (Candidate.explicit((0.25, -0.5)), Candidate.explicit((0.0, 0.125)))
    task = make_task(spec, "t1", candidates=exact)
    assert task_from_proto(task_to_proto(task)) == task
    with pytest.raises(WireError):  # 1e-3 is not exactly a float32
        task_to_proto(dataclasses.replace(task, candidates=(Candidate.explicit((1e-3,)),) * 2))
    with pytest.raises(WireError):  # an explicit candidate has seed 0 and scale 1
        task_to_proto(dataclasses.replace(task, candidates=(Candidate(5, 1.0, (0.5,)),) * 2))
    with pytest.raises(WireError):  # a ranking ranks at least two
        task_to_proto(dataclasses.replace(task, candidates=exact[:1]))


# -- aggregation ---------------------------------------------------------------------------------
def _liar_cannot_reverse(holders: int, n: int, depth: int, rng: random.Random) -> None:
    shared = list(range(n))
    rng.shuffle(shared)
    honest = {f"h{i}": tuple(shared[: depth or n]) for i in range(holders - 1)}
    liar_order = list(range(n))
    for _ in range(50):  # many lies, the worst of them tried too
        rng.shuffle(liar_order)
        for lie in (tuple(liar_order), tuple(reversed(shared))):
            votes = {**honest, "liar": lie[: depth or n]}
            assert copeland_ranking(votes, n, depth) == tuple(shared[: depth or n])


@pytest.mark.parametrize(("holders", "n", "depth"), [(3, 8, 0), (4, 5, 0), (3, 8, 3), (5, 6, 1)])
def test_one_liar_cannot_reverse_an_order_all_honest_holders_share(
    holders: int, n: int, depth: int
) -> None:
    _liar_cannot_reverse(holders, n, depth, random.Random(holders * 100 + n * 10 + depth))


def test_borda_can_be_flipped_by_one_liar_where_copeland_is_not() -> None:
    honest = {"a": (0, 1, 2, 3, 4, 5, 6, 7), "b": (0, 1, 2, 3, 4, 5, 6, 7)}
    liar = {"liar": (1, 2, 3, 4, 5, 6, 7, 0)}  # the honest runner-up first, winner last
    assert borda_ranking({**honest, **liar}, 8)[0] == 1  # flipped
    assert copeland_ranking({**honest, **liar}, 8)[0] == 0


def test_copeland_ties_go_to_the_lower_index_and_weights_count() -> None:
    votes = {"a": (0, 1), "b": (1, 0)}
    assert copeland_ranking(votes, 2) == (0, 1)
    assert copeland_ranking(votes, 2, weights={"b": 2.0}) == (1, 0)


def test_derived_losses_are_the_ranks_and_mu_for_the_unnamed() -> None:
    assert derived_losses((2, 0), 4) == [1.0, 2.0, 0.0, 2.0]


# -- the holder releases and charges a ranking -------------------------------------------------
RANK_SPEC = ParametrizationSpec(kind="scale", patterns=("model.norm.weight",))


def _ranking_holder(tmp_path: Path) -> tuple[DataHolder, RunSpec]:
    ledger_dir = tmp_path / "ledger"
    policy = make_policy(
        ledger_dir,
        allowed_algorithms=["es-mu-lambda"],
        parametrizations=[dataclasses.asdict(RANK_SPEC)],
    )
    holder = DataHolder(
        "h",
        tiny_records(48),
        policy,
        Ledger.open(ledger_dir, "ranks", 1000.0),
        lambda: load_model("tiny-llama"),
    )
    base = run_spec(algorithm="bboxer-1+lambda", parametrization=RANK_SPEC)
    spec = dataclasses.replace(
        base, algorithm="es-mu-lambda", answer_kind=AnswerKind.RANKING, rank_depth=3
    )
    holder.accept_run(spec)
    return holder, spec


def test_a_holder_charges_a_top_mu_ranking_its_bits_and_resends_it_unchanged(
    tmp_path: Path,
) -> None:
    holder, spec = _ranking_holder(tmp_path)
    task = make_task(spec, "r1", candidates=scheduled_candidates(spec, 0, (0.1, -0.1, 0.2, 0.3)))
    answer = holder.answer(task)
    assert answer.ranking is not None and len(answer.ranking) == 3 and answer.choice is None
    assert holder.ledger.spent_bits == pytest.approx(math.log2(4 * 3 * 2))
    record = holder.ledger.records[-1]
    assert record.kind == "ranking" and record.choice == encode_ranking(answer.ranking, 4, 3)
    assert holder.answer(task) == answer  # re-sent: the same ranking, never charged twice
    assert holder.ledger.spent_bits == pytest.approx(math.log2(24))


def test_a_ranking_task_the_policy_does_not_allow_is_refused(tmp_path: Path) -> None:
    holder, spec = _ranking_holder(tmp_path)
    explicit = make_task(
        spec,
        "r2",
        candidates=[Candidate.explicit((0.1,) * 32), Candidate.explicit((0.2,) * 32)],
    )
    assert holder.answer(explicit).refusal is RefusalCode.MALFORMED  # seeded algorithm
    lone = make_task(spec, "r3", candidates=scheduled_candidates(spec, 0, (0.1, 0.2)))
    assert holder.answer(lone).refusal is RefusalCode.MALFORMED  # fewer than rank_depth
    assert holder.ledger.spent_bits == 0.0
    assert genesis_hash(holder.fingerprint, RANK_SPEC.canonical_id()) == holder.log_head


# -- the guard on rank runs' steps ---------------------------------------------------------------
def _steps(steps: list[Step], algorithm: str, **policy: Any) -> list[int]:
    tracker = DriftTracker([(0, 4)])
    rounds, _ = check_steps(
        make_policy(Path("/nonexistent"), **policy),
        steps,
        SeedSchedule(DIRECTION_SEED, 4),
        last_round=-1,
        before_round=10,
        drift=tracker,
        name="task t",
        algorithm=algorithm,
    )
    return rounds


def test_es_mu_lambda_steps_share_a_round_each_seed_once() -> None:
    s = [candidate_seed(DIRECTION_SEED, 2, lane) for lane in range(3)]
    assert _steps([Step(s[0], 0.125), Step(s[2], 0.0625)], "es-mu-lambda") == [2, 2]
    with pytest.raises(PolicyViolation, match="each seed once"):
        _steps([Step(s[0], 0.125), Step(s[0], 0.0625)], "es-mu-lambda")
    with pytest.raises(PolicyViolation, match="not a candidate"):  # one-step algorithms
        _steps([Step(s[0], 0.125), Step(s[2], 0.0625)], "bboxer-1+lambda")


def test_explicit_steps_only_for_cma_within_the_cap_one_a_round() -> None:
    delta = Step.explicit((0.25, -0.25, 0.0, 0.125))
    assert _steps([delta, delta], "cma-es") == [0, 1]
    with pytest.raises(PolicyViolation, match="seeded steps only"):
        _steps([delta], "es-mu-lambda")
    with pytest.raises(PolicyViolation, match="max_perturbation_scale"):
        _steps([Step.explicit((0.75, 0.0, 0.0, 0.0))], "cma-es")
    with pytest.raises(PolicyViolation, match="coordinates"):
        _steps([Step.explicit((0.25, 0.0))], "cma-diagonal")
    with pytest.raises(PolicyViolation, match="logs explicit steps"):
        _steps([Step(candidate_seed(DIRECTION_SEED, 0, 0), 0.125)], "cma-es")
    with pytest.raises(PolicyViolation, match="not before round"):
        _steps([delta] * 11, "cma-es")


def test_a_ranking_crosses_flower_records_too() -> None:
    flower = pytest.importorskip("sottovoce.common.transport.flower_records")
    state = flower.HolderState(log_version=0, log_head="0" * 64)
    answer = Answer(task_id="t1", choice=None, ranking=(1, 0, 3))
    assert flower.read_answer(flower.answer_content(answer, state)) == (answer, state)
