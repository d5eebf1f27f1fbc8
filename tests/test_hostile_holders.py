"""Holders that try to stall, outvote or overhear a run, played against the coordinator.

Each test plays a holder the coordinator must not trust: one that joins and goes quiet,
one that answers a task it never pulled (task ids are deterministic, so it can compute
them), one that answers after the run is over, and a crowd that joins, leaves, answers
late and outlives a coordinator crash while the bit budget is nearly spent. The
coordinator core is driven in process on a fake clock; eviction is also played over
gRPC (the evicted holder's session ends) and over Flower (the node is invited again).
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sottovoce.common.config import RunConfig, ServerSection, parse_config
from sottovoce.common.errors import (
    ConfigError,
    LogIntegrityError,
    NotJoined,
    RequestRefused,
    SottovoceError,
)
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.proto import sottovoce_pb2_grpc as pb_grpc
from sottovoce.common.protocol.messages import Answer, JoinRequest, RunFinished, Task
from sottovoce.common.steplog import extend_chain
from sottovoce.common.storage import read_json_lines
from sottovoce.common.transport import flower_records as fr
from sottovoce.common.transport import wire
from sottovoce.common.transport.wire import Credentials, PullTaskCall, PushAnswerCall
from sottovoce.flower_runtime import run_in_process
from sottovoce.server.coordinator import Coordinator, task_id_for
from sottovoce.server.flower_driver import DriverSettings, make_server_app
from sottovoce.server.grpc_service import serve
from sottovoce.server.run_report import coordinator_report
from sottovoce.server.run_state import JOURNAL, RunState

FINGERPRINT = "sha256:" + "5e" * 32


def config(**sections: Any) -> RunConfig:
    """A (1+1) run (one bit an answer); ``server=``/``run=`` entries override the base."""
    data: dict[str, Any] = {
        "run": {"name": "guard", "max_rounds": 20, "bit_budget": 100.0},
        "parametrization": {"kind": "scale"},
        "server": {"min_holders": 2, "quorum": 2, "round_timeout_s": 10.0},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data, "test")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def open_coordinator(run_dir: Path, cfg: RunConfig, clock: Clock) -> Coordinator:
    state = RunState.open(run_dir, cfg, "# test\n", FINGERPRINT)
    return Coordinator(cfg, state, FINGERPRINT, clock=clock)


def join(coordinator: Coordinator, *holders: str) -> None:
    for holder in holders:
        coordinator.join(JoinRequest(holder_id=holder, model_fingerprint=FINGERPRINT))


def pull(coordinator: Coordinator, holder: str) -> Task | RunFinished | None:
    log = coordinator.state.log
    return coordinator.pull_task(holder, log.version, log.head, timeout_s=0)


def answer_round(coordinator: Coordinator, choices: dict[str, int]) -> None:
    """Each holder pulls the open round's task and answers it in time."""
    for holder, choice in choices.items():
        task = pull(coordinator, holder)
        assert isinstance(task, Task), task
        assert coordinator.push_answer(holder, Answer(task.task_id, choice=choice))


def journal_bytes(coordinator: Coordinator) -> bytes:
    path = coordinator.state.run_dir / JOURNAL
    return path.read_bytes() if path.exists() else b""


def journal_of(coordinator: Coordinator, kind: str) -> list[dict[str, Any]]:
    return [r for r in read_json_lines(coordinator.state.run_dir / JOURNAL) if r["type"] == kind]


# -- class 4a: a holder that goes quiet is dropped -----------------------------------------
def quiet_run(tmp_path: Path) -> tuple[Coordinator, Clock, RunConfig]:
    """Three holders, quorum two; 'quiet' joins and never answers: evicted after two rounds."""
    clock = Clock()
    cfg = config(server={"min_holders": 3, "max_missed_rounds": 2})
    coordinator = open_coordinator(tmp_path / "run", cfg, clock)
    join(coordinator, "a", "b", "quiet")
    for index in range(2):
        answer_round(coordinator, {"a": 1, "b": 1})
        assert len(coordinator.state.rounds) == index  # still waiting for 'quiet'
        clock.now += 11  # until its deadline
        coordinator.tick()
    return coordinator, clock, cfg


def test_max_missed_rounds_is_validated_and_stays_out_of_the_run_fingerprint() -> None:
    with pytest.raises(ConfigError, match=r"^test: server\.max_missed_rounds: .*greater than"):
        parse_config({"server": {"max_missed_rounds": 0}}, "test")
    assert ServerSection().max_missed_rounds == 3  # an honest demo holder never misses one
    # A restart may change it, and run directories made before it existed still resume.
    assert config(server={"max_missed_rounds": 9}).fingerprint() == config().fingerprint()


def test_a_quiet_holder_is_evicted_and_rounds_stop_waiting_for_it(tmp_path: Path) -> None:
    coordinator, _, _ = quiet_run(tmp_path)
    state = coordinator.state
    assert [r.closed_by for r in state.rounds] == ["deadline", "deadline"]
    assert [r.asked for r in state.rounds] == [("a", "b", "quiet")] * 2
    assert [(e.holder_id, e.round_index, e.missed_rounds) for e in state.evictions] == [
        ("quiet", 1, 2)
    ]
    assert coordinator.active_holders == {"a", "b"}
    (record,) = journal_of(coordinator, "evicted")
    assert (record["holder"], record["round"], record["missed_rounds"]) == ("quiet", 1, 2)

    answer_round(coordinator, {"a": 1, "b": 0})  # no deadline: the round no longer waits
    assert state.rounds[-1].closed_by == "all answered"
    assert state.rounds[-1].asked == ("a", "b")  # the quorum counts the holders left
    with pytest.raises(NotJoined, match="'quiet' is not in this run"):
        pull(coordinator, "quiet")


def test_an_evicted_holder_may_rejoin_and_is_dropped_again_after_one_more_miss(
    tmp_path: Path,
) -> None:
    coordinator, clock, _ = quiet_run(tmp_path)
    state = coordinator.state
    join(coordinator, "quiet")  # a fresh Join: active again, asked from the next round on
    assert "quiet" in coordinator.active_holders
    answer_round(coordinator, {"a": 1, "b": 1})  # round 2 opened before it came back
    assert state.rounds[-1].asked == ("a", "b")
    answer_round(coordinator, {"a": 1, "b": 1})
    clock.now += 11
    coordinator.tick()
    assert state.rounds[-1].asked == ("a", "b", "quiet")
    assert [e.round_index for e in state.evictions] == [1, 3]  # its count was not cleared
    join(coordinator, "quiet")
    answer_round(coordinator, {"a": 1, "b": 1})
    answer_round(coordinator, {"a": 1, "b": 1, "quiet": 0})  # an answer in time...
    assert "quiet" not in state.missed_rounds  # ...clears its count
    answer_round(coordinator, {"a": 1, "b": 1})
    clock.now += 11
    coordinator.tick()  # one miss: not evicted
    assert "quiet" in coordinator.active_holders and state.missed_rounds["quiet"] == 1


def test_evictions_and_missed_rounds_survive_a_restart_and_reach_the_report(
    tmp_path: Path,
) -> None:
    coordinator, clock, cfg = quiet_run(tmp_path)
    before = (coordinator.state.evictions, coordinator.state.missed_rounds)
    resumed = open_coordinator(tmp_path / "run", cfg, clock)  # as after kill -9
    assert (resumed.state.evictions, resumed.state.missed_rounds) == before
    report = coordinator_report(cfg, resumed.state, resumed.spec)
    assert [(e["holder"], e["round"], e["missed_rounds"]) for e in report["evictions"]] == [
        ("quiet", 1, 2)
    ]
    join(resumed, "a", "b", "quiet")  # it comes back after the restart and misses again
    answer_round(resumed, {"a": 1, "b": 1})
    assert resumed.state.rounds[-1].asked == ("a", "b", "quiet")  # round 2 was re-asked
    assert len(resumed.state.rounds) == 2  # waiting for it
    clock.now += 11
    resumed.tick()
    assert [e.round_index for e in resumed.state.evictions] == [1, 2]


def test_a_holder_that_leaves_and_comes_back_within_a_round_is_waited_for_again(
    tmp_path: Path,
) -> None:
    clock = Clock()
    coordinator = open_coordinator(tmp_path / "run", config(server={"quorum": 1}), clock)
    join(coordinator, "a", "b")
    assert isinstance(pull(coordinator, "a"), Task)  # round 0 is open
    coordinator.leave("b")  # before it pulled: its bits are no longer held
    assert coordinator.reserved_bits == 1.0
    join(coordinator, "b")  # back within the round: held again, and waited for
    assert coordinator.reserved_bits == 2.0
    answer_round(coordinator, {"a": 1})
    assert coordinator.state.rounds == []
    answer_round(coordinator, {"b": 0})
    assert coordinator.state.rounds[0].choices == {"a": 1, "b": 0}


# -- class 4b: answers count only for the task a holder pulled, while the run is open ----------
def test_an_answer_to_a_task_never_pulled_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    clock = Clock()
    coordinator = open_coordinator(tmp_path / "run", config(), clock)
    join(coordinator, "a", "b")
    task_a = pull(coordinator, "a")
    assert isinstance(task_a, Task)
    run_id = coordinator.state.run_id
    before = (journal_bytes(coordinator), coordinator.state.bits_total)
    forged = [
        ("b", task_id_for(run_id, 0, "b")),  # b's task this round: issued, never pulled
        ("a", task_id_for(run_id, 1, "a")),  # a's next task, not asked yet
        ("b", task_a.task_id),  # someone else's task
    ]
    for holder, task_id in forged:
        with pytest.raises(RequestRefused, match="was not given to holder"):
            coordinator.push_answer(holder, Answer(task_id, choice=1))
    assert (journal_bytes(coordinator), coordinator.state.bits_total) == before
    assert coordinator.state.answered_task_ids == set()

    # A holder that pulled a newer task has abandoned the older one: that answer is refused.
    task_b = pull(coordinator, "b")
    assert isinstance(task_b, Task)
    clock.now += 11
    coordinator.tick()  # round 0 closes unanswered; round 1 opens
    newer = pull(coordinator, "b")
    assert isinstance(newer, Task) and newer.round_index == 1
    before = journal_bytes(coordinator)
    with pytest.raises(RequestRefused, match="the task it pulled last"):
        coordinator.push_answer("b", Answer(task_b.task_id, choice=1))
    assert journal_bytes(coordinator) == before
    assert coordinator.push_answer("b", Answer(newer.task_id, choice=1))


def test_answers_after_the_run_is_over_are_refused_and_change_nothing(tmp_path: Path) -> None:
    clock = Clock()
    cfg = config(run={"max_rounds": 1}, server={"min_holders": 3})
    coordinator = open_coordinator(tmp_path / "run", cfg, clock)
    join(coordinator, "a", "b", "c")
    late = pull(coordinator, "c")
    assert isinstance(late, Task)
    answer_round(coordinator, {"a": 1, "b": 1})
    clock.now += 11
    coordinator.tick()  # round 0 closes at its deadline; max_rounds: the run is over
    assert coordinator.finished
    before = (journal_bytes(coordinator), coordinator.state.bits_total)
    with pytest.raises(RequestRefused, match="is over"):
        coordinator.push_answer("c", Answer(late.task_id, choice=0))
    assert (journal_bytes(coordinator), coordinator.state.bits_total) == before

    stopped = open_coordinator(tmp_path / "stopped", config(), clock)
    join(stopped, "a", "b")
    open_task = pull(stopped, "a")
    assert isinstance(open_task, Task)
    stopped.stop("stopped by the operator")  # with a round open
    before = journal_bytes(stopped)
    with pytest.raises(RequestRefused, match="is over"):
        stopped.push_answer("a", Answer(open_task.task_id, choice=1))
    assert journal_bytes(stopped) == before
    assert isinstance(pull(stopped, "a"), RunFinished)  # the end is still handed out


def test_after_a_restart_only_an_answer_to_a_task_delivered_before_the_crash_counts(
    tmp_path: Path,
) -> None:
    clock, cfg = Clock(), config()
    first = open_coordinator(tmp_path / "run", cfg, clock)
    join(first, "a", "b")
    answer_round(first, {"a": 1, "b": 1})
    task_b = pull(first, "b")  # round 1 handed to b; a never pulled it; then kill -9
    assert isinstance(task_b, Task)

    again = open_coordinator(tmp_path / "run", cfg, clock)  # nobody has joined it yet
    computed = Answer(task_id_for(first.state.run_id, 1, "a"), choice=1)
    before = journal_bytes(again)
    with pytest.raises(RequestRefused, match="was not given to holder 'a'"):
        again.push_answer("a", computed)  # the id is right, but a was never handed it
    assert journal_bytes(again) == before
    assert again.push_answer("b", Answer(task_b.task_id, choice=1))  # delivered: kept
    join(again, "a", "b")
    answer_round(again, {"a": 0})
    assert again.state.rounds[-1].choices == {"a": 0, "b": 1}


# -- class 4c: the coordinator never hears more than bit_budget --------------------------------
HOLDERS = ("h0", "h1", "h2", "h3")
ACTIONS = st.one_of(
    st.tuples(st.just("join"), st.sampled_from(HOLDERS)),
    st.tuples(st.just("leave"), st.sampled_from(HOLDERS)),
    st.tuples(st.just("pull"), st.sampled_from(HOLDERS)),
    st.tuples(st.just("answer"), st.sampled_from(HOLDERS)),
    st.tuples(st.just("refuse"), st.sampled_from(HOLDERS)),
    st.tuples(st.just("forge"), st.sampled_from(HOLDERS)),
    st.tuples(st.just("older"), st.sampled_from(HOLDERS)),
    st.tuples(st.just("wait"), st.sampled_from((1.0, 11.0))),
    st.tuples(st.just("restart"), st.none()),
)


BEST_OF_TWO = {"run": {"algorithm": "bboxer-1+lambda"}, "optimizer": {"candidates": 2}}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    actions=st.lists(ACTIONS, min_size=5, max_size=60),
    budget=st.sampled_from((3.0, 5.0, 7.0)),
    best_of_two=st.booleans(),  # log2(3) bits an answer: float sums near the budget
)
def test_the_bits_heard_never_exceed_the_budget_whatever_holders_do(
    actions: list[tuple[str, Any]], budget: float, best_of_two: bool
) -> None:
    """Joins, leaves, late answers, forged and abandoned task ids and coordinator crashes,
    in any order: the bits heard stay within the budget, every answer heard is to a task
    journaled as delivered to its holder before, and a refused call changes no byte."""
    algorithm = BEST_OF_TWO if best_of_two else {"run": {}}
    cfg = config(
        **{**algorithm, "run": {"max_rounds": 12, "bit_budget": budget, **algorithm["run"]}},
        server={"min_holders": 2, "quorum": 1, "max_missed_rounds": 2},
    )
    clock = Clock()
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        coordinator = open_coordinator(run_dir, cfg, clock)
        pulled: dict[str, list[str]] = {h: [] for h in HOLDERS}
        for action, arg in actions:
            before = journal_bytes(coordinator)
            try:
                _play(coordinator, clock, pulled, action, arg)
            except SottovoceError:
                assert journal_bytes(coordinator) == before  # refused: nothing changed
            if action == "restart":
                bits = coordinator.state.bits_total
                coordinator = open_coordinator(run_dir, cfg, clock)
                assert coordinator.state.bits_total == bits  # the journal knows the same
            heard = coordinator.state.bits_total
            assert heard <= budget + 1e-9
            assert heard + coordinator.reserved_bits <= budget + 1e-9
            held = set(coordinator._reserved)  # bits are held only for answers still due
            assert not held & coordinator.state.answered_task_ids
        _assert_heard_only_delivered(coordinator)


def _play(
    coordinator: Coordinator, clock: Clock, pulled: dict[str, list[str]], action: str, arg: Any
) -> None:
    if action == "join":
        join(coordinator, arg)
    elif action == "leave":
        coordinator.leave(arg)
    elif action == "pull":
        task = pull(coordinator, arg)
        if isinstance(task, Task):
            pulled[arg].append(task.task_id)
    elif action in ("answer", "refuse") and pulled[arg]:
        task_id = pulled[arg][-1]
        refused = Answer(task_id, choice=None, refusal="policy")
        coordinator.push_answer(arg, refused if action == "refuse" else Answer(task_id, choice=1))
    elif action == "older" and len(pulled[arg]) > 1:
        coordinator.push_answer(arg, Answer(pulled[arg][0], choice=1))
    elif action == "forge":
        next_task = task_id_for(coordinator.state.run_id, coordinator.state.next_round, arg)
        if next_task not in pulled[arg]:
            coordinator.push_answer(arg, Answer(next_task, choice=0))
    elif action == "wait":
        clock.now += arg
        coordinator.tick()


def _assert_heard_only_delivered(coordinator: Coordinator) -> None:
    delivered: set[tuple[int, str]] = set()
    heard = 0.0
    for record in read_json_lines(coordinator.state.run_dir / JOURNAL):
        if record["type"] == "delivered":
            delivered.update((record["round"], holder) for holder in record["holders"])
        elif record["type"] == "answer":
            assert (record["round"], record["holder"]) in delivered, record
            heard += record["bits"]
    assert heard == pytest.approx(coordinator.state.bits_total)


# -- class 5: what goes back to a holder is always a message the wire carries ----------------
def test_a_holder_far_behind_or_a_stop_reason_with_newlines_never_makes_an_invalid_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Either used to fail only when the reply was encoded: INTERNAL on every PullTask."""
    clock = Clock()
    coordinator = open_coordinator(tmp_path / "run", config(server={"quorum": 1}), clock)
    join(coordinator, "a", "b")
    answer_round(coordinator, {"a": 1, "b": 1})  # one step in the log
    monkeypatch.setattr("sottovoce.server.coordinator.MAX_NEW_STEPS", 0)  # as if 100,001
    with pytest.raises(LogIntegrityError, match="'a' is 1 steps behind"):
        coordinator.pull_task("a", 0, coordinator.state.genesis, timeout_s=0)
    monkeypatch.undo()
    coordinator.stop("the runtime failed: Traceback\n  line 1\n" + "x" * 600)
    finished = pull(coordinator, "a")
    assert isinstance(finished, RunFinished)
    assert wire.run_finished_to_proto(finished).reason.startswith("the runtime failed: Traceback")


# -- eviction over gRPC: the session ends, the holder joins again --------------------------
def test_over_grpc_an_evicted_holder_must_join_again_and_rounds_go_on_without_it(
    tmp_path: Path,
) -> None:
    cfg = config(server={"min_holders": 2, "quorum": 1, "round_timeout_s": 0.3,
                         "max_missed_rounds": 1})  # fmt: skip
    coordinator = Coordinator(
        cfg, RunState.open(tmp_path / "run", cfg, "", FINGERPRINT), FINGERPRINT
    )
    genesis = coordinator.state.genesis
    with serve(coordinator, "127.0.0.1:0") as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        a, b = (grpc_join(stub, h) for h in ("a", "b"))
        task_a, task_b = (grpc_pull(stub, who, 0, genesis) for who in (a, b))
        assert stub.PushAnswer(grpc_answer(a, task_a.task_id), timeout=5).accepted
        time.sleep(0.35)  # b misses round 0's deadline: evicted when the round closes
        coordinator.tick()
        assert coordinator.active_holders == {"a"}
        with pytest.raises(grpc.RpcError) as caught:
            stub.PushAnswer(grpc_answer(b, task_b.task_id), timeout=5)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND  # its session ended
        head = coordinator.state.log.head
        version = coordinator.state.log.version
        next_a = grpc_pull(stub, a, version, head)
        assert next_a.round_index == 1  # round 1 was asked of a alone...
        assert stub.PushAnswer(grpc_answer(a, next_a.task_id), timeout=5).accepted
        assert coordinator.state.rounds[1].closed_by == "all answered"  # ...and did not wait
        b = grpc_join(stub, "b")  # what a holder's loop does on NOT_FOUND
        late = stub.PushAnswer(grpc_answer(b, task_b.task_id), timeout=5)
        assert not late.accepted  # journaled late, its bit counted: it was heard
    assert coordinator.state.bits_per_holder == {"a": 2.0, "b": 1.0}
    assert [e.holder_id for e in coordinator.state.evictions] == ["b"]


def test_over_grpc_forged_and_after_the_end_answers_are_failed_precondition(
    tmp_path: Path,
) -> None:
    cfg = config(server={"min_holders": 2, "quorum": 2})
    state = RunState.open(tmp_path / "run", cfg, "", FINGERPRINT)
    coordinator = Coordinator(cfg, state, FINGERPRINT)
    with serve(coordinator, "127.0.0.1:0") as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        a, b = (grpc_join(stub, h) for h in ("a", "b"))
        task_a = grpc_pull(stub, a, 0, state.genesis)
        forged = [
            (b, task_id_for(state.run_id, 0, "b"), "was not given to holder 'b'"),  # not pulled
            (a, task_id_for(state.run_id, 1, "a"), "was not given to holder 'a'"),  # not asked
        ]
        for who, task_id, detail in forged:
            assert_refused(stub, coordinator, who, task_id, detail)
        coordinator.stop("stopped by the operator")
        assert_refused(stub, coordinator, a, task_a.task_id, "is over (stopped by the operator)")
    assert state.bits_total == 0.0


def assert_refused(
    stub: pb_grpc.CoordinatorStub, coordinator: Coordinator, who: Credentials, task: str, why: str
) -> None:
    """The answer is FAILED_PRECONDITION, says ``why``, and changes no journal byte."""
    before = journal_bytes(coordinator)
    with pytest.raises(grpc.RpcError) as caught:
        stub.PushAnswer(grpc_answer(who, task), timeout=5)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert why in (caught.value.details() or "")
    assert journal_bytes(coordinator) == before


def grpc_join(stub: pb_grpc.CoordinatorStub, holder: str) -> Credentials:
    reply = stub.Join(wire.join_request_to_proto(JoinRequest(holder, FINGERPRINT)), timeout=5)
    return Credentials(holder, wire.join_reply_from_proto(reply)[1])


def grpc_pull(stub: pb_grpc.CoordinatorStub, who: Credentials, version: int, head: str) -> Task:
    request = wire.pull_task_request_to_proto(PullTaskCall(who, version, head, 2.0))
    result = wire.pull_task_reply_from_proto(stub.PullTask(request, timeout=5))
    assert isinstance(result, Task), result
    return result


def grpc_answer(who: Credentials, task_id: str) -> pb.PushAnswerRequest:
    return wire.push_answer_request_to_proto(PushAnswerCall(who, Answer(task_id, choice=1)))


# -- eviction over Flower: the node is invited again ---------------------------------------
def wait_until(condition: Any, what: str, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.005)


class FlowerHolders:
    """ClientApp handlers for light holders that follow the log. 'slow' sits on its first
    task until that round has closed without it, as a holder whose machine stalls would;
    'fast' waits in round 2 until 'slow' is back in the run, so the run outlasts its
    return whatever the threads' timing."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.stalled = threading.Event()
        self.versions: dict[int, fr.HolderState] = {}
        self.lock = threading.Lock()

    def name(self, context: Context) -> str:
        return "slow" if int(context.node_config["partition-id"]) == 0 else "fast"

    def state(self, context: Context, genesis: str) -> fr.HolderState:
        with self.lock:
            return self.versions.setdefault(context.node_id, fr.HolderState(0, genesis))

    def on_join(self, message: Message, context: Context) -> Message:
        spec = fr.read_join(message.content)
        request = JoinRequest(self.name(context), spec.model_fingerprint)
        content = fr.join_reply_content(request, self.state(context, spec.log_genesis))
        return Message(content, reply_to=message)

    def on_task(self, message: Message, context: Context) -> Message:
        spec, task = fr.read_task(message.content)
        state = self.coordinator.state
        if self.name(context) == "slow" and not self.stalled.is_set():
            self.stalled.set()
            wait_until(lambda: len(state.rounds) > task.round_index, "its round closed")
        if self.name(context) == "fast" and task.round_index == 2:
            wait_until(lambda: "slow" in self.coordinator.active_holders, "'slow' rejoined")
        held = self.state(context, spec.log_genesis)
        if task.base_version == held.log_version:
            head = extend_chain(held.log_head, held.log_version, task.new_steps)
            held = fr.HolderState(task.target_version, head)
            with self.lock:
                self.versions[context.node_id] = held
        answer = Answer(task.task_id, choice=task.candidates[0].seed % 2)
        return Message(fr.answer_content(answer, held), reply_to=message)

    def on_finish(self, message: Message, context: Context) -> Message:
        spec, _ = fr.read_finish(message.content)
        content = fr.holder_state_content(self.state(context, spec.log_genesis))
        return Message(content, reply_to=message)


def test_over_flower_a_stalled_node_is_evicted_then_invited_again(tmp_path: Path) -> None:
    cfg = config(
        run={"max_rounds": 5},
        server={"min_holders": 2, "quorum": 1, "round_timeout_s": 0.5, "max_missed_rounds": 1},
    )
    state = RunState.open(tmp_path / "run", cfg, "", FINGERPRINT)
    coordinator = Coordinator(cfg, state, FINGERPRINT)
    holders = FlowerHolders(coordinator)
    client_app = ClientApp()
    client_app.query("join")(holders.on_join)
    client_app.query("task")(holders.on_task)
    client_app.query("finish")(holders.on_finish)
    settings_ = DriverSettings(
        poll_interval_s=0.01, discover_every_s=0.05, rejoin_after_s=0.05, finish_timeout_s=0.2
    )
    server_app = make_server_app(lambda _: coordinator, settings_)
    run_in_process(server_app, client_app, 2, workers=2)

    assert [e.holder_id for e in state.evictions] == ["slow"]
    assert [r.round_index for r in state.rounds] == list(range(5))
    assert any("slow" in r.choices for r in state.rounds[1:])  # back, and answering in time
    answers = [r for r in journal_of(coordinator, "answer") if r["holder"] == "slow"]
    assert answers[0]["round"] == 0 and answers[0]["late"]  # its stalled answer still counted
    assert state.bits_per_holder["slow"] == len(answers)
