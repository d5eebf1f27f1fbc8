"""The asyncio service and the group-committed journal: long-polls hold no thread, a round's
opening wakes its waiting holders with one delivery record, and no reply leaves before the
journal records it rests on are on disk."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import HeldFsyncs

from sottovoce.common.config import RunConfig, parse_config
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.proto import sottovoce_pb2_grpc as pb_grpc
from sottovoce.common.protocol.messages import Answer, JoinRequest, Task
from sottovoce.common.storage import read_json_lines
from sottovoce.common.transport import wire
from sottovoce.common.transport.wire import Credentials, PullTaskCall, PushAnswerCall
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.grpc_service import serve
from sottovoce.server.journal import Journal
from sottovoce.server.run_state import JOURNAL, RunState

FINGERPRINT = "sha256:" + "4d" * 32


def config(holders: int) -> RunConfig:
    return parse_config(
        {
            "run": {"name": "aio", "max_rounds": 3, "bit_budget": 10_000.0},
            "parametrization": {"kind": "scale"},
            "server": {"min_holders": holders, "quorum": holders, "round_timeout_s": 60.0,
                       "rate_limit_burst": 1000},
        },
        "test",
    )  # fmt: skip


def coordinator(tmp_path: Path, holders: int) -> Coordinator:
    cfg = config(holders)
    return Coordinator(cfg, RunState.open(tmp_path / "run", cfg, "# t\n", FINGERPRINT), FINGERPRINT)


async def join_and_poll(
    address: str, holder: str, genesis: str, wait_s: float
) -> tuple[Credentials, pb.PullTaskReply]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        reply = await stub.Join(wire.join_request_to_proto(JoinRequest(holder, FINGERPRINT)))
        _, session = wire.join_reply_from_proto(reply)
        me = Credentials(holder, session)
        request = wire.pull_task_request_to_proto(PullTaskCall(me, 0, genesis, wait_s))
        return me, await stub.PullTask(request, timeout=wait_s + 5)


def test_waiting_long_polls_hold_no_threads(tmp_path: Path) -> None:
    """200 holders wait in PullTask at once (no round can open: 201 are needed)."""
    coord = coordinator(tmp_path, holders=201)
    peak = 0

    async def main(address: str) -> list[Any]:
        nonlocal peak
        polls = [
            asyncio.create_task(join_and_poll(address, f"h{i:03d}", coord.state.genesis, 1.5))
            for i in range(200)
        ]
        await asyncio.sleep(1.0)  # all of them are waiting now
        peak = threading.active_count()
        return await asyncio.gather(*polls)

    with serve(coord, "127.0.0.1:0") as running:
        before = threading.active_count()
        results = asyncio.run(main(running.address))
    assert len(coord.active_holders) == 200
    assert all(not reply.HasField("task") for _, reply in results)  # empty polls at the wait
    assert peak - before < 16  # a thread per waiting poll would be 200 more


def test_a_round_opening_hands_every_waiting_holder_its_task_in_one_record(
    tmp_path: Path,
) -> None:
    holders = 40
    coord = coordinator(tmp_path, holders=holders)

    async def main(address: str) -> list[Any]:
        first = [
            asyncio.create_task(join_and_poll(address, f"h{i:03d}", coord.state.genesis, 10.0))
            for i in range(holders - 1)
        ]
        await asyncio.sleep(1.0)  # they all wait; the last one's poll opens round 0
        last = await join_and_poll(address, "last", coord.state.genesis, 10.0)
        return [*(await asyncio.gather(*first)), last]

    with serve(coord, "127.0.0.1:0") as running:
        results = asyncio.run(main(running.address))
    assert all(reply.HasField("task") for _, reply in results)
    delivered = [
        r for r in read_json_lines(coord.state.run_dir / JOURNAL) if r["type"] == "delivered"
    ]
    assert len(delivered[0]["holders"]) >= holders - 1  # one record for all who waited
    assert sum(len(r["holders"]) for r in delivered) == holders


def test_no_reply_leaves_before_its_journal_record_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hold every fsync: the holder's PushAnswer does not return until the disk has it.
    Two holders, so that the answer does not close the round (closing syncs on its own,
    which would hold the reply whatever the service did)."""
    coord = coordinator(tmp_path, holders=2)
    coord.join(JoinRequest("solo", FINGERPRINT))
    coord.join(JoinRequest("other", FINGERPRINT))  # joins, never answers
    fsyncs = HeldFsyncs()
    with serve(coord, "127.0.0.1:0") as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        reply = stub.Join(wire.join_request_to_proto(JoinRequest("solo", FINGERPRINT)), timeout=5)
        me = Credentials("solo", wire.join_reply_from_proto(reply)[1])
        pulled = stub.PullTask(
            wire.pull_task_request_to_proto(PullTaskCall(me, 0, coord.state.genesis, 1.0)),
            timeout=5,
        )
        task = wire.pull_task_reply_from_proto(pulled)
        assert isinstance(task, Task)
        fsyncs.hold(monkeypatch)
        push = stub.PushAnswer.future(
            wire.push_answer_request_to_proto(PushAnswerCall(me, Answer(task.task_id, 1))),
            timeout=10,
        )
        time.sleep(0.5)
        assert not push.done()  # journaled, counted in memory, but not yet said to be
        released = fsyncs.release()
        assert push.result().accepted
        assert fsyncs.synced and fsyncs.synced[0] >= released  # the fsync came before the reply
    records = read_json_lines(coord.state.run_dir / JOURNAL)
    assert [r["task_id"] for r in records if r["type"] == "answer"] == [task.task_id]


def test_group_commit_shares_fsyncs_and_calls_back_after_them(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    order: list[str] = []

    def writer(index: int) -> None:
        for n in range(50):
            seq = journal.append({"writer": index, "n": n})
            journal.sync(seq)
            assert journal.durable >= seq

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert journal.written == 400
    assert journal.fsyncs < 400  # concurrent writers shared fsyncs
    seq = journal.append({"last": True})
    done = threading.Event()
    journal.when_durable(seq, lambda: (order.append("callback"), done.set()))
    assert done.wait(5) and journal.durable >= seq
    journal.close()
    lines = read_json_lines(tmp_path / "journal.jsonl")
    assert len(lines) == 401 and lines[-1] == {"last": True}
    assert order == ["callback"]


def test_a_round_record_is_on_disk_before_its_step_reaches_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coord = coordinator(tmp_path, holders=1)
    coord.join(JoinRequest("solo", FINGERPRINT))
    events: list[str] = []
    real_fsync = os.fsync
    journal_path = coord.state.run_dir / JOURNAL

    def traced_fsync(fd: int) -> None:
        real_fsync(fd)
        events.append("journal fsync")

    def traced_log_append(step: Any, _real: Any = coord.state.log.append) -> str:
        lines = journal_path.read_text(encoding="utf-8").count('"type":"round"')
        events.append(f"log append after {lines} round record(s), durable={journal.durable}")
        return str(_real(step))

    journal = coord.state.journal
    monkeypatch.setattr("sottovoce.server.journal.os.fsync", traced_fsync)
    monkeypatch.setattr(coord.state.log, "append", traced_log_append)
    for _ in range(3):
        log = coord.state.log
        task = coord.pull_task("solo", log.version, log.head, timeout_s=0)
        assert isinstance(task, Task)
        coord.push_answer("solo", Answer(task.task_id, 1))  # 1: the candidate wins
    appends = [e for e in events if e.startswith("log append")]
    assert appends, events
    for index, event in enumerate(events):
        if event.startswith("log append"):
            assert events[index - 1] == "journal fsync"  # the round record was synced first
