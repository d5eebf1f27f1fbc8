"""The data holder's side of the gRPC transport: dial out, join, then pull, answer, push.

Holders dial out (enclaves often allow outbound connections only) and drive everything:
the coordinator never calls them. PullTask and PushAnswer go as messages on one Session
stream (:class:`_SessionStream`), each a request and its reply in turn, because a message
costs the coordinator a small fraction of a call; a coordinator without Session is called
unary, the same exchanges one call each. The loop is resumable: every exchange has a deadline,
transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) are retried with
capped exponential backoff for a bounded total time, PushAnswer is idempotent by task id
so resending after a lost reply is safe, and a coordinator that restarted and forgot the
holder (NOT_FOUND) is joined again. Anything else is permanent: a
:class:`TransportError` carrying the coordinator's one-line status detail.

Every task is decoded and bounds-checked (:mod:`sottovoce.common.transport.wire`) before the holder
sees it, so a malformed task from a malicious coordinator raises :class:`WireError`
without touching data.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

from sottovoce.common.errors import TransportError
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.proto import sottovoce_pb2_grpc as pb_grpc
from sottovoce.common.protocol.messages import Answer, RunFinished, RunSpec, Task
from sottovoce.common.transport import wire
from sottovoce.common.transport.channel import CHANNEL_OPTIONS, TlsConfig
from sottovoce.common.transport.endpoints import HolderEndpoint
from sottovoce.common.transport.wire import Credentials, PullTaskCall, PushAnswerCall

logger = logging.getLogger(__name__)

STOPPED_REASON = "stopped by the holder before the run finished"
POLL_DEADLINE_MARGIN_S = 5.0  # a long-poll's deadline is its wait plus this
LEAVE_TIMEOUT_S = 2.0  # Leave is best effort; never hold a failing holder up for long
_STOP_CHECK_S = 0.05  # how often a blocked call looks at the stop event

TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

Request = TypeVar("Request")
Reply = TypeVar("Reply")


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff for transient errors, for at most ``total_s`` per call."""

    total_s: float = 60.0
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0


@dataclass
class WireTraffic:
    """Protocol bytes this holder sent and received (serialized messages, without TLS framing).

    Filled in by :func:`run_holder` for the holder's own cost report: what a deployment
    between organizations pays on the wire for a run. ``calls`` counts exchanges (a unary
    call, or a request and its reply on the Session stream).
    """

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class _StopRequestedError(Exception):
    """The caller's stop event was set; unwinds the loop to a clean Leave."""


class _NoSessionError(Exception):
    """The coordinator has no Session stream; the exchange is to be made unary."""


class _AnswerRefusedError(Exception):
    """The coordinator refused one answer (FAILED_PRECONDITION); the run may go on."""


def run_holder(
    holder: HolderEndpoint,
    address: str,
    *,
    tls: TlsConfig | None = None,
    poll_timeout_s: float = 20.0,
    connect_timeout_s: float = 10.0,
    stop: threading.Event | None = None,
    rpc_timeout_s: float = 10.0,
    retry: RetryPolicy | None = None,
    traffic: WireTraffic | None = None,
    streamed: bool = True,
) -> RunFinished:
    """Take part in the coordinator's run at ``address`` until it finishes; return its end.

    Raises PolicyViolation if the holder refuses the run (after telling the coordinator it
    leaves), TransportError if the coordinator cannot be reached or rejects a call, and
    WireError if it sends a malformed message. If ``stop`` is set, the holder leaves and a
    RunFinished with reason :data:`STOPPED_REASON` comes back (its ``bits_spent_total`` is
    0.0: the coordinator never said; the holder's own ledger knows what it released).
    ``traffic``, if given, counts the bytes of every call that got a reply. ``streamed``
    False makes every exchange a unary call (for a proxy on the way that does not pass
    bidirectional streams); the coordinator sees the same calls either way.
    """
    channel = _open_channel(address, tls)
    try:
        _wait_until_ready(channel, address, connect_timeout_s)
        session = _HolderSession(
            holder,
            pb_grpc.CoordinatorStub(channel),
            stop=stop or threading.Event(),
            poll_timeout_s=poll_timeout_s,
            rpc_timeout_s=rpc_timeout_s,
            retry=retry or RetryPolicy(),
            traffic=traffic if traffic is not None else WireTraffic(),
            streamed=streamed,
        )
        return session.run()
    finally:
        channel.close()


def _open_channel(address: str, tls: TlsConfig | None) -> grpc.Channel:
    options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    cert, key, ca = tls.read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    if tls.server_name is not None:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, credentials, options=options)


def _wait_until_ready(channel: grpc.Channel, address: str, timeout_s: float) -> None:
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError as exc:
        raise TransportError(
            f"cannot reach coordinator at {address} after {timeout_s:g} s"
        ) from exc


class _HolderSession:
    """One holder's conversation with the coordinator: its session token and its calls."""

    def __init__(
        self,
        holder: HolderEndpoint,
        stub: pb_grpc.CoordinatorStub,
        *,
        stop: threading.Event,
        poll_timeout_s: float,
        rpc_timeout_s: float,
        retry: RetryPolicy,
        traffic: WireTraffic,
        streamed: bool,
    ):
        self._holder = holder
        self._traffic = traffic
        self._stub = stub
        self._stop = stop
        self._poll_timeout_s = poll_timeout_s
        self._rpc_timeout_s = rpc_timeout_s
        self._retry = retry
        self._credentials: Credentials | None = None
        self._spec: RunSpec | None = None
        self._stream: _SessionStream | None = _SessionStream(stub, stop) if streamed else None

    def run(self) -> RunFinished:
        try:
            self._join()
            finished = self._loop()
            self._holder.finish(finished)
        except _StopRequestedError:
            self._leave()
            return self._stopped()
        except BaseException:
            self._leave()
            raise
        self._leave()
        return finished

    # -- the protocol --------------------------------------------------------------------
    def _join(self) -> None:
        """Join (again, after a coordinator restart) and check the run against the policy."""
        request = wire.join_request_to_proto(self._holder.join_request())
        reply = self._call("Join", lambda: self._invoke(self._stub.Join, request))
        spec, session = wire.join_reply_from_proto(reply)
        self._credentials = Credentials(holder_id=request.holder_id, session=session)
        self._spec = spec
        self._holder.accept_run(spec)  # PolicyViolation: run() leaves and re-raises
        logger.info("joined run %s as %s", spec.run_id, request.holder_id)

    def _loop(self) -> RunFinished:
        result = self._pull()
        while True:
            if self._stop.is_set():
                raise _StopRequestedError
            if isinstance(result, RunFinished):
                logger.info("run %s finished: %s", result.run_id, result.reason)
                return result
            if isinstance(result, Task):
                result = self._answer_then_pull(self._holder.answer(result))
            else:
                result = self._pull()

    def _pull(self) -> Task | RunFinished | None:
        def attempt() -> pb.PullTaskReply:
            request = self._pull_request()
            if self._stream is None:
                return self._invoke(self._stub.PullTask, request, self._poll_deadline_s())
            _, pulled = self._exchange(wire.session_request(pull=request))
            assert pulled is not None
            return pulled

        try:
            reply = self._call("PullTask", attempt, rejoin=True)
        except _NoSessionError:  # the coordinator has no Session: the same call, unary
            reply = self._call("PullTask", attempt, rejoin=True)
        return wire.pull_task_reply_from_proto(reply)

    def _answer_then_pull(self, answer: Answer) -> Task | RunFinished | None:
        """Push ``answer`` and wait for the next task: one message on the Session stream,
        or the two calls one after the other (no stream, or a coordinator without one)."""
        if self._stream is not None:
            try:
                return self._answer_then_pull_streamed(answer)
            except _AnswerRefusedError as refused:
                self._log_refused(answer, refused)
                return self._pull()
            except _NoSessionError:
                pass  # the stream is dropped: the same answer, unary
        self._push(answer)
        return self._pull()

    def _answer_then_pull_streamed(self, answer: Answer) -> Task | RunFinished | None:
        def attempt() -> tuple[pb.PushAnswerReply | None, pb.PullTaskReply | None]:
            message = wire.session_request(
                push=self._push_request(answer), pull=self._pull_request()
            )
            return self._exchange(message)

        pushed, pulled = self._call(
            "PushAnswer, then PullTask", attempt, rejoin=True, refused_ok=True
        )
        assert pushed is not None and pulled is not None
        if not pushed.accepted:
            logger.info("answer to task %s not used (duplicate or late)", answer.task_id)
        return wire.pull_task_reply_from_proto(pulled)

    def _push(self, answer: Answer) -> None:
        """PushAnswer as a unary call (a coordinator without Session)."""

        def attempt() -> pb.PushAnswerReply:
            return self._invoke(self._stub.PushAnswer, self._push_request(answer))

        try:
            reply = self._call("PushAnswer", attempt, rejoin=True, refused_ok=True)
        except _AnswerRefusedError as refused:
            self._log_refused(answer, refused)
            return
        if not reply.accepted:
            logger.info("answer to task %s not used (duplicate or late)", answer.task_id)

    @staticmethod
    def _log_refused(answer: Answer, refused: _AnswerRefusedError) -> None:
        # The coordinator did not take it (the run ended, or a newer task superseded it):
        # the answer is in the ledger either way; the next pull says what is next.
        logger.info("answer to task %s not taken: %s", answer.task_id, refused)

    def _pull_request(self) -> pb.PullTaskRequest:
        """PullTask from where the holder's log is now (it may have rejoined since)."""
        return wire.pull_task_request_to_proto(
            PullTaskCall(
                credentials=self._session(),
                have_version=self._holder.log_version,
                have_head=self._holder.log_head,
                wait_s=self._poll_timeout_s,
            )
        )

    def _push_request(self, answer: Answer) -> pb.PushAnswerRequest:
        call = PushAnswerCall(credentials=self._session(), answer=answer)
        return wire.push_answer_request_to_proto(call)

    def _poll_deadline_s(self) -> float:
        return self._poll_timeout_s + POLL_DEADLINE_MARGIN_S

    def _leave(self) -> None:
        """Tell the coordinator we go; best effort, since we may be leaving because it is gone."""
        if self._stream is not None:
            self._stream.close()
        if self._credentials is None:
            return
        request = wire.leave_request_to_proto(self._credentials)
        self._credentials = None
        try:
            self._stub.Leave(request, timeout=LEAVE_TIMEOUT_S)
        except grpc.RpcError as error:
            logger.warning("Leave failed (%s): %s", error.code().name, error.details())

    def _stopped(self) -> RunFinished:
        return RunFinished(
            run_id=self._spec.run_id if self._spec is not None else "unknown",
            reason=STOPPED_REASON,
            final_version=self._holder.log_version,
            log_head=self._holder.log_head,
            bits_spent_total=0.0,
        )

    def _session(self) -> Credentials:
        if self._credentials is None:
            raise TransportError("no session with the coordinator (Join has not succeeded)")
        return self._credentials

    # -- calls, deadlines and retries ----------------------------------------------------
    def _call(
        self,
        name: str,
        attempt: Callable[[], Reply],
        *,
        rejoin: bool = False,
        refused_ok: bool = False,
    ) -> Reply:
        """Run ``attempt`` until it succeeds, retrying transient failures within the budget.

        ``refused_ok``: FAILED_PRECONDITION (the coordinator refuses this one call, e.g. an
        answer after the run ended) raises :class:`_AnswerRefusedError` instead of ending
        the holder's part in the run.
        """
        give_up_at = time.monotonic() + self._retry.total_s
        backoff_s = self._retry.initial_backoff_s
        rejoined = False
        while True:
            try:
                return attempt()
            except grpc.RpcError as error:
                code, detail = error.code(), error.details()
            if rejoin and code is grpc.StatusCode.NOT_FOUND and not rejoined:
                logger.warning("coordinator lost our session (%s); joining again", detail)
                self._join()
                rejoined = True
                continue
            if code in TRANSIENT_CODES and time.monotonic() + backoff_s < give_up_at:
                logger.info("%s: %s (%s); retrying in %.2g s", name, code.name, detail, backoff_s)
                if self._stop.wait(backoff_s):
                    raise _StopRequestedError
                backoff_s = min(backoff_s * self._retry.multiplier, self._retry.max_backoff_s)
                continue
            if refused_ok and code is grpc.StatusCode.FAILED_PRECONDITION:
                raise _AnswerRefusedError(detail)
            raise TransportError(f"{name} failed with {code.name}: {detail}")

    def _invoke(
        self,
        method: grpc.UnaryUnaryMultiCallable[Request, Reply],
        request: Request,
        timeout_s: float | None = None,
    ) -> Reply:
        """One call with a deadline that gives up early (cancels) if the stop event is set."""
        future = method.future(request, timeout=timeout_s or self._rpc_timeout_s)
        while True:
            try:
                reply = future.result(timeout=_STOP_CHECK_S)
            except grpc.FutureTimeoutError:
                if self._stop.is_set():
                    future.cancel()
                    raise _StopRequestedError from None
                continue
            self._count(request, reply)
            return reply

    def _exchange(
        self, message: pb.SessionRequest
    ) -> tuple[pb.PushAnswerReply | None, pb.PullTaskReply | None]:
        """One exchange on the Session stream: (the push's reply, the pull's reply), each
        present exactly when ``message`` carried that call. Its deadline is a poll's when it
        waits for a task. A coordinator without Session (UNIMPLEMENTED: an older or a
        different server) raises :class:`_NoSessionError` and is called unary from then on."""
        assert self._stream is not None
        timeout_s = self._poll_deadline_s() if message.HasField("pull") else self._rpc_timeout_s
        try:
            reply = self._stream.exchange(message, timeout_s)
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise
            logger.info("the coordinator has no Session stream; calling it unary")
            self._stream.close()
            self._stream = None
            raise _NoSessionError from None
        self._count(message, reply)
        return wire.session_replies(reply, message)

    def _count(self, request: object, reply: object) -> None:
        """Add one completed call's serialized sizes to the holder's traffic."""
        self._traffic.calls += 1
        self._traffic.bytes_sent += _size(request)
        self._traffic.bytes_received += _size(reply)


def _size(message: object) -> int:
    byte_size = getattr(message, "ByteSize", None)
    return int(byte_size()) if callable(byte_size) else 0


class _SessionStream:
    """The holder's Session stream: requests go in one at a time, each reply comes back
    before the next request goes, as a unary call's would.

    The stream is opened at the first exchange and again after it ends (a refusal ends it
    with the call's status; a coordinator restart or a network fault breaks it). Its replies
    are read on a thread of their own, so that an exchange can give up at its deadline
    (DEADLINE_EXCEEDED, retried like a call's) or when the stop event is set, which a
    blocking read cannot. That thread reads one reply per request sent and no more: what a
    coordinator sends unasked stays in gRPC's flow-control window, never in our memory.
    """

    def __init__(self, stub: pb_grpc.CoordinatorStub, stop: threading.Event):
        self._stub = stub
        self._stop = stop
        self._open: _OpenStream | None = None

    def exchange(self, request: pb.SessionRequest, timeout_s: float) -> pb.SessionReply:
        """Send ``request`` and return its reply; a failure raises ``grpc.RpcError`` (with
        the stream's status) and closes the stream, so the next exchange opens a new one."""
        stream = self._open or self._start()
        stream.send(request)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                item = stream.replies.get(timeout=_STOP_CHECK_S)
            except queue.Empty:
                if self._stop.is_set():
                    self.close()
                    raise _StopRequestedError from None
                if time.monotonic() > deadline:
                    self.close()
                    raise _StreamError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no reply on the Session stream within {timeout_s:g} s",
                    ) from None
                continue
            if isinstance(item, pb.SessionReply):
                return item
            self.close()
            if isinstance(item, grpc.RpcError):
                raise item
            raise _StreamError(
                grpc.StatusCode.UNAVAILABLE, "the coordinator ended the Session stream"
            )

    def close(self) -> None:
        """End the stream (if open): no more requests, and the call is cancelled."""
        stream, self._open = self._open, None
        if stream is not None:
            stream.close()

    def _start(self) -> _OpenStream:
        self._open = _OpenStream(self._stub)
        return self._open


class _OpenStream:
    """One Session call: the requests waiting to go, the replies read, and the reader."""

    _END = object()

    def __init__(self, stub: pb_grpc.CoordinatorStub):
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.replies: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._wanted = threading.Semaphore(0)  # replies asked for and not read yet
        self._closed = threading.Event()
        self._call = stub.Session(self._outgoing())
        threading.Thread(target=self._read, name="sottovoce-session", daemon=True).start()

    def send(self, request: pb.SessionRequest) -> None:
        self._requests.put(request)
        self._wanted.release()

    def close(self) -> None:
        self._closed.set()
        self._requests.put(self._END)
        self._wanted.release()  # the reader wakes, sees the stream closed and stops
        self._call.cancel()

    def _outgoing(self) -> Iterator[pb.SessionRequest]:
        while True:
            item = self._requests.get()
            if item is self._END:
                return
            assert isinstance(item, pb.SessionRequest)
            yield item

    def _read(self) -> None:
        replies = iter(self._call)
        while True:
            self._wanted.acquire()
            if self._closed.is_set():
                return
            try:
                reply = next(replies)
            except StopIteration:
                self.replies.put(self._END)
                return
            except grpc.RpcError as error:
                self.replies.put(error)
                return
            self.replies.put(reply)


class _StreamError(grpc.RpcError):
    """A Session stream's failure seen on the holder's side (no reply by the deadline, or
    the stream ended without one), raised as a call's error would be."""

    def __init__(self, code: grpc.StatusCode, detail: str):
        super().__init__(detail)
        self._code = code
        self._detail = detail

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._detail
