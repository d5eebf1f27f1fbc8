"""Per-holder limits of the gRPC service: a flood is refused, a normal run never is.

The limiter pieces are checked on a fake clock; the service end to end over real gRPC on
loopback, in front of the real Coordinator (its journal and rounds are the state a refused
call must not change), and under mutual TLS with certificates from ``common/transport/certs.py``.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import InstantHolder, Spy

from sottovoce.client.grpc_loop import run_holder
from sottovoce.common.config import SERVICE_LIMIT_KEYS, RunConfig, ServerSection, parse_config
from sottovoce.common.errors import ConfigError
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.proto import sottovoce_pb2_grpc as pb_grpc
from sottovoce.common.protocol.messages import Answer, JoinRequest, RunFinished, Task
from sottovoce.common.steplog import extend_chain
from sottovoce.common.transport import wire
from sottovoce.common.transport.certs import init_ca, issue, tls_config
from sottovoce.common.transport.channel import CHANNEL_OPTIONS
from sottovoce.common.transport.wire import Credentials, PullTaskCall, PushAnswerCall
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.grpc_service import (
    SERVICE_NAME,
    CoordinatorServicer,
    RunningServer,
    limits_for,
    serve,
    start_server,
)
from sottovoce.server.limits import (
    ConcurrencyCap,
    Deliveries,
    KeyedRateLimiter,
    RateLimit,
    ServiceLimits,
    TokenBucket,
)
from sottovoce.server.run_state import JOURNAL, RunState

FINGERPRINT = "sha256:" + "3c" * 32
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the limiter pieces ------------------------------------------------------------------
def test_token_bucket_allows_a_burst_then_its_rate() -> None:
    bucket = TokenBucket(RateLimit(per_s=2.0, burst=3), now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)  # 0.8 of a token: still refused, and it took nothing
    assert bucket.take(0.5)  # the refused call did not delay the refill
    assert not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_a_refund_gives_a_token_back_up_to_the_burst() -> None:
    bucket = TokenBucket(RateLimit(per_s=0.001, burst=2), now=0.0)
    assert bucket.take(0.0) and bucket.take(0.0) and not bucket.take(0.0)
    bucket.give_back(0.0)
    assert bucket.take(0.0) and not bucket.take(0.0)
    for _ in range(5):
        bucket.give_back(0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]


def test_keys_have_their_own_buckets_and_memory_is_bounded() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter(RateLimit(per_s=1.0, burst=1), clock=clock, max_keys=2)
    assert limiter.try_acquire("a") and not limiter.try_acquire("a")
    assert limiter.try_acquire("b")  # a's flood does not touch b
    assert limiter.try_acquire("c") and len(limiter) == 2  # the oldest (a) is forgotten
    assert limiter.try_acquire("a")  # ...which can only loosen its limit
    clock.now += 0.5
    assert not limiter.try_acquire("c")  # c was kept (a forgotten bucket would be full)
    clock.now += 0.5  # now every bucket has refilled: dropping them changes nothing
    assert limiter.try_acquire("d") and len(limiter) == 1


def test_concurrency_cap_counts_calls_in_progress() -> None:
    cap = ConcurrencyCap(limit=2)
    assert cap.try_acquire("a") and cap.try_acquire("a") and not cap.try_acquire("a")
    assert cap.try_acquire("b")
    cap.release("a")
    assert cap.active("a") == 1 and cap.try_acquire("a")
    for key in ("a", "a", "b"):
        cap.release(key)
    assert cap.active("a") == cap.active("b") == 0


def test_only_the_first_delivery_of_an_item_counts() -> None:
    deliveries = Deliveries()
    assert deliveries.first("a", "task-1") and not deliveries.first("a", "task-1")
    assert deliveries.first("b", "task-1") and deliveries.first("a", "task-2")
    deliveries.forget("a")
    assert deliveries.first("a", "task-2")


# -- configuration -------------------------------------------------------------------------
def test_limit_keys_are_validated_with_one_line_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^test: server\.rate_limit_per_s: .*greater than 0"):
        parse_config({"server": {"rate_limit_per_s": 0}}, "test")
    with pytest.raises(ConfigError, match=r"^test: server\.max_polls_per_holder: "):
        parse_config({"server": {"max_polls_per_holder": 0}}, "test")
    assert set(SERVICE_LIMIT_KEYS) <= set(ServerSection.model_fields)


def test_limits_are_not_part_of_the_run_fingerprint() -> None:
    """Raising a limit and restarting resumes the run; so do run dirs made before limits."""
    base = {"server": {"min_holders": 2, "quorum": 2}}
    limited = {
        "server": {**base["server"], **dict.fromkeys(SERVICE_LIMIT_KEYS, 7)},
    }
    assert parse_config(limited, "t").fingerprint() == parse_config(base, "t").fingerprint()
    other_run = {"server": {"min_holders": 3, "quorum": 2}}
    assert parse_config(other_run, "t").fingerprint() != parse_config(base, "t").fingerprint()


def test_the_worker_pool_is_sized_for_the_holders_expected() -> None:
    def workers(**server: Any) -> int:
        return ServiceLimits.from_config(ServerSection(**server)).max_workers

    assert workers() == 64  # the pool the service always had, for small runs
    assert workers(min_holders=1000, quorum=1000) == 2016  # a long-poll each, and room
    assert workers(allowed_holders=tuple(f"h{i}" for i in range(100))) == 216
    assert workers(min_holders=1000, quorum=1, max_workers=300) == 300


def test_serve_takes_the_limits_from_the_coordinators_config(tmp_path: Path) -> None:
    coordinator = real_coordinator(tmp_path, rate_limit_burst=7, max_polls_per_holder=2)
    limits = limits_for(coordinator)
    assert (limits.calls.burst, limits.max_polls_per_holder) == (7, 2)
    assert limits_for(object()) == ServiceLimits.defaults()  # type: ignore[arg-type]


# -- helpers for the gRPC tests --------------------------------------------------------------
def run_config(**server: Any) -> RunConfig:
    data = {
        "run": {"name": "limits", "max_rounds": 3, "bit_budget": 1000.0},
        "parametrization": {"kind": "scale"},
        "server": {"min_holders": 1, "quorum": 1, "round_timeout_s": 60.0, **server},
    }
    return parse_config(data, "test")


def real_coordinator(tmp_path: Path, **server: Any) -> Coordinator:
    config = run_config(**server)
    state = RunState.open(tmp_path / "run", config, "# test\n", FINGERPRINT)
    return Coordinator(config, state, FINGERPRINT)


@pytest.fixture
def custom_server() -> Iterator[Any]:
    """Start a servicer on a loopback port (the service's own clock can then be faked)."""
    servers: list[RunningServer] = []

    def start(servicer: CoordinatorServicer) -> str:
        running = start_server(servicer, "127.0.0.1:0")  # as serve() does, on its own loop
        servers.append(running)
        return running.address

    yield start
    for running in servers:
        running.stop(grace_s=0)


def limits(*, per_s: float = 1.0, burst: int = 3, joins: int = 10, polls: int = 4) -> ServiceLimits:
    return ServiceLimits(
        calls=RateLimit(per_s, burst),
        joins=RateLimit(0.001, joins),
        max_polls_per_holder=polls,
        max_workers=8,
    )


def join(stub: pb_grpc.CoordinatorStub, holder_id: str = "holder-a") -> Credentials:
    reply = stub.Join(wire.join_request_to_proto(JoinRequest(holder_id, FINGERPRINT)), timeout=5)
    _, session = wire.join_reply_from_proto(reply)
    return Credentials(holder_id, session)


def pull_request(credentials: Credentials, genesis: str, wait_s: float = 0.0) -> Any:
    return wire.pull_task_request_to_proto(PullTaskCall(credentials, 0, genesis, wait_s))


def push_request(credentials: Credentials, task_id: str) -> Any:
    return wire.push_answer_request_to_proto(PushAnswerCall(credentials, Answer(task_id, choice=1)))


def refused(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=5)
    return caught.value.code(), caught.value.details() or ""


def journal_bytes(coordinator: Coordinator) -> bytes:
    path = coordinator.state.run_dir / JOURNAL
    return path.read_bytes() if path.exists() else b""


# -- a flood is refused and changes nothing --------------------------------------------------
def test_a_flood_of_wasted_calls_is_refused_before_the_coordinator(
    tmp_path: Path, custom_server: Any
) -> None:
    coordinator = real_coordinator(tmp_path)
    spy = Spy(coordinator)
    clock = FakeClock()
    address = custom_server(CoordinatorServicer(spy, limits=limits(burst=3), clock=clock))
    genesis = coordinator.state.genesis
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        me = join(stub)
        first = stub.PullTask(pull_request(me, genesis), timeout=5)  # new task: free
        task_id = first.task.task_id
        for _ in range(3):  # the same task again and again: each costs a token
            assert stub.PullTask(pull_request(me, genesis), timeout=5).task.task_id == task_id
        code, detail = refused(stub.PullTask, pull_request(me, genesis))
        assert code is EXHAUSTED
        assert detail == ("rate limit: calls of holder 'holder-a' over 1/s, burst 3; retry later")
        before = (journal_bytes(coordinator), list(spy.calls))

        # Refused: an answer that would be accepted, and leaving. Nothing reaches the
        # coordinator, nothing is journaled, the round stays open, the holder stays in.
        assert refused(stub.PushAnswer, push_request(me, task_id))[0] is EXHAUSTED
        assert refused(stub.Leave, wire.leave_request_to_proto(me))[0] is EXHAUSTED
        assert (journal_bytes(coordinator), spy.calls) == before
        assert coordinator.state.answered_task_ids == set()
        assert coordinator.state.rounds == [] and coordinator.state.bits_total == 0.0

        clock.now += 1.0  # one token back: the same answer now goes through, once
        assert stub.PushAnswer(push_request(me, task_id), timeout=5).accepted
    assert spy.calls == ["join"] + ["pull"] * 4 + ["push"]
    assert coordinator.state.answered_task_ids == {task_id}
    assert [r.closed_by for r in coordinator.state.rounds] == ["all answered"]


def test_progress_is_free_at_any_speed(tmp_path: Path, custom_server: Any) -> None:
    """With one token in all, a holder still runs every round: new tasks and accepted
    answers give their tokens back."""
    coordinator = real_coordinator(tmp_path)
    servicer = CoordinatorServicer(coordinator, limits=limits(per_s=1e-6, burst=1))
    address = custom_server(servicer)
    version, head = 0, coordinator.state.genesis
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        me = join(stub)
        while True:
            call = PullTaskCall(me, version, head, 0.0)
            reply = stub.PullTask(wire.pull_task_request_to_proto(call), timeout=5)
            result = wire.pull_task_reply_from_proto(reply)
            if isinstance(result, RunFinished):
                break
            assert isinstance(result, Task)
            head = extend_chain(head, version, result.new_steps)
            version = result.target_version
            assert stub.PushAnswer(push_request(me, result.task_id), timeout=5).accepted
        stub.Leave(wire.leave_request_to_proto(me), timeout=5)  # takes the one token
    assert len(coordinator.state.rounds) == 3


def test_join_flood_is_limited_per_certificate(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_ca(certs)
    issue(certs, "coordinator", server_hosts=("127.0.0.1",))
    for name in ("holder-a", "holder-b"):
        issue(certs, name)
    coordinator = real_coordinator(tmp_path)
    spy = Spy(coordinator)
    server_tls = tls_config(certs, "coordinator")
    with serve(spy, "127.0.0.1:0", tls=server_tls, limits=limits(joins=2)) as running:
        with mtls_channel(certs, "holder-a", running.address) as channel_a:
            stub_a = pb_grpc.CoordinatorStub(channel_a)
            join(stub_a)
            kept = join(stub_a)  # a second Join replaces the session; the burst is 2
            code, detail = refused(stub_a.Join, join_proto("holder-a"))
            assert code is EXHAUSTED
            assert detail == (
                "rate limit: Join calls from 'holder-a' over 0.001/s, burst 2; retry later"
            )
            # Charged to the certificate before the claim is looked at.
            assert refused(stub_a.Join, join_proto("holder-b"))[0] is EXHAUSTED
            # The refused Joins replaced no session: the second one's still works.
            reply = stub_a.PullTask(pull_request(kept, coordinator.state.genesis), timeout=5)
            assert reply.WhichOneof("reply") == "task"
        with mtls_channel(certs, "holder-b", running.address) as channel_b:
            join(pb_grpc.CoordinatorStub(channel_b), "holder-b")  # its own bucket
    assert spy.calls == ["join", "join", "pull", "join"]


def join_proto(holder_id: str) -> pb.JoinRequest:
    return wire.join_request_to_proto(JoinRequest(holder_id, FINGERPRINT))


def mtls_channel(certs: Path, name: str, address: str) -> grpc.Channel:
    cert, key, ca = tls_config(certs, name).read()
    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    return grpc.secure_channel(address, credentials, options=list(CHANNEL_OPTIONS))


class BlockingPolls(Spy):
    """PullTask waits until released, as a long-poll with nothing to hand out."""

    def __init__(self, inner: Coordinator) -> None:
        super().__init__(inner)
        self.entered = threading.Event()
        self.release = threading.Event()

    def pull_task(
        self, holder_id: str, have_version: int, have_head: str, timeout_s: float
    ) -> Task | RunFinished | None:
        self.calls.append("pull")
        self.entered.set()
        self.release.wait(timeout=10)
        return None


def test_a_holder_cannot_hold_more_than_its_waiting_polls(
    tmp_path: Path, custom_server: Any
) -> None:
    endpoint = BlockingPolls(real_coordinator(tmp_path))
    address = custom_server(CoordinatorServicer(endpoint, limits=limits(polls=1, burst=10)))
    genesis = endpoint.inner.state.genesis
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        me = join(stub)
        waiting = stub.PullTask.future(pull_request(me, genesis, wait_s=5.0), timeout=10)
        assert endpoint.entered.wait(5)
        code, detail = refused(stub.PullTask, pull_request(me, genesis, wait_s=5.0))
        assert code is EXHAUSTED
        assert detail == (
            "rate limit: holder 'holder-a' already has 1 PullTask calls waiting; "
            "retry when one returns"
        )
        endpoint.release.set()
        assert waiting.result(timeout=5).WhichOneof("reply") == "nothing"
        stub.PullTask(pull_request(me, genesis), timeout=5)  # the slot is free again
    assert endpoint.calls == ["join", "pull", "pull"]


# -- rejected calls count against their caller, before their bytes are parsed ---------------
def connection(address: str) -> grpc.Channel:
    """A channel with its own TCP connection (channels in one process otherwise share one)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def raw_method(channel: grpc.Channel, name: str) -> Any:
    """The service's method ``name`` taking and returning bytes, whatever they are."""
    return channel.unary_unary(f"/{SERVICE_NAME}/{name}")


def test_malformed_calls_count_against_their_callers_limit_and_no_other(
    tmp_path: Path, custom_server: Any
) -> None:
    """A flood of malformed Joins (no holder id yet, so only the connection is known) used
    to cost the flooder nothing: now it runs out of tokens, and only it."""
    spy = Spy(real_coordinator(tmp_path))
    clock = FakeClock()
    address = custom_server(CoordinatorServicer(spy, limits=limits(burst=3), clock=clock))
    malformed = pb.JoinRequest(holder_id="", model_fingerprint=FINGERPRINT)
    with connection(address) as flooder, connection(address) as honest:
        stub = pb_grpc.CoordinatorStub(flooder)
        for _ in range(2):
            assert refused(stub.Join, malformed)[0] is grpc.StatusCode.INVALID_ARGUMENT
        code, detail = refused(raw_method(flooder, "Join"), b"\xff\xff")
        assert (code, detail) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid JoinRequest: the bytes are not that message",
        )
        code, detail = refused(stub.Join, join_proto("holder-a"))  # even a valid one now
        assert code is EXHAUSTED
        assert detail.startswith("rate limit: rejected calls from 'ipv4:127.0.0.1:")
        assert detail.endswith("over 1/s, burst 3; retry later")
        assert refused(raw_method(flooder, "PushAnswer"), b"\xff")[0] is EXHAUSTED  # unparsed
        join(pb_grpc.CoordinatorStub(honest))  # another caller is not throttled
        clock.now += 1.0  # one token back
        join(stub, "holder-b")
    assert spy.calls == ["join", "join"]


def test_unauthenticated_calls_count_against_the_certificate_on_any_connection(
    tmp_path: Path,
) -> None:
    certs = tmp_path / "certs"
    init_ca(certs)
    issue(certs, "coordinator", server_hosts=("127.0.0.1",))
    for name in ("holder-a", "holder-b"):
        issue(certs, name)
    spy = Spy(real_coordinator(tmp_path))
    server_tls = tls_config(certs, "coordinator")
    with serve(spy, "127.0.0.1:0", tls=server_tls, limits=limits(per_s=1e-6, burst=3)) as running:
        genesis = spy.inner.state.genesis
        with mtls_channel(certs, "holder-a", running.address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            me = join(stub)
            forged = Credentials("holder-a", secrets.token_urlsafe(24))
            assert refused(stub.PullTask, pull_request(forged, genesis))[0] is (
                grpc.StatusCode.UNAUTHENTICATED
            )
            impostor = Credentials("holder-b", me.session)  # not its certificate's name
            code = refused(stub.PushAnswer, push_request(impostor, "limits-1:r0:00000000"))[0]
            assert code is grpc.StatusCode.PERMISSION_DENIED
            assert (
                refused(stub.Join, join_proto("holder-b"))[0] is grpc.StatusCode.PERMISSION_DENIED
            )
            code, detail = refused(stub.PullTask, pull_request(me, genesis))  # its own session
            assert code is EXHAUSTED and "rejected calls from 'holder-a'" in detail
        with mtls_channel(certs, "holder-a", running.address) as again:  # a new connection
            assert refused(pb_grpc.CoordinatorStub(again).Join, join_proto("holder-a"))[0] is (
                EXHAUSTED
            )
        with mtls_channel(certs, "holder-b", running.address) as other:
            join(pb_grpc.CoordinatorStub(other), "holder-b")  # its own bucket
    assert spy.calls == ["join", "join"]


# -- a normal run is not affected --------------------------------------------------------------
@pytest.mark.parametrize("limited", ["defaults", "one-token"])
def test_a_normal_run_is_never_throttled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, limited: str
) -> None:
    rounds, names = 40, ("holder-a", "holder-b", "holder-c")
    config = run_config(min_holders=3, quorum=3)
    config = config.model_copy(update={"run": config.run.model_copy(update={"max_rounds": 40})})
    state = RunState.open(tmp_path / "run", config, "# test\n", FINGERPRINT)
    coordinator = Coordinator(config, state, FINGERPRINT)
    tight = limits(per_s=1e-6, burst=1) if limited == "one-token" else None
    holders = [InstantHolder(name, FINGERPRINT) for name in names]
    caplog.set_level(logging.INFO)
    with (
        serve(coordinator, "127.0.0.1:0", limits=tight) as running,
        ThreadPoolExecutor(len(holders)) as pool,
    ):
        runs = [pool.submit(run_holder, h, running.address, poll_timeout_s=5.0) for h in holders]
        finished = [run.result(timeout=60) for run in runs]
    assert {f.reason for f in finished} == {f"max_rounds ({rounds}) reached"}
    assert [len(h.answers) for h in holders] == [rounds] * 3
    assert {r.closed_by for r in state.rounds} == {"all answered"}
    assert "RESOURCE_EXHAUSTED" not in caplog.text


# -- nothing answers without authentication but health ----------------------------------------
def test_only_health_answers_without_a_session(tmp_path: Path, custom_server: Any) -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Coordinator"].methods}
    # A new method must be added here with the check that it authenticates its caller
    # (Session's messages: tests/test_session_stream.py, authenticated like a call).
    assert methods == {"Join", "PullTask", "PushAnswer", "Leave", "Session"}
    spy = Spy(real_coordinator(tmp_path))
    address = custom_server(CoordinatorServicer(spy, limits=limits(burst=100)))
    genesis = spy.inner.state.genesis
    stranger = Credentials("holder-a", secrets.token_urlsafe(24))
    calls = {
        "PullTask": pull_request(stranger, genesis),
        "PushAnswer": push_request(stranger, "limits-1:r0:00000000"),
        "Leave": wire.leave_request_to_proto(stranger),
    }
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for name, request in calls.items():  # never joined
            assert refused(getattr(stub, name), request)[0] is grpc.StatusCode.NOT_FOUND
        join(stub)
        for name, request in calls.items():  # joined, but not this session
            assert refused(getattr(stub, name), request)[0] is grpc.StatusCode.UNAUTHENTICATED
        reflection = channel.unary_unary(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None, None
        )
        assert refused(reflection, b"")[0] is grpc.StatusCode.UNIMPLEMENTED
    assert spy.calls == ["join"]


def test_under_mutual_tls_even_health_needs_a_certificate(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_ca(certs)
    issue(certs, "coordinator", server_hosts=("127.0.0.1",))
    issue(certs, "holder-a")
    coordinator = real_coordinator(tmp_path)
    with serve(coordinator, "127.0.0.1:0", tls=tls_config(certs, "coordinator")) as running:
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        with mtls_channel(certs, "holder-a", running.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        ca = (certs / "ca.pem").read_bytes()
        anonymous = grpc.ssl_channel_credentials(ca)  # checks the server, shows no certificate
        with (
            grpc.secure_channel(running.address, anonymous) as channel,
            pytest.raises(grpc.RpcError) as caught,
        ):
            health_pb2_grpc.HealthStub(channel).Check(request, timeout=2)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
