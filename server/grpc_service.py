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
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, ParamSpec, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sottovoce.common.config import RunConfig
from sottovoce.common.errors import NotJoined, SottovoceError, TransportError
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.proto import sottovoce_pb2_grpc as pb_grpc
from sottovoce.common.protocol.messages import RunFinished, Task
from sottovoce.common.transport import wire
from sottovoce.common.transport.channel import CHANNEL_OPTIONS, TlsConfig
from sottovoce.common.transport.endpoints import CoordinatorEndpoint
from sottovoce.common.transport.wire import Credentials, WireError
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

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M")
Context = grpc.ServicerContext


def peer_identity(context: Context, claimed_id: str, *, require_certificate: bool = False) -> str:
    """Who the peer is: its certificate's common name under mutual TLS, else ``claimed_id``.

    Over an insecure channel nothing better than the claim exists, which is why insecure
    transport is meant for loopback and tests only.
    """
    # At run time the value is a list of bytes (grpc-stubs says bytes).
    names: object = context.auth_context().get("x509_common_name")
    if isinstance(names, list) and names and isinstance(names[0], bytes):
        return names[0].decode("utf-8", errors="replace")
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


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Implements the Coordinator service by calling a :class:`CoordinatorEndpoint`.

    Register it with :func:`add_to_server` (``serve`` does), so that it parses the request
    bytes itself: grpc's own parsing answers bytes that are no message with INTERNAL and a
    traceback in the log, before any limit could count them.
    """

    def __init__(
        self,
        endpoint: CoordinatorEndpoint,
        *,
        require_certificate: bool = False,
        max_poll_s: float = MAX_POLL_S,
        limits: ServiceLimits | None = None,
        clock: Clock = time.monotonic,
    ):
        self._endpoint = endpoint
        self._require_certificate = require_certificate
        self._max_poll_s = max_poll_s
        self._sessions: dict[str, str] = {}
        self._lock = threading.Lock()
        limits = limits or ServiceLimits.defaults()
        self._calls = KeyedRateLimiter(limits.calls, clock=clock)
        self._joins = KeyedRateLimiter(limits.joins, clock=clock)
        self._rejected = KeyedRateLimiter(limits.calls, clock=clock)
        self._polls = ConcurrencyCap(limits.max_polls_per_holder)
        self._deliveries = Deliveries()
        watch_evictions = getattr(endpoint, "add_eviction_listener", None)
        if callable(watch_evictions):  # the Coordinator: an evicted holder's session ends
            watch_evictions(self._end_session)

    # -- the four calls ------------------------------------------------------------------
    def Join(self, request: pb.JoinRequest, context: Context) -> pb.JoinReply:  # noqa: N802
        return self._serve(context, self._join, request)

    def PullTask(self, request: pb.PullTaskRequest, context: Context) -> pb.PullTaskReply:  # noqa: N802
        return self._serve(context, self._pull_task, request)

    def PushAnswer(self, request: pb.PushAnswerRequest, context: Context) -> pb.PushAnswerReply:  # noqa: N802
        return self._serve(context, self._push_answer, request)

    def Leave(self, request: pb.LeaveRequest, context: Context) -> pb.LeaveReply:  # noqa: N802
        return self._serve(context, self._leave, request)

    def handle_bytes(self, method: str, data: bytes, context: Context) -> Message:
        """Parse ``data`` as ``method``'s request (INVALID_ARGUMENT, counted, if it is not
        one), then serve it as that method. What :func:`add_to_server` registers."""
        request_type = _REQUEST_TYPES[method]

        def parse(_: bytes, __: Context) -> Message:
            try:
                return request_type.FromString(data)
            except DecodeError:
                raise _Rejected(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"invalid {request_type.DESCRIPTOR.name}: the bytes are not that message",
                ) from None

        message = self._serve(context, parse, data)
        handler: Callable[[Message, Context], Message] = getattr(self, method)
        return handler(message, context)

    # -- what each call does, once admitted -----------------------------------------------
    def _join(self, request: pb.JoinRequest, context: Context) -> pb.JoinReply:
        join = _decode(wire.join_request_from_proto, request)
        identity = self._peer(context, join.holder_id)
        self._admit(self._joins, identity, "Join calls from")
        self._check_claim(identity, join.holder_id)
        spec = self._invoke(None, self._endpoint.join, join)
        session = secrets.token_urlsafe(24)
        reply = _encode(wire.join_reply_to_proto, spec, session)
        with self._lock:
            self._sessions[join.holder_id] = session  # a new Join replaces an older session
        logger.info("holder %s joined run %s", join.holder_id, spec.run_id)
        return reply

    def _pull_task(self, request: pb.PullTaskRequest, context: Context) -> pb.PullTaskReply:
        call = _decode(wire.pull_task_request_from_proto, request)
        holder_id = self._authenticate(context, call.credentials)
        self._admit(self._calls, holder_id, "calls of holder")
        timeout_s = self._poll_timeout(call.wait_s, context)
        with self._poll_slot(holder_id):
            result = self._invoke(
                holder_id,
                self._endpoint.pull_task,
                holder_id,
                call.have_version,
                call.have_head,
                timeout_s,
            )
        reply = _encode(wire.pull_task_reply_to_proto, result)
        self._credit_delivery(holder_id, result)
        return reply

    def _push_answer(self, request: pb.PushAnswerRequest, context: Context) -> pb.PushAnswerReply:
        call = _decode(wire.push_answer_request_from_proto, request)
        holder_id = self._authenticate(context, call.credentials)
        self._admit(self._calls, holder_id, "calls of holder")
        accepted = self._invoke(holder_id, self._endpoint.push_answer, holder_id, call.answer)
        if accepted:
            self._calls.refund(holder_id)  # a new answer is progress; a re-sent one counts
        return pb.PushAnswerReply(accepted=bool(accepted))

    def _leave(self, request: pb.LeaveRequest, context: Context) -> pb.LeaveReply:
        credentials = _decode(wire.leave_request_from_proto, request)
        holder_id = self._authenticate(context, credentials)
        self._admit(self._calls, holder_id, "calls of holder")
        self._invoke(holder_id, self._endpoint.leave, holder_id)
        self._end_session(holder_id)
        logger.info("holder %s left", holder_id)
        return pb.LeaveReply()

    # -- helpers -------------------------------------------------------------------------
    def _serve(self, context: Context, handler: Callable[[M, Context], R], request: M) -> R:
        """Run ``handler`` for the caller, unless its rejected calls are over their limit;
        a refusal takes one of its tokens and becomes the call's status."""
        caller = _caller(context)
        if not self._rejected.allows(caller):
            _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit: rejected calls from {caller!r} over "
                f"{self._rejected.limit.describe()}; retry later",
            )
        try:
            return handler(request, context)
        except _Rejected as rejected:
            if rejected.callers_fault:
                self._rejected.try_acquire(caller)
            _abort(context, rejected.code, rejected.detail)

    def _invoke(
        self, holder_id: str | None, method: Callable[P, R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Call the endpoint for ``holder_id`` (None before it has joined), turning the
        errors it may raise into statuses."""
        try:
            return method(*args, **kwargs)
        except WireError as exc:
            raise _Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except NotJoined as exc:  # left, or evicted: its session is over; it may join again
            if holder_id is not None:
                self._end_session(holder_id)
            raise _Rejected(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        except SottovoceError as exc:
            raise _Rejected(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None

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

    def _check_identity(self, context: Context, claimed_id: str) -> None:
        self._check_claim(self._peer(context, claimed_id), claimed_id)

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

    @contextmanager
    def _poll_slot(self, holder_id: str) -> Iterator[None]:
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

    def _authenticate(self, context: Context, credentials: Credentials) -> str:
        """The caller's holder id, once its identity and session token check out."""
        holder_id = credentials.holder_id
        self._check_identity(context, holder_id)
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


def add_to_server(servicer: CoordinatorServicer, server: grpc.Server) -> None:
    """Register ``servicer`` as the Coordinator service; it receives the raw request bytes
    (see :meth:`CoordinatorServicer.handle_bytes`). Replaces the generated
    ``add_CoordinatorServicer_to_server``, which lets grpc parse them."""

    def handler(method: str) -> grpc.RpcMethodHandler[Any, Any]:
        def serve_bytes(data: bytes, context: Context) -> Message:
            return servicer.handle_bytes(method, data, context)

        return grpc.unary_unary_rpc_method_handler(
            serve_bytes,
            request_deserializer=None,  # the bytes as they came
            response_serializer=_REPLY_TYPES[method].SerializeToString,
        )

    handlers = {method: handler(method) for method in _REQUEST_TYPES}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _caller(context: Context) -> str:
    """Who is calling, known before its request is read: the certificate's common name
    under mutual TLS, else the peer's address (one connection)."""
    names: object = context.auth_context().get("x509_common_name")
    if isinstance(names, list) and names and isinstance(names[0], bytes):
        return names[0].decode("utf-8", errors="replace")
    return context.peer()


def _abort(context: Context, code: grpc.StatusCode, detail: str) -> NoReturn:
    logger.info("rejected %s: %s", code.name, detail)
    context.abort(code, detail)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def _decode(decode: Callable[[M], R], message: M) -> R:
    """Decode a request; a bound violated is the caller's fault (INVALID_ARGUMENT)."""
    try:
        return decode(message)
    except WireError as exc:
        raise _Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


def _encode(encode: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Encode a reply; a bound violated here is a coordinator bug, never sent on."""
    try:
        return encode(*args, **kwargs)
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
    """A started coordinator server; ``port`` is the one actually bound."""

    server: grpc.Server
    health: health.HealthServicer
    port: int
    host: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace_s: float = 1.0) -> None:
        """Report NOT_SERVING, then stop; in-flight calls get ``grace_s`` to finish."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        """Block until the server stops; True if it did within ``timeout_s``."""
        return bool(self.server.wait_for_termination(timeout_s))

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
) -> RunningServer:
    """Start the Coordinator service (and health checking) on ``address``.

    ``"127.0.0.1:0"`` picks a free port (see ``RunningServer.port``). With ``tls`` the
    server requires and verifies client certificates (mutual TLS); without it the
    transport is insecure, which is for loopback and tests only. ``limits`` default to
    the endpoint's run config (:func:`limits_for`); ``max_workers`` overrides their pool
    size. Worker threads are started as calls need them, up to that size.
    """
    limits = limits or limits_for(endpoint)
    if max_workers is not None:
        limits = dataclasses.replace(limits, max_workers=max_workers)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=limits.max_workers, thread_name_prefix="sottovoce-rpc"),
        # No SO_REUSEPORT: a second coordinator on a busy port must fail, not share its traffic.
        options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=4 * limits.max_workers,
    )
    servicer = CoordinatorServicer(
        endpoint, require_certificate=tls is not None, max_poll_s=max_poll_s, limits=limits
    )
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = _bind(server, address, tls)
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    host = address.rsplit(":", 1)[0]
    logger.info("coordinator listening on %s:%d (%s)", host, port, "mTLS" if tls else "insecure")
    return RunningServer(server=server, health=health_servicer, port=port, host=host)


def limits_for(endpoint: CoordinatorEndpoint) -> ServiceLimits:
    """The ``[server]`` limits of the endpoint's run config (the Coordinator has one, as
    ``config``), so ``sottovoce server`` applies them; the defaults for any other endpoint."""
    config = getattr(endpoint, "config", None)
    if isinstance(config, RunConfig):
        return ServiceLimits.from_config(config.server)
    return ServiceLimits.defaults()


def _bind(server: grpc.Server, address: str, tls: TlsConfig | None) -> int:
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            cert, key, ca = tls.read()
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=True
            )
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise TransportError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise TransportError(f"cannot listen on {address}: the address cannot be bound")
    return port
