"""Nothing a holder sends crashes the coordinator: random requests against the real service.

Hypothesis feeds Join, PullTask, PushAnswer and Leave calls to the real servicer in front
of the real Coordinator over loopback gRPC: random bytes, and well-formed messages whose
fields are drawn from the values that matter (the real session and ones that are not,
the task id the holder was handed and ids it could compute but never pulled, choices and
values at and past their bounds, log versions past the log, NaN). Every reply must be a
reply or a status other than INTERNAL/UNKNOWN (an unhandled exception), the server logs no
error, and a refused call changes nothing: journal, bits, rounds, members and sessions.

``SOTTOVOCE_FUZZ_EXAMPLES`` sets the examples per run (default 200: about a second); a
long fuzz is the same test with a large number.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sottovoce.common.config import parse_config
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.proto import sottovoce_pb2_grpc as pb_grpc
from sottovoce.common.protocol.messages import JoinRequest
from sottovoce.common.transport import wire
from sottovoce.server.coordinator import Coordinator, task_id_for
from sottovoce.server.grpc_service import SERVICE_NAME, CoordinatorServicer, start_server
from sottovoce.server.limits import RateLimit, ServiceLimits
from sottovoce.server.run_state import JOURNAL, RunState

FINGERPRINT = "sha256:" + "f0" * 32
EXAMPLES = int(os.environ.get("SOTTOVOCE_FUZZ_EXAMPLES", "200"))
CRASHES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
HOLDER = "holder-a"
# Placeholders, resolved against the live run when a call is made.
REAL_SESSION, REAL_HEAD, DELIVERED, UNPULLED = "<session>", "<head>", "<delivered>", "<unpulled>"

ALGORITHMS: dict[str, dict[str, Any]] = {
    "best-of": {
        "run": {"algorithm": "bboxer-1+lambda"},
        "optimizer": {"candidates": 3},
        "evaluation": {"mode": "minibatch", "batch_size": 16},
    },
    "dpzero": {
        "run": {"algorithm": "dpzero"},
        "evaluation": {"mode": "poisson", "batch_size": 16},
        "privacy": {"epsilon": 2.0, "delta": 1e-5, "examples_per_holder": 64},
    },
}


def run_config(algorithm: str) -> Any:
    data: dict[str, Any] = {
        "run": {"name": "fuzz", "max_rounds": 100_000, "bit_budget": 1e9},
        "parametrization": {"kind": "scale"},
        "server": {"min_holders": 1, "quorum": 1, "round_timeout_s": 600.0},
    }
    for section, values in ALGORITHMS[algorithm].items():
        data[section] = {**data.get(section, {}), **values}
    return parse_config(data, "fuzz")


# -- what a holder may send ------------------------------------------------------------------
def mostly(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``usual`` about four times in five, so that calls get past the first check."""
    return st.integers(0, 4).flatmap(lambda pick: other if pick == 0 else usual)


texts = st.text(max_size=80)
uint32 = st.integers(0, 2**32 - 1)
uint64 = st.integers(0, 2**64 - 1)
holder_ids = mostly(st.just(HOLDER), st.sampled_from(["holder-b", ""]) | texts)
sessions = mostly(st.just(REAL_SESSION), st.just("A" * 32) | texts)
task_ids = mostly(st.sampled_from([DELIVERED, UNPULLED]), st.just("fuzz:r0:00000000") | texts)
heads = mostly(st.just(REAL_HEAD), st.just("0" * 64) | texts)
versions = mostly(st.integers(0, 3), uint64)


@st.composite
def answers(draw: st.DrawFn, task_ids: st.SearchStrategy[str] = task_ids) -> pb.Answer:
    answer = pb.Answer(task_id=draw(task_ids))
    outcome = draw(st.sampled_from(["choice", "value", "refusal", "none"]))
    if outcome == "choice":
        answer.choice = draw(mostly(st.integers(0, 4), uint32))
    elif outcome == "value":
        finite = st.floats(-2.0, 2.0, width=32)
        answer.value = draw(mostly(finite, st.floats(width=32, allow_nan=True)))
    elif outcome == "refusal":
        answer.refusal = draw(texts)
    return answer


def join_requests() -> st.SearchStrategy[pb.JoinRequest]:
    return st.builds(
        pb.JoinRequest,
        holder_id=holder_ids,
        model_fingerprint=st.sampled_from([FINGERPRINT, "sha256:" + "00" * 32]) | texts,
        policy_summary=st.dictionaries(texts, texts, max_size=3),
    )


CALLS: st.SearchStrategy[tuple[str, Message | bytes]] = st.one_of(
    st.tuples(st.sampled_from(["Join", "PullTask", "PushAnswer", "Leave"]), st.binary(max_size=96)),
    st.tuples(st.just("Join"), join_requests()),
    # What holder-a's own loop sends (see Service.resolve), so that rounds go on.
    st.tuples(st.just("PullTask"), st.just(pb.PullTaskRequest(holder_id=HOLDER))),
    st.tuples(
        st.just("PushAnswer"),
        st.builds(
            pb.PushAnswerRequest,
            holder_id=st.just(HOLDER),
            session=st.just(REAL_SESSION),
            answer=answers(st.just(DELIVERED)),
        ),
    ),
    st.tuples(
        st.just("PullTask"),
        st.builds(
            pb.PullTaskRequest,
            holder_id=holder_ids,
            session=sessions,
            have_version=versions,
            have_head=heads,
            wait_ms=st.just(0) | uint32,
        ),
    ),
    st.tuples(
        st.just("PushAnswer"),
        st.builds(pb.PushAnswerRequest, holder_id=holder_ids, session=sessions, answer=answers()),
    ),
    st.tuples(st.just("Leave"), st.builds(pb.LeaveRequest, holder_id=holder_ids, session=sessions)),
)


# -- the service under test ------------------------------------------------------------------
@dataclass
class Service:
    coordinator: Coordinator
    servicer: CoordinatorServicer
    channel: grpc.Channel

    def session(self) -> str:
        """holder-a's session, joining again if a fuzzed call made it leave."""
        current = self.servicer._sessions.get(HOLDER)
        if current is not None:
            return current
        stub = pb_grpc.CoordinatorStub(self.channel)
        reply = stub.Join(wire.join_request_to_proto(JoinRequest(HOLDER, FINGERPRINT)), timeout=5)
        return wire.join_reply_from_proto(reply)[1]

    def resolve(self, message: Message) -> Message:
        """The message with its placeholders replaced by the run's live values (a bare
        PullTaskRequest of holder-a becomes the one its loop would send now)."""
        state = self.coordinator.state
        delivered = state.last_delivered.get(HOLDER, 0)
        resolved = type(message)()
        resolved.CopyFrom(message)
        if isinstance(resolved, pb.PullTaskRequest) and not resolved.session:
            resolved.session, resolved.have_head = REAL_SESSION, REAL_HEAD
            resolved.have_version = state.log.version
        version = getattr(resolved, "have_version", 0)
        values = {
            REAL_SESSION: self.session(),
            REAL_HEAD: state.log.hash_at(version) if version <= state.log.version else "0" * 64,
            DELIVERED: task_id_for(state.run_id, delivered, HOLDER),
            UNPULLED: task_id_for(state.run_id, state.next_round + 1, HOLDER),
        }
        for holder in (resolved, getattr(resolved, "answer", None)):
            for name in ("session", "have_head", "task_id"):
                value = getattr(holder, name, None)
                if value in values:
                    setattr(holder, name, values[value])
        return resolved

    def snapshot(self) -> tuple[Any, ...]:
        state = self.coordinator.state
        journal = state.run_dir / JOURNAL
        return (
            journal.read_bytes() if journal.exists() else b"",
            state.bits_total,
            len(state.rounds),
            self.coordinator.active_holders,
            dict(self.servicer._sessions),
            frozenset(state.answered_task_ids),
        )

    def call(self, method: str, request: Message | bytes, timeout: float) -> None:
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        if method == "Session":  # one message on a stream of its own, and its reply
            stream: Callable[..., Any] = self.channel.stream_stream(f"/{SERVICE_NAME}/Session")
            assert len(list(stream(iter([payload]), timeout=timeout))) == 1
            return
        invoke: Callable[..., Any] = self.channel.unary_unary(f"/{SERVICE_NAME}/{method}")
        invoke(payload, timeout=timeout)


@pytest.fixture(params=list(ALGORITHMS))
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    config = run_config(request.param)
    coordinator = Coordinator(
        config, RunState.open(tmp_path / "run", config, "# fuzz\n", FINGERPRINT), FINGERPRINT
    )
    generous = RateLimit(per_s=1e6, burst=1_000_000)  # the limits are not what is fuzzed here
    limits = ServiceLimits(calls=generous, joins=generous, max_polls_per_holder=8, max_workers=8)
    servicer = CoordinatorServicer(coordinator, limits=limits, max_poll_s=0.0)
    running = start_server(servicer, "127.0.0.1:0")
    channel = grpc.insecure_channel(running.address)
    try:
        yield Service(coordinator, servicer, channel)
    finally:
        channel.close()
        running.stop(grace_s=0)


def test_no_request_crashes_the_coordinator_or_changes_it_when_refused(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(call=CALLS, streamed=st.booleans())
    def one_call(call: tuple[str, Message | bytes], streamed: bool) -> None:
        method, request = call
        if not isinstance(request, bytes):
            request = service.resolve(request)
        if streamed and isinstance(request, (pb.PullTaskRequest, pb.PushAnswerRequest)):
            method = "Session"  # the same call, as a message on a stream
            if isinstance(request, pb.PullTaskRequest):
                request = wire.session_request(pull=request)
            else:
                request = wire.session_request(push=request)
        elif streamed and isinstance(request, bytes):
            method = "Session"  # bytes that may or may not be a SessionRequest
        before = service.snapshot()
        try:
            service.call(method, request, timeout=10)
        except grpc.RpcError as error:
            assert error.code() not in CRASHES, (method, request, error.details())
            assert service.snapshot() == before, (method, request, error.details())

    one_call()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert service.coordinator.state.bits_total <= service.coordinator.config.run.bit_budget
