"""DPZero and the other DP answers on the holder: clipping, noise, budgets, refusals.

The noise tests go through the production entropy path (``SecureRandomness``); the
budget tests through the real ledger file, so that a refusal provably wrote nothing.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_policy, make_task, run_spec, scheduled_candidates, tiny_records

from sottovoce.client.holder import DataHolder
from sottovoce.client.ledger import Ledger
from sottovoce.client.private_answers import (
    SecureRandomness,
    noisy_mean,
    quantize,
    randomized_response,
)
from sottovoce.common.accounting import (
    PoissonGaussian,
    PrivacyAccountant,
    RandomizedResponse,
    calibrate_noise_multiplier,
)
from sottovoce.common.errors import ConfigError, PolicyViolation, RefusalCode
from sottovoce.common.models import LoadedModel, load_model
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.messages import BatchSpec, DpSpec, RunSpec
from sottovoce.common.quantization import dequantize, levels
from sottovoce.server.strategies import DPZero
from sottovoce.server.strategies.aggregation import aggregate_scalars

DATASET = "tinyset"
N = 64
BATCH = 16  # expected Poisson batch: sampling rate 1/4
RATE = BATCH / N
DELTA = 1e-5
SCALE = 0.01


def load_tiny() -> LoadedModel:
    return load_model("tiny-llama")


# -- the mechanism, without a model --------------------------------------------------------
def test_each_example_moves_the_pre_noise_mean_by_at_most_clip_over_batch() -> None:
    rng = SecureRandomness()
    differences = np.array([0.5, -3.0, 40.0, -0.25, float("inf"), float("nan")])
    clipped_mean = noisy_mean(
        differences, clip=1.0, expected_batch=8, noise_multiplier=0.0, rng=rng
    )
    assert clipped_mean == pytest.approx((0.5 - 1.0 + 1.0 - 0.25 + 1.0 + 0.0) / 8)
    # Add/remove one example (any value, even a diverged one): sensitivity clip / B.
    for extra in (1e9, -1e9, 0.3, float("nan")):
        grown = noisy_mean(
            np.append(differences, extra), clip=1.0, expected_batch=8, noise_multiplier=0.0, rng=rng
        )
        assert abs(grown - clipped_mean) <= 1.0 / 8 + 1e-12


def test_noise_has_the_calibrated_standard_deviation() -> None:
    """Many draws through the production path; a 4% tolerance is ~9 standard errors of
    the sample std at 20,000 draws, and a noise off by the batch size or by sqrt(2) fails."""
    rng = SecureRandomness()
    sigma, clip, batch = 2.5, 0.75, 16
    draws = [
        noisy_mean([], clip=clip, expected_batch=batch, noise_multiplier=sigma, rng=rng)
        for _ in range(20_000)
    ]
    expected = sigma * clip / batch
    assert statistics.pstdev(draws) == pytest.approx(expected, rel=0.04)
    assert abs(statistics.fmean(draws)) < 5 * expected / math.sqrt(len(draws))


def test_noise_source_cannot_be_seeded() -> None:
    """No parameter selects a seed, and the global seeds every library offers change nothing."""
    assert list(inspect.signature(SecureRandomness).parameters) == []
    assert not any(
        "seed" in name or "rng" in name or "random" in name
        for name in inspect.signature(DataHolder).parameters
    )
    draws = []
    for _ in range(2):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        draws.append(SecureRandomness().gaussian(1.0))
    assert draws[0] != draws[1]


def test_stochastic_rounding_is_unbiased_and_stays_on_the_grid() -> None:
    rng = SecureRandomness()
    bits, bound = 3, 1.0
    value = 0.3
    draws = [dequantize(quantize(value, bits, bound, rng), bits, bound) for _ in range(20_000)]
    step = 2 * bound / (levels(bits) - 1)
    assert set(np.round(draws, 9)) <= {round(-bound + k * step, 9) for k in range(levels(bits))}
    assert len(set(np.round(draws, 9))) == 2  # the two levels around 0.3
    assert statistics.fmean(draws) == pytest.approx(value, abs=4 * step / math.sqrt(len(draws)))
    assert quantize(7.0, bits, bound, rng) == levels(bits) - 1  # clamped to the range
    assert quantize(-7.0, bits, bound, rng) == 0
    with pytest.raises(ValueError, match="level 8"):
        dequantize(8, bits, bound)


def test_randomized_response_keeps_the_truth_at_the_stated_rate() -> None:
    rng = SecureRandomness()
    mechanism = RandomizedResponse(epsilon=1.0, outcomes=3)
    answers = [randomized_response(2, mechanism, rng) for _ in range(30_000)]
    kept = answers.count(2) / len(answers)
    # e / (e + 2) = 0.576; the standard error at 30,000 draws is 0.003.
    assert kept == pytest.approx(mechanism.truth_probability, abs=0.015)
    assert answers.count(0) == pytest.approx(answers.count(1), rel=0.1)


def test_robust_aggregates_resist_one_poisoned_holder() -> None:
    honest = {"a": 0.1, "b": 0.12, "c": 0.08, "d": 0.11}
    poisoned = {**honest, "evil": 1000.0}
    assert aggregate_scalars(poisoned, "mean") > 100
    assert aggregate_scalars(poisoned, "median") == pytest.approx(0.11)
    assert 0.08 <= aggregate_scalars(poisoned, "trimmed-mean", trim_fraction=0.2) <= 0.12
    assert aggregate_scalars({"a": 1.0, "b": 4.0}, "mean", weights={"b": 3.0}) == 3.25


def test_dpzero_step_descends_and_is_clamped() -> None:
    optimizer = DPZero(run_seed=1, smoothing=1e-3, learning_rate=0.1, max_coefficient=0.25)
    (candidate,) = optimizer.ask(4)
    assert optimizer.ask(4) == (candidate,) and optimizer.ask(5) != (candidate,)
    step = optimizer.step_for(candidate, 2.0)
    assert step is not None and step.seed == candidate.seed
    assert step.coefficient == pytest.approx(-0.2)  # against the slope
    clamped = optimizer.step_for(candidate, -1e6)
    assert clamped is not None and 0 < clamped.coefficient <= 0.25
    assert optimizer.step_for(candidate, 0.0) is None


# -- the holder -----------------------------------------------------------------------------
def dp_spec(
    *,
    noise: float,
    max_rounds: int = 100,
    quantization_bits: int = 0,
    run_id: str = "run-a",
    batch: int = BATCH,
) -> RunSpec:
    base = run_spec(run_id=run_id, batch=BatchSpec(mode="poisson", batch_size=batch))
    return dataclasses.replace(
        base,
        algorithm="dpzero",
        answer_kind=AnswerKind.DP_SCALAR,
        max_rounds=max_rounds,
        dp=DpSpec(
            epsilon=2.0,
            delta=DELTA,
            noise_multiplier=noise,
            clip=1.0,
            quantization_bits=quantization_bits,
            quantization_range=1.0,
        ),
    )


def dp_holder(
    tmp_path: Path, name: str = "h", *, max_epsilon: float | None = 2.0, **policy: Any
) -> DataHolder:
    ledger_dir = tmp_path / name / "ledger"
    privacy = {} if max_epsilon is None else {"max_epsilon": max_epsilon, "delta": DELTA}
    policy = {"min_examples": N, **policy}
    holder_policy = make_policy(
        ledger_dir,
        max_bits=100_000.0,
        allowed_algorithms=["dpzero", "bboxer-1+1", "bboxer-1+lambda"],
        allowed_batch_modes=["poisson", "minibatch", "full"],
        **privacy,
        **policy,
    )
    ledger = Ledger.open(ledger_dir, DATASET, 100_000.0, privacy=holder_policy.privacy_limit())
    return DataHolder(name, tiny_records(N), holder_policy, ledger, load_tiny)


def dp_task(spec: RunSpec, task_id: str, round_index: int = 0) -> Any:
    candidates = scheduled_candidates(spec, round_index, (SCALE,))
    return make_task(spec, task_id, candidates=candidates, round_index=round_index)


def ledger_bytes(holder: DataHolder) -> bytes:
    return holder.ledger.path.read_bytes()


def test_dp_scalar_answer_is_charged_bits_and_epsilon_before_it_leaves(tmp_path: Path) -> None:
    sigma = calibrate_noise_multiplier(2.0, DELTA, 100, RATE)
    holder = dp_holder(tmp_path)
    spec = dp_spec(noise=sigma)
    holder.accept_run(spec)
    answer = holder.answer(dp_task(spec, "t0"))
    assert answer.value is not None and answer.choice is None and not answer.refused
    (record,) = holder.ledger.records
    assert record.bits == 32.0 and record.value == answer.value
    assert record.dp == PoissonGaussian(sigma, RATE)
    single = PrivacyAccountant([PoissonGaussian(sigma, RATE)]).epsilon(DELTA)
    assert holder.ledger.spent_epsilon() == pytest.approx(single)
    # A re-sent task id gets the same released value, never a fresh draw or charge.
    before = ledger_bytes(holder)
    assert holder.answer(dp_task(spec, "t0")) == answer
    assert ledger_bytes(holder) == before


def test_two_holders_with_the_same_data_and_task_draw_different_noise(tmp_path: Path) -> None:
    spec = dp_spec(noise=calibrate_noise_multiplier(2.0, DELTA, 100, 1.0), batch=N)
    holders = [dp_holder(tmp_path, name) for name in ("a", "b")]
    values = []
    for holder in holders:
        holder.accept_run(spec)
        answer = holder.answer(dp_task(spec, "same-task"))
        assert answer.value is not None
        values.append(answer.value)
    # Rate 1 (expected batch = n): same examples, same differences; only the noise differs.
    assert values[0] != values[1]


def test_quantized_answer_is_a_level_and_costs_its_bits(tmp_path: Path) -> None:
    holder = dp_holder(tmp_path)
    spec = dp_spec(noise=calibrate_noise_multiplier(2.0, DELTA, 100, RATE), quantization_bits=4)
    holder.accept_run(spec)
    answer = holder.answer(dp_task(spec, "t0"))
    assert answer.value is None and answer.choice is not None and 0 <= answer.choice < 16
    assert holder.ledger.records[0].bits == 4.0


def test_the_answer_that_would_cross_epsilon_is_refused_and_the_one_before_is_not(
    tmp_path: Path,
) -> None:
    sigma, answers = 3.0, 5
    event = PoissonGaussian(sigma, RATE)
    at_limit = PrivacyAccountant([event] * answers).epsilon(DELTA)
    past_limit = PrivacyAccountant([event] * (answers + 1)).epsilon(DELTA)
    limit = (at_limit + past_limit) / 2
    holder = dp_holder(tmp_path, max_epsilon=limit)
    spec = dp_spec(noise=sigma, max_rounds=answers)
    holder.accept_run(spec)
    for index in range(answers):
        assert not holder.answer(dp_task(spec, f"t{index}")).refused
    assert holder.ledger.spent_epsilon() == pytest.approx(at_limit)
    before = (ledger_bytes(holder), holder.forward_passes)
    refused = holder.answer(dp_task(spec, "one-too-many"))
    assert refused.refusal is RefusalCode.OVER_BUDGET
    assert "past max_epsilon" in (holder.status.last_refusal or "")
    assert (ledger_bytes(holder), holder.forward_passes) == before


def test_epsilon_survives_a_restart_and_a_new_run_cannot_reset_it(tmp_path: Path) -> None:
    sigma = calibrate_noise_multiplier(2.0, DELTA, 10, RATE)
    holder = dp_holder(tmp_path)
    spec = dp_spec(noise=sigma, max_rounds=10)
    holder.accept_run(spec)
    for index in range(10):
        assert not holder.answer(dp_task(spec, f"t{index}")).refused
    spent = holder.ledger.spent_epsilon()
    assert 1.9 < spent <= 2.0
    holder.ledger.close()

    reopened = dp_holder(tmp_path)  # same ledger folder and data set id
    assert reopened.ledger.spent_epsilon() == pytest.approx(spent)
    new_run = dp_spec(noise=sigma, max_rounds=10, run_id="run-b")
    with pytest.raises(PolicyViolation, match=r"below the 500 this data set needs|cannot afford"):
        reopened.accept_run(new_run)


def test_a_holder_restarted_mid_run_rejoins_and_answers_the_rest(tmp_path: Path) -> None:
    sigma = calibrate_noise_multiplier(2.0, DELTA, 10, RATE)
    spec = dp_spec(noise=sigma, max_rounds=10)
    holder = dp_holder(tmp_path)
    holder.accept_run(spec)
    for index in range(5):
        assert not holder.answer(dp_task(spec, f"t{index}")).refused
    holder.ledger.close()
    restarted = dp_holder(tmp_path)
    restarted.accept_run(spec)  # its own 5 answers are part of the run, not prior spending
    for index in range(5, 10):
        assert not restarted.answer(dp_task(spec, f"t{index}")).refused
    assert restarted.ledger.spent_epsilon() <= 2.0
    assert restarted.answer(dp_task(spec, "t10")).refused  # the 11th would pass 2.0


def test_a_run_with_too_little_noise_is_refused_at_join(tmp_path: Path) -> None:
    needed = calibrate_noise_multiplier(2.0, DELTA, 100, RATE)
    holder = dp_holder(tmp_path)
    with pytest.raises(PolicyViolation, match=r"noise_multiplier 1 is below the \d"):
        holder.accept_run(dp_spec(noise=1.0))
    with pytest.raises(PolicyViolation, match="adds no noise"):
        dp_holder(tmp_path, "strict", require_dp=True).accept_run(dp_spec(noise=0.0))
    holder.accept_run(dp_spec(noise=needed))  # exactly what the budget needs is fine


def test_a_smaller_data_set_needs_more_noise_than_the_coordinator_assumed(tmp_path: Path) -> None:
    """The coordinator calibrated for rate 16/64; a holder declaring 32 examples has rate 1/2
    (its declared floor, not its real size, so the refusal says nothing about its data)."""
    coordinator_sigma = calibrate_noise_multiplier(2.0, DELTA, 100, RATE)
    ledger_dir = tmp_path / "small" / "ledger"
    policy = make_policy(
        ledger_dir,
        max_bits=100_000.0,
        allowed_algorithms=["dpzero"],
        allowed_batch_modes=["poisson"],
        max_epsilon=2.0,
        delta=DELTA,
        min_examples=32,
    )
    ledger = Ledger.open(ledger_dir, DATASET, 100_000.0, privacy=policy.privacy_limit())
    small = DataHolder("s", tiny_records(64), policy, ledger, lambda: load_model("tiny-llama"))
    with pytest.raises(PolicyViolation, match=r"sampling rate 0\.5"):
        small.accept_run(dp_spec(noise=coordinator_sigma))


def test_policy_delta_must_be_below_one_over_n(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy delta 0.05 must be < 1/n"):
        ledger_dir = tmp_path / "ledger"
        policy = make_policy(ledger_dir, max_epsilon=2.0, delta=0.05)
        ledger = Ledger.open(ledger_dir, DATASET, 1000.0, privacy=policy.privacy_limit())
        DataHolder("h", tiny_records(N), policy, ledger, lambda: load_model("tiny-llama"))


def test_randomized_response_compare_bits_are_accounted(tmp_path: Path) -> None:
    holder = dp_holder(tmp_path, max_epsilon=50.0)
    spec = dataclasses.replace(
        run_spec(), max_rounds=20, dp=DpSpec(delta=DELTA, randomized_response_epsilon=0.5)
    )
    holder.accept_run(spec)
    for index in range(3):
        answer = holder.answer(make_task(spec, f"t{index}"))
        assert answer.choice in (0, 1)
    assert [r.dp for r in holder.ledger.records] == [RandomizedResponse(0.5, 2)] * 3
    assert holder.ledger.spent_epsilon() == pytest.approx(
        PrivacyAccountant([RandomizedResponse(0.5, 2)] * 3).epsilon(DELTA)
    )
    tight = dp_holder(tmp_path, "tight", max_epsilon=1.0)
    with pytest.raises(PolicyViolation, match="randomized-response answers"):
        tight.accept_run(spec)  # 20 answers at 0.5 cannot fit in 1.0


def test_require_dp_refuses_plain_bboxer(tmp_path: Path) -> None:
    holder = dp_holder(tmp_path, require_dp=True)
    with pytest.raises(PolicyViolation, match="no randomized response"):
        holder.accept_run(run_spec())


# -- the run config ---------------------------------------------------------------------------
def dpzero_config(**overrides: Any) -> dict[str, Any]:
    from helpers import merged, run_config_data

    base = run_config_data(
        run={"algorithm": "dpzero", "max_rounds": 50},
        evaluation={"mode": "poisson", "batch_size": 16},
        privacy={"epsilon": 2.0, "delta": 1e-5, "examples_per_holder": 64},
    )
    return merged(base, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"privacy": {"epsilon": 0.0}}, "privacy.epsilon: Input should be greater than 0"),
        ({"privacy": {"delta": 0.02}}, "privacy.delta 0.02 must be < 1/examples_per_holder"),
        ({"evaluation": {"batch_size": 65}}, "evaluation.batch_size 65 is larger than"),
        ({"evaluation": {"mode": "minibatch"}}, "evaluation.mode must be 'poisson' for dpzero"),
        ({"privacy": {"examples_per_holder": None}}, "privacy.examples_per_holder is needed"),
        ({"dpzero": {"clip": -1.0}}, "dpzero.clip: Input should be greater than 0"),
        ({"dpzero": {"quantization_bits": 17}}, "dpzero.quantization_bits"),
        ({"dpzero": {"aggregate": "max"}}, "dpzero.aggregate"),
    ],
)
def test_impossible_dp_configs_are_rejected_with_the_parameter_named(
    overrides: dict[str, Any], message: str
) -> None:
    from sottovoce.common.config import parse_config

    data = dpzero_config(**overrides)
    if data["privacy"].get("examples_per_holder", 0) is None:
        del data["privacy"]["examples_per_holder"]
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "run.toml")
    assert str(caught.value).startswith("run.toml: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_epsilon_no_noise_can_reach_is_rejected_when_the_spec_is_built() -> None:
    from sottovoce.common.config import parse_config

    config = parse_config(
        dpzero_config(run={"max_rounds": 1_000_000}, privacy={"epsilon": 1e-6}), "run.toml"
    )
    with pytest.raises(ConfigError, match=r"privacy\.epsilon: no noise multiplier up to"):
        config.dp_spec()


def test_the_coordinator_calibrates_what_the_config_asks() -> None:
    from sottovoce.common.config import parse_config

    config = parse_config(dpzero_config(), "run.toml")
    spec = config.dp_spec()
    assert config.answer_kind is AnswerKind.DP_SCALAR and config.sampling_rate == 0.25
    epsilon = PrivacyAccountant([PoissonGaussian(spec.noise_multiplier, 0.25)] * 50).epsilon(1e-5)
    assert epsilon == pytest.approx(2.0, rel=1e-3) and epsilon <= 2.0


# -- end to end over gRPC -------------------------------------------------------------------
@pytest.mark.parametrize("quantization_bits", [0, 4])
def test_dpzero_run_over_grpc_exports_base_plus_log(tmp_path: Path, quantization_bits: int) -> None:
    from helpers import base_plus_steps, differing_tensors, tiny_fingerprint, write_run_config
    from test_integration import PATTERNS, accepted_steps_in_journal, make_holder, run_federation
    from transformers import AutoModelForCausalLM

    from sottovoce.api import open_coordinator
    from sottovoce.common.storage import read_json_lines
    from sottovoce.server.export import export_run

    rounds, per_holder, batch = 8, 24, 8
    config = write_run_config(
        tmp_path / "run.toml",
        run={"algorithm": "dpzero", "max_rounds": rounds, "bit_budget": 10_000.0},
        parametrization={"kind": "select", "patterns": PATTERNS},
        evaluation={"mode": "poisson", "batch_size": batch},
        dpzero={
            "learning_rate": 0.05,
            "smoothing": 0.01,
            "clip": 2.0,
            "quantization_bits": quantization_bits,
        },
        privacy={"epsilon": 6.0, "delta": 1e-5, "examples_per_holder": per_holder},
    )
    run_dir = tmp_path / "run"
    coordinator = open_coordinator(config, run_dir, model_fingerprint=tiny_fingerprint())
    policy = {
        "allowed_algorithms": ["dpzero"],
        "allowed_batch_modes": ["poisson"],
        "min_batch_size": batch,
        "max_bits": 10_000.0,
        "max_epsilon": 6.0 * (1 + 1e-4),
        "delta": 1e-5,
        "require_dp": True,
        "min_examples": per_holder,
    }
    holders = [make_holder(tmp_path, f"holder-{i}", seed=i, **policy) for i in range(2)]

    outcomes = run_federation(coordinator, holders)

    for outcome in outcomes.values():
        assert outcome.error is None, outcome.error
    state = coordinator.state
    assert len(state.rounds) == rounds
    steps = list(state.log)
    assert [(s.seed, s.coefficient) for s in steps] == accepted_steps_in_journal(run_dir)
    for closed in state.rounds:  # a zero estimate is the only way to skip a step
        assert closed.estimate is not None and (closed.step is None) == (closed.estimate == 0.0)
        assert closed.estimate == pytest.approx(sum(closed.values.values()) / 2)
    bits = quantization_bits or 32
    assert state.bits_per_holder == {"holder-0": rounds * bits, "holder-1": rounds * bits}

    sigma = coordinator.spec.dp.noise_multiplier
    expected_epsilon = PrivacyAccountant([PoissonGaussian(sigma, batch / per_holder)] * rounds)
    journal = read_json_lines(run_dir / "journal.jsonl")
    for holder in holders:
        records = holder.ledger.records
        assert len(records) == rounds
        assert holder.ledger.spent_epsilon() == pytest.approx(expected_epsilon.epsilon(1e-5))
        assert holder.ledger.spent_epsilon() <= 6.0 * (1 + 1e-4)
        heard = [
            r["value"] for r in journal if r["type"] == "answer" and r["holder"] == holder.holder_id
        ]
        if quantization_bits:
            released = [dequantize(r.choice or 0, quantization_bits, 2.0) for r in records]
        else:
            released = [r.value for r in records]
        assert heard == pytest.approx(released)
        report = holder.local_report(state.bits_total)
        assert report["epsilon_this_run"] == pytest.approx(expected_epsilon.epsilon(1e-5))
        assert report["dp_answers_this_run"] == rounds

    out = tmp_path / "export"
    export_run(run_dir, out)
    exported = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert differing_tensors(base_plus_steps(steps, PATTERNS), exported.state_dict()) == []
