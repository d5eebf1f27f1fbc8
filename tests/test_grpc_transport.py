"""The gRPC transport end to end: a real server on loopback, fake endpoints on both sides."""

from __future__ import annotations

import math
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sottovoce.client.grpc_loop import STOPPED_REASON, RetryPolicy, run_holder
from sottovoce.common.errors import (
    LogIntegrityError,
    PolicyViolation,
    RefusalCode,
    TransportError,
)
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.proto import sottovoce_pb2_grpc as pb_grpc
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.messages import (
    Answer,
    BatchSpec,
    Candidate,
    FitnessSpec,
    JoinRequest,
    RunFinished,
    RunSpec,
    Task,
)
from sottovoce.common.steplog import Step, as_float32, extend_chain, genesis_hash
from sottovoce.common.transport import wire
from sottovoce.common.transport.certs import init_ca, issue, tls_config
from sottovoce.common.transport.wire import WireError
from sottovoce.server.grpc_service import (
    SERVICE_NAME,
    CoordinatorServicer,
    RunningServer,
    serve,
    start_server,
)

FINGERPRINT = "sha256:" + "0f" * 32
GENESIS = genesis_hash(FINGERPRINT, ParametrizationSpec().canonical_id())
SPEC = RunSpec(
    run_id="run-1",
    algorithm="bboxer-1+1",
    model_fingerprint=FINGERPRINT,
    parametrization=ParametrizationSpec(),
    fitness=FitnessSpec(),
    batch=BatchSpec(),
    answer_kind=AnswerKind.COMPARE,
    bit_budget=10.0,
    max_rounds=3,
    log_genesis=GENESIS,
)
SCALE = as_float32(0.01)
FAST_RETRY = RetryPolicy(total_s=3.0, initial_backoff_s=0.01, max_backoff_s=0.05)


def scripted_tasks() -> list[Task]:
    """Three rounds; each ships the step the previous round accepted."""
    tasks: list[Task] = []
    head, steps = GENESIS, [Step(seed=11, coefficient=SCALE), Step(seed=12, coefficient=-SCALE)]
    kinds = [AnswerKind.COMPARE, AnswerKind.BEST_OF, AnswerKind.COMPARE]
    for round_index, kind in enumerate(kinds):
        new_steps = tuple(steps[round_index - 1 : round_index]) if round_index else ()
        head = extend_chain(head, max(0, round_index - 1), new_steps)
        n = 3 if kind is AnswerKind.BEST_OF else 1
        tasks.append(
            Task(
                task_id=f"run-1:r{round_index}",
                run_id="run-1",
                round_index=round_index,
                base_version=max(0, round_index - 1),
                new_steps=new_steps,
                log_head=head,
                candidates=tuple(
                    Candidate(seed=100 * round_index + i, scale=SCALE) for i in range(n)
                ),
                answer_kind=kind,
                batch=BatchSpec(),
                deadline_unix=time.time() + 60,
            )
        )
    return tasks


@dataclass
class FakeCoordinator:
    """Hands out scripted tasks in order, one at a time, then the end of the run."""

    tasks: list[Task] = field(default_factory=scripted_tasks)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    answers: dict[str, Answer] = field(default_factory=dict)
    raise_on_pull: Exception | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def join(self, request: JoinRequest) -> RunSpec:
        self.calls.append(("join", request.holder_id))
        if request.model_fingerprint != FINGERPRINT:
            raise PolicyViolation("JoinRequest.model_fingerprint: not the run's base model")
        return SPEC

    def pull_task(
        self, holder_id: str, have_version: int, have_head: str, timeout_s: float
    ) -> Task | RunFinished | None:
        self.calls.append(("pull", holder_id, have_version, timeout_s))
        if self.raise_on_pull is not None:
            raise self.raise_on_pull
        with self.lock:
            open_tasks = [t for t in self.tasks if t.task_id not in self.answers]
        if not self.tasks:
            time.sleep(timeout_s)  # a long-poll with nothing to hand out
            return None
        if not open_tasks:
            last = self.tasks[-1]
            version = last.target_version  # the fake holder applied every step it was sent
            return RunFinished("run-1", "rounds done", version, last.log_head, 3.0, version)
        return open_tasks[0]

    def push_answer(self, holder_id: str, answer: Answer) -> bool:
        self.calls.append(("push", holder_id, answer))
        with self.lock:
            if answer.task_id in self.answers:
                return False
            self.answers[answer.task_id] = answer
            return True

    def leave(self, holder_id: str) -> None:
        self.calls.append(("leave", holder_id))

    def kinds(self) -> list[str]:
        return [call[0] for call in self.calls]


@dataclass
class FakeHolder:
    """Answers deterministically (the candidate seed's parity) and follows the log."""

    holder_id: str = "holder-a"
    fingerprint: str = FINGERPRINT
    refuse_run: bool = False
    log_version: int = 0
    log_head: str = GENESIS
    answered: list[Task] = field(default_factory=list)
    finished: RunFinished | None = None
    on_answer: Any = None

    def join_request(self) -> JoinRequest:
        return JoinRequest(self.holder_id, self.fingerprint, {"max_bits": "10"})

    def accept_run(self, spec: RunSpec) -> None:
        if self.refuse_run:
            raise PolicyViolation("RunSpec.algorithm: bboxer-1+1 is not allowed by policy")

    def answer(self, task: Task) -> Answer:
        if task.base_version == self.log_version:  # not a re-sent task
            assert extend_chain(self.log_head, task.base_version, task.new_steps) == task.log_head
            self.log_version, self.log_head = task.target_version, task.log_head
        self.answered.append(task)
        if self.on_answer is not None:
            self.on_answer(task)
        if task.answer_kind is AnswerKind.COMPARE:
            return Answer(task.task_id, choice=task.candidates[0].seed % 2)
        return Answer(task.task_id, choice=1 + task.candidates[-1].seed % len(task.candidates))

    def finish(self, finished: RunFinished) -> None:
        self.finished = finished


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture
def coordinator() -> FakeCoordinator:
    return FakeCoordinator()


@pytest.fixture
def server(coordinator: FakeCoordinator) -> Iterator[RunningServer]:
    running = serve(coordinator, "127.0.0.1:0", max_workers=8)
    yield running
    running.stop(grace_s=0)


@pytest.fixture
def stub(server: RunningServer) -> Iterator[pb_grpc.CoordinatorStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.CoordinatorStub(channel)


def join(stub: pb_grpc.CoordinatorStub, holder_id: str = "holder-a") -> str:
    request = wire.join_request_to_proto(JoinRequest(holder_id, FINGERPRINT))
    return str(stub.Join(request, timeout=5).session)


def rpc_error(call: Any, request: Any, timeout: float = 5.0) -> tuple[grpc.StatusCode, str]:
    """The status code and detail of a call that must fail."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=timeout)
    return caught.value.code(), caught.value.details() or ""


def start_custom_server(servicer: pb_grpc.CoordinatorServicer) -> tuple[grpc.Server, str]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


# -- the full cycle ----------------------------------------------------------------------
def test_join_pull_push_finish_cycle(server: RunningServer, coordinator: FakeCoordinator) -> None:
    holder = FakeHolder()
    finished = run_holder(holder, server.address, poll_timeout_s=1.0, connect_timeout_s=5.0)

    head = coordinator.tasks[-1].log_head
    assert finished == RunFinished("run-1", "rounds done", 2, head, 3.0, base_version=2)
    assert holder.finished == finished
    assert [t.task_id for t in holder.answered] == ["run-1:r0", "run-1:r1", "run-1:r2"]
    assert holder.log_version == 2 and holder.log_head == coordinator.tasks[-1].log_head
    choices = {task_id: a.choice for task_id, a in coordinator.answers.items()}
    assert choices == {"run-1:r0": 0, "run-1:r1": 1 + 102 % 3, "run-1:r2": 200 % 2}
    assert coordinator.kinds() == ["join"] + ["pull", "push"] * 3 + ["pull", "leave"]
    pulls = [c for c in coordinator.calls if c[0] == "pull"]
    assert [c[2] for c in pulls] == [0, 0, 1, 2]  # the holder's log version as it grew
    assert [c[3] for c in pulls] == [pytest.approx(1.0)] * 4  # the wait the holder asked for


def test_holder_refusing_the_run_leaves_and_raises(
    server: RunningServer, coordinator: FakeCoordinator
) -> None:
    with pytest.raises(PolicyViolation, match="not allowed by policy"):
        run_holder(FakeHolder(refuse_run=True), server.address, connect_timeout_s=5.0)
    assert coordinator.kinds() == ["join", "leave"]


def test_coordinator_refusing_the_join_is_a_transport_error_with_its_detail(
    server: RunningServer, coordinator: FakeCoordinator
) -> None:
    holder = FakeHolder(fingerprint="sha256:" + "11" * 32)
    with pytest.raises(TransportError, match=r"FAILED_PRECONDITION: .*not the run's base model"):
        run_holder(holder, server.address, connect_timeout_s=5.0)
    assert coordinator.kinds() == ["join"]


def test_log_mismatch_is_failed_precondition(
    server: RunningServer, coordinator: FakeCoordinator, stub: pb_grpc.CoordinatorStub
) -> None:
    coordinator.raise_on_pull = LogIntegrityError("have_head is not the hash at version 0")
    session = join(stub)
    request = pb.PullTaskRequest(holder_id="holder-a", session=session, have_head=GENESIS)
    code, detail = rpc_error(stub.PullTask, request)
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert detail == "have_head is not the hash at version 0"


# -- idempotence -------------------------------------------------------------------------
def test_duplicate_push_is_harmless(
    stub: pb_grpc.CoordinatorStub, coordinator: FakeCoordinator
) -> None:
    session = join(stub)
    request = pb.PushAnswerRequest(
        holder_id="holder-a", session=session, answer=pb.Answer(task_id="run-1:r0", choice=1)
    )
    assert stub.PushAnswer(request, timeout=5).accepted is True
    assert stub.PushAnswer(request, timeout=5).accepted is False
    assert coordinator.kinds() == ["join", "push", "push"]
    assert coordinator.answers == {"run-1:r0": Answer("run-1:r0", choice=1)}


class LosesFirstPushReply(CoordinatorServicer):
    """The answer reaches the endpoint but the reply is lost: the holder must resend."""

    lost = False

    async def PushAnswer(self, request: pb.PushAnswerRequest, context: Any) -> pb.PushAnswerReply:  # noqa: N802
        reply = await super().PushAnswer(request, context)
        if not self.lost:
            self.lost = True
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (simulated)")
        return reply


def test_lost_push_reply_is_resent_and_the_duplicate_ignored(coordinator: FakeCoordinator) -> None:
    running = start_server(LosesFirstPushReply(coordinator), "127.0.0.1:0")
    try:
        holder = FakeHolder()
        finished = run_holder(holder, running.address, poll_timeout_s=1.0, retry=FAST_RETRY)
    finally:
        running.stop(grace_s=0)
    pushes = [c[2] for c in coordinator.calls if c[0] == "push"]
    assert [a.task_id for a in pushes] == ["run-1:r0", "run-1:r0", "run-1:r1", "run-1:r2"]
    assert pushes[0] == pushes[1]  # the same answer resent, not a fresh one
    assert len(holder.answered) == 3 and finished.reason == "rounds done"


def test_coordinator_that_lost_its_sessions_is_joined_again(coordinator: FakeCoordinator) -> None:
    servicer = CoordinatorServicer(coordinator)
    running = start_server(servicer, "127.0.0.1:0")
    holder = FakeHolder()
    holder.on_answer = lambda task: servicer._sessions.clear() if task.round_index == 1 else None
    try:
        finished = run_holder(holder, running.address, poll_timeout_s=1.0, retry=FAST_RETRY)
    finally:
        running.stop(grace_s=0)
    assert finished.reason == "rounds done"
    assert coordinator.kinds().count("join") == 2
    assert sorted(coordinator.answers) == ["run-1:r0", "run-1:r1", "run-1:r2"]


# -- bad requests change nothing ---------------------------------------------------------
def test_invalid_push_is_invalid_argument_and_reaches_no_endpoint(
    stub: pb_grpc.CoordinatorStub, coordinator: FakeCoordinator
) -> None:
    session = join(stub)
    request = pb.PushAnswerRequest(
        holder_id="holder-a", session=session, answer=pb.Answer(task_id="t" * 200, choice=1)
    )
    code, detail = rpc_error(stub.PushAnswer, request)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert detail == (
        "invalid PushAnswerRequest.answer.task_id: 200 chars, expected 1..64 chars of "
        "[A-Za-z0-9._:-]"
    )
    assert coordinator.kinds() == ["join"]


@pytest.mark.parametrize(
    ("request_", "field_name"),
    [
        (pb.JoinRequest(holder_id="h", model_fingerprint="sha256:xyz"), "model_fingerprint"),
        (pb.JoinRequest(holder_id="", model_fingerprint=FINGERPRINT), "holder_id"),
    ],
)
def test_invalid_join_changes_nothing(
    stub: pb_grpc.CoordinatorStub,
    coordinator: FakeCoordinator,
    request_: pb.JoinRequest,
    field_name: str,
) -> None:
    code, detail = rpc_error(stub.Join, request_)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert detail.startswith(f"invalid JoinRequest.{field_name}: ")
    assert coordinator.calls == []


def test_invalid_pull_changes_nothing(
    stub: pb_grpc.CoordinatorStub, coordinator: FakeCoordinator
) -> None:
    session = join(stub)
    request = pb.PullTaskRequest(holder_id="holder-a", session=session, have_head="not-a-hash")
    code, detail = rpc_error(stub.PullTask, request)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "PullTaskRequest.have_head" in detail
    assert coordinator.kinds() == ["join"]


def test_wrong_session_token_is_rejected(
    stub: pb_grpc.CoordinatorStub, coordinator: FakeCoordinator
) -> None:
    join(stub)
    forged = secrets.token_urlsafe(24)
    request = pb.PullTaskRequest(holder_id="holder-a", session=forged, have_head=GENESIS)
    code, detail = rpc_error(stub.PullTask, request)
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "session token of holder 'holder-a'" in detail
    push = pb.PushAnswerRequest(
        holder_id="holder-a", session=forged, answer=pb.Answer(task_id="run-1:r0", choice=1)
    )
    assert rpc_error(stub.PushAnswer, push)[0] is grpc.StatusCode.UNAUTHENTICATED
    leave = pb.LeaveRequest(holder_id="holder-a", session=forged)
    assert rpc_error(stub.Leave, leave)[0] is grpc.StatusCode.UNAUTHENTICATED
    assert coordinator.kinds() == ["join"]


def test_unknown_holder_is_not_found(
    stub: pb_grpc.CoordinatorStub, coordinator: FakeCoordinator
) -> None:
    session = join(stub, "holder-a")
    request = pb.PullTaskRequest(holder_id="holder-b", session=session, have_head=GENESIS)
    code, detail = rpc_error(stub.PullTask, request)
    assert code is grpc.StatusCode.NOT_FOUND
    assert "holder 'holder-b' has no session" in detail
    assert coordinator.kinds() == ["join"]


class SendsNanScale(pb_grpc.CoordinatorServicer):
    """A malicious coordinator: a well-formed Join, then a task no holder may act on."""

    def __init__(self) -> None:
        self.left = threading.Event()

    def Join(self, request: pb.JoinRequest, context: Any) -> pb.JoinReply:  # noqa: N802
        return wire.join_reply_to_proto(SPEC, secrets.token_urlsafe(24))

    def PullTask(self, request: pb.PullTaskRequest, context: Any) -> pb.PullTaskReply:  # noqa: N802
        task = wire.task_to_proto(scripted_tasks()[0])
        task.candidates[0].scale = math.nan
        return pb.PullTaskReply(task=task)

    def Leave(self, request: pb.LeaveRequest, context: Any) -> pb.LeaveReply:  # noqa: N802
        self.left.set()
        return pb.LeaveReply()


def test_holder_rejects_a_malformed_task_before_acting_on_it() -> None:
    servicer = SendsNanScale()
    server, address = start_custom_server(servicer)
    holder = FakeHolder()
    try:
        with pytest.raises(WireError, match=r"PullTaskReply\.task\.candidates\[0\]\.scale: nan"):
            run_holder(holder, address, poll_timeout_s=1.0)
    finally:
        server.stop(0)
    assert holder.answered == []
    assert servicer.left.is_set()


# -- reachability, health, long-poll, stop -------------------------------------------------
def test_unreachable_coordinator_fails_within_the_timeout() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        run_holder(FakeHolder(), f"127.0.0.1:{port}", connect_timeout_s=0.5)
    assert time.monotonic() - started < 3.0
    assert str(caught.value) == f"cannot reach coordinator at 127.0.0.1:{port} after 0.5 s"


def test_busy_port_is_a_clear_error(server: RunningServer) -> None:
    with pytest.raises(TransportError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        serve(FakeCoordinator(), f"127.0.0.1:{server.port}")


def test_health_check_serves(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE_NAME == "sottovoce.v1.Coordinator"


def test_long_poll_returns_nothing_after_the_wait() -> None:
    coordinator = FakeCoordinator(tasks=[])
    running = serve(coordinator, "127.0.0.1:0", max_workers=4)
    try:
        with grpc.insecure_channel(running.address) as channel:
            idle_stub = pb_grpc.CoordinatorStub(channel)
            session = join(idle_stub)
            request = pb.PullTaskRequest(
                holder_id="holder-a", session=session, have_head=GENESIS, wait_ms=300
            )
            started = time.monotonic()
            reply = idle_stub.PullTask(request, timeout=5)
            elapsed = time.monotonic() - started
            # A wait longer than the caller's deadline is cut to fit inside it.
            long_wait = replace_wait(request, 60_000)
            idle_stub.PullTask(long_wait, timeout=1.0)
    finally:
        running.stop(grace_s=0)
    assert reply.WhichOneof("reply") == "nothing"
    assert 0.3 <= elapsed < 2.0
    timeouts = [c[3] for c in coordinator.calls if c[0] == "pull"]
    assert timeouts[0] == pytest.approx(0.3)
    assert 0.3 < timeouts[1] < 0.6  # the 1 s deadline less the 0.5 s margin, not 60 s


def replace_wait(request: pb.PullTaskRequest, wait_ms: int) -> pb.PullTaskRequest:
    copy = pb.PullTaskRequest()
    copy.CopyFrom(request)
    copy.wait_ms = wait_ms
    return copy


def test_stop_event_leaves_promptly() -> None:
    coordinator = FakeCoordinator(tasks=[])
    running = serve(coordinator, "127.0.0.1:0", max_workers=4, max_poll_s=1.0)
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    started = time.monotonic()
    try:
        finished = run_holder(FakeHolder(), running.address, poll_timeout_s=10.0, stop=stop)
    finally:
        timer.cancel()
        running.stop(grace_s=0)
    assert time.monotonic() - started < 1.0  # sooner than the server's 1 s cap on a poll
    assert finished.reason == STOPPED_REASON
    assert coordinator.kinds()[-1] == "leave"


def test_refusal_is_pushed_as_is(server: RunningServer, coordinator: FakeCoordinator) -> None:
    refusing = FakeHolder()
    refusal = RefusalCode.POLICY
    refusing.answer = lambda task: Answer(task.task_id, choice=None, refusal=refusal)  # type: ignore[method-assign]
    run_holder(refusing, server.address, poll_timeout_s=1.0)
    assert {a.refusal for a in coordinator.answers.values()} == {refusal}


def test_an_answer_the_coordinator_refuses_does_not_end_the_holders_run(
    server: RunningServer, coordinator: FakeCoordinator
) -> None:
    """An answer that arrives after its round closed (or after the run ended) is refused
    with FAILED_PRECONDITION; the holder pulls again instead of giving up."""
    refused_once: list[str] = []
    push = coordinator.push_answer

    def push_answer(holder_id: str, answer: Answer) -> bool:
        if not refused_once:
            refused_once.append(answer.task_id)
            coordinator.answers[answer.task_id] = answer  # the round went on without it
            raise PolicyViolation(f"task {answer.task_id!r} is no longer open")
        return push(holder_id, answer)

    coordinator.push_answer = push_answer  # type: ignore[method-assign]
    holder = FakeHolder()
    finished = run_holder(holder, server.address, poll_timeout_s=1.0)
    assert finished.reason == "rounds done" and len(refused_once) == 1
    assert holder.finished == finished


# -- mutual TLS: the identity comes from the certificate ---------------------------------
def _federation_certs(folder: Path, *holders: str) -> Path:
    """A CA, a coordinator certificate for localhost/127.0.0.1 and holder certificates,
    made by the production code behind `sottovoce certs`."""
    init_ca(folder)
    issue(folder, "coordinator", server_hosts=("localhost", "127.0.0.1"))
    for holder in holders:
        issue(folder, holder)
    return folder


def test_mutual_tls_takes_the_holder_id_from_the_certificate(tmp_path: Path) -> None:
    certs = _federation_certs(tmp_path / "certs", "holder-a")
    server_tls = tls_config(certs, "coordinator")
    holder_tls = tls_config(certs, "holder-a")

    coordinator = FakeCoordinator()
    running = serve(coordinator, "127.0.0.1:0", tls=server_tls, max_workers=4)
    try:
        finished = run_holder(FakeHolder(), running.address, tls=holder_tls, poll_timeout_s=1.0)
        impostor = FakeHolder(holder_id="holder-b")  # holds holder-a's certificate
        with pytest.raises(TransportError, match=r"PERMISSION_DENIED: .*common name 'holder-a'"):
            run_holder(impostor, running.address, tls=holder_tls, poll_timeout_s=1.0)
        with pytest.raises(TransportError, match="cannot reach coordinator"):
            run_holder(FakeHolder(), running.address, connect_timeout_s=0.5)  # no TLS
        stranger = _federation_certs(tmp_path / "other", "holder-a")  # another CA
        with pytest.raises(TransportError, match="cannot reach coordinator"):
            run_holder(
                FakeHolder(),
                running.address,
                tls=tls_config(stranger, "holder-a"),
                connect_timeout_s=0.5,
            )
    finally:
        running.stop(grace_s=0)
    assert finished.reason == "rounds done"
    assert [c for c in coordinator.calls if c[0] == "join"] == [("join", "holder-a")]
