"""The Flower transport: records, equivalence with the native transport, holders' budgets.

Flower runs here in Flower's own runtime (in-memory link state, grid, node workers) with
threads instead of Ray (``sottovoce.flower_runtime.run_in_process``); the ServerApp, the
ClientApp, the coordinator, the holders' policies and ledgers are the real ones, on the
tiny model built in code.
"""

from __future__ import annotations

import json
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.task_identity import TaskIdentity
from helpers import (
    TINY,
    base_plus_steps,
    differing_tensors,
    make_task,
    run_spec,
    scheduled_candidates,
    tiny_fingerprint,
    write_policy,
    write_records,
    write_run_config,
)
from safetensors.torch import load_file

from sottovoce import flower_apps
from sottovoce.api import open_coordinator, open_holder
from sottovoce.client.flower_nodes import HolderNodes, NodeHolder, make_client_app
from sottovoce.client.grpc_loop import run_holder
from sottovoce.client.holder import DataHolder
from sottovoce.common.errors import RefusalCode
from sottovoce.common.protocol.messages import (
    Answer,
    BatchSpec,
    Candidate,
    JoinRequest,
    RunFinished,
)
from sottovoce.common.steplog import Step
from sottovoce.common.storage import read_json_lines
from sottovoce.common.transport import flower_records as fr
from sottovoce.common.transport.flower_records import HolderState
from sottovoce.common.transport.wire import WireError
from sottovoce.flower_runtime import run_in_process
from sottovoce.local import drive_locally
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.export import export_run
from sottovoce.server.flower_driver import DriverSettings, FlowerRunSummary, make_server_app
from sottovoce.server.grpc_service import serve
from sottovoce.simulate import simulate

PATTERNS = ["model.norm.weight", "model.layers.1.mlp.*"]
HEAD = "ab" * 32
SETTINGS = DriverSettings(idle_timeout_s=30.0, finish_timeout_s=10.0)


# -- records -------------------------------------------------------------------------------
def a_task() -> tuple[Any, Any]:
    spec = run_spec(algorithm="bboxer-1+lambda", batch=BatchSpec(mode="full", batch_size=16))
    steps = [Step(seed=2**64 - 1, coefficient=0.125), Step(seed=3, coefficient=-0.5)]
    task = make_task(
        spec,
        "run-a:r2:0123abcd",
        new_steps=steps,
        candidates=(Candidate(seed=11, scale=0.25), Candidate(seed=12, scale=-0.25)),
    )
    return spec, task


def test_every_message_survives_the_round_trip() -> None:
    spec, task = a_task()
    assert fr.read_join(fr.join_content(spec)) == spec
    assert fr.read_task(fr.task_content(spec, task)) == (spec, task)
    finished = RunFinished(
        run_id="run-a", reason="max_rounds (3) reached", final_version=2, log_head=HEAD,
        bits_spent_total=6.0, base_version=0, new_steps=task.new_steps,
    )  # fmt: skip
    assert fr.read_finish(fr.finish_content(spec, finished)) == (spec, finished)
    state = HolderState(log_version=7, log_head=HEAD)
    request = JoinRequest("hospital-a", tiny_fingerprint(), {"max_bits": "100"})
    joined = fr.read_join_reply(fr.join_reply_content(request, state))
    assert (joined.request, joined.refusal, joined.state) == (request, None, state)
    refused = fr.read_join_reply(fr.refusal_content(RefusalCode.POLICY, state))
    assert (refused.request, refused.refusal) == (None, RefusalCode.POLICY)
    over = Answer(task.task_id, None, refusal=RefusalCode.OVER_BUDGET)
    for answer in (Answer(task.task_id, 2), over):
        assert fr.read_answer(fr.answer_content(answer, state)) == (answer, state)
    content = fr.answer_content(Answer(task.task_id, 2), state)
    assert isinstance(content[fr.ANSWER], MetricRecord)  # the released number, as a metric
    assert dict(content[fr.ANSWER]) == {"choice": 2}


def _answer(**meta: Any) -> RecordDict:
    content = fr.answer_content(Answer("t-1", 1), HolderState(0, HEAD))
    content[fr.ANSWER_META] = ConfigRecord({"task_id": "t-1", **meta})
    return content


def _with(content: RecordDict, name: str, record: Any) -> RecordDict:
    content[name] = record
    return content


def _spec_proto_bytes() -> bytes:
    return fr.join_content(run_spec())[fr.RUN_SPEC][fr.PROTO_KEY]  # type: ignore[return-value]


MALFORMED: dict[str, tuple[Callable[[], RecordDict], Callable[[RecordDict], object], str]] = {
    "unknown record": (
        lambda: _with(fr.join_content(run_spec()), "extra", ConfigRecord({"x": 1})),
        fr.read_join,
        "invalid message content: unknown 'extra'",
    ),
    "missing record": (lambda: RecordDict(), fr.read_join, "missing sottovoce.run_spec"),
    "metric instead of config": (
        lambda: RecordDict({fr.RUN_SPEC: MetricRecord({"proto": 1})}),
        fr.read_join,
        "invalid sottovoce.run_spec: expected a ConfigRecord",
    ),
    "proto not bytes": (
        lambda: RecordDict({fr.RUN_SPEC: ConfigRecord({"proto": "text"})}),
        fr.read_join,
        "invalid sottovoce.run_spec.proto: expected bytes",
    ),
    "garbage bytes": (
        lambda: RecordDict({fr.RUN_SPEC: ConfigRecord({"proto": b"\xff\xff\xff"})}),
        fr.read_join,
        "invalid sottovoce.run_spec: not a RunSpec message",
    ),
    "oversized": (
        lambda: RecordDict({fr.RUN_SPEC: ConfigRecord({"proto": b"\0" * (4 * 2**20 + 1)})}),
        fr.read_join,
        "bytes, limit 4194304",
    ),
    "a field out of bounds (wire check)": (
        lambda: RecordDict(
            {fr.RUN_SPEC: ConfigRecord({"proto": _spec_proto_bytes().replace(b"run-a", b"run a")})}
        ),
        fr.read_join,
        "invalid sottovoce.run_spec.run_id: 'run a' has a character outside",
    ),
    "choice as a float": (
        lambda: _with(_answer(), fr.ANSWER, MetricRecord({"choice": 1.0})),
        fr.read_answer,
        "invalid sottovoce.answer.choice: expected an integer",
    ),
    "choice out of range": (
        lambda: _with(_answer(), fr.ANSWER, MetricRecord({"choice": 65536})),
        fr.read_answer,
        "invalid Answer.choice: 65536 is outside 0..65535",
    ),
    "choice and refusal": (
        lambda: _answer(refusal="no"),
        fr.read_answer,
        "exactly one of sottovoce.answer, sottovoce.answer_meta.refusal",
    ),
    "bad task id": (
        lambda: _answer(task_id="t 1"),
        fr.read_answer,
        "invalid Answer.task_id: 't 1' has a character outside",
    ),
    "bad log head": (
        lambda: _with(
            _answer(), fr.HOLDER_STATE, ConfigRecord({"log_version": 0, "log_head": "x"})
        ),
        fr.read_answer,
        "invalid sottovoce.holder_state.log_head",
    ),
    "negative log version": (
        lambda: _with(
            _answer(), fr.HOLDER_STATE, ConfigRecord({"log_version": -1, "log_head": HEAD})
        ),
        fr.read_answer,
        "invalid sottovoce.holder_state.log_version",
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_records_are_refused_with_one_line(name: str) -> None:
    build, read, expected = MALFORMED[name]
    with pytest.raises(WireError) as caught:
        read(build())
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


# -- running a federation ------------------------------------------------------------------
def write_holder_files(root: Path, name: str, *, seed: int, **policy: Any) -> Path:
    """A holder's data file (24 records) and policy under ``root/name``; its ledger goes there."""
    folder = root / name
    folder.mkdir(parents=True)
    write_records(folder / "data.jsonl", 24, seed=seed)
    write_policy(folder / "policy.toml", folder / "ledger", **policy)
    return folder


def open_folder_holder(folder: Path) -> DataHolder:
    return open_holder(
        folder / "data.jsonl",
        folder / "policy.toml",
        holder_id=folder.name,
        model_name="tiny-llama",
    )


def make_holder(root: Path, name: str, *, seed: int, **policy: Any) -> DataHolder:
    return open_folder_holder(write_holder_files(root, name, seed=seed, **policy))


@dataclass
class FlowerRun:
    summary: FlowerRunSummary
    builds: int  # how many holders the ClientApp built


def run_flower(
    coordinator: Coordinator,
    build_holder: Callable[[int], DataHolder],
    num_nodes: int,
    *,
    fresh_process_per_message: bool = False,
) -> FlowerRun:
    """ServerApp + ClientApp in Flower's runtime; node ``partition-id`` i gets holder i."""
    summaries: list[FlowerRunSummary] = []
    builds = [0]

    def factory(context: Context) -> NodeHolder:
        builds[0] += 1
        return NodeHolder(build_holder(int(context.node_config["partition-id"])))

    server_app = make_server_app(lambda _: coordinator, SETTINGS, lambda _, s: summaries.append(s))
    mods = []
    if fresh_process_per_message:  # as under a SuperNode: a new ClientApp process each time

        def new_process(
            message: Message, context: Context, call_next: ClientAppCallable
        ) -> Message:
            nodes.forget(context.node_id)
            return call_next(message, context)

        mods.append(new_process)
    client_app, nodes = make_client_app(factory, mods=mods)
    run_in_process(server_app, client_app, num_nodes, workers=num_nodes)  # as holder processes
    assert len(summaries) == 1
    return FlowerRun(summaries[0], builds[0])


def run_grpc(coordinator: Coordinator, holders: list[DataHolder]) -> None:
    """The native gRPC transport on loopback, one thread per holder."""
    errors: list[BaseException] = []

    def take_part(holder: DataHolder) -> None:
        try:
            run_holder(holder, address, poll_timeout_s=1.0, connect_timeout_s=5.0)
        except BaseException as exc:
            errors.append(exc)

    with serve(coordinator, "127.0.0.1:0") as server:
        address = server.address
        threads = [threading.Thread(target=take_part, args=(h,)) for h in holders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60.0)
    assert errors == [] and not any(t.is_alive() for t in threads)


def journal_rounds(run_dir: Path) -> list[tuple[Any, ...]]:
    """Every closed round as journaled, without its wall-clock time."""
    return [
        (r["round"], r["candidates"], r["choices"], r["refusals"], r["winner"], r["step"],
         r["step_size_after"], r["bits"], r["closed_by"])
        for r in read_json_lines(run_dir / "journal.jsonl")
        if r["type"] == "round"
    ]  # fmt: skip


def holder_weights(holder: DataHolder) -> dict[str, torch.Tensor]:
    assert holder.evaluator is not None
    return holder.evaluator.parametrization.export_state_dict()


# -- equivalence -----------------------------------------------------------------------------
def test_flower_and_native_transports_make_the_same_model(tmp_path: Path) -> None:
    config = write_run_config(
        tmp_path / "run.toml",
        run={"algorithm": "bboxer-1+lambda", "max_rounds": 8, "seed": 11},
        parametrization={"kind": "select", "patterns": PATTERNS},
        optimizer={"initial_step": 0.02, "min_step": 0.001, "max_step": 0.1, "candidates": 3},
        evaluation={"mode": "full"},  # a deterministic fitness of the weights: no secret RNG
    )
    runs: dict[str, tuple[Coordinator, list[DataHolder]]] = {}
    for transport in ("local", "grpc", "flower"):
        coordinator = open_coordinator(
            config, tmp_path / transport / "run", model_fingerprint=tiny_fingerprint()
        )
        holders = [make_holder(tmp_path / transport, f"holder-{i}", seed=i) for i in range(2)]
        if transport == "local":
            drive_locally(coordinator, holders)
        elif transport == "grpc":
            run_grpc(coordinator, holders)
        else:
            flower = run_flower(coordinator, holders.__getitem__, len(holders))
            assert sorted(flower.summary.holders.values()) == ["holder-0", "holder-1"]
            assert flower.summary.refused == {}
        runs[transport] = (coordinator, holders)

    native, _ = runs["local"]
    assert native.state.finished_reason == "max_rounds (8) reached"
    accepted = [r.step for r in native.state.rounds if r.step is not None]
    assert 1 <= len(accepted) < 8  # the run moved, and not on every round
    assert {r.winner for r in native.state.rounds} - {None} <= {0, 1, 2}
    exports = {}
    for transport, (coordinator, holders) in runs.items():
        state = coordinator.state
        assert state.finished_reason == native.state.finished_reason
        assert journal_rounds(state.run_dir) == journal_rounds(native.state.run_dir)
        assert list(state.log) == accepted and state.log.head == native.state.log.head
        assert state.bits_per_holder == {"holder-0": 16.0, "holder-1": 16.0}  # 8 x log2(4)
        for holder, native_holder in zip(holders, runs["local"][1], strict=True):
            assert [(r.choice, r.bits) for r in holder.ledger.records] == [
                (r.choice, r.bits) for r in native_holder.ledger.records
            ]
            assert holder.log_head == state.log.head  # every holder reached the final model
            assert differing_tensors(holder_weights(native_holder), holder_weights(holder)) == []
        out = tmp_path / transport / "export"
        result = export_run(state.run_dir, out)
        assert (result.steps, result.log_head) == (len(accepted), native.state.log.head)
        exports[transport] = (out / "model.safetensors").read_bytes()
    assert exports["flower"] == exports["local"] == exports["grpc"]  # bit for bit
    weights = load_file(tmp_path / "flower" / "export" / "model.safetensors")
    assert len(weights) > 10  # (the tied lm_head is not stored twice)
    assert differing_tensors(weights, base_plus_steps(accepted, PATTERNS)) == []


# -- a short simulation through Flower -------------------------------------------------------
def test_simulate_through_flower(tmp_path: Path) -> None:
    config = write_run_config(
        tmp_path / "run.toml",
        run={"name": "flower-sim", "max_rounds": 5, "bit_budget": 100.0},
        evaluation={"mode": "full"},
        simulate={"holders": 2, "test_size": 40, "dev_size": 10, "train_size": 40, "ood_cap": 100},
        server={"min_holders": 2, "quorum": 2},
    )
    run_dir, state_dir = tmp_path / "sim", tmp_path / "ledgers"
    report = simulate(config, run_dir=run_dir, state_dir=state_dir, engine="flower")

    coordinator_dir = run_dir / "coordinator"
    assert report["rounds"] == 5 and report["finished_reason"] == "max_rounds (5) reached"
    assert report["bits_spent_per_holder"] == {"holder-0": 5.0, "holder-1": 5.0}
    assert report["bits_spent_total"] == 10.0
    steps = [r["step"] for r in read_json_lines(coordinator_dir / "journal.jsonl")
             if r["type"] == "round" and r["step"] is not None]  # fmt: skip
    log_lines = read_json_lines(coordinator_dir / "log.jsonl")
    assert len(log_lines) == len(steps) == report["accepted_steps"]
    ledgers = sorted(state_dir.glob("*.ledger.jsonl"))
    assert len(ledgers) == 2
    for ledger in ledgers:
        records = read_json_lines(ledger)
        assert [r["bits"] for r in records] == [1.0] * 5
        assert {r["run_id"] for r in records} == {report["run_id"]}
    for index in range(2):  # each holder's local report, on the final model
        holder_dir = run_dir / "holders" / f"holder-{index}"
        local = json.loads((holder_dir / "report.json").read_text(encoding="utf-8"))
        assert (local["log_head"], local["n"]) == (report["log_head"], 20)
        assert local["bits_this_run"] == 5.0
    assert report["generalization_bound"]["n"] == 40
    exported = load_file(Path(report["exported_model"]) / "model.safetensors")
    assert exported  # and the export is base + the log, as the equivalence test shows


# -- the holder's budget and policy live in the ClientApp ------------------------------------
def test_over_budget_holder_refuses_inside_the_clientapp(tmp_path: Path) -> None:
    config = write_run_config(
        tmp_path / "run.toml", run={"max_rounds": 6}, server={"min_holders": 2, "quorum": 1}
    )
    coordinator = open_coordinator(config, tmp_path / "run", model_fingerprint=tiny_fingerprint())
    holders = [
        make_holder(tmp_path, "generous", seed=0),
        make_holder(tmp_path, "thrifty", seed=1, max_bits=3.0),
    ]
    run_flower(coordinator, holders.__getitem__, 2)

    generous, thrifty = holders
    state = coordinator.state
    assert state.finished_reason == "max_rounds (6) reached" and len(state.rounds) == 6
    assert [sorted(r.refusals) for r in state.rounds] == [[]] * 3 + [["thrifty"]] * 3
    assert all(r.refusals["thrifty"] == "over-budget" for r in state.rounds[3:])
    assert all(list(r.choices) == ["generous"] for r in state.rounds[3:])
    assert state.bits_per_holder == {"generous": 6.0, "thrifty": 3.0}
    assert (thrifty.status.answered, thrifty.status.refused) == (3, 3)
    assert [r.bits for r in thrifty.ledger.records] == [1.0, 1.0, 1.0]
    assert len(generous.ledger.records) == 6


@pytest.fixture
def flower_run_id() -> Iterator[None]:
    """Messages built outside a runtime need the run id Flower keeps in a global."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
    yield


def test_a_server_that_ignores_refusals_gets_nothing_more(
    tmp_path: Path, flower_run_id: None
) -> None:
    holder = make_holder(tmp_path, "thrifty", seed=0, max_bits=2.0)
    client_app, _ = make_client_app(lambda _: NodeHolder(holder))
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    spec = run_spec()

    def task(spec: Any, task_id: str) -> Any:  # scales a proto float carries exactly
        return make_task(spec, task_id, candidates=scheduled_candidates(spec, 0, (0.125,)))

    def ask(content: RecordDict, kind: str) -> RecordDict:
        reply = client_app(Message(content, 5, kind), context)
        assert not reply.has_error(), reply.error
        return reply.content

    joined = fr.read_join_reply(ask(fr.join_content(spec), fr.JOIN))
    assert joined.request is not None and joined.request.holder_id == "thrifty"
    answers = []
    for number in range(4):  # a "server" that keeps asking, whatever the holder says
        asked = task(spec, f"run-a:r{number}:00000000")
        answers.append(fr.read_answer(ask(fr.task_content(spec, asked), fr.TASK))[0])
    assert [a.refused for a in answers] == [False, False, True, True]
    assert answers[2].refusal is RefusalCode.OVER_BUDGET
    assert "0.00 of 2 remain" in (holder.status.last_refusal or "")
    passes = holder.forward_passes
    resent = task(spec, "run-a:r0:00000000")
    again = fr.read_answer(ask(fr.task_content(spec, resent), fr.TASK))
    assert again[0] == answers[0]  # a re-sent question: the recorded answer, not a new one
    assert holder.forward_passes == passes
    assert [r.task_id for r in holder.ledger.records] == ["run-a:r0:00000000", "run-a:r1:00000000"]

    # A run the policy does not allow is refused before the holder says who it is.
    elsewhere = run_spec(fingerprint="sha256:" + "11" * 32)
    refused = fr.read_join_reply(ask(fr.join_content(elsewhere), fr.JOIN))
    assert refused.request is None and refused.refusal is RefusalCode.POLICY
    late = task(elsewhere, "run-a:r9:00000000")
    answer, _ = fr.read_answer(ask(fr.task_content(elsewhere, late), fr.TASK))
    assert answer.refused and len(holder.ledger.records) == 2 and holder.forward_passes == passes


def test_holders_that_may_not_take_part_are_left_out(tmp_path: Path) -> None:
    config = write_run_config(
        tmp_path / "run.toml", run={"max_rounds": 3}, server={"min_holders": 1, "quorum": 1}
    )
    coordinator = open_coordinator(config, tmp_path / "run", model_fingerprint=tiny_fingerprint())
    holders = [
        make_holder(tmp_path, "hospital-a", seed=0),
        make_holder(tmp_path, "dpzero-only", seed=1, allowed_algorithms=["dpzero"]),
    ]  # fmt: skip
    flower = run_flower(coordinator, holders.__getitem__, 2)

    assert list(flower.summary.holders.values()) == ["hospital-a"]
    (reason,) = flower.summary.refused.values()
    assert reason == "the holder refused the run: policy"  # its code; the words stay home
    assert coordinator.state.bits_per_holder == {"hospital-a": 3.0}
    assert holders[1].ledger.records == () and holders[1].forward_passes == 0


# -- deadlines -------------------------------------------------------------------------------
def slow_first_call(function: Callable[..., Any], delay_s: float) -> Callable[..., Any]:
    calls = []

    def slow(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(delay_s)
        return function(*args)

    return slow


def test_answers_after_the_round_deadline_are_journaled_late_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_run_config(
        tmp_path / "run.toml",
        run={"max_rounds": 2},
        server={"min_holders": 2, "quorum": 2, "round_timeout_s": 1.0},
    )
    coordinator = open_coordinator(config, tmp_path / "run", model_fingerprint=tiny_fingerprint())
    holders = [make_holder(tmp_path, f"holder-{i}", seed=i) for i in range(2)]
    for holder in holders:  # the first evaluation outlasts its round, as a cold start can
        monkeypatch.setattr(holder, "_draw", slow_first_call(holder._draw, 1.5))
    run_flower(coordinator, holders.__getitem__, 2)

    state = coordinator.state
    assert state.rounds[0].closed_by == "deadline; no quorum"
    round_0 = [
        (r["holder"], r["late"], r["bits"])
        for r in read_json_lines(state.run_dir / "journal.jsonl")
        if r["type"] == "answer" and r["round"] == 0
    ]
    assert sorted(round_0) == [("holder-0", True, 1.0), ("holder-1", True, 1.0)]
    for holder in holders:  # every bit that left a holder reached the coordinator's books
        assert sum(r.bits for r in holder.ledger.records) == state.bits_per_holder[holder.holder_id]
        assert len(holder.ledger.records) >= 1


# -- a ClientApp process per message, as under a SuperNode ----------------------------------
def test_a_clientapp_started_afresh_for_every_message_gives_the_same_run(tmp_path: Path) -> None:
    config = write_run_config(
        tmp_path / "run.toml",
        run={"max_rounds": 6, "seed": 5},
        optimizer={"initial_step": 0.05, "min_step": 0.001, "max_step": 0.2},
        evaluation={"mode": "full"},
    )
    logs = {}
    for mode in ("kept", "fresh"):
        coordinator = open_coordinator(
            config, tmp_path / mode / "run", model_fingerprint=tiny_fingerprint()
        )
        folders = [write_holder_files(tmp_path / mode, f"holder-{i}", seed=i) for i in range(2)]

        def build(index: int, folders: list[Path] = folders) -> DataHolder:
            return open_folder_holder(folders[index])

        flower = run_flower(coordinator, build, 2, fresh_process_per_message=mode == "fresh")
        messages = 2 * (1 + 6 + 1)  # join, six tasks, finish: per holder
        assert flower.builds == (messages if mode == "fresh" else 2)
        state = coordinator.state
        assert len(state.log) >= 1
        assert set(flower.summary.final_states.values()) == {
            HolderState(state.log.version, state.log.head)
        }
        logs[mode] = (list(state.log), journal_rounds(state.run_dir))
    assert logs["fresh"] == logs["kept"]


def test_dpzero_through_flower_with_epsilon_in_the_report(tmp_path: Path) -> None:
    config = write_run_config(
        tmp_path / "run.toml",
        run={"name": "flower-dp", "algorithm": "dpzero", "max_rounds": 4, "bit_budget": 1e4},
        evaluation={"mode": "poisson", "batch_size": 8},
        dpzero={"learning_rate": 0.05, "smoothing": 0.01, "quantization_bits": 8},
        privacy={"epsilon": 6.0, "delta": 1e-5, "examples_per_holder": 20},
        simulate={"holders": 2, "test_size": 40, "dev_size": 10, "train_size": 40, "ood_cap": 100},
        server={"min_holders": 2, "quorum": 2},
    )
    run_dir, state_dir = tmp_path / "sim", tmp_path / "ledgers"
    report = simulate(config, run_dir=run_dir, state_dir=state_dir, engine="flower")

    assert report["rounds"] == 4 and report["bits_spent_per_holder"] == {
        "holder-0": 32.0,
        "holder-1": 32.0,
    }
    privacy = report["privacy"]
    assert privacy["sampling_rate"] == 0.4 and privacy["noise_multiplier"] > 0
    for holder in ("holder-0", "holder-1"):
        spent = privacy["per_holder"][holder]
        assert spent["dp_answers_this_run"] == 4
        assert 5.0 < spent["epsilon_this_run"] <= 6.0 * (1 + 1e-4)  # the policy allows 6 only
    for ledger in sorted(state_dir.glob("*.ledger.jsonl")):
        records = read_json_lines(ledger)
        assert [r["dp"]["mechanism"] for r in records] == ["poisson-gaussian"] * 4
        assert all(0 <= r["choice"] < 256 and r["bits"] == 8.0 for r in records)
    assert len(report["training_fitness_curve"]["points"]) == 4
    view = privacy["as_computed_by_the_coordinator"]
    assert view["answers_per_holder"] == {"holder-0": 4, "holder-1": 4}
    for holder in ("holder-0", "holder-1"):  # same rate as the holders': same epsilon
        assert view["epsilon_per_holder"][holder] == pytest.approx(
            privacy["per_holder"][holder]["epsilon_this_run"]
        )


# -- `flwr run .` on Flower's Ray simulation --------------------------------------------------
def test_the_client_app_pickles_for_rays_actor_processes(tmp_path: Path) -> None:
    """Flower's Ray backend pickles the ClientApp to ship it to its actors (``flwr run .``
    against a local simulation federation). Each copy starts with no holders of its own:
    a process builds its own, as a new ClientApp process does."""
    copy = pickle.loads(pickle.dumps(flower_apps.clientapp))
    assert type(copy) is type(flower_apps.clientapp)

    nodes = HolderNodes(flower_apps.holder_from_node_config)
    holder = open_holder(
        write_records(tmp_path / "data.jsonl", 16),
        write_policy(tmp_path / "policy.toml", tmp_path / "ledgers"),
        holder_id="h0",
        model_name=TINY,
    )
    nodes._nodes[7] = NodeHolder(holder=holder)
    restored = pickle.loads(pickle.dumps(nodes))
    assert restored._nodes == {} and restored._factory is flower_apps.holder_from_node_config
    with restored._lock:  # a lock of its own, not a pickled one
        pass
    nodes.forget()
