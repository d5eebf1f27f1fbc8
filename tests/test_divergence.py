"""The divergence penalty: pinned like the fitness, computed on a secret, fixed set of the
holder's prompts against the base, and able to overrule a label-score gain."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    FITNESS,
    make_policy,
    make_task,
    policy_data,
    run_config_data,
    run_spec,
    scheduled_candidates,
    scheduled_seed,
    tiny_records,
    write_policy,
    write_run_config,
)

from sottovoce.client.divergence import secret_prompts
from sottovoce.client.evaluator import CandidateEvaluator
from sottovoce.client.holder import DataHolder
from sottovoce.client.ledger import Ledger
from sottovoce.client.policy import check_run, load_policy
from sottovoce.common.config import load_config
from sottovoce.common.errors import ConfigError, PolicyViolation
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import load_model
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.protocol.answers import AnswerKind, rank_candidates
from sottovoce.common.protocol.messages import Candidate, FitnessSpec, check_fitness_spec
from sottovoce.common.quality import last_position_kl
from sottovoce.common.steplog import Step, as_float32
from sottovoce.common.tiny_model import build_tiny_llama, build_tiny_tokenizer
from sottovoce.common.transport.wire import WireError, fitness_from_proto, fitness_to_proto

PENALIZED = dataclasses.replace(FITNESS, kl_weight=1.0, kl_prompts=8)
PENALIZED_TABLE = {"kl_weight": 1.0, "kl_prompts": 8}
CHOICES_ONLY = ["plain", "randomized-response"]
NORM_SCALES = ParametrizationSpec(kind="scale", patterns=("model.norm.weight",))
LAST_BLOCK = ParametrizationSpec(kind="scale", last_k_blocks=1)
RECORDS = tiny_records(40, seed=3)


# -- the spec --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kl_weight": -1.0}, "kl_weight"),
        ({"kl_weight": float("nan")}, "kl_weight"),
        ({"kl_weight": 1.0}, "kl_prompts"),  # a weight with no prompts
        ({"kl_prompts": 4}, "kl_prompts"),  # prompts with no weight
    ],
)
def test_unsound_penalties_are_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        check_fitness_spec(dataclasses.replace(FITNESS, **changes))


def test_the_penalty_travels_on_the_wire_within_bounds() -> None:
    assert fitness_from_proto(fitness_to_proto(PENALIZED)) == PENALIZED
    message = fitness_to_proto(PENALIZED)
    message.kl_prompts = 129
    with pytest.raises(WireError, match=r"kl_prompts: 129 is outside 0..128"):
        fitness_from_proto(message)
    message.kl_prompts, message.kl_weight = 8, 1e7
    with pytest.raises(WireError, match="kl_weight"):
        fitness_from_proto(message)


# -- pinned in the policy --------------------------------------------------------------------
def penalized_policy(tmp_path: Path, **overrides: Any) -> Any:
    return make_policy(
        tmp_path / "ledger",
        fitness=PENALIZED_TABLE,
        answer_mechanisms=CHOICES_ONLY,
        **overrides,
    )


@pytest.mark.parametrize("asked", [FITNESS, dataclasses.replace(PENALIZED, kl_weight=0.01)])
def test_the_penalty_is_pinned_and_a_changed_one_refused(tmp_path: Path, asked: Any) -> None:
    policy = penalized_policy(tmp_path)
    check_run(policy, run_spec(fitness=PENALIZED), policy.expected_model_fingerprint)
    with pytest.raises(PolicyViolation, match="pinned fitness in kl_weight"):
        check_run(policy, run_spec(fitness=asked), policy.expected_model_fingerprint)


def test_a_run_cannot_add_a_penalty_the_policy_does_not_pin(tmp_path: Path) -> None:
    policy = make_policy(tmp_path / "ledger")
    with pytest.raises(PolicyViolation, match="pinned fitness in kl_weight"):
        check_run(policy, run_spec(fitness=PENALIZED), policy.expected_model_fingerprint)


def test_a_policy_cannot_pair_the_penalty_with_dp_scalar(tmp_path: Path) -> None:
    path = write_policy(tmp_path / "policy.toml", tmp_path / "ledger", fitness=PENALIZED_TABLE)
    with pytest.raises(ConfigError, match=r"policy.toml: fitness.kl_weight: .*dp-scalar"):
        load_policy(path)
    data = policy_data(tmp_path / "ledger", fitness=PENALIZED_TABLE)
    assert data["fitness"]["kl_prompts"] == 8
    path = write_policy(
        tmp_path / "ok.toml", tmp_path / "ledger", fitness=PENALIZED_TABLE,
        answer_mechanisms=CHOICES_ONLY,
    )  # fmt: skip
    assert load_policy(path).fitness == PENALIZED


def test_a_dpzero_run_config_cannot_carry_the_penalty(tmp_path: Path) -> None:
    path = write_run_config(
        tmp_path / "run.toml",
        run={"algorithm": "dpzero"},
        evaluation={"mode": "poisson"},
        fitness=PENALIZED_TABLE,
    )
    with pytest.raises(ConfigError, match=r"fitness.kl_weight: .*dpzero"):
        load_config(path)
    assert load_config(write_run_config(tmp_path / "ok.toml", fitness=PENALIZED_TABLE))
    assert run_config_data()["fitness"]  # the helpers' base config has a fitness table


# -- the secret prompts ----------------------------------------------------------------------
def test_secret_prompts_are_fixed_by_key_and_records_alone() -> None:
    key, other = bytes(range(32)), bytes(32)
    chosen = secret_prompts(RECORDS, key, 8)
    assert len(chosen) == 8 and all(record in RECORDS for record in chosen)
    shuffled = RECORDS[:]
    random.Random(0).shuffle(shuffled)
    assert secret_prompts(shuffled, key, 8) == chosen  # order does not choose them
    assert secret_prompts(RECORDS, other, 8) != chosen  # the key does
    assert len(secret_prompts(RECORDS, key, 1000)) == len(RECORDS)


# -- the evaluator ---------------------------------------------------------------------------
def evaluator(
    spec: ParametrizationSpec, fitness: FitnessSpec = PENALIZED, **kwargs: bool
) -> CandidateEvaluator:
    model = build_tiny_llama(seed=1)
    parametrization = build_parametrization(spec)
    parametrization.attach(model)
    return CandidateEvaluator(
        model, parametrization, build_fitness(fitness, build_tiny_tokenizer()), max_batch=8,
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("spec", [NORM_SCALES, LAST_BLOCK], ids=["head-cache", "prefix"])
def test_kl_is_zero_on_the_base_and_matches_a_full_forward(spec: ParametrizationSpec) -> None:
    fast = evaluator(spec)
    plain = evaluator(spec, reuse_prefix=False, cache_head_inputs=False)
    prompts = RECORDS[:12]
    for which in (fast, plain):
        which.take_divergence_reference(prompts)
        assert which.divergence_now() == 0.0  # exactly: the base against itself
    step = Step(seed=5, coefficient=as_float32(0.3))
    fast.apply_steps([step])
    plain.apply_steps([step])
    moved = fast.divergence_now()
    assert moved > 1e-6
    assert moved == pytest.approx(plain.divergence_now(), rel=1e-4)
    # And it is the KL of the model's own logits, computed from scratch.
    model = plain.model
    batch = plain.fitness.prepare_prompts(prompts, max_batch=64)[0]
    with torch.inference_mode():
        tuned = model(**batch.model_inputs()).logits[:, -1, :]
    base_model = build_tiny_llama(seed=1)
    with torch.inference_mode():
        base = base_model(**batch.model_inputs()).logits[:, -1, :]
    assert moved == pytest.approx(float(last_position_kl(base, tuned).mean()), rel=1e-4)


def test_the_reference_is_refused_once_the_base_has_moved() -> None:
    moved = evaluator(NORM_SCALES)
    moved.apply_steps([Step(seed=5, coefficient=as_float32(0.1))])
    with pytest.raises(RuntimeError, match="before any log step"):
        moved.take_divergence_reference(RECORDS[:4])


def test_the_penalty_overrules_a_label_score_gain() -> None:
    """Among candidates that each raise the label score, the penalized fitness takes the
    one that moves the model least, or none; the unpenalized one takes the largest gain."""
    examples = RECORDS
    candidates = [Candidate(seed=s, scale=as_float32(0.5)) for s in range(1, 40)]
    plain = evaluator(NORM_SCALES, FITNESS)
    incumbent, scores = plain.score(examples, candidates)
    gains = [float(s.mean() - incumbent.mean()) for s in scores]
    winners = [c for c, g in zip(candidates, gains, strict=True) if g > 0]
    assert winners, "no candidate raises the label score: pick other seeds"
    choice, _ = plain.choose(examples, winners, AnswerKind.BEST_OF)
    assert choice != 0  # without a penalty a gain is taken

    heavy = dataclasses.replace(PENALIZED, kl_weight=1e5)
    penalized = evaluator(NORM_SCALES, heavy)
    penalized.take_divergence_reference(examples[:8])
    choice, stats = penalized.choose(examples, winners, AnswerKind.BEST_OF)
    assert choice == 0  # every gain costs more in KL than it brings
    assert stats["incumbent_kl"] == 0.0 and stats["best_candidate_kl"] > 0
    # A small weight leaves the choice to the scores again.
    light = evaluator(NORM_SCALES, dataclasses.replace(PENALIZED, kl_weight=1e-9))
    light.take_divergence_reference(examples[:8])
    assert light.choose(examples, winners, AnswerKind.BEST_OF)[0] == choice_without(winners)


def choice_without(winners: list[Candidate]) -> int:
    plain = evaluator(NORM_SCALES, FITNESS)
    return plain.choose(RECORDS, winners, AnswerKind.BEST_OF)[0]


def test_a_penalized_choice_without_a_reference_fails_to_the_default() -> None:
    unreferenced = evaluator(NORM_SCALES)
    with pytest.raises(RuntimeError, match="no divergence reference"):
        unreferenced.choose(RECORDS, [Candidate(seed=3, scale=as_float32(0.1))], AnswerKind.COMPARE)


# -- the holder ------------------------------------------------------------------------------
def make_holder(tmp_path: Path, policy: Any) -> DataHolder:
    ledger = Ledger.open(tmp_path / "ledger", "set", policy.max_bits)
    return DataHolder("h", tiny_records(64), policy, ledger, lambda: load_model("tiny-llama"))


def test_a_holder_answers_a_penalized_run_and_reports_its_kl(tmp_path: Path) -> None:
    holder = make_holder(tmp_path, penalized_policy(tmp_path))
    spec = run_spec(fitness=PENALIZED)
    holder.accept_run(spec)
    step = Step(seed=scheduled_seed(spec, 0), coefficient=as_float32(0.05))
    answer = holder.answer(make_task(spec, "t0"))
    assert answer.choice in (0, 1) and not answer.refused
    answer = holder.answer(make_task(spec, "t1", new_steps=[step]))
    assert not answer.refused
    assert holder.status.defaulted == 0  # the penalty was computed, not failed over
    report = holder.local_report(2.0)
    assert report["kl_prompts"] == 8 and report["kl_weight"] == 1.0
    assert report["kl_to_base_nats"] > 0  # one step moved it


def test_an_unpenalized_holder_still_reports_kl_on_its_prompts(tmp_path: Path) -> None:
    holder = make_holder(tmp_path, make_policy(tmp_path / "ledger"))
    holder.accept_run(run_spec())
    report = holder.local_report(0.0)
    assert report["kl_to_base_nats"] == 0.0 and report["kl_prompts"] == 64
    assert np.isfinite(report["train_risk"])


# -- rankings carry the penalty too ----------------------------------------------------------
LOWRANK_LAST = ParametrizationSpec(kind="lowrank", rank=1, last_k_blocks=1)


@pytest.mark.parametrize("spec", [NORM_SCALES, LOWRANK_LAST], ids=["one-at-a-time", "batched"])
def test_a_ranking_orders_the_penalized_fitness_a_choice_compares(
    spec: ParametrizationSpec,
) -> None:
    """A rank answer is a choice-like answer: it orders mean score - kl_weight x KL, each
    KL read with that candidate in place, whether the population runs batched or not."""
    examples = RECORDS[:24]
    candidates = [Candidate(seed=s, scale=as_float32(0.4)) for s in range(1, 7)]
    heavy = dataclasses.replace(PENALIZED, kl_weight=50.0)
    ranker = evaluator(spec, heavy)
    ranker.take_divergence_reference(examples[:8])
    ranking, stats = ranker.rank(examples, candidates, 0)

    check = evaluator(spec, heavy)
    check.batch_population = False
    check.take_divergence_reference(examples[:8])
    _, scores = check.score(examples, candidates, with_incumbent=False)
    kls = []
    for candidate in candidates:
        with check.parametrization.perturbed_candidate(candidate):
            kls.append(check.divergence_now())
    fitness = [float(s.mean()) - 50.0 * kl for s, kl in zip(scores, kls, strict=True)]
    assert ranking == rank_candidates(fitness, 0)
    assert stats["best_candidate_kl"] == pytest.approx(kls[ranking[0]], rel=1e-4, abs=1e-9)
    unpenalized = rank_candidates([float(s.mean()) for s in scores], 0)
    assert ranking != unpenalized, "the penalty changed no order: pick a larger weight"


def test_a_penalized_ranking_without_a_reference_fails_to_the_default() -> None:
    unreferenced = evaluator(NORM_SCALES)
    candidates = [Candidate(seed=s, scale=as_float32(0.1)) for s in (3, 4)]
    with pytest.raises(RuntimeError, match="no divergence reference"):
        unreferenced.rank(RECORDS, candidates, 0)


def test_a_holder_answers_a_penalized_ranking_run(tmp_path: Path) -> None:
    """The policy lets a ranking (plain answers) carry the pinned penalty; the holder
    computes it rather than failing over to the default answer."""
    policy = penalized_policy(
        tmp_path,
        allowed_algorithms=["es-mu-lambda"],
        parametrizations=[dataclasses.asdict(NORM_SCALES)],
    )
    holder = make_holder(tmp_path, policy)
    base = run_spec(algorithm="bboxer-1+lambda", parametrization=NORM_SCALES, fitness=PENALIZED)
    spec = dataclasses.replace(
        base, algorithm="es-mu-lambda", answer_kind=AnswerKind.RANKING, rank_depth=2
    )
    holder.accept_run(spec)
    answer = holder.answer(
        make_task(spec, "r0", candidates=scheduled_candidates(spec, 0, (0.3, -0.3, 0.2)))
    )
    assert answer.ranking is not None and len(answer.ranking) == 2 and not answer.refused
    assert holder.status.defaulted == 0
