"""The Session stream: PullTask and PushAnswer as messages on one stream, each served as
the call it carries (the same checks, limits, journal waits and refusals), and the holder's
loop over it: a run over streams equals the unary run, a coordinator without Session is
called unary, and a hostile one gets nothing from a wrong reply."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import HeldFsyncs, InstantHolder, Spy

from sottovoce.client.grpc_loop import RetryPolicy, WireTraffic, _SessionStream, run_holder
from sottovoce.common.config import RunConfig, parse_config
from sottovoce.common.errors import TransportError
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.proto import sottovoce_pb2_grpc as pb_grpc
from sottovoce.common.protocol.messages import Answer, JoinRequest, RunSpec, Task
from sottovoce.common.storage import read_json_lines
from sottovoce.common.transport import wire
from sottovoce.common.transport.certs import init_ca, issue, tls_config
from sottovoce.common.transport.channel import CHANNEL_OPTIONS
from sottovoce.common.transport.wire import Credentials, PullTaskCall, PushAnswerCall, WireError
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.grpc_service import (
    SERVICE_NAME,
    CoordinatorServicer,
    RunningServer,
    serve,
    start_server,
)
from sottovoce.server.limits import RateLimit, ServiceLimits
from sottovoce.server.run_state import JOURNAL, RunState

FINGERPRINT = "sha256:" + "ab" * 32
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
FAST_RETRY = RetryPolicy(total_s=1.5, initial_backoff_s=0.01, max_backoff_s=0.05)


# -- helpers ---------------------------------------------------------------------------------
def run_config(rounds: int = 3, holders: int = 1) -> RunConfig:
    data = {
        "run": {"name": "stream", "max_rounds": rounds, "bit_budget": 1000.0},
        "parametrization": {"kind": "scale"},
        "server": {"min_holders": holders, "quorum": holders, "round_timeout_s": 60.0},
    }
    return parse_config(data, "test")


def coordinator(tmp_path: Path, rounds: int = 3, holders: int = 1) -> Coordinator:
    config = run_config(rounds, holders)
    state = RunState.open(tmp_path / "run", config, "# test\n", FINGERPRINT)
    return Coordinator(config, state, FINGERPRINT)


def limits(*, burst: int = 100, polls: int = 4) -> ServiceLimits:
    return ServiceLimits(
        calls=RateLimit(1e-6, burst),
        joins=RateLimit(1e-6, 10),
        max_polls_per_holder=polls,
        max_workers=8,
    )


@pytest.fixture
def custom_server() -> Iterator[Any]:
    servers: list[RunningServer] = []

    def start(servicer: CoordinatorServicer) -> str:
        running = start_server(servicer, "127.0.0.1:0")
        servers.append(running)
        return running.address

    yield start
    for running in servers:
        running.stop(grace_s=0)


def join(stub: pb_grpc.CoordinatorStub, holder_id: str = "holder-a") -> Credentials:
    reply = stub.Join(wire.join_request_to_proto(JoinRequest(holder_id, FINGERPRINT)), timeout=5)
    return Credentials(holder_id, wire.join_reply_from_proto(reply)[1])


def pull(credentials: Credentials, head: str, version: int = 0, wait_s: float = 0.0) -> Any:
    return wire.pull_task_request_to_proto(PullTaskCall(credentials, version, head, wait_s))


def push(credentials: Credentials, task_id: str, choice: int = 1) -> Any:
    return wire.push_answer_request_to_proto(PushAnswerCall(credentials, Answer(task_id, choice)))


class Stream:
    """A raw Session stream from a test: send one message, read its reply."""

    def __init__(self, channel: grpc.Channel):
        self._outgoing: list[bytes | None] = []
        self._ready = threading.Condition()
        self._replies = channel.stream_stream(f"/{SERVICE_NAME}/Session")(
            self._messages(), timeout=10
        )

    def _messages(self) -> Iterator[bytes]:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._outgoing))
                item = self._outgoing.pop(0)
            if item is None:
                return
            yield item

    def send(self, message: pb.SessionRequest | bytes) -> None:
        data = message if isinstance(message, bytes) else message.SerializeToString()
        with self._ready:
            self._outgoing.append(data)
            self._ready.notify()

    def exchange(self, *requests: Any) -> pb.SessionReply:
        self.send(as_session(*requests))
        return pb.SessionReply.FromString(next(self._replies))

    def refused(self, *message: Any) -> tuple[grpc.StatusCode, str]:
        """The status that ends the stream when ``message`` is sent."""
        if isinstance(message[0], (pb.PullTaskRequest, pb.PushAnswerRequest)):
            self.send(as_session(*message))
        else:
            self.send(message[0])
        with pytest.raises(grpc.RpcError) as caught:
            next(self._replies)
        return caught.value.code(), caught.value.details() or ""

    def close(self) -> None:
        with self._ready:
            self._outgoing.append(None)
            self._ready.notify()
        self._replies.cancel()


def as_session(*requests: Any) -> pb.SessionRequest:
    """PullTask and PushAnswer requests as one Session message."""
    pulls = [r for r in requests if isinstance(r, pb.PullTaskRequest)]
    pushes = [r for r in requests if isinstance(r, pb.PushAnswerRequest)]
    return wire.session_request(
        push=pushes[0] if pushes else None, pull=pulls[0] if pulls else None
    )


class CountsStreams(CoordinatorServicer):
    """The real service, counting the Session streams opened and the messages on them."""

    streams = 0
    messages = 0

    async def handle_session(
        self, requests: AsyncIterator[bytes], context: Any
    ) -> AsyncIterator[pb.SessionReply]:
        type(self).streams += 1
        async for reply in super().handle_session(requests, context):
            type(self).messages += 1
            yield reply


class NoSession(CoordinatorServicer):
    """A coordinator that predates Session (it answers it UNIMPLEMENTED, as grpc does for a
    method a server does not have)."""

    async def handle_session(
        self, requests: AsyncIterator[bytes], context: Any
    ) -> AsyncIterator[pb.SessionReply]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        yield pb.SessionReply()  # pragma: no cover - abort raises


# -- the holder's loop over the stream -------------------------------------------------------
def run_federation(
    tmp_path: Path, servicer_type: type[CoordinatorServicer], *, streamed: bool = True
) -> Any:
    """Three holders, ten rounds, through the given service; what the run left behind."""
    names = ("holder-a", "holder-b", "holder-c")
    coord = coordinator(tmp_path, rounds=10, holders=3)
    holders = [InstantHolder(name, FINGERPRINT) for name in names]
    traffic = [WireTraffic() for _ in names]
    servicer = servicer_type(coord, limits=limits())
    running = start_server(servicer, "127.0.0.1:0")
    try:
        threads = [
            threading.Thread(
                target=run_holder,
                args=(holder, running.address),
                kwargs={"poll_timeout_s": 5.0, "traffic": t, "streamed": streamed},
            )
            for holder, t in zip(holders, traffic, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        running.stop(grace_s=0)
    state = coord.state
    return (
        state.log.head,
        [(r.round_index, r.closed_by, r.choices, r.winner, r.steps) for r in state.rounds],
        # Task ids less their run id (a random nonce per run), and the choices.
        [[(a.task_id.split(":", 1)[1], a.choice) for a in h.answers] for h in holders],
    ), [(t.calls, t.bytes_sent > 0, t.bytes_received > 0) for t in traffic]


def test_a_run_goes_over_one_stream_per_holder_and_equals_the_unary_run(tmp_path: Path) -> None:
    CountsStreams.streams = CountsStreams.messages = 0
    streamed, streamed_traffic = run_federation(tmp_path / "streamed", CountsStreams)
    unary, unary_traffic = run_federation(tmp_path / "unary", NoSession)
    assert streamed == unary  # the same log, rounds and answers
    assert CountsStreams.streams == 3  # one stream per holder for the whole run
    # Each holder's first pull, then its 10 answers each with the next pull (the last one
    # says the run finished): 11 messages.
    assert CountsStreams.messages == 3 * 11
    assert streamed_traffic == [(1 + 11, True, True)] * 3  # Join, then the 11 exchanges
    assert unary_traffic == [(1 + 11 + 10, True, True)] * 3  # Join, 11 PullTasks, 10 pushes
    # A holder told not to stream (`sottovoce client --unary`) opens none, with the same run.
    forced, forced_traffic = run_federation(tmp_path / "forced", CountsStreams, streamed=False)
    assert (forced, forced_traffic) == (unary, unary_traffic)
    assert CountsStreams.streams == 3


class WrongKind(pb_grpc.CoordinatorServicer):
    """A hostile coordinator: a good Join, then a PushAnswer reply to the holder's pull."""

    def __init__(self) -> None:
        self.left = threading.Event()

    def Join(self, request: pb.JoinRequest, context: Any) -> pb.JoinReply:  # noqa: N802
        spec = coordinator_spec()
        return wire.join_reply_to_proto(spec, secrets.token_urlsafe(24))

    def Session(self, requests: Iterator[pb.SessionRequest], context: Any) -> Iterator[Any]:  # noqa: N802
        for _ in requests:
            yield pb.SessionReply(pushed=pb.PushAnswerReply(accepted=True))

    def Leave(self, request: pb.LeaveRequest, context: Any) -> pb.LeaveReply:  # noqa: N802
        self.left.set()
        return pb.LeaveReply()


_SPEC: list[RunSpec] = []


def coordinator_spec() -> RunSpec:
    return _SPEC[0]


def sync_server(servicer: pb_grpc.CoordinatorServicer) -> tuple[grpc.Server, str]:
    """A plain (threaded) grpc server for a scripted, hostile coordinator."""
    server = grpc.server(ThreadPoolExecutor(max_workers=32), options=list(CHANNEL_OPTIONS))
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_a_reply_of_the_wrong_kind_is_a_wire_error_and_the_holder_answers_nothing(
    tmp_path: Path,
) -> None:
    coord = coordinator(tmp_path)
    _SPEC[:] = [coord.join(JoinRequest("probe", FINGERPRINT))]
    servicer = WrongKind()
    server, address = sync_server(servicer)
    holder = InstantHolder("holder-a", FINGERPRINT)
    try:
        with pytest.raises(
            WireError,
            match=r"^invalid SessionReply: carries a PushAnswer reply for a request that asked "
            r"for a PullTask reply$",
        ):
            run_holder(holder, address, poll_timeout_s=1.0)
    finally:
        server.stop(0)
    assert holder.answers == []
    assert servicer.left.is_set()


class Silent(pb_grpc.CoordinatorServicer):
    """A coordinator that reads the holder's stream and never replies."""

    def __init__(self) -> None:
        self.streams = 0
        self.released = threading.Event()

    def Join(self, request: pb.JoinRequest, context: Any) -> pb.JoinReply:  # noqa: N802
        return wire.join_reply_to_proto(coordinator_spec(), secrets.token_urlsafe(24))

    def Session(self, requests: Iterator[pb.SessionRequest], context: Any) -> Iterator[Any]:  # noqa: N802
        self.streams += 1
        for _ in requests:
            self.released.wait(30)
        yield from ()

    def Leave(self, request: pb.LeaveRequest, context: Any) -> pb.LeaveReply:  # noqa: N802
        return pb.LeaveReply()


def test_an_exchange_with_no_reply_gives_up_at_its_deadline_and_retries_on_a_new_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coord = coordinator(tmp_path)
    _SPEC[:] = [coord.join(JoinRequest("probe", FINGERPRINT))]
    monkeypatch.setattr("sottovoce.client.grpc_loop.POLL_DEADLINE_MARGIN_S", 0.2)
    servicer = Silent()
    server, address = sync_server(servicer)
    started = time.monotonic()
    try:
        with pytest.raises(
            TransportError, match=r"^PullTask failed with DEADLINE_EXCEEDED: no reply"
        ):
            run_holder(
                InstantHolder("holder-a", FINGERPRINT),
                address,
                poll_timeout_s=0.1,
                retry=FAST_RETRY,
            )
    finally:
        servicer.released.set()
        server.stop(0)
    elapsed = time.monotonic() - started
    assert 1.0 < elapsed < 5.0  # 0.3 s deadlines until the 1.5 s retry budget is spent
    assert servicer.streams >= 2  # each try after a deadline went on a new stream


# -- each message is served as the call it carries -------------------------------------------
def test_a_stream_message_is_authenticated_like_a_call(tmp_path: Path, custom_server: Any) -> None:
    spy = Spy(coordinator(tmp_path))
    address = custom_server(CoordinatorServicer(spy, limits=limits()))
    genesis = spy.inner.state.genesis
    stranger = Credentials("holder-a", secrets.token_urlsafe(24))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for request in (pull(stranger, genesis), push(stranger, "stream-1:r0:00000000")):
            stream = Stream(channel)
            assert stream.refused(request)[0] is grpc.StatusCode.NOT_FOUND  # never joined
        join(stub)
        for request in (pull(stranger, genesis), push(stranger, "stream-1:r0:00000000")):
            stream = Stream(channel)
            code = stream.refused(request)[0]
            assert code is grpc.StatusCode.UNAUTHENTICATED  # joined, not this session
    assert spy.calls == ["join"]


def test_malformed_stream_messages_are_refused_counted_and_reach_nothing(
    tmp_path: Path, custom_server: Any
) -> None:
    spy = Spy(coordinator(tmp_path))
    address = custom_server(CoordinatorServicer(spy, limits=limits(burst=3)))
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        assert Stream(ch).refused(b"\xff\xff") == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid SessionRequest: the bytes are not that message",
        )
        assert Stream(ch).refused(pb.SessionRequest()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid SessionRequest: carries no call (neither push nor pull is set)",
        )
        empty_pull = pb.SessionRequest(pull=pb.PullTaskRequest())
        code, detail = Stream(ch).refused(empty_pull)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and detail.startswith(
            "invalid PullTaskRequest"
        )
        code, detail = Stream(ch).refused(b"\xff")  # the caller's rejected calls are spent
        assert code is EXHAUSTED and "rejected calls from 'ipv4:127.0.0.1:" in detail
    assert spy.calls == []
    assert (
        not (spy.inner.state.run_dir / JOURNAL).exists()
        or b"answer" not in (spy.inner.state.run_dir / JOURNAL).read_bytes()
    )


def test_every_message_takes_a_token_unless_it_brings_progress(
    tmp_path: Path, custom_server: Any
) -> None:
    """The per-holder call limit applies to messages: a stream of the same task again and
    again runs out of tokens as unary calls do; new tasks and answers are free."""
    spy = Spy(coordinator(tmp_path))
    address = custom_server(CoordinatorServicer(spy, limits=limits(burst=3)))
    genesis = spy.inner.state.genesis
    with grpc.insecure_channel(address) as channel:
        me = join(pb_grpc.CoordinatorStub(channel))
        stream = Stream(channel)
        first = stream.exchange(pull(me, genesis)).pulled.task  # a new task: free
        for _ in range(3):  # the same task again: a token each
            assert stream.exchange(pull(me, genesis)).pulled.task.task_id == first.task_id
        code, detail = stream.refused(pull(me, genesis))
        assert code is EXHAUSTED and detail.startswith("rate limit: calls of holder 'holder-a'")
        again = Stream(channel)  # a new stream has no new tokens
        assert again.refused(pull(me, genesis))[0] is EXHAUSTED
    assert spy.calls == ["join", "pull", "pull", "pull", "pull"]


def test_a_holder_may_open_only_its_few_streams(tmp_path: Path, custom_server: Any) -> None:
    spy = Spy(coordinator(tmp_path))
    address = custom_server(CoordinatorServicer(spy, limits=limits(polls=2)))
    genesis = spy.inner.state.genesis
    with grpc.insecure_channel(address) as channel:
        me = join(pb_grpc.CoordinatorStub(channel))
        streams = [Stream(channel), Stream(channel)]
        for stream in streams:
            assert stream.exchange(pull(me, genesis)).pulled.HasField("task")
        code, detail = Stream(channel).refused(pull(me, genesis))
        assert code is EXHAUSTED and "already has 2 Session streams open" in detail
        streams[0].close()
        deadline = time.monotonic() + 5
        while True:  # the closed stream's slot comes back once the server sees it end
            third = Stream(channel)
            try:
                assert third.exchange(pull(me, genesis)).pulled.HasField("task")
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    assert spy.calls.count("pull") >= 3


def test_under_mutual_tls_a_message_for_another_holder_is_denied(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_ca(certs)
    issue(certs, "coordinator", server_hosts=("127.0.0.1",))
    for name in ("holder-a", "holder-b"):
        issue(certs, name)
    spy = Spy(coordinator(tmp_path))
    with serve(spy, "127.0.0.1:0", tls=tls_config(certs, "coordinator"), limits=limits()) as srv:
        genesis = spy.inner.state.genesis
        cert, key, ca = tls_config(certs, "holder-b").read()
        with grpc.secure_channel(
            srv.address, grpc.ssl_channel_credentials(ca, key, cert)
        ) as b_channel:
            b = join(pb_grpc.CoordinatorStub(b_channel), "holder-b")
        cert, key, ca = tls_config(certs, "holder-a").read()
        with grpc.secure_channel(
            srv.address, grpc.ssl_channel_credentials(ca, key, cert)
        ) as channel:
            a = join(pb_grpc.CoordinatorStub(channel))
            stream = Stream(channel)
            assert stream.exchange(pull(a, genesis)).pulled.HasField("task")
            code, detail = stream.refused(pull(b, genesis))  # holder-b's own session
            assert code is grpc.StatusCode.PERMISSION_DENIED
            assert detail == "holder_id 'holder-b' is not the certificate's common name 'holder-a'"
    assert spy.calls == ["join", "join", "pull"]


@pytest.mark.parametrize("then_pull", [False, True], ids=["push alone", "push, then pull"])
def test_no_stream_reply_leaves_before_its_journal_record_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then_pull: bool
) -> None:
    """Hold every fsync: the reply to a push (alone, or with the next pull, whose wait
    covers the push's record) does not come until the disk has the answer. Two holders,
    so that the answer does not close the round (closing syncs on its own)."""
    coord = coordinator(tmp_path, holders=2)
    fsyncs = HeldFsyncs()
    with serve(coord, "127.0.0.1:0") as running, grpc.insecure_channel(running.address) as ch:
        me = join(pb_grpc.CoordinatorStub(ch), "solo")
        join(pb_grpc.CoordinatorStub(ch), "other")  # joins, never answers
        stream = Stream(ch)
        task = wire.pull_task_reply_from_proto(
            stream.exchange(pull(me, coord.state.genesis, wait_s=1.0)).pulled
        )
        assert isinstance(task, Task)
        fsyncs.hold(monkeypatch)
        replies: list[pb.SessionReply] = []
        requests = [push(me, task.task_id)]
        if then_pull:  # nothing to hand out yet: the pull answers "no task" at once
            requests.append(pull(me, task.log_head, version=task.target_version))
        sender = threading.Thread(target=lambda: replies.append(stream.exchange(*requests)))
        sender.start()
        time.sleep(0.5)
        assert replies == []  # journaled, counted in memory, but not yet said to be
        released = fsyncs.release()
        sender.join(timeout=10)
        assert replies and replies[0].pushed.accepted
        assert replies[0].HasField("pulled") is then_pull
        if then_pull:
            assert replies[0].pulled.HasField("nothing")
        assert fsyncs.synced and fsyncs.synced[0] >= released  # the fsync came first
        stream.close()
    records = read_json_lines(coord.state.run_dir / JOURNAL)
    assert [r["task_id"] for r in records if r["type"] == "answer"] == [task.task_id]


def test_an_answer_and_the_next_pull_go_in_one_message_the_answer_first(
    tmp_path: Path, custom_server: Any
) -> None:
    spy = Spy(coordinator(tmp_path, rounds=3))
    address = custom_server(CoordinatorServicer(spy, limits=limits()))
    state = spy.inner.state
    with grpc.insecure_channel(address) as channel:
        me = join(pb_grpc.CoordinatorStub(channel))
        stream = Stream(channel)
        first = wire.pull_task_reply_from_proto(stream.exchange(pull(me, state.genesis)).pulled)
        assert isinstance(first, Task)
        reply = stream.exchange(
            push(me, first.task_id), pull(me, state.genesis, wait_s=5.0)
        )  # the answer closes round 0; the pull waits for round 1's task
        assert reply.HasField("pushed") and reply.HasField("pulled")
        assert reply.pushed.accepted
        second = wire.pull_task_reply_from_proto(reply.pulled)
        assert isinstance(second, Task) and second.round_index == 1
        calls_before = list(spy.calls)
        code, _ = stream.refused(
            push(me, "stream-0:r9:00000000"), pull(me, state.genesis)
        )  # an answer to a task never handed out: refused, and its pull is not served
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert spy.calls == [*calls_before, "push"]
    assert [r.round_index for r in state.rounds] == [0]


class Floods(pb_grpc.CoordinatorServicer):
    """A hostile coordinator: thousands of replies, asked for or not, on every stream."""

    def __init__(self) -> None:
        self.sent = 0

    def Session(self, requests: Iterator[pb.SessionRequest], context: Any) -> Iterator[Any]:  # noqa: N802
        next(requests)
        reply = wire.session_reply([("PullTask", wire.pull_task_reply_to_proto(None))])
        for _ in range(5000):
            self.sent += 1
            yield reply


def test_replies_nobody_asked_for_are_never_read_into_the_holders_memory() -> None:
    servicer = Floods()
    server, address = sync_server(servicer)
    try:
        with grpc.insecure_channel(address) as channel:
            stream = _SessionStream(pb_grpc.CoordinatorStub(channel), threading.Event())
            message = wire.session_request(pull=pb.PullTaskRequest())
            assert stream.exchange(message, timeout_s=5).HasField("pulled")
            deadline = time.monotonic() + 5
            while servicer.sent < 100 and time.monotonic() < deadline:
                time.sleep(0.01)  # the coordinator has pushed many more at us
            time.sleep(0.2)
            assert servicer.sent >= 100
            opened = stream._open
            assert opened is not None and opened.replies.qsize() == 0  # one asked, one read
            assert stream.exchange(message, timeout_s=5).HasField("pulled")  # the next one
            stream.close()
    finally:
        server.stop(0)
