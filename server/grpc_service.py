"""The coordinator's gRPC server: the ``sottovoce.v1.Coordinator`` service over an endpoint.

The servicer is a thin, careful shell around a :class:`CoordinatorEndpoint`: it decodes and
bounds-checks every request (:mod:`sottovoce.common.transport.wire`) and authenticates the holder
*before* the endpoint is called, so a malformed or unauthenticated request changes no
state. Errors become gRPC statuses whose detail is the one-line message:

=====================================  ======================
bad message (bytes that are not the    INVALID_ARGUMENT
request, or a WireError)
holder never joined, was evicted       NOT_FOUND (the holder
(NotJoined), or the coordinator        joins again)
restarted
wrong session token or certificate     UNAUTHENTICATED /
                                       PERMISSION_DENIED
RequestRefused, LogIntegrityError,     FAILED_PRECONDITION
other SottovoceError from the endpoint
(an answer to a task the holder was
not handed, or after the run ended)
over a per-holder limit (call rate,    RESOURCE_EXHAUSTED
Join rate, PullTasks waiting, calls    (the holder retries)
refused before)
=====================================  ======================

Every refusal counts against its caller (see :mod:`sottovoce.server.limits`), and an
evicted holder's session ends when the coordinator evicts it.

Identity: without TLS (loopback, tests) the holder id is the one claimed in Join; with
mutual TLS it must equal the client certificate's common name (:func:`peer_identity`).
Every call after Join also carries the random session token that Join returned. No
method of this service answers without that identity: Join needs the certificate (under
mutual TLS), the others the session too; only the standard health service takes no
session (and under mutual TLS it, too, needs a client certificate to connect).

Limits (:mod:`sottovoce.server.limits`): once a holder is authenticated, its PullTask,
PushAnswer and Leave calls that bring the run nothing new (a task or answer sent again, an
empty poll, a rejected call) are rate limited; Join is limited per peer identity; and a
holder's waiting PullTasks are capped, so one holder cannot take the coordinator's lock
or threads from the others; and every refused call of any kind is counted per caller
(certificate, else connection) before its bytes are parsed. A refused call reaches no
endpoint. :func:`serve` reads the
limits from the endpoint's run config (the Coordinator's ``[server]`` section) unless
given them.

The Session stream: a holder may send its PullTask and PushAnswer calls as messages on one
bidirectional stream (:meth:`CoordinatorServicer.handle_session`), an answer and the next
pull in one message, because a message costs a fraction of a call. Each message is served
exactly as the calls it carries, in order, through the same checks, limits, statuses and
journal waits; a refused call ends the stream with its status. A holder keeps at most
``max_polls_per_holder`` streams open.

Serving (``grpc.aio``): one event loop, in a thread of its own, serves every call, so a
waiting long-poll costs a coroutine and a few hundred bytes, not a thread. For the real
:class:`~sottovoce.server.coordinator.Coordinator` the loop calls it directly (its calls
take its lock briefly and write journal lines without waiting for the disk): a PullTask
with nothing to hand out registers a wake-up (``Coordinator.watch``) and awaits it, and a
reply leaves only after ``Coordinator.on_durable`` says the journal is on disk up to the
records it rests on (group commit: one fsync, on the journal's own thread, for every reply
waiting meanwhile). A periodic tick closes rounds at their deadline. Any other endpoint
(a test's fake, a wrapper) may block, so its calls run on a thread pool of
``limits.max_workers`` threads, as the threaded server did.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import _async as health_aio  # what health.aio names, seen by mypy
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sottovoce.common.config import RunConfig
from sottovoce.common.errors import NotJoined, SottovoceError, TransportError
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.protocol.messages import RunFinished, Task
from sottovoce.common.transport import wire
from sottovoce.common.transport.channel import CHANNEL_OPTIONS, TlsConfig
from sottovoce.common.transport.endpoints import CoordinatorEndpoint
from sottovoce.common.transport.wire import Credentials, WireError
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.limits import (
    Clock,
    ConcurrencyCap,
    Deliveries,
    KeyedRateLimiter,
    ServiceLimits,
)

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name  # sottovoce.v1.Coordinator
MAX_POLL_S = 30.0  # the longest a PullTask is held, whatever the holder asks
DEADLINE_MARGIN_S = 0.5  # reply this long before the caller's deadline
TICK_S = 0.25  # how often the served Coordinator's round deadlines are checked
START_TIMEOUT_S = 30.0
MAX_CALLS_IN_FLIGHT = 65_536  # the served Coordinator's cap on calls at once (all holders)

R = TypeVar("R")
M = TypeVar("M")
Context = grpc.aio.ServicerContext[Any, Any]


class ServiceObserver(Protocol):
    """What the service tells a metrics collector (:mod:`sottovoce.server.metrics`)."""

    def rejected(self, code: grpc.StatusCode) -> None:
        """A call was refused with ``code`` (RESOURCE_EXHAUSTED: a limit)."""

    def served(self, method: str, seconds: float) -> None:
        """A call of ``method`` was answered (successfully) after ``seconds``."""


def peer_identity(context: Context, claimed_id: str, *, require_certificate: bool = False) -> str:
    """Who the peer is: its certificate's common name under mutual TLS, else ``claimed_id``.

    Over an insecure channel nothing better than the claim exists, which is why insecure
    transport is meant for loopback and tests only.
    """
    name = _certificate_name(context)
    if name is not None:
        return name
    if require_certificate:
        raise SottovoceError("the peer presented no client certificate with a common name")
    return claimed_id


class _Rejected(Exception):
    """A call refused with ``code``; the servicer counts it against the caller."""

    def __init__(self, code: grpc.StatusCode, detail: str, *, callers_fault: bool = True):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.callers_fault = callers_fault


class CoordinatorServicer:
    """Implements the Coordinator service (``grpc.aio``) by calling a :class:`CoordinatorEndpoint`.

    Register it with :func:`add_to_server` (``serve`` and :func:`start_server` do), so that it
    parses the request bytes itself: grpc's own parsing answers bytes that are no message
    with INTERNAL and a traceback in the log, before any limit could count them. Its
    methods are coroutines and run on the server's event loop.
    """

    def __init__(
        self,
        endpoint: CoordinatorEndpoint,
        *,
        require_certificate: bool = False,
        max_poll_s: float = MAX_POLL_S,
        limits: ServiceLimits | None = None,
        clock: Clock = time.monotonic,
        observer: ServiceObserver | None = None,
    ):
        self._endpoint = endpoint
        # The real coordinator is called on the loop; anything else may block: a pool.
        self._coordinator = endpoint if isinstance(endpoint, Coordinator) else None
        self._require_certificate = require_certificate
        self._max_poll_s = max_poll_s
        self._sessions: dict[str, str] = {}
        self._lock = threading.Lock()
        limits = limits or ServiceLimits.defaults()
        self.limits = limits
        self._calls = KeyedRateLimiter(limits.calls, clock=clock)
        self._joins = KeyedRateLimiter(limits.joins, clock=clock)
        self._rejected = KeyedRateLimiter(limits.calls, clock=clock)
        self._polls = ConcurrencyCap(limits.max_polls_per_holder)
        self._streams = ConcurrencyCap(limits.max_polls_per_holder)
        self._deliveries = Deliveries()
        self._task_replies = wire.TaskReplies()
        self._observer = observer
        self._executor: ThreadPoolExecutor | None = None
        self._durable_waits: _DurableWaits | None = None
        watch_evictions = getattr(endpoint, "add_eviction_listener", None)
        if callable(watch_evictions):  # the Coordinator: an evicted holder's session ends
            watch_evictions(self._end_session)

    @property
    def coordinator(self) -> Coordinator | None:
        """The real coordinator this service drives on its loop (None for other endpoints)."""
        return self._coordinator

    def close(self) -> None:
        """Stop the thread pool of a blocking endpoint (if one was started)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the four calls ------------------------------------------------------------------
    async def Join(self, request: pb.JoinRequest, context: Context) -> pb.JoinReply:  # noqa: N802
        return await self._serve(context, self._join, request)

    async def PullTask(self, request: pb.PullTaskRequest, context: Context) -> pb.PullTaskReply:  # noqa: N802
        return await self._serve(context, self._pull_task, request)

    async def PushAnswer(  # noqa: N802
        self, request: pb.PushAnswerRequest, context: Context
    ) -> pb.PushAnswerReply:
        return await self._serve(context, self._push_answer, request)

    async def Leave(self, request: pb.LeaveRequest, context: Context) -> pb.LeaveReply:  # noqa: N802
        return await self._serve(context, self._leave, request)

    async def handle_bytes(self, method: str, data: bytes, context: Context) -> Message:
        """Parse ``data`` as ``method``'s request (INVALID_ARGUMENT, counted, if it is not
        one), then serve it as that method. What :func:`add_to_server` registers."""
        started = time.perf_counter()
        message = await self._serve(context, _PARSERS[method], data)
        return await self._serve_call(method, message, context, started)

    async def handle_session(
        self, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[pb.SessionReply]:
        """Serve a Session stream: each message carries a PushAnswer, a PullTask, or both
        (served in that order), each served exactly as that call (the same checks, limits
        and journal waits) and answered before the next message is read. A refusal ends the
        stream with the status the call would have had. A holder has at most
        ``max_polls_per_holder`` streams open (a stream waits in at most one poll at a time)."""
        async with self._stream_slot(context):
            async for data in requests:
                started = time.perf_counter()
                calls = await self._serve(context, _parse_session, data)
                replies = []
                for index, (method, request) in enumerate(calls):
                    # A call followed by another in the message (a push, then its pull) does
                    # not wait for the disk itself: the last call's wait, for everything
                    # journaled up to then, comes before the one reply that carries both.
                    waits_later = _REPLY_WAITS_LATER.set(index < len(calls) - 1)
                    try:
                        replies.append(
                            (method, await self._serve_call(method, request, context, started))
                        )
                    finally:
                        _REPLY_WAITS_LATER.reset(waits_later)
                yield wire.session_reply(replies)

    async def _serve_call(
        self, method: str, message: Message, context: Context, started: float
    ) -> Message:
        handler: Callable[[Message, Context], Awaitable[Message]] = getattr(self, method)
        reply = await handler(message, context)
        if self._observer is not None:
            self._observer.served(method, time.perf_counter() - started)
        return reply

    # -- what each call does, once admitted -----------------------------------------------
    async def _join(self, request: pb.JoinRequest, context: Context) -> pb.JoinReply:
        join = _decode(wire.join_request_from_proto, request)
        identity = self._peer(context, join.holder_id)
        self._admit(self._joins, identity, "Join calls from")
        self._check_claim(identity, join.holder_id)
        coordinator = self._coordinator
        if coordinator is not None:
            spec = await self._inline(
                None, functools.partial(coordinator.join, join, durable=False)
            )
        else:
            spec = await self._blocking(None, functools.partial(self._endpoint.join, join))
        session = secrets.token_urlsafe(24)
        reply = _encode(wire.join_reply_to_proto, spec, session)
        with self._lock:
            self._sessions[join.holder_id] = session  # a new Join replaces an older session
        logger.info("holder %s joined run %s", join.holder_id, spec.run_id)
        return reply

    async def _pull_task(self, request: pb.PullTaskRequest, context: Context) -> pb.PullTaskReply:
        call = _decode(wire.pull_task_request_from_proto, request)
        holder_id = self._authenticate(context, call.credentials)
        self._admit(self._calls, holder_id, "calls of holder")
        timeout_s = self._poll_timeout(call.wait_s, context)
        async with self._poll_slot(holder_id):
            coordinator = self._coordinator
            if coordinator is not None:
                result = await self._inline_wait(
                    holder_id,
                    functools.partial(
                        self._wait_for_task,
                        coordinator,
                        holder_id,
                        call.have_version,
                        call.have_head,
                        timeout_s,
                    ),
                )
            else:
                result = await self._blocking(
                    holder_id,
                    functools.partial(
                        self._endpoint.pull_task,
                        holder_id,
                        call.have_version,
                        call.have_head,
                        timeout_s,
                    ),
                )
        reply = _encode(self._task_replies.encode, result)
        self._credit_delivery(holder_id, result)
        return reply

    async def _push_answer(
        self, request: pb.PushAnswerRequest, context: Context
    ) -> pb.PushAnswerReply:
        call = _decode(wire.push_answer_request_from_proto, request)
        holder_id = self._authenticate(context, call.credentials)
        self._admit(self._calls, holder_id, "calls of holder")
        coordinator = self._coordinator
        if coordinator is not None:
            push = functools.partial(coordinator.push_answer, holder_id, call.answer, durable=False)
            accepted = await self._inline(holder_id, push)
        else:
            accepted = await self._blocking(
                holder_id, functools.partial(self._endpoint.push_answer, holder_id, call.answer)
            )
        if accepted:
            self._calls.refund(holder_id)  # a new answer is progress; a re-sent one counts
        return pb.PushAnswerReply(accepted=bool(accepted))

    async def _leave(self, request: pb.LeaveRequest, context: Context) -> pb.LeaveReply:
        credentials = _decode(wire.leave_request_from_proto, request)
        holder_id = self._authenticate(context, credentials)
        self._admit(self._calls, holder_id, "calls of holder")
        coordinator = self._coordinator
        if coordinator is not None:
            await self._inline(
                holder_id, functools.partial(coordinator.leave, holder_id, durable=False)
            )
        else:
            await self._blocking(holder_id, functools.partial(self._endpoint.leave, holder_id))
        self._end_session(holder_id)
        logger.info("holder %s left", holder_id)
        return pb.LeaveReply()

    # -- driving the endpoint --------------------------------------------------------------
    async def _wait_for_task(
        self,
        coordinator: Coordinator,
        holder_id: str,
        have_version: int,
        have_head: str,
        timeout_s: float,
    ) -> Task | RunFinished | None:
        """The long-poll as a coroutine: poll, and until ``timeout_s`` passes, await the
        coordinator's wake-up for this holder (its task, the run's end, its eviction) and
        poll again. Watching starts before the first poll, so no wake-up is missed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        waker = _Waker(loop)
        unwatch = coordinator.watch(holder_id, waker.wake)
        try:
            while True:
                result = coordinator.poll_task(holder_id, have_version, have_head)
                remaining = deadline - loop.time()
                if result is not None or remaining <= 0:
                    return result
                await waker.wait(remaining)
        finally:
            unwatch()

    async def _inline(self, holder_id: str | None, call: Callable[[], R]) -> R:
        """Call the coordinator on the loop, then wait (without blocking the loop) until the
        journal is durable up to what the call wrote, so the reply never outruns the disk."""
        with self._endpoint_errors(holder_id):
            result = call()
            await self._durable()
        return result

    async def _inline_wait(self, holder_id: str | None, call: Callable[[], Awaitable[R]]) -> R:
        """:meth:`_inline` for a call that awaits (the long-poll)."""
        with self._endpoint_errors(holder_id):
            result = await call()
            await self._durable()
        return result

    async def _durable(self) -> None:
        coordinator = self._coordinator
        assert coordinator is not None
        if _REPLY_WAITS_LATER.get():
            return  # the reply leaves after a later call's wait (see handle_session)
        if self._durable_waits is None:
            self._durable_waits = _DurableWaits(coordinator)
        await self._durable_waits.wait()
        if coordinator.state.journal.failed:
            coordinator.state.journal.check()  # a failed fsync is no reply: this raises

    async def _blocking(self, holder_id: str | None, call: Callable[[], R]) -> R:
        """Call an endpoint that may block, on a thread of the pool."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.limits.max_workers, thread_name_prefix="sottovoce-rpc"
            )
        with self._endpoint_errors(holder_id):
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    @contextmanager
    def _endpoint_errors(self, holder_id: str | None) -> Iterator[None]:
        """Turn the errors an endpoint may raise for ``holder_id`` (None before it has
        joined) into statuses."""
        try:
            yield
        except WireError as exc:
            raise _Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except NotJoined as exc:  # left, or evicted: its session is over; it may join again
            if holder_id is not None:
                self._end_session(holder_id)
            raise _Rejected(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        except SottovoceError as exc:
            raise _Rejected(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None

    # -- helpers -------------------------------------------------------------------------
    async def _serve(
        self, context: Context, handler: Callable[[M, Context], Awaitable[R]], request: M
    ) -> R:
        """Run ``handler`` for the caller, unless its rejected calls are over their limit;
        a refusal takes one of its tokens and becomes the call's status."""
        caller = _caller(context)
        if not self._rejected.allows(caller):
            await self._abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit: rejected calls from {caller!r} over "
                f"{self._rejected.limit.describe()}; retry later",
            )
        try:
            return await handler(request, context)
        except _Rejected as rejected:
            if rejected.callers_fault:
                self._rejected.try_acquire(caller)
            await self._abort(context, rejected.code, rejected.detail)

    async def _abort(self, context: Context, code: grpc.StatusCode, detail: str) -> NoReturn:
        if self._observer is not None:
            self._observer.rejected(code)
        logger.info("rejected %s: %s", code.name, detail)
        await context.abort(code, detail)
        raise AssertionError("context.abort returned")  # pragma: no cover - abort raises

    def _end_session(self, holder_id: str) -> None:
        """Forget a holder's session (it left, or the coordinator evicted it)."""
        with self._lock:
            self._sessions.pop(holder_id, None)
        self._deliveries.forget(holder_id)

    def _peer(self, context: Context, claimed_id: str) -> str:
        """The peer's identity (see :func:`peer_identity`); UNAUTHENTICATED without one."""
        try:
            return peer_identity(context, claimed_id, require_certificate=self._require_certificate)
        except SottovoceError as exc:
            raise _Rejected(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None

    def _check_claim(self, identity: str, claimed_id: str) -> None:
        if identity != claimed_id:
            raise _Rejected(
                grpc.StatusCode.PERMISSION_DENIED,
                f"holder_id {claimed_id!r} is not the certificate's common name {identity!r}",
            )

    def _admit(self, limiter: KeyedRateLimiter, key: str, what: str) -> None:
        """Take a token for the call, or refuse it before it reaches the endpoint."""
        if not limiter.try_acquire(key):
            raise _Rejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit: {what} {key!r} over {limiter.limit.describe()}; retry later",
            )

    def _credit_delivery(self, holder_id: str, result: Task | RunFinished | None) -> None:
        """A task (or the end of the run) the holder has not had yet is progress: give the
        call's token back. A re-sent task and an empty poll keep it."""
        if isinstance(result, Task):
            item = result.task_id
        elif isinstance(result, RunFinished):
            item = f"finished:{result.run_id}"
        else:
            return
        if self._deliveries.first(holder_id, item):
            self._calls.refund(holder_id)

    @asynccontextmanager
    async def _poll_slot(self, holder_id: str) -> AsyncIterator[None]:
        """One of the holder's few waiting-PullTask slots for the block, or RESOURCE_EXHAUSTED."""
        if not self._polls.try_acquire(holder_id):
            raise _Rejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit: holder {holder_id!r} already has {self._polls.limit} PullTask "
                "calls waiting; retry when one returns",
            )
        try:
            yield
        finally:
            self._polls.release(holder_id)

    @asynccontextmanager
    async def _stream_slot(self, context: Context) -> AsyncIterator[None]:
        """One of the caller's few Session streams for the block, or RESOURCE_EXHAUSTED
        (counted against the caller, as any refusal). Keyed by the certificate under mutual
        TLS, else by the connection, because a stream names no holder until its first
        message."""
        caller = _caller(context)

        async def admit(_: None, __: Context) -> None:
            if not self._streams.try_acquire(caller):
                raise _Rejected(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"rate limit: {caller!r} already has {self._streams.limit} Session streams "
                    "open; close one first",
                )

        await self._serve(context, admit, None)
        try:
            yield
        finally:
            self._streams.release(caller)

    def _authenticate(self, context: Context, credentials: Credentials) -> str:
        """The caller's holder id, once its identity and session token check out."""
        holder_id = credentials.holder_id
        self._check_claim(self._peer(context, holder_id), holder_id)
        with self._lock:
            expected = self._sessions.get(holder_id)
        if expected is None:
            raise _Rejected(
                grpc.StatusCode.NOT_FOUND,
                f"holder {holder_id!r} has no session (never joined, was evicted, or the "
                "coordinator restarted): call Join",
            )
        if not secrets.compare_digest(expected, credentials.session):
            raise _Rejected(
                grpc.StatusCode.UNAUTHENTICATED,
                f"session token of holder {holder_id!r} is not the one its Join returned",
            )
        return holder_id

    def _poll_timeout(self, wanted_s: float, context: Context) -> float:
        """How long the endpoint may block: what the holder asked, within its deadline and cap."""
        limit = self._max_poll_s
        remaining = context.time_remaining()
        if remaining is not None:
            limit = min(limit, remaining - DEADLINE_MARGIN_S)
        return max(0.0, min(wanted_s, limit))


class _Waker:
    """A waiting poll's wake-up: ``wake`` may be called from any thread (the coordinator
    calls it with its lock held), ``wait`` awaits the next one or a timeout on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop, in its thread
        self._future: asyncio.Future[None] | None = None
        self._pending = False

    def wake(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self._set()
        else:
            self._loop.call_soon_threadsafe(self._set)

    def _set(self) -> None:
        self._pending = True
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Until a wake-up (one that came since the last wait counts) or ``timeout_s``."""
        if self._pending:
            self._pending = False
            return
        future = self._loop.create_future()
        self._future = future
        timer = self._loop.call_later(timeout_s, _resolve, future)
        try:
            await future
        finally:
            timer.cancel()
            self._future = None
            self._pending = False


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _DurableWaits:
    """Replies waiting for the journal's fsync, woken together: the journal's thread wakes
    the loop once per fsync, not once per reply."""

    def __init__(self, coordinator: Coordinator):
        self._journal = coordinator.state.journal
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []
        self._registered = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def wait(self) -> None:
        """Until the journal is on disk up to every record written so far (at once if it
        is): the fsync runs on the journal's thread, never on the loop."""
        journal = self._journal
        target = journal.written
        if journal.durable >= target:
            return
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append((target, future))
        if not self._registered:
            self._register(target)
        await future

    def _register(self, seq: int) -> None:
        loop = self._loop
        assert loop is not None
        self._registered = True

        def durable() -> None:  # on the journal's thread: hand it to the loop
            loop.call_soon_threadsafe(self._ready)

        self._journal.when_durable(seq, durable)

    def _ready(self) -> None:
        self._registered = False
        durable = self._journal.durable
        later: list[tuple[int, asyncio.Future[None]]] = []
        for seq, future in self._waiting:
            if seq <= durable or self._journal.failed:
                _resolve(future)
            else:
                later.append((seq, future))
        self._waiting = later
        if later:
            self._register(max(seq for seq, _ in later))


_REQUEST_TYPES: dict[str, type[Message]] = {
    "Join": pb.JoinRequest,
    "PullTask": pb.PullTaskRequest,
    "PushAnswer": pb.PushAnswerRequest,
    "Leave": pb.LeaveRequest,
}
_REPLY_TYPES: dict[str, type[Message]] = {
    "Join": pb.JoinReply,
    "PullTask": pb.PullTaskReply,
    "PushAnswer": pb.PushAnswerReply,
    "Leave": pb.LeaveReply,
}


def add_to_server(servicer: CoordinatorServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` as the Coordinator service on a ``grpc.aio`` server; it receives
    the raw request bytes (see :meth:`CoordinatorServicer.handle_bytes`). Replaces the
    generated ``add_CoordinatorServicer_to_server``, which lets grpc parse them."""

    def handler(method: str) -> grpc.RpcMethodHandler[Any, Any]:
        async def serve_bytes(data: bytes, context: Context) -> Message:
            return await servicer.handle_bytes(method, data, context)

        return grpc.unary_unary_rpc_method_handler(
            serve_bytes,  # grpc.aio takes coroutine behaviours
            request_deserializer=None,  # the bytes as they came
            response_serializer=_REPLY_TYPES[method].SerializeToString,
        )

    handlers = {method: handler(method) for method in _REQUEST_TYPES}
    handlers["Session"] = grpc.stream_stream_rpc_method_handler(
        servicer.handle_session,  # an async generator: grpc.aio streams what it yields
        request_deserializer=None,
        response_serializer=pb.SessionReply.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


_REPLY_WAITS_LATER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sottovoce_reply_waits_later", default=False
)
"""Set while a Session message's earlier call is served: its reply leaves with a later
call's, after that call's wait for the journal, which covers every record written so far."""

_CALL_IDENTITY: contextvars.ContextVar[tuple[object, str | None]] = contextvars.ContextVar(
    "sottovoce_call_identity"
)


def _certificate_name(context: Context) -> str | None:
    """The client certificate's common name, or None. ``auth_context()`` builds a new dict
    on every call, so the name is kept for the rest of the call (grpc.aio runs each call
    in its own task, hence its own context variables)."""
    cached = _CALL_IDENTITY.get(None)
    if cached is not None and cached[0] is context:
        return cached[1]
    # At run time the value is a list of bytes (grpc-stubs says bytes).
    names: object = context.auth_context().get("x509_common_name")
    name = None
    if isinstance(names, list) and names and isinstance(names[0], bytes):
        name = names[0].decode("utf-8", errors="replace")
    _CALL_IDENTITY.set((context, name))
    return name


def _caller(context: Context) -> str:
    """Who is calling, known before its request is read: the certificate's common name
    under mutual TLS, else the peer's address (one connection)."""
    return _certificate_name(context) or context.peer()


def _parser(request_type: type[Message]) -> Callable[[bytes, Context], Awaitable[Message]]:
    """A handler that parses the bytes as ``request_type`` (INVALID_ARGUMENT if they are not
    one), for :meth:`CoordinatorServicer._serve` to run and count."""

    async def parse(data: bytes, _: Context) -> Message:
        try:
            return request_type.FromString(data)
        except DecodeError:
            raise _Rejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid {request_type.DESCRIPTOR.name}: the bytes are not that message",
            ) from None

    return parse


_PARSERS = {method: _parser(request_type) for method, request_type in _REQUEST_TYPES.items()}
_PARSE_SESSION_REQUEST = _parser(pb.SessionRequest)


async def _parse_session(data: bytes, context: Context) -> list[tuple[str, Message]]:
    """The calls a Session message's bytes carry (INVALID_ARGUMENT if they are not a
    SessionRequest, or one that carries no call)."""
    message = await _PARSE_SESSION_REQUEST(data, context)
    assert isinstance(message, pb.SessionRequest)
    return _decode(wire.session_calls, message)


def _decode(decode: Callable[[M], R], message: M) -> R:
    """Decode a request; a bound violated is the caller's fault (INVALID_ARGUMENT)."""
    try:
        return decode(message)
    except WireError as exc:
        raise _Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


def _encode(encode: Callable[..., R], *args: Any) -> R:
    """Encode a reply; a bound violated here is a coordinator bug, never sent on."""
    try:
        return encode(*args)
    except WireError as exc:
        logger.error("coordinator produced an invalid reply: %s", exc)
        raise _Rejected(
            grpc.StatusCode.INTERNAL,
            f"coordinator produced an invalid reply: {exc}",
            callers_fault=False,
        ) from None


# -- running a server --------------------------------------------------------------------
@dataclass
class RunningServer:
    """A started coordinator server on its own event loop thread; ``port`` is the one bound.

    Its methods are called from ordinary threads (the CLI, tests); they hand the work to
    the loop and wait for it.
    """

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    host: str
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    servicer: CoordinatorServicer
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace_s: float = 1.0) -> None:
        """Report NOT_SERVING, then stop; in-flight calls get ``grace_s`` to finish."""
        if self._stopped.is_set():
            return
        try:
            stopping = asyncio.run_coroutine_threadsafe(self._stop(grace_s), self.loop)
            stopping.result(timeout=grace_s + 30.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30.0)
            if not self.thread.is_alive():
                self.loop.close()
            self.servicer.close()
            self._stopped.set()

    async def _stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        """Block until the server stops; True if it did within ``timeout_s``."""
        return self._stopped.wait(timeout_s)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(
    endpoint: CoordinatorEndpoint,
    address: str,
    *,
    tls: TlsConfig | None = None,
    limits: ServiceLimits | None = None,
    max_workers: int | None = None,
    max_poll_s: float = MAX_POLL_S,
    observer: ServiceObserver | None = None,
) -> RunningServer:
    """Start the Coordinator service (and health checking) on ``address``.

    ``"127.0.0.1:0"`` picks a free port (see ``RunningServer.port``). With ``tls`` the
    server requires and verifies client certificates (mutual TLS); without it the
    transport is insecure, which is for loopback and tests only. ``limits`` default to
    the endpoint's run config (:func:`limits_for`); ``max_workers`` overrides their pool
    size (the threads a blocking endpoint's calls run on; the real coordinator needs none).
    """
    limits = limits or limits_for(endpoint)
    if max_workers is not None:
        limits = dataclasses.replace(limits, max_workers=max_workers)
    servicer = CoordinatorServicer(
        endpoint,
        require_certificate=tls is not None,
        max_poll_s=max_poll_s,
        limits=limits,
        observer=observer,
    )
    return start_server(servicer, address, tls=tls)


def start_server(
    servicer: CoordinatorServicer, address: str, *, tls: TlsConfig | None = None
) -> RunningServer:
    """Serve ``servicer`` (and health checking) on ``address`` from a new event-loop thread."""
    credentials = _server_credentials(tls)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sottovoce-grpc", daemon=True)
    thread.start()
    starting = asyncio.run_coroutine_threadsafe(_start(servicer, address, credentials), loop)
    try:
        server, health_servicer, port = starting.result(timeout=START_TIMEOUT_S)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10.0)
        loop.close()
        raise
    host = address.rsplit(":", 1)[0]
    logger.info("coordinator listening on %s:%d (%s)", host, port, "mTLS" if tls else "insecure")
    return RunningServer(
        server=server,
        health=health_servicer,
        port=port,
        host=host,
        loop=loop,
        thread=thread,
        servicer=servicer,
    )


async def _start(
    servicer: CoordinatorServicer,
    address: str,
    credentials: grpc.ServerCredentials | None,
) -> tuple[grpc.aio.Server, health_aio.HealthServicer, int]:
    server = grpc.aio.server(
        # No SO_REUSEPORT: a second coordinator on a busy port must fail, not share its traffic.
        options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=_max_calls_in_flight(servicer),
    )
    add_to_server(servicer, server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = _bind(server, address, credentials)
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    if servicer.coordinator is not None:
        asyncio.get_running_loop().create_task(_tick_forever(servicer.coordinator))
    return server, health_servicer, port


def _max_calls_in_flight(servicer: CoordinatorServicer) -> int:
    """Four times the worker pool for an endpoint whose calls hold threads; for the served
    Coordinator, whose waiting polls are coroutines, room for every holder's polls
    (``max_polls_per_holder`` each still bounds any one holder)."""
    pooled = 4 * servicer.limits.max_workers
    return pooled if servicer.coordinator is None else max(pooled, MAX_CALLS_IN_FLIGHT)


async def _tick_forever(coordinator: Coordinator) -> None:
    """Close rounds at their deadline (nothing else would: waiting polls only wait)."""
    while True:
        await asyncio.sleep(TICK_S)
        try:
            coordinator.tick(durable=False)
        except SottovoceError as exc:
            logger.error("coordinator tick failed: %s", exc)


def limits_for(endpoint: CoordinatorEndpoint) -> ServiceLimits:
    """The ``[server]`` limits of the endpoint's run config (the Coordinator has one, as
    ``config``), so ``sottovoce server`` applies them; the defaults for any other endpoint."""
    config = getattr(endpoint, "config", None)
    if isinstance(config, RunConfig):
        return ServiceLimits.from_config(config.server)
    return ServiceLimits.defaults()


def _server_credentials(tls: TlsConfig | None) -> grpc.ServerCredentials | None:
    if tls is None:
        return None
    cert, key, ca = tls.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise TransportError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise TransportError(f"cannot listen on {address}: the address cannot be bound")
    return port
