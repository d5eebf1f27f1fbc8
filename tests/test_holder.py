"""The data holder core in process: answers, charges, cached re-sends, refusals, restarts."""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    FITNESS,
    make_policy,
    make_task,
    run_spec,
    scheduled_candidates,
    scheduled_seed,
    tiny_records,
)

from sottovoce.client.holder import DataHolder
from sottovoce.client.ledger import Ledger
from sottovoce.client.private_answers import SecureRandomness
from sottovoce.client.refusal_log import read_refusals, refusal_log_path
from sottovoce.common.bounds import accepted_rounds_bits
from sottovoce.common.errors import ConfigError, PolicyViolation, RefusalCode
from sottovoce.common.models import LoadedModel, load_model
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.protocol.messages import Candidate, RunFinished, RunSpec, Task
from sottovoce.common.steplog import Step, as_float32, extend_chain

DATASET = "tinyset"
STEP = Step(seed=scheduled_seed(run_spec(), 0), coefficient=as_float32(0.05))  # round 0's


def load_tiny() -> LoadedModel:
    return load_model("tiny-llama")


def open_ledger(ledger_dir: Path, max_bits: float) -> Ledger:
    return Ledger.open(ledger_dir, DATASET, max_bits)


def ledger_file(ledger_dir: Path) -> Path:
    return ledger_dir / f"{DATASET}.ledger.jsonl"


def make_holder(
    tmp_path: Path, *, max_bits: float = 100.0, records: int = 64, **policy: Any
) -> DataHolder:
    ledger_dir = tmp_path / "ledger"
    holder_policy = make_policy(ledger_dir, max_bits=max_bits, **policy)
    return DataHolder(
        "h",
        tiny_records(records),
        holder_policy,
        open_ledger(ledger_dir, max_bits),
        load_tiny,
    )


def joined(tmp_path: Path, spec: RunSpec | None = None, **kwargs: Any) -> DataHolder:
    holder = make_holder(tmp_path, **kwargs)
    holder.accept_run(spec or run_spec())
    return holder


def assert_refused_without_trace(
    holder: DataHolder, task: Task, reason: str, code: RefusalCode | None = None
) -> None:
    """Refused with a bare reason code; the words (``reason``) only in the holder's own
    status and refusal log; no ledger byte written, no forward pass, log unmoved."""
    path = ledger_file(holder.policy.ledger_dir)
    before = (path.read_bytes(), holder.forward_passes, holder.log_version, holder.log_head)
    answer = holder.answer(task)
    assert answer.refused and answer.choice is None and answer.value is None
    assert isinstance(answer.refusal, RefusalCode)
    assert code is None or answer.refusal is code
    assert holder.status.last_refusal is not None and reason in holder.status.last_refusal
    notes = read_refusals(refusal_log_path(path))
    assert notes and notes[-1]["task_id"] == task.task_id and reason in notes[-1]["message"]
    after = (path.read_bytes(), holder.forward_passes, holder.log_version, holder.log_head)
    assert after == before


# -- answering and charging ------------------------------------------------------------------
def test_compare_answer_charges_one_bit_durably(tmp_path: Path) -> None:
    holder = joined(tmp_path)
    joining = holder.forward_passes  # the divergence reference's prompts, scored at join
    answer = holder.answer(make_task(run_spec(), "t1"))
    assert not answer.refused and answer.choice in (0, 1)
    assert holder.forward_passes - joining == 2  # incumbent and candidate on one batch of 16
    assert holder.ledger.spent_bits == 1.0
    holder.ledger.close()
    with Ledger.open(tmp_path / "ledger", DATASET, 100.0) as reopened:
        (record,) = reopened.records
        assert (record.task_id, record.run_id, record.bits) == ("t1", "run-a", 1.0)
        assert (record.kind, record.choice) == ("compare", answer.choice)
        assert reopened.spent_bits == 1.0


def test_best_of_three_charges_two_bits(tmp_path: Path) -> None:
    spec = run_spec(algorithm="bboxer-1+lambda")
    holder = joined(tmp_path, spec)
    joining = holder.forward_passes
    three = scheduled_candidates(spec, 0, (0.05, 0.05, 0.05))
    answer = holder.answer(make_task(spec, "t1", candidates=three))
    assert not answer.refused and answer.choice in (0, 1, 2, 3)
    assert holder.forward_passes - joining == 4
    (record,) = holder.ledger.records
    assert record.bits == math.log2(3 + 1) == 2.0
    assert record.kind == "best-of"


def test_resent_task_gets_recorded_answer_at_no_cost(tmp_path: Path) -> None:
    holder = joined(tmp_path)
    task = make_task(run_spec(), "t1", new_steps=[STEP])
    first = holder.answer(task)
    path = ledger_file(tmp_path / "ledger")
    snapshot = (path.read_bytes(), holder.forward_passes, holder.log_version)
    assert snapshot[2] == 1
    for _ in range(3):
        again = holder.answer(task)
        assert again == first
    assert (path.read_bytes(), holder.forward_passes, holder.log_version) == snapshot
    assert len(holder.ledger.records) == 1 and holder.ledger.spent_bits == 1.0


# -- refusals --------------------------------------------------------------------------------
def test_budget_edge_last_affordable_answer_passes_next_is_refused(tmp_path: Path) -> None:
    holder = joined(tmp_path, max_bits=2.0)
    spec = run_spec()
    assert not holder.answer(make_task(spec, "t1")).refused
    assert not holder.answer(make_task(spec, "t2")).refused  # lands exactly on max_bits
    assert holder.ledger.spent_bits == 2.0
    assert_refused_without_trace(holder, make_task(spec, "t3"), "0.00 of 2 remain")
    assert holder.ledger.spent_bits == 2.0 and len(holder.ledger.records) == 2


def test_best_of_that_would_cross_the_budget_is_refused(tmp_path: Path) -> None:
    spec = run_spec(algorithm="bboxer-1+lambda")
    holder = joined(tmp_path, spec, max_bits=3.0)
    three = scheduled_candidates(spec, 0, (0.05, 0.05, 0.05))
    assert not holder.answer(make_task(spec, "t1", candidates=three)).refused
    assert_refused_without_trace(
        holder,
        make_task(spec, "t2", candidates=three),
        "costs 2.00 bits, 1.00 of 3 remain",
        RefusalCode.OVER_BUDGET,
    )
    # A cheaper question still fits what is left.
    one = make_task(spec, "t3", candidates=three[:1])
    assert not holder.answer(one).refused
    assert holder.ledger.spent_bits == 3.0


BEST_OF = run_spec(algorithm="bboxer-1+lambda")
TWO = scheduled_candidates(BEST_OF, 1, (0.05, -0.05))  # round 1, after STEP (round 0)
LATER = Step(seed=scheduled_seed(BEST_OF, 1), coefficient=as_float32(0.05))
BAD_TASKS: dict[str, tuple[Callable[[], Task], str, RefusalCode]] = {
    "lambda above max_lambda": (
        lambda: make_task(
            BEST_OF, "x", history=[STEP], candidates=scheduled_candidates(BEST_OF, 1, [0.05] * 5)
        ),
        "5 candidates; policy allows at most max_lambda 4",
        RefusalCode.POLICY,
    ),
    "candidate scale above cap": (
        lambda: make_task(
            BEST_OF, "x", history=[STEP], candidates=scheduled_candidates(BEST_OF, 1, [-0.6])
        ),
        "|scale| 0.6 > max_perturbation_scale 0.5",
        RefusalCode.POLICY,
    ),
    "candidate seed off the schedule": (
        lambda: make_task(BEST_OF, "x", history=[STEP], candidates=[Candidate(1, 0.05)]),
        "not on the run's seed schedule",
        RefusalCode.POLICY,
    ),
    "step coefficient above cap": (
        lambda: make_task(
            BEST_OF, "x", history=[STEP], new_steps=[Step(LATER.seed, 0.75)], round_index=2
        ),
        "new step 0 has |coefficient| 0.75 > max_perturbation_scale 0.5",
        RefusalCode.POLICY,
    ),
    "step seed off the schedule": (
        lambda: make_task(BEST_OF, "x", history=[STEP], new_steps=[Step(3, 0.25)]),
        "new step 0 has seed 3, which is not a candidate",
        RefusalCode.POLICY,
    ),
    "steps do not hash to log_head": (
        lambda: make_task(BEST_OF, "x", history=[STEP], new_steps=[LATER], log_head="ab" * 32),
        "do not hash to the announced log head",
        RefusalCode.MALFORMED,
    ),
    "older log version": (
        lambda: make_task(BEST_OF, "x", base_version=0, new_steps=[STEP], candidates=TWO),
        "builds on log version 0, this holder is at version 1",
        RefusalCode.STALE,
    ),
    "newer log version": (
        lambda: make_task(BEST_OF, "x", history=[STEP, LATER]),
        "builds on log version 2, this holder is at version 1",
        RefusalCode.STALE,
    ),
    "run id mismatch": (
        lambda: make_task(BEST_OF, "x", history=[STEP], run_id="run-b"),
        "is for run 'run-b'; this holder joined 'run-a'",
        RefusalCode.MALFORMED,
    ),
}


@pytest.mark.parametrize("case", list(BAD_TASKS))
def test_refused_task_charges_nothing_and_runs_nothing(tmp_path: Path, case: str) -> None:
    holder = joined(tmp_path, BEST_OF)
    assert not holder.answer(make_task(BEST_OF, "t0", new_steps=[STEP], candidates=TWO)).refused
    assert holder.log_version == 1 and holder.ledger.spent_bits == pytest.approx(math.log2(3))
    build, reason, code = BAD_TASKS[case]
    assert_refused_without_trace(holder, build(), reason, code)
    assert holder.status.refused == 1
    # The holder is unharmed: the next honest task is answered from version 1.
    assert not holder.answer(make_task(BEST_OF, "t1", history=[STEP], candidates=TWO)).refused


def test_task_before_any_run_is_refused(tmp_path: Path) -> None:
    holder = make_holder(tmp_path)
    assert_refused_without_trace(
        holder, make_task(run_spec(), "t1"), "no run accepted", RefusalCode.NOT_READY
    )


# -- runs the policy refuses -----------------------------------------------------------------
BAD_RUNS: dict[str, tuple[RunSpec, str]] = {
    "model fingerprint": (
        run_spec(fingerprint="sha256:" + "00" * 32),
        "run is for model sha256:000000000000...",
    ),
    "parametrization patterns": (
        run_spec(parametrization=ParametrizationSpec(kind="scale", patterns=("*embed*",))),
        "run's parametrization is not one the policy pins: closest differs in patterns",
    ),
    "algorithm": (
        run_spec(algorithm="bboxer-1+lambda"),
        "run wants algorithm 'bboxer-1+lambda'; policy allows ['bboxer-1+1']",
    ),
    "parametrization": (
        run_spec(parametrization=ParametrizationSpec(kind="full")),
        "run's parametrization is not one the policy pins: closest differs in kind",
    ),
    "prompt template": (
        run_spec(fitness=dataclasses.replace(FITNESS, prompt_template="Is {text} in your data?")),
        "fitness differs from the policy's pinned fitness in prompt_template",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_accept_run_refuses_what_the_policy_forbids(tmp_path: Path, case: str) -> None:
    holder = make_holder(
        tmp_path,
        allowed_algorithms=["bboxer-1+1"],
        parametrizations=[{"kind": "scale"}, {"kind": "select", "patterns": ["*norm*"]}],
    )
    spec, reason = BAD_RUNS[case]
    with pytest.raises(PolicyViolation) as refused:
        holder.accept_run(spec)
    assert reason in str(refused.value)
    assert "\n" not in str(refused.value)
    assert holder.spec is None and holder.forward_passes == 0
    assert_refused_without_trace(holder, make_task(spec, "t1"), "no run accepted")


# -- the budget outlives holders and runs ----------------------------------------------------
def test_restart_and_new_run_keep_the_spent_bits(tmp_path: Path) -> None:
    first = joined(tmp_path, max_bits=3.0)
    run_a = run_spec()
    for task_id in ("a1", "a2"):
        assert not first.answer(make_task(run_a, task_id)).refused
    first.ledger.close()

    second = joined(tmp_path, run_spec(run_id="run-b"), max_bits=3.0)
    assert second.ledger.spent_bits == 2.0 and second.status.lifetime_bits_spent == 2.0
    run_b = run_spec(run_id="run-b")
    # An old run's task id gets no answer in the new run (not even the recorded one).
    assert_refused_without_trace(second, make_task(run_b, "a1"), "already answered for run")
    assert not second.answer(make_task(run_b, "b1")).refused
    assert second.ledger.spent_bits == 3.0
    assert_refused_without_trace(
        second, make_task(run_b, "b2"), "0.00 of 3 remain", RefusalCode.OVER_BUDGET
    )
    assert [r.run_id for r in second.ledger.records] == ["run-a", "run-a", "run-b"]


# -- the minibatch is the holder's secret ----------------------------------------------------
class SpyRandom(secrets.SystemRandom):
    """System entropy, recording every draw and every attempt to seed it."""

    def __init__(self) -> None:
        self.draws: list[list[int]] = []
        self.seeds: list[object] = []
        super().__init__()  # Random.__init__ seeds itself once; later calls are what counts
        self.seeds.clear()

    def seed(self, *args: Any, **kwargs: Any) -> None:
        self.seeds.append(args)

    def sample(self, population: Sequence[int], k: int, **kwargs: Any) -> list[int]:  # type: ignore[override]
        drawn = super().sample(population, k, **kwargs)
        self.draws.append(list(drawn))
        return drawn


def test_minibatch_rng_is_system_entropy_never_seeded_by_the_task(tmp_path: Path) -> None:
    holders = [joined(tmp_path / name) for name in ("a", "b")]
    spies = []
    for holder in holders:
        assert type(holder._rng) is SecureRandomness
        assert type(holder._rng._rng) is secrets.SystemRandom
        spy = SpyRandom()
        holder._rng._rng = spy
        spies.append(spy)
    task = make_task(run_spec(), "same-task")
    twin = make_task(run_spec(), "same-task-again")
    for holder in holders:
        assert not holder.answer(task).refused
    assert not holders[0].answer(twin).refused
    a, b = spies
    assert [len(draw) for draw in a.draws + b.draws] == [16, 16, 16]
    assert all(len(set(draw)) == 16 and max(draw) < 64 for draw in a.draws + b.draws)
    # Same question, two holders (and the same holder twice): independent draws.
    assert a.draws[0] != b.draws[0] and a.draws[0] != a.draws[1]
    assert a.seeds == [] and b.seeds == []


def finished_message(
    spec: RunSpec, steps: Sequence[Step], base: int, head: str | None = None
) -> RunFinished:
    return RunFinished(
        run_id=spec.run_id,
        reason="max_rounds reached",
        final_version=base + len(steps),
        log_head=head or extend_chain(spec.log_genesis, 0, steps),
        bits_spent_total=12.0,
        base_version=base,
        new_steps=tuple(steps),
    )


def test_finish_applies_the_final_steps_and_reports_locally(tmp_path: Path) -> None:
    holder = make_holder(tmp_path)
    spec = run_spec()
    holder.accept_run(spec)
    before = holder.local_report(bits_spent_total=12.0)
    holder.finish(finished_message(spec, [STEP], base=0))
    assert holder.log_version == 1
    report = holder.local_report(bits_spent_total=12.0)
    assert report["log_head"] == holder.log_head and report["n"] == 64
    assert report["train_risk"] == report["train_errors"] / 64
    assert math.isclose(report["slack"], math.sqrt((12 * math.log(2) + math.log(20)) / 128))
    assert before["log_version"] == 0
    # Its own transcript count, from its own log: one step (round 0) of a 100-round run.
    transcript = report["transcript_bound"]
    accepted = [True] + [False] * 99
    assert transcript["transcript_bits"] == accepted_rounds_bits(accepted, 4)
    assert transcript["transcript_bits"] > before["transcript_bound"]["transcript_bits"]
    assert transcript["n"] == 64 and transcript["transcript_bound"] < 1.0


def test_finish_with_a_forged_head_applies_nothing(tmp_path: Path) -> None:
    holder = make_holder(tmp_path)
    spec = run_spec()
    holder.accept_run(spec)
    holder.finish(finished_message(spec, [STEP], base=0, head="f" * 64))
    assert holder.log_version == 0
    assert holder.status.last_refusal is not None and "hash" in holder.status.last_refusal


def test_a_bad_label_is_named_by_its_file_line_before_any_dial(tmp_path: Path) -> None:
    """Data errors found when the holder is made give the file's 1-based line, as the
    reader's own errors do (a blank line is skipped but counted), and leave no ledger."""
    from helpers import write_policy

    from sottovoce.api import open_holder
    from sottovoce.common.errors import DataError

    data = tmp_path / "data.jsonl"
    data.write_text(
        '{"text": "fine", "label": 0}\n\n{"text": "bad", "label": 7}\n', encoding="utf-8"
    )
    policy = write_policy(
        tmp_path / "policy.toml", tmp_path / "ledger", min_examples=1, min_batch_size=1
    )
    with pytest.raises(DataError, match=rf"^{data} line 3: field 'label' must be an integer"):
        open_holder(data, policy, holder_id="h", model_name="tiny-llama")
    assert not (tmp_path / "ledger").exists()


OFFLINE_REFUSALS = {
    "model fingerprint": (
        {"expected_model_fingerprint": "sha256:" + "0" * 64},
        "is not the policy's expected_model_fingerprint",
    ),
    "too few examples": ({"min_examples": 500}, "declares min_examples 500"),
    "delta too large": ({"delta": 0.25, "max_epsilon": 6.0}, "policy delta 0.25 must be < 1/n"),
    "parametrization": (
        {"parametrizations": [{"kind": "scale", "patterns": ["no.such.weight"]}]},
        "policy parametrizations[0]",
    ),
}


@pytest.mark.parametrize("case", list(OFFLINE_REFUSALS))
def test_a_misconfigured_holder_fails_before_it_makes_a_ledger(tmp_path: Path, case: str) -> None:
    """Issue 18: everything checkable offline is checked before the ledger (or its key,
    its record index, its lock) is created, so a misconfigured holder leaves no file."""
    from helpers import write_policy, write_records

    from sottovoce.api import open_holder

    overrides, message = OFFLINE_REFUSALS[case]
    data = write_records(tmp_path / "data.jsonl", 24)
    policy = write_policy(tmp_path / "policy.toml", tmp_path / "ledger", **overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        open_holder(data, policy, holder_id="h", model_name="tiny-llama")
    assert not (tmp_path / "ledger").exists()
    # the same inputs, fixed, do make the ledger (the check above can fail)
    write_policy(tmp_path / "policy.toml", tmp_path / "ledger")
    holder = open_holder(data, policy, holder_id="h", model_name="tiny-llama")
    holder.ledger.close()
    assert any((tmp_path / "ledger").glob("*.ledger.jsonl"))
