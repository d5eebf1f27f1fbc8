"""The holder against a hostile coordinator: every class of attack the guard defends.

Each test plays the attacker with valid, wire-legal messages and checks what it gets:
refused before any data is read (ledger bytes unchanged, zero forward passes), or
answered with nothing it could not have learned anyway. Where a pinned, capped question
still isolates one record (a plain comparison can always be decided by one record), the
test shows the attack succeeding, and that randomized response and DPZero bound it by
their per-answer epsilon.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    LABEL_WORDS,
    TEMPLATE,
    make_policy,
    make_task,
    run_spec,
    scheduled_candidates,
    scheduled_seed,
    tiny_fingerprint,
    tiny_records,
)

from sottovoce.client.dataset_identity import open_dataset_ledger
from sottovoce.client.evaluator import CandidateEvaluator
from sottovoce.client.grpc_loop import RetryPolicy, run_holder
from sottovoce.client.holder import DataHolder
from sottovoce.client.mechanisms import PlainChoice
from sottovoce.common.accounting import (
    PoissonGaussian,
    PrivacyAccountant,
    RandomizedResponse,
    answer_epsilon,
    chunk_vote_event,
)
from sottovoce.common.errors import ConfigError, PolicyViolation, RefusalCode
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import LoadedModel, load_model
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.messages import (
    Answer,
    BatchSpec,
    Candidate,
    DpSpec,
    FitnessSpec,
    JoinRequest,
    RunFinished,
    RunSpec,
    Task,
)
from sottovoce.common.protocol.seeds import candidate_seed
from sottovoce.common.steplog import Step, as_float32, extend_chain, genesis_hash
from sottovoce.server.grpc_service import serve

FITNESS = FitnessSpec(prompt_template=TEMPLATE, label_words=LABEL_WORDS)
# Everything `scale` selects on the tiny model by default: every linear, norm and embedding
# weight, one log-scale per output channel (per token, for the embedding). A holder that
# pins this has agreed to per-token scales: the easiest place to isolate a record.
ALL_SCALES = ParametrizationSpec(kind="scale")
NORM_SCALES = ParametrizationSpec(kind="scale", patterns=("model.norm.weight",))
EMBEDDING_SCALES = ParametrizationSpec(kind="scale", patterns=("model.embed_tokens.weight",))


def load_tiny() -> LoadedModel:
    return load_model("tiny-llama")


def holder_on(
    folder: Path, records: Sequence[dict[str, object]], name: str = "h", **policy: Any
) -> DataHolder:
    policy = {"parametrizations": [dataclasses.asdict(ALL_SCALES)], "max_bits": 1e5, **policy}
    holder_policy = make_policy(folder / "ledger", **policy)
    ledger = open_dataset_ledger(
        holder_policy.ledger_dir,
        records,
        holder_policy.max_bits,
        privacy=holder_policy.privacy_limit(),
    )
    return DataHolder(name, records, holder_policy, ledger, load_tiny)


def spec_for(parametrization: ParametrizationSpec = ALL_SCALES, **changes: Any) -> RunSpec:
    spec = run_spec(parametrization=parametrization, batch=BatchSpec(mode="full", batch_size=1))
    return dataclasses.replace(spec, **changes)


def untouched(holder: DataHolder) -> tuple[bytes, int]:
    return holder.ledger.path.read_bytes(), holder.forward_passes


# -- a hostile coordinator, over real gRPC ---------------------------------------------------
@dataclass
class HostileCoordinator:
    """Sends a run spec and scripted tasks, whatever the holder answers."""

    spec: RunSpec
    tasks: list[Task]
    answers: dict[str, Answer] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def join(self, request: JoinRequest) -> RunSpec:
        return self.spec

    def pull_task(
        self, holder_id: str, have_version: int, have_head: str, timeout_s: float
    ) -> Task | RunFinished | None:
        with self.lock:
            waiting = [t for t in self.tasks if t.task_id not in self.answers]
        if waiting:
            return waiting[0]
        return RunFinished(self.spec.run_id, "done", have_version, have_head, 1.0, have_version)

    def push_answer(self, holder_id: str, answer: Answer) -> bool:
        with self.lock:
            self.answers[answer.task_id] = answer
        return True

    def leave(self, holder_id: str) -> None:
        pass


def run_against(holder: DataHolder, coordinator: HostileCoordinator) -> BaseException | None:
    with serve(coordinator, "127.0.0.1:0") as server:
        try:
            run_holder(
                holder,
                server.address,
                poll_timeout_s=1.0,
                retry=RetryPolicy(total_s=3.0, initial_backoff_s=0.01, max_backoff_s=0.05),
            )
        except Exception as exc:
            return exc
    return None


# -- 1. a crafted question isolates one record -----------------------------------------------
def test_an_unpinned_parametrization_is_refused_at_join_over_grpc(tmp_path: Path) -> None:
    """Per-token scales of the embedding, where the policy pins only the final norm."""
    holder = holder_on(
        tmp_path,
        tiny_records(32),
        parametrizations=[{"kind": "scale", "patterns": ["model.norm.weight"]}],
    )
    coordinator = HostileCoordinator(spec_for(EMBEDDING_SCALES), tasks=[])
    error = run_against(holder, coordinator)
    assert isinstance(error, PolicyViolation) and "closest differs in patterns" in str(error)
    assert coordinator.answers == {}
    assert untouched(holder) == (b"", 0) and holder.spec is None


def test_a_ground_direction_is_refused_before_any_data_is_read(tmp_path: Path) -> None:
    """A seed the coordinator searched for is not on the schedule: nothing is computed."""
    holder = holder_on(tmp_path, tiny_records(32))
    spec = spec_for()
    ground = make_task(spec, "r0", candidates=(Candidate(seed=0xDEADBEEF, scale=0.25),))
    ground_step = make_task(
        spec, "r1", new_steps=[Step(seed=0xC0FFEE, coefficient=0.25)], round_index=1
    )
    honest = make_task(spec, "r2")
    coordinator = HostileCoordinator(spec, [ground, ground_step, honest])
    assert run_against(holder, coordinator) is None
    assert coordinator.answers["r0"].refusal is RefusalCode.POLICY
    assert coordinator.answers["r1"].refusal is RefusalCode.POLICY
    assert coordinator.answers["r2"].choice in (0, 1)  # the holder is unharmed
    assert [r.task_id for r in holder.ledger.records] == ["r2"]


def test_many_small_steps_cannot_drive_a_scale_to_minus_infinity(tmp_path: Path) -> None:
    """The coordinator walks one log-scale down with legal steps, each under the per-step
    cap (choosing, each round, the lane whose sign pushes that coordinate down). The total
    drift cap stops it: x never passes the cap, and the refusal is a bare code."""
    holder = holder_on(tmp_path, tiny_records(32), max_drift_linf=1.0, max_perturbation_scale=0.25)
    spec = spec_for()
    holder.accept_run(spec)
    target = 0  # log-scale of the first selected channel
    steps: list[Step] = []
    for round_index in range(12):
        for lane in range(4):
            seed = scheduled_seed(spec, round_index, lane)
            sign = float(torch_sign(seed, target))
            steps.append(Step(seed=seed, coefficient=as_float32(-0.25 * sign)))
            break
    answers = []
    version = 0
    for number in range(len(steps)):
        task = make_task(
            spec, f"walk{number}", history=steps[:version], new_steps=steps[version : number + 1]
        )
        answer = holder.answer(task)
        answers.append(answer)
        if not answer.refused:
            version = number + 1
    assert holder.run is not None
    assert holder.run.drift.drift.linf <= 1.0
    refused = [a for a in answers if a.refused]
    assert refused and all(a.refusal is RefusalCode.POLICY for a in refused)
    assert "max_drift_linf" in (holder.status.last_refusal or "")
    assert version == 4  # four steps of 0.25 reach the cap; the fifth is refused


def torch_sign(seed: int, index: int) -> int:
    from sottovoce.common.directions import rademacher

    return int(rademacher(seed, 0, index + 1)[index])


def test_a_huge_task_is_refused_in_milliseconds(tmp_path: Path) -> None:
    """100,000 steps used to cost a minute of CPU before any check; now they cost a count."""
    holder = holder_on(tmp_path, tiny_records(32))
    spec = spec_for()
    holder.accept_run(spec)
    steps = [Step(seed=scheduled_seed(spec, r), coefficient=as_float32(1e-6)) for r in range(100)]
    huge = make_task(spec, "huge", new_steps=steps * 1000, round_index=99)
    before = untouched(holder)
    started = time.perf_counter()
    answer = holder.answer(huge)
    assert time.perf_counter() - started < 0.5
    assert answer.refusal is RefusalCode.POLICY and untouched(holder) == before
    assert "max_new_steps_per_task 1000" in (holder.status.last_refusal or "")


# -- inside the pins and caps: what a plain comparison cannot protect ------------------------
TARGET = {"text": "zqxjzqxj", "label": 1}  # the record whose membership the attacker asks about


def others() -> list[dict[str, object]]:
    return tiny_records(20, seed=11)


@dataclass(frozen=True)
class Question:
    """A legal question whose true answer differs with and without the target record."""

    candidate: Candidate
    answer_with: int
    answer_without: int


def find_isolating_question(spec: RunSpec, lanes: int = 4, rounds: int = 60) -> Question:
    """The attacker knows the model, every other record, and the target: it searches the
    public schedule (any lane, either sign, up to the scale cap) for a candidate that
    the target alone decides. No pin or cap forbids any of it."""
    loaded = load_tiny()
    parametrization = build_parametrization(spec.parametrization)
    parametrization.attach(loaded.model)
    evaluator = CandidateEvaluator(
        loaded.model, parametrization, build_fitness(spec.fitness, loaded.tokenizer)
    )
    records = [*others(), TARGET]
    for round_index in range(rounds):
        candidates = [
            Candidate(seed=scheduled_seed(spec, round_index, lane), scale=sign * 0.5)
            for lane in range(lanes)
            for sign in (1.0, -1.0)
        ]
        incumbent, scored = evaluator.score(records, candidates)
        for candidate, scores in zip(candidates, scored, strict=True):
            with_target = int(scores.mean() > incumbent.mean())
            without = int(scores[:-1].mean() > incumbent[:-1].mean())
            if with_target != without:
                return Question(candidate, with_target, without)
    raise AssertionError("no isolating question found; widen the search")


def find_isolating_direction(spec: RunSpec, lanes: int = 4, rounds: int = 12) -> Candidate:
    """For DPZero: the scheduled direction whose clipped finite difference on the target is
    largest against the spread of the others' (what the member's subsampling adds)."""
    loaded = load_tiny()
    parametrization = build_parametrization(spec.parametrization)
    parametrization.attach(loaded.model)
    evaluator = CandidateEvaluator(
        loaded.model, parametrization, build_fitness(spec.fitness, loaded.tokenizer)
    )
    records = [*others(), TARGET]
    best, best_score = None, -1.0
    for round_index in range(rounds):
        for lane in range(lanes):
            candidate = Candidate(seed=scheduled_seed(spec, round_index, lane), scale=0.25)
            differences, _ = evaluator.finite_differences(records, candidate)
            clipped = torch.tensor(differences).clamp(-1, 1)
            score = float(clipped[-1].abs() / (0.05 + clipped[:-1].norm() * 0.2))
            if score > best_score:
                best, best_score = candidate, score
    assert best is not None
    return best


def ask_many(
    holder: DataHolder, spec: RunSpec, question: Question, count: int, prefix: str = "q"
) -> list[int]:
    answers = []
    for number in range(count):
        round_index = _round_of(spec, question.candidate.seed)
        task = make_task(
            spec, f"{holder.holder_id}-{prefix}{number}", candidates=(question.candidate,),
            round_index=round_index,
        )  # fmt: skip
        answer = holder.answer(task)
        assert answer.choice is not None, answer
        answers.append(answer.choice)
    return answers


def _round_of(spec: RunSpec, seed: int) -> int:
    for round_index in range(1000):
        if any(candidate_seed(spec.direction_seed, round_index, i) == seed for i in range(8)):
            return round_index
    raise AssertionError("seed not on the schedule")


def membership_success(
    with_answers: list[int], without_answers: list[int], question: Question
) -> float:
    """The attacker says "member" when the answer is the member's: its rate of being right."""
    hits = sum(a == question.answer_with for a in with_answers)
    hits += sum(a != question.answer_with for a in without_answers)
    return hits / (len(with_answers) + len(without_answers))


@pytest.mark.parametrize("pinned", [ALL_SCALES, NORM_SCALES], ids=["all scales", "final norm"])
def test_inside_the_pins_a_plain_comparison_reveals_one_record_over_grpc(
    tmp_path: Path, pinned: ParametrizationSpec
) -> None:
    """The honest statement of what pins and caps cannot do (also in the README): with
    every field pinned (even to the final norm's scales alone), seeds on the schedule and
    drift capped, one compare bit still tells a coordinator that knows the rest of the data
    whether the target is in it."""
    spec = spec_for(pinned, max_rounds=100)
    question = find_isolating_question(spec)
    round_index = _round_of(spec, question.candidate.seed)
    guesses = {}
    for member in (True, False):
        records = [*others(), TARGET] if member else others()
        holder = holder_on(
            tmp_path / str(member),
            records,
            name=f"m{member}",
            parametrizations=[dataclasses.asdict(pinned)],
        )
        task = make_task(spec, "probe", candidates=(question.candidate,), round_index=round_index)
        coordinator = HostileCoordinator(spec, [task])
        assert run_against(holder, coordinator) is None
        guesses[member] = coordinator.answers["probe"].choice == question.answer_with
    assert guesses == {True: True, False: False}  # membership, learned from one bit


def test_randomized_response_bounds_the_same_attack_by_its_epsilon(tmp_path: Path) -> None:
    epsilon = 1.0
    spec = spec_for(max_rounds=100, dp=DpSpec(delta=1e-5, randomized_response_epsilon=epsilon))
    question = find_isolating_question(spec)
    privacy = {"max_epsilon": 1e4, "delta": 1e-5}
    member = holder_on(tmp_path / "in", [*others(), TARGET], name="in", **privacy)
    outsider = holder_on(tmp_path / "out", others(), name="out", **privacy)
    for holder in (member, outsider):
        holder.accept_run(spec)
    trials = 300
    success = membership_success(
        ask_many(member, spec, question, trials),
        ask_many(outsider, spec, question, trials),
        question,
    )
    bound = RandomizedResponse(epsilon, 2).truth_probability  # e / (1 + e) = 0.731
    # The attack meets this bound exactly (the question isolates the record), and the noise
    # comes from the holder's secure source, so no seed fixes the draw: 4.5 standard
    # errors make a false alarm a few in a million (3 made it one in 700, and it happened);
    # RR at epsilon 1.6 or more (0.83), or no RR (1.0), is still caught.
    assert success <= bound + 4.5 * math.sqrt(bound * (1 - bound) / (2 * trials))
    assert success > 0.6  # the question does isolate the record: RR is what protects it


def test_chunk_votes_bound_the_same_attack_by_their_epsilon(tmp_path: Path) -> None:
    """The holders' policy requires chunk votes (so a plain comparison is refused); the
    coordinator asks K = 1 chunk, where the one chunk's vote is the plain comparison the
    target decides: the attacker's best case, since no partition can hide the target. The
    answer is the noisy arg-max of (1, 0) against (0, 1): a Gaussian of sensitivity
    sqrt(2). Success stays under (e^eps + delta) / (1 + e^eps) for one answer's eps (and at
    what the Gaussian itself allows, Phi(sqrt(2) / (2 sigma))); with the noise switched off
    behind the accountant's back, the same question reads membership every time."""
    sigma, delta = 4.0, 1e-5
    spec = spec_for(max_rounds=100, dp=DpSpec(delta=delta, chunks=1, vote_noise=sigma))
    question = find_isolating_question(spec)
    epsilon = answer_epsilon(chunk_vote_event(sigma), delta)
    privacy = {
        "max_epsilon": 1e4,
        "delta": delta,
        "answer_mechanisms": ["chunk-vote"],
        "require_dp": True,
        "max_answer_epsilon": epsilon,
    }
    member = holder_on(tmp_path / "in", [*others(), TARGET], name="in", **privacy)
    outsider = holder_on(tmp_path / "out", others(), name="out", **privacy)
    plain = dataclasses.replace(spec, dp=DpSpec())
    for holder in (member, outsider):
        with pytest.raises(PolicyViolation, match="policy requires DP answers"):
            holder.accept_run(plain)
        holder.accept_run(spec)

    def success(trials: int, prefix: str) -> tuple[float, float]:
        rate = membership_success(
            ask_many(member, spec, question, trials, prefix),
            ask_many(outsider, spec, question, trials, prefix),
            question,
        )
        return rate, 3 * math.sqrt(0.25 / (2 * trials))

    bound = (math.exp(epsilon) + delta) / (1 + math.exp(epsilon))  # 0.81 at sigma 4
    gaussian = float(NormalDist().cdf(math.sqrt(2) / (2 * sigma)))  # 0.57
    measured, tolerance = success(100, "q")
    assert measured <= bound + tolerance
    # Two-sided, and from the holder's secure noise: 4.5 standard errors of the Gaussian's
    # own rate (a false alarm a few in a million), not 3 (about one in 370).
    assert abs(measured - gaussian) <= 4.5 * math.sqrt(gaussian * (1 - gaussian) / 200)
    for holder in (member, outsider):  # planted: the accountant is told sigma, no noise added
        assert holder.run is not None
        holder.run.mechanism.noisy_choice = lambda counts: int(np.argmax(counts))  # type: ignore[attr-defined]
    planted, tolerance = success(50, "planted")
    assert planted > bound + tolerance


def test_dpzero_bounds_the_same_attack_by_its_epsilon(tmp_path: Path) -> None:
    """One DPZero answer on the direction that best isolates the target, with noise whose
    single-answer epsilon is about 0.5; the attacker thresholds the released value halfway
    between the two expected values. Its success stays under (e^eps + delta) / (1 + e^eps),
    and the same test catches a holder whose noise was switched off."""
    sigma, delta = 8.0, 1e-5
    spec = dataclasses.replace(
        spec_for(max_rounds=100),
        algorithm="dpzero",
        answer_kind=AnswerKind.DP_SCALAR,
        batch=BatchSpec(mode="poisson", batch_size=20),  # rate ~1: no amplification to hide in
        dp=DpSpec(epsilon=1.0, delta=delta, noise_multiplier=sigma, clip=1.0),
    )
    direction = find_isolating_direction(spec)
    policy = {
        "max_epsilon": 1e6,
        "delta": delta,
        "allowed_algorithms": ["dpzero"],
        "allowed_batch_modes": ["poisson"],
        "min_examples": 20,
        "min_batch_size": 16,
    }
    member = holder_on(tmp_path / "in", [*others(), TARGET], name="in", **policy)
    outsider = holder_on(tmp_path / "out", others(), name="out", **policy)
    expected = {}
    for holder in (member, outsider):
        holder.accept_run(spec)
        assert holder.evaluator is not None
        differences, _ = holder.evaluator.finite_differences(holder.records, direction)
        rate = min(1.0, 20 / len(holder.records))
        expected[holder.holder_id] = rate * float(torch.tensor(differences).clamp(-1, 1).sum()) / 20
    threshold = (expected["in"] + expected["out"]) / 2
    sign = 1.0 if expected["in"] > expected["out"] else -1.0

    def success(trials: int) -> float:
        values: dict[str, list[float]] = {}
        for holder in (member, outsider):
            round_index = _round_of(spec, direction.seed)
            values[holder.holder_id] = []
            for number in range(trials):
                task = make_task(
                    spec, f"{holder.holder_id}-d{len(holder.ledger.records)}-{number}",
                    candidates=(direction,), round_index=round_index,
                )  # fmt: skip
                answer = holder.answer(task)
                assert answer.value is not None
                values[holder.holder_id].append(answer.value)
        hits = sum(sign * (v - threshold) > 0 for v in values["in"])
        hits += sum(sign * (v - threshold) <= 0 for v in values["out"])
        return hits / (2 * trials)

    one_answer = PrivacyAccountant([PoissonGaussian(sigma, 1.0)]).epsilon(delta)
    bound = (math.exp(one_answer) + delta) / (1 + math.exp(one_answer))
    trials = 200
    tolerance = 3 * math.sqrt(0.25 / (2 * trials))
    assert success(trials) <= bound + tolerance
    # The planted case: the same holders with their noise switched off are caught.
    for holder in (member, outsider):
        assert holder.run is not None
        holder.run.mechanism.spec = dataclasses.replace(
            spec, dp=dataclasses.replace(spec.dp, noise_multiplier=0.0)
        )
    assert success(trials) > bound + tolerance


# -- 2. refusals leak nothing -----------------------------------------------------------------
def test_a_refusal_is_the_same_code_whatever_the_budget_and_data(tmp_path: Path) -> None:
    spec = spec_for()
    answers = []
    for index, (records, max_bits) in enumerate([(32, 1.0), (48, 3.0), (200, 7.0)]):
        holder = holder_on(
            tmp_path / str(index), tiny_records(records, seed=index), max_bits=max_bits
        )
        holder.accept_run(spec)
        while not holder.answer(make_task(spec, f"spend{len(holder.ledger.records)}")).refused:
            pass
        answers.append(holder.answer(make_task(spec, "over")))
        answers.append(holder.answer(make_task(spec, "stale", base_version=3)))
    # Every refusal is a bare code: no bits left, epsilon spent, file hash or n in it.
    assert {a.refusal for a in answers[::2]} == {RefusalCode.OVER_BUDGET}
    assert all(a == Answer(a.task_id, None, refusal=a.refusal) for a in answers)
    assert len({a for a in answers[::2]}) == 1


def test_join_decisions_do_not_depend_on_the_real_number_of_examples(tmp_path: Path) -> None:
    """A coordinator offering DPZero runs at ever lower noise cannot find where a holder
    starts refusing and so learn its n: the decision uses the declared min_examples."""
    privacy = {
        "max_epsilon": 2.0,
        "delta": 1e-5,
        "allowed_algorithms": ["dpzero"],
        "allowed_batch_modes": ["poisson"],
        "min_examples": 32,
    }
    small = holder_on(tmp_path / "small", tiny_records(32), **privacy)
    large = holder_on(tmp_path / "large", tiny_records(320, seed=1), **privacy)
    decisions: dict[str, list[bool]] = {"small": [], "large": []}
    for sigma in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0):
        spec = dataclasses.replace(
            spec_for(max_rounds=50),
            algorithm="dpzero",
            answer_kind=AnswerKind.DP_SCALAR,
            batch=BatchSpec(mode="poisson", batch_size=16),
            dp=DpSpec(epsilon=2.0, delta=1e-5, noise_multiplier=sigma),
        )
        for name, holder in (("small", small), ("large", large)):
            try:
                holder.accept_run(spec)
                decisions[name].append(True)
            except PolicyViolation:
                decisions[name].append(False)
    assert decisions["small"] == decisions["large"]
    assert True in decisions["small"] and False in decisions["small"]


# -- 3. wire-legal values crash nothing ------------------------------------------------------
def test_randomized_response_at_the_wire_maximum_is_answered(tmp_path: Path) -> None:
    spec = spec_for(dp=DpSpec(delta=1e-5, randomized_response_epsilon=64.0))
    holder = holder_on(tmp_path, tiny_records(32), max_epsilon=1e9, delta=1e-5)
    holder.accept_run(spec)
    answer = holder.answer(make_task(spec, "t"))
    assert answer.choice in (0, 1)


def test_a_failure_after_reading_data_gives_the_default_answer_charged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = holder_on(tmp_path, tiny_records(32))
    spec = spec_for()
    holder.accept_run(spec)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory halfway through the data")

    monkeypatch.setattr(PlainChoice, "release", broken)
    answer = holder.answer(make_task(spec, "t"))
    assert answer == Answer("t", choice=0)  # "keep the incumbent", data-independent
    assert [r.bits for r in holder.ledger.records] == [1.0]  # charged like any answer
    assert holder.status.defaulted == 1


def test_non_finite_scores_give_the_default_answer(tmp_path: Path) -> None:
    holder = holder_on(tmp_path, tiny_records(32))
    spec = spec_for()
    holder.accept_run(spec)
    assert holder.evaluator is not None
    with torch.no_grad():
        next(holder.evaluator.model.parameters()).fill_(math.nan)  # a poisoned model
    answer = holder.answer(make_task(spec, "t"))
    assert answer == Answer("t", choice=0) and holder.status.defaulted == 1


def test_a_broken_step_application_makes_the_run_refuse_until_rejoined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = holder_on(tmp_path, tiny_records(32))
    spec = spec_for()
    holder.accept_run(spec)
    assert holder.evaluator is not None
    steps = [Step(seed=scheduled_seed(spec, 0), coefficient=as_float32(0.125))]
    monkeypatch.setattr(
        holder.evaluator, "apply_steps", lambda steps: (_ for _ in ()).throw(MemoryError("oom"))
    )
    first = holder.answer(make_task(spec, "t1", new_steps=steps))
    assert first.refusal is RefusalCode.INTERNAL
    again = holder.answer(make_task(spec, "t2"))
    assert again.refusal is RefusalCode.INTERNAL and holder.ledger.records == ()


# -- 5. a ledger belongs to the records ------------------------------------------------------
def spend(holder: DataHolder, spec: RunSpec, count: int, prefix: str) -> None:
    holder.accept_run(spec)
    for number in range(count):
        assert not holder.answer(make_task(spec, f"{prefix}{number}")).refused


def test_the_same_records_in_another_form_keep_their_budget(tmp_path: Path) -> None:
    from sottovoce.api import open_ledger
    from sottovoce.common.data import write_jsonl

    records = tiny_records(24)
    policy_path = tmp_path / "policy.toml"
    from helpers import write_policy

    write_policy(policy_path, tmp_path / "ledger", max_bits=50.0)
    jsonl = tmp_path / "data.jsonl"
    write_jsonl(jsonl, records)
    with open_ledger(policy_path, jsonl) as ledger:
        ledger.charge("t1", "run-a", 5.0, 1, answer_kind="compare")
        first_id = ledger.dataset_id
    # Reordered, as TSV (labels are strings there), with blank lines and padding.
    tsv = tmp_path / "data.tsv"
    lines = ["text\tlabel"] + [f" {r['text']}\t{r['label']}" for r in reversed(records)]
    tsv.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    with open_ledger(policy_path, tsv) as ledger:
        assert ledger.dataset_id == first_id and ledger.spent_bits == 5.0
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n" + jsonl.read_text() + "\n\n", encoding="utf-8")
    with open_ledger(policy_path, blank) as ledger:
        assert ledger.dataset_id == first_id and ledger.spent_bits == 5.0


def test_an_overlapping_data_set_inherits_what_its_records_cost(tmp_path: Path) -> None:
    folder = tmp_path / "ledger"
    first, second = tiny_records(20, seed=1), tiny_records(20, seed=2)

    def opened(records: list[dict[str, object]]) -> Any:
        return open_dataset_ledger(folder, records, 100.0)

    with opened(first) as ledger:
        ledger.charge("a", "r", 4.0, 1, answer_kind="compare")
    with opened(second) as ledger:
        ledger.charge("b", "r", 6.0, 1, answer_kind="compare")
    with opened(first + second[:5]) as grown:  # grew by five of the second's records
        assert grown.inherited is not None
        # Its worst record is one of the five, which cost 6 bits in the second ledger.
        assert grown.spent_bits == 6.0 and grown.own_bits == 0.0
    with opened(first[:10]) as subset:
        assert subset.spent_bits == 4.0
    with opened(tiny_records(20, seed=3)) as stranger:
        assert stranger.inherited is None and stranger.spent_bits == 0.0
    # The first data set sees what the grown one spent on its records, next time it opens.
    with opened(first + second[:5]) as grown:
        grown.charge("c", "r", 1.0, 0, answer_kind="compare")
    with opened(first) as ledger:
        assert ledger.spent_bits == 4.0 + 1.0


def test_the_ledger_folder_holds_no_plain_record_hashes(tmp_path: Path) -> None:
    import hashlib

    from sottovoce.common.data import canonical_line

    records = tiny_records(24)
    holder = holder_on(tmp_path, records)
    spend(holder, spec_for(), 2, "t")
    holder.ledger.close()
    everything = b"".join(p.read_bytes() for p in (tmp_path / "ledger").iterdir() if p.is_file())
    for record in records:
        for text in (canonical_line(record), str(record["text"])):
            digest = hashlib.sha256(text.encode()).hexdigest()
            assert digest.encode() not in everything and bytes.fromhex(digest) not in everything


def test_a_lost_key_is_not_replaced_silently(tmp_path: Path) -> None:
    holder = holder_on(tmp_path, tiny_records(24))
    holder.ledger.close()
    (tmp_path / "ledger" / "holder.key").unlink()
    with pytest.raises(ConfigError, match="restore the key"):
        holder_on(tmp_path, tiny_records(24))


def test_a_ledger_kept_under_the_file_hash_is_adopted(tmp_path: Path) -> None:
    """Ledgers before record keys were named after the data file's sha256."""
    from helpers import write_policy

    from sottovoce.api import file_sha256, open_ledger
    from sottovoce.client.ledger import Ledger
    from sottovoce.common.data import write_jsonl

    data = tmp_path / "data.jsonl"
    write_jsonl(data, tiny_records(24))
    with Ledger.open(tmp_path / "ledger", file_sha256(data), 50.0) as old:
        old.charge("t1", "run-a", 7.0, 1, answer_kind="compare")
    policy = write_policy(tmp_path / "policy.toml", tmp_path / "ledger", max_bits=50.0)
    with open_ledger(policy, data) as ledger:
        assert ledger.spent_bits == 7.0


# -- 6. the holder's own files and its concurrency -------------------------------------------
def test_holder_files_are_owner_only(tmp_path: Path) -> None:
    holder = holder_on(tmp_path, tiny_records(24))
    holder._status_path = tmp_path / "status.json"
    spec = spec_for()
    spend(holder, spec, 1, "t")
    holder.answer(make_task(spec, "off", candidates=(Candidate(1, 0.1),)))  # a refusal note
    files = [p for p in (tmp_path / "ledger").iterdir() if not p.name.endswith(".lock")]
    files.append(tmp_path / "status.json")
    assert {p.suffix for p in files} >= {".jsonl", ".key", ".records", ".json"}
    for path in files:
        assert path.stat().st_mode & 0o077 == 0, path


def test_concurrent_tasks_are_answered_one_at_a_time(tmp_path: Path) -> None:
    holder = holder_on(tmp_path, tiny_records(24))
    spec = spec_for()
    holder.accept_run(spec)
    results: list[Answer] = []
    errors: list[BaseException] = []

    def answer(task_id: str) -> None:
        try:
            results.append(holder.answer(make_task(spec, task_id)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=answer, args=(f"c{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 6 and not any(a.refused for a in results)
    assert len(holder.ledger.records) == 6


def test_log_heads_agree_with_what_the_holder_applied(tmp_path: Path) -> None:
    """Sanity of the helpers the attacks use: a legal walk is answered and applied."""
    holder = holder_on(tmp_path, tiny_records(24))
    spec = spec_for()
    holder.accept_run(spec)
    step = Step(seed=scheduled_seed(spec, 0), coefficient=as_float32(0.125))
    task = make_task(spec, "w", new_steps=[step])
    assert not holder.answer(task).refused
    assert holder.log_head == extend_chain(
        genesis_hash(tiny_fingerprint(), ALL_SCALES.canonical_id()), 0, [step]
    )
    assert scheduled_candidates(spec, 1)[0].seed == task.candidates[0].seed
