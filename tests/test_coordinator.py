"""The coordinator core, in process: rounds, votes, budget, journal and resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sottovoce.common.bounds import choice_transcript_bits
from sottovoce.common.config import RunConfig, parse_config
from sottovoce.common.errors import ConfigError, LogIntegrityError, RequestRefused
from sottovoce.common.protocol.messages import Answer, JoinRequest, RunFinished, Task
from sottovoce.common.storage import read_json_lines
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.run_report import run_complexity
from sottovoce.server.run_state import RunState

FINGERPRINT = "sha256:" + "ab" * 32


def config(**run: Any) -> RunConfig:
    data = {
        "run": {"name": "t", "max_rounds": 10, "bit_budget": 100, **run},
        "server": {"min_holders": 2, "quorum": 2, "round_timeout_s": 30},
        "parametrization": {"kind": "scale"},
    }
    return parse_config(data, "test")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def open_coordinator(run_dir: Path, cfg: RunConfig, clock: Clock | None = None) -> Coordinator:
    state = RunState.open(run_dir, cfg, "# test\n", FINGERPRINT)
    return Coordinator(cfg, state, FINGERPRINT, clock=clock or Clock())


def join_two(coordinator: Coordinator) -> None:
    for holder in ("a", "b"):
        coordinator.join(JoinRequest(holder_id=holder, model_fingerprint=FINGERPRINT))


def pull(coordinator: Coordinator, holder: str) -> Task:
    log = coordinator.state.log
    task = coordinator.pull_task(holder, log.version, log.head, timeout_s=0)
    assert isinstance(task, Task)
    return task


def play_round(coordinator: Coordinator, choices: dict[str, int]) -> list[Task]:
    tasks = [pull(coordinator, holder) for holder in choices]
    for task, (holder, choice) in zip(tasks, choices.items(), strict=True):
        assert coordinator.push_answer(holder, Answer(task_id=task.task_id, choice=choice))
    return tasks


def test_join_checks_model_fingerprint(tmp_path: Path) -> None:
    coordinator = open_coordinator(tmp_path / "run", config())
    with pytest.raises(RequestRefused, match="this run needs"):
        coordinator.join(JoinRequest(holder_id="a", model_fingerprint="sha256:" + "00" * 32))


def test_join_checks_the_allow_list(tmp_path: Path) -> None:
    data = {
        "run": {"name": "t", "max_rounds": 10, "bit_budget": 100},
        "server": {"min_holders": 1, "quorum": 1, "allowed_holders": ["hospital-a"]},
    }
    coordinator = open_coordinator(tmp_path / "run", parse_config(data, "test"))
    with pytest.raises(RequestRefused, match=r"'bank-b' is not in this run's server\.allowed"):
        coordinator.join(JoinRequest(holder_id="bank-b", model_fingerprint=FINGERPRINT))
    coordinator.join(JoinRequest(holder_id="hospital-a", model_fingerprint=FINGERPRINT))


def test_no_round_before_min_holders(tmp_path: Path) -> None:
    coordinator = open_coordinator(tmp_path / "run", config())
    coordinator.join(JoinRequest(holder_id="a", model_fingerprint=FINGERPRINT))
    assert coordinator.pull_task("a", 0, coordinator.state.log.head, timeout_s=0) is None


def test_majority_accepts_and_journals(tmp_path: Path) -> None:
    coordinator = open_coordinator(tmp_path / "run", config())
    join_two(coordinator)
    tasks = play_round(coordinator, {"a": 1, "b": 1})
    assert coordinator.state.log.version == 1
    step = next(iter(coordinator.state.log))
    assert step.seed == tasks[0].candidates[0].seed
    assert coordinator.state.bits_total == 2.0
    assert coordinator.state.bits_per_holder == {"a": 1.0, "b": 1.0}
    play_round(coordinator, {"a": 1, "b": 0})  # tie: keep the incumbent
    assert coordinator.state.log.version == 1
    task = pull(coordinator, "a")
    assert task.base_version == 1 and task.new_steps == ()
    journal = read_json_lines(tmp_path / "run" / "journal.jsonl")
    assert [r["type"] for r in journal] == [
        *["delivered", "delivered", "answer", "answer", "round"] * 2,
        "delivered",
    ]
    assert [(r["round"], r["holders"]) for r in journal if r["type"] == "delivered"] == [
        (0, ["a"]), (0, ["b"]), (1, ["a"]), (1, ["b"]), (2, ["a"])
    ]  # fmt: skip


def test_bad_answers_change_nothing(tmp_path: Path) -> None:
    coordinator = open_coordinator(tmp_path / "run", config())
    join_two(coordinator)
    task = pull(coordinator, "a")
    journal = tmp_path / "run" / "journal.jsonl"
    delivered = journal.read_bytes()  # a's delivery; nothing after it may change
    with pytest.raises(RequestRefused, match="not given"):
        coordinator.push_answer("b", Answer(task_id=task.task_id, choice=1))
    with pytest.raises(RequestRefused, match="not given"):
        coordinator.push_answer("a", Answer(task_id="forged", choice=1))
    with pytest.raises(RequestRefused, match="out of range"):
        coordinator.push_answer("a", Answer(task_id=task.task_id, choice=2))
    assert journal.read_bytes() == delivered and coordinator.state.bits_total == 0
    assert coordinator.push_answer("a", Answer(task_id=task.task_id, choice=1))
    assert not coordinator.push_answer("a", Answer(task_id=task.task_id, choice=0))
    assert coordinator.state.bits_total == 1.0


def test_holder_on_another_log_is_refused(tmp_path: Path) -> None:
    coordinator = open_coordinator(tmp_path / "run", config())
    join_two(coordinator)
    with pytest.raises(LogIntegrityError, match="not this run's log"):
        coordinator.pull_task("a", 0, "f" * 64, timeout_s=0)
    with pytest.raises(LogIntegrityError):
        coordinator.pull_task("a", 3, coordinator.state.log.head, timeout_s=0)


def test_bit_budget_stops_before_overspending(tmp_path: Path) -> None:
    coordinator = open_coordinator(tmp_path / "run", config(bit_budget=5))
    join_two(coordinator)
    play_round(coordinator, {"a": 1, "b": 1})
    play_round(coordinator, {"a": 0, "b": 0})
    finished = coordinator.pull_task("a", 1, coordinator.state.log.head, timeout_s=0)
    assert isinstance(finished, RunFinished)
    assert "bit budget" in finished.reason
    assert coordinator.state.bits_total == 4.0 <= 5


def test_deadline_closes_on_quorum_and_late_answers_still_count(tmp_path: Path) -> None:
    clock = Clock()
    cfg = parse_config(
        {"run": {"name": "t"}, "server": {"min_holders": 3, "quorum": 2, "round_timeout_s": 10}},
        "test",
    )
    coordinator = open_coordinator(tmp_path / "run", cfg, clock)
    for holder in ("a", "b", "c"):
        coordinator.join(JoinRequest(holder_id=holder, model_fingerprint=FINGERPRINT))
    tasks = {h: pull(coordinator, h) for h in ("a", "b", "c")}
    coordinator.push_answer("a", Answer(task_id=tasks["a"].task_id, choice=1))
    coordinator.push_answer("b", Answer(task_id=tasks["b"].task_id, choice=1))
    clock.now += 11
    coordinator.tick()
    assert coordinator.state.log.version == 1
    assert coordinator.state.rounds[0].closed_by == "deadline"
    assert not coordinator.push_answer("c", Answer(task_id=tasks["c"].task_id, choice=0))
    assert coordinator.state.bits_per_holder["c"] == 1.0  # heard, so counted


def test_restart_resumes_round_and_log(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = config()
    coordinator = open_coordinator(run_dir, cfg)
    join_two(coordinator)
    play_round(coordinator, {"a": 1, "b": 1})
    open_task = pull(coordinator, "a")
    coordinator.push_answer("a", Answer(task_id=open_task.task_id, choice=1))
    head, step_size = coordinator.state.log.head, coordinator.strategy.step_size

    resumed = open_coordinator(run_dir, cfg)  # as after kill -9
    assert resumed.state.log.head == head and resumed.strategy.step_size == step_size
    assert resumed.state.bits_total == 3.0
    join_two(resumed)
    again = pull(resumed, "b")
    assert again.round_index == open_task.round_index
    assert again.candidates == open_task.candidates  # the same question is asked again
    assert resumed.pull_task("a", 1, head, timeout_s=0) is None  # a already answered it
    resumed.push_answer("b", Answer(task_id=again.task_id, choice=1))
    assert resumed.state.log.version == 2


def test_answer_to_a_task_of_the_crashed_coordinator_counts_after_restart(tmp_path: Path) -> None:
    cfg = config()
    first = open_coordinator(tmp_path / "run", cfg)
    join_two(first)
    play_round(first, {"a": 1, "b": 1})
    task_b = pull(first, "b")  # round 1 asked; then the coordinator dies before b answers
    again = open_coordinator(tmp_path / "run", cfg)
    again.join(JoinRequest(holder_id="b", model_fingerprint=FINGERPRINT))  # b is back first
    assert again.push_answer("b", Answer(task_id=task_b.task_id, choice=1))  # kept, not lost
    again.join(JoinRequest(holder_id="a", model_fingerprint=FINGERPRINT))
    task_a = pull(again, "a")
    assert task_a.round_index == 1
    assert again.push_answer("a", Answer(task_id=task_a.task_id, choice=1))
    closed = again.state.rounds[-1]
    assert closed.round_index == 1 and closed.choices == {"a": 1, "b": 1}
    assert closed.step is not None and closed.closed_by == "all answered"
    with pytest.raises(RequestRefused, match="was not given"):  # any other id stays refused
        again.push_answer("a", Answer(task_id=task_b.task_id, choice=1))


def test_a_round_answered_across_a_restart_closes_when_it_opens_again(tmp_path: Path) -> None:
    """a answered before the crash, b to the new coordinator before a was back: nothing is
    left to wait for, so the round closes as it opens again, not at its deadline."""
    cfg = config()
    first = open_coordinator(tmp_path / "run", cfg)
    join_two(first)
    play_round(first, {"a": 1, "b": 1})
    task_a, task_b = pull(first, "a"), pull(first, "b")
    assert first.push_answer("a", Answer(task_id=task_a.task_id, choice=1))  # then it dies
    clock = Clock()
    again = open_coordinator(tmp_path / "run", cfg, clock)
    again.join(JoinRequest(holder_id="b", model_fingerprint=FINGERPRINT))
    assert again.push_answer("b", Answer(task_id=task_b.task_id, choice=0))  # kept for it
    again.join(JoinRequest(holder_id="a", model_fingerprint=FINGERPRINT))
    again.tick()  # the clock has not moved: the deadline is 30 s away
    closed = again.state.rounds[-1]
    assert closed.round_index == 1 and closed.choices == {"a": 1, "b": 0}
    assert closed.closed_by == "all answered"
    assert pull(again, "a").round_index == 2  # and the next round is open


def test_crash_between_journal_and_log_is_completed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = config()
    coordinator = open_coordinator(run_dir, cfg)
    join_two(coordinator)
    play_round(coordinator, {"a": 1, "b": 1})
    (run_dir / "log.jsonl").write_text("")  # the step never reached the log
    resumed = open_coordinator(run_dir, cfg)
    assert resumed.state.log.version == 1
    assert resumed.state.repaired


def test_wait_holders_left_returns_when_all_have_left(tmp_path: Path) -> None:
    coordinator = open_coordinator(tmp_path / "run", config())
    join_two(coordinator)
    assert not coordinator.wait_holders_left(timeout_s=0.0)
    coordinator.leave("a")
    coordinator.leave("b")
    assert coordinator.wait_holders_left(timeout_s=0.0)


def test_other_config_cannot_reuse_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    open_coordinator(run_dir, config())
    with pytest.raises(ConfigError, match="different config"):
        open_coordinator(run_dir, config(max_rounds=11))
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["model_fingerprint"] == FINGERPRINT


def test_the_coordinators_complexity_is_the_code_of_its_aggregated_transcript(
    tmp_path: Path,
) -> None:
    """What the bound pays for: one outcome per round (1 + the accepted candidate, or 0),
    not every holder's vote. Disagreeing holders and a tie cost nothing extra."""
    cfg = config(algorithm="bboxer-1+lambda")
    cfg = cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"candidates": 3})})
    coordinator = open_coordinator(tmp_path / "run", cfg)
    join_two(coordinator)
    for votes in ({"a": 2, "b": 2}, {"a": 1, "b": 3}, {"a": 0, "b": 0}, {"a": 3, "b": 3}):
        play_round(coordinator, votes)
    complexity = run_complexity(cfg, coordinator.spec, coordinator.state)
    assert [r.winner for r in coordinator.state.rounds] == [1, None, None, 2]
    assert complexity.transcript_bits == choice_transcript_bits([2, 0, 0, 3], 3)
    assert complexity.heard_bits == coordinator.state.bits_total == 8 * 2.0
    assert complexity.rounds == 4


def test_a_holder_that_refuses_the_run_at_join_costs_no_round(tmp_path: Path) -> None:
    """A holder that joins, finds the run outside its policy and leaves before pulling its
    task never saw the round: the round is withdrawn, not spent (a 2-round run is not used
    up by two misconfigured holders)."""
    cfg = parse_config(
        {
            "run": {"name": "t", "max_rounds": 2, "bit_budget": 100},
            "server": {"min_holders": 1, "quorum": 1, "round_timeout_s": 30},
            "parametrization": {"kind": "scale"},
        },
        "test",
    )
    coordinator = open_coordinator(tmp_path / "run", cfg)
    for refuser in ("bad-1", "bad-2"):
        coordinator.join(JoinRequest(holder_id=refuser, model_fingerprint=FINGERPRINT))
        coordinator.tick()  # round 0 opens, issued to the refuser
        coordinator.leave(refuser)  # what a holder does when accept_run refuses
    assert coordinator.state.rounds == [] and coordinator.state.next_round == 0
    assert not [
        r for r in read_json_lines(tmp_path / "run" / "journal.jsonl") if r["type"] == "round"
    ]

    coordinator.join(JoinRequest(holder_id="good", model_fingerprint=FINGERPRINT))
    for round_index in (0, 1):
        task = pull(coordinator, "good")
        assert task.round_index == round_index
        assert coordinator.push_answer("good", Answer(task_id=task.task_id, choice=1))
    assert [r.round_index for r in coordinator.state.rounds] == [0, 1]
    coordinator.tick()
    assert coordinator.finished


def test_a_holder_that_pulled_its_task_and_left_still_closes_the_round(tmp_path: Path) -> None:
    """Only a round nobody was handed is withdrawn: one a holder pulled is journaled."""
    cfg = parse_config(
        {
            "run": {"name": "t", "max_rounds": 2, "bit_budget": 100},
            "server": {"min_holders": 1, "quorum": 1, "round_timeout_s": 30},
            "parametrization": {"kind": "scale"},
        },
        "test",
    )
    coordinator = open_coordinator(tmp_path / "run", cfg)
    coordinator.join(JoinRequest(holder_id="a", model_fingerprint=FINGERPRINT))
    pull(coordinator, "a")
    coordinator.leave("a")
    assert [r.round_index for r in coordinator.state.rounds] == [0]
