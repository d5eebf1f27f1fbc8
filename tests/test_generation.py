"""Generation fitness: greedy decoding with the KV cache, a pinned extractor, nothing sent."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, make_policy, make_task, run_spec, scheduled_candidates, tiny_fingerprint

from sottovoce.client.evaluator import CandidateEvaluator
from sottovoce.client.holder import DataHolder
from sottovoce.client.ledger import Ledger
from sottovoce.client.policy import check_run
from sottovoce.common.errors import ConfigError, PolicyViolation
from sottovoce.common.fitness import GenerationFitness, build_fitness
from sottovoce.common.models import load_model
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.protocol.extractors import answers_match, gsm8k_answer, last_number
from sottovoce.common.protocol.messages import FitnessSpec, check_fitness_spec
from sottovoce.common.transport.wire import fitness_from_proto, fitness_to_proto

GSM8K = FitnessSpec(
    kind="generation",
    prompt_template="Q: {question}\nA:",
    target_field="answer",
    max_new_tokens=6,
    answer_extractor="gsm8k",
    answer_match="numeric",
)
PROBLEMS = [
    {"question": f"what is {a} plus {b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b:,}"}
    for a, b in [(2, 3), (10, 31), (700, 800), (1, 1), (5, 9), (12, 30)]
]


def test_the_extractors_read_gsm8k_answers() -> None:
    assert gsm8k_answer("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert gsm8k_answer("no hashes 42") is None
    assert gsm8k_answer("#### 5 then #### -2.5") == "-2.5"
    assert last_number("it costs $1,500. Done") == "1500"
    assert answers_match("72.0", "72", "numeric") and not answers_match("72.0", "72", "exact")
    assert not answers_match(None, "1", "exact")


def test_a_generation_fitness_refuses_an_unpinned_extractor() -> None:
    with pytest.raises(ValueError, match="answer_extractor"):
        check_fitness_spec(dataclasses.replace(GSM8K, answer_extractor="regex:.*"))
    with pytest.raises(ValueError, match="max_new_tokens"):
        check_fitness_spec(dataclasses.replace(GSM8K, max_new_tokens=0))
    with pytest.raises(ValueError, match="generation only"):
        check_fitness_spec(FitnessSpec(answer_extractor="gsm8k"))
    tokenizer = load_model(TINY).tokenizer
    with pytest.raises(ConfigError, match="answer_extractor"):
        GenerationFitness(dataclasses.replace(GSM8K, answer_extractor="anything"), tokenizer)
    assert fitness_from_proto(fitness_to_proto(GSM8K)) == GSM8K


def test_the_policy_pins_the_extractor_match_and_token_budget(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, fitness=dataclasses.asdict(GSM8K))
    spec = dataclasses.replace(run_spec(), fitness=GSM8K)
    check_run(policy, spec, tiny_fingerprint())
    for change in (
        {"answer_extractor": "last-number"},
        {"answer_match": "exact"},
        {"max_new_tokens": 64},
    ):
        asked = dataclasses.replace(spec, fitness=dataclasses.replace(GSM8K, **change))
        with pytest.raises(PolicyViolation, match=next(iter(change))):
            check_run(policy, asked, tiny_fingerprint())


def test_greedy_decoding_is_scored_by_the_extractor_and_timed_per_problem() -> None:
    loaded = load_model(TINY)
    fitness = build_fitness(GSM8K, loaded.tokenizer)
    assert isinstance(fitness, GenerationFitness)
    (batch,) = fitness.prepare(PROBLEMS, max_batch=8)
    started = time.perf_counter()
    texts = fitness.generate(loaded.model, batch)
    per_problem = (time.perf_counter() - started) / len(PROBLEMS)
    assert per_problem < 2.0, f"{per_problem:.3f} s a problem"  # tiny model, 6 new tokens
    scores = fitness.score_model(loaded.model, batch)
    targets = batch.targets or ()
    expected = [
        answers_match(gsm8k_answer(text), gsm8k_answer(target), "numeric")
        for text, target in zip(texts, targets, strict=True)
    ]
    assert scores.correct.tolist() == expected
    assert fitness.generate(loaded.model, batch) == texts  # greedy: deterministic
    # a planted right answer scores 1, a wrong one 0
    fitness.generate = lambda _model, _batch: ["so #### 5"] * len(PROBLEMS)  # type: ignore[method-assign]
    planted = fitness.score_model(loaded.model, batch)
    assert planted.score[batch.targets.index(PROBLEMS[0]["answer"])] == 1.0  # type: ignore[union-attr]
    assert planted.score.sum() == 1.0


def test_the_population_decodes_in_one_batch_as_one_at_a_time() -> None:
    loaded = load_model(TINY)
    spec = ParametrizationSpec(
        kind="lora", rank=1, patterns=("model.layers.1.self_attn.o_proj.weight",)
    )
    parametrization = build_parametrization(spec)
    parametrization.attach(loaded.model)
    fitness = build_fitness(GSM8K, loaded.tokenizer)
    candidates = scheduled_candidates(run_spec(), 0, (0.5, -0.5, 0.25))
    batched = CandidateEvaluator(loaded.model, parametrization, fitness, max_batch=8)
    alone = CandidateEvaluator(
        loaded.model, parametrization, fitness, max_batch=8, batch_population=False
    )
    inc_b, per_b = batched.score(PROBLEMS, candidates)
    inc_a, per_a = alone.score(PROBLEMS, candidates)
    assert np.array_equal(inc_b, inc_a) and all(
        np.array_equal(b, a) for b, a in zip(per_b, per_a, strict=True)
    )


def test_a_holder_answers_a_generation_task_without_sending_text(tmp_path: Path) -> None:
    ledger_dir = tmp_path / "ledger"
    policy = make_policy(
        ledger_dir, fitness=dataclasses.asdict(GSM8K), min_examples=6, min_batch_size=6
    )
    holder = DataHolder(
        "h", PROBLEMS, policy, Ledger.open(ledger_dir, "gsm", 100.0), lambda: load_model(TINY)
    )
    spec = dataclasses.replace(run_spec(algorithm="bboxer-1+lambda"), fitness=GSM8K)
    spec = dataclasses.replace(spec, batch=dataclasses.replace(spec.batch, mode="full"))
    holder.accept_run(spec)
    answer = holder.answer(
        make_task(spec, "g1", candidates=scheduled_candidates(spec, 0, (0.1, 0.2)))
    )
    assert answer.refusal is None and answer.choice in (0, 1, 2)
    assert answer.value is None and answer.ranking is None
