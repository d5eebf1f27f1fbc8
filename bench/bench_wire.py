"""Bytes on the wire per answer and per task, over real gRPC on loopback (docs/architecture.md).

Target (docs/architecture.md): a task and its answer are bytes, not megabytes; at most 200 B
per answer.

Setting: the project's gRPC server (``serve``) on 127.0.0.1, insecure (no TLS), in front
of a scripted coordinator endpoint; a TCP proxy on 127.0.0.1 between client and server
forwards and counts every byte in each direction, so the figures include HTTP/2 frames,
HPACK-compressed headers, the 5-byte gRPC message prefix, trailers and any HTTP/2 control
frames (PING, WINDOW_UPDATE). Messages are shaped like the demo's: run id
``sentiment-demo-<8 hex>``, task ids from the coordinator's ``task_id_for``, holder
``holder-0``, 64-bit seeds, float32 scales.

Measured, each over ``--calls`` calls after ``--warmup`` calls on the same connection:

1. raw stub after Join, as unary calls: PushAnswer of a compare answer and of a best-of-7
   answer; PullTask returning a compare task and a best-of-7 task, each with 0 and with 10
   new log steps;
2. the same on one Session stream, as the client loop sends them: a compare answer alone,
   and the demo's round (a best-of-7 answer with the next pull, in one message, returning
   a best-of-7 task with one new step);
3. the real client loop (``run_holder`` with a fake holder) for ``--rounds`` rounds of the
   demo's task (best-of-7, one new step per round): bytes per round, both directions.

Also printed: the serialized protobuf size of each payload (what framing is added to).
Usage: ``python bench/bench_wire.py [--calls 200] [--rounds 100]``
"""

from __future__ import annotations

import argparse
import queue
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from sottovoce.client.grpc_loop import run_holder
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
from sottovoce.common.transport.channel import CHANNEL_OPTIONS
from sottovoce.server.coordinator import task_id_for
from sottovoce.server.grpc_service import serve

HOLDER = "holder-0"
FINGERPRINT = "sha256:" + "5a" * 32
PARAMETRIZATION = ParametrizationSpec(kind="scale", patterns=("model.norm.weight",))
GENESIS = genesis_hash(FINGERPRINT, PARAMETRIZATION.canonical_id())
RUN_ID = f"sentiment-demo-{secrets.token_hex(4)}"  # as RunState names a run
SPEC = RunSpec(
    run_id=RUN_ID,
    algorithm="bboxer-1+lambda",
    model_fingerprint=FINGERPRINT,
    parametrization=PARAMETRIZATION,
    fitness=FitnessSpec(),
    batch=BatchSpec(mode="full", batch_size=32),
    answer_kind=AnswerKind.BEST_OF,
    bit_budget=1350.0,
    max_rounds=1_000_000,
    log_genesis=GENESIS,
)
FIRST_ROUND = 100  # round indexes and log versions of a run well under way
BASE_VERSION = 40
STEP = as_float32(0.05)
ANSWER_TARGET_BYTES = 200
SETTLE_S = 0.05  # let trailing control frames (WINDOW_UPDATE, PING acks) pass


# -- a byte-counting TCP proxy -------------------------------------------------------------
class CountingProxy:
    """Forwards TCP connections to ``127.0.0.1:upstream_port``, counting bytes each way."""

    def __init__(self, upstream_port: int):
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._lock = threading.Lock()
        self._up = 0  # client -> server
        self._down = 0  # server -> client
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def counts(self) -> tuple[int, int]:
        """(client -> server, server -> client) bytes so far."""
        with self._lock:
            return self._up, self._down

    def close(self) -> None:
        self._closed.set()
        for sock in [self._listener, *self._sockets]:
            sock.close()
        for thread in self._threads:
            thread.join(timeout=2.0)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, upstream]
            for source, target, up in ((client, upstream, True), (upstream, client, False)):
                pump = threading.Thread(target=self._pump, args=(source, target, up), daemon=True)
                self._threads.append(pump)
                pump.start()

    def _pump(self, source: socket.socket, target: socket.socket, up: bool) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if up:
                        self._up += len(data)
                    else:
                        self._down += len(data)
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # a side closed: the connection is over


# -- the demo's messages -------------------------------------------------------------------
def make_task(
    round_index: int,
    kind: AnswerKind,
    n_candidates: int,
    n_steps: int,
    base: tuple[int, str] = (BASE_VERSION, GENESIS),
) -> Task:
    """A task shaped like the coordinator's (ids, 64-bit seeds, float32 scales, head).

    ``base`` is the (version, head) the task builds on; its steps extend that chain.
    """
    rng = random.Random(round_index)
    steps = tuple(
        Step(seed=rng.getrandbits(64), coefficient=STEP if rng.random() < 0.5 else -STEP)
        for _ in range(n_steps)
    )
    base_version, base_head = base
    return Task(
        task_id=task_id_for(RUN_ID, round_index, HOLDER),
        run_id=RUN_ID,
        round_index=round_index,
        base_version=base_version,
        new_steps=steps,
        log_head=extend_chain(base_head, base_version, steps),
        candidates=tuple(
            Candidate(seed=rng.getrandbits(64), scale=STEP) for _ in range(n_candidates)
        ),
        answer_kind=kind,
        batch=SPEC.batch,
        deadline_unix=time.time() + 120.0,
    )


def demo_run(rounds: int) -> list[Task | RunFinished]:
    """``rounds`` chained best-of-7 tasks, each shipping one new step, then the end."""
    script: list[Task | RunFinished] = []
    base = (BASE_VERSION, GENESIS)
    for n in range(rounds):
        task = make_task(FIRST_ROUND + n, AnswerKind.BEST_OF, 7, 1, base)
        script.append(task)
        base = (task.target_version, task.log_head)
    version, head = base
    script.append(
        RunFinished(RUN_ID, "rounds done", version, head, 3.0 * rounds, base_version=version)
    )
    return script


TaskSource = Callable[[int], Task | RunFinished]


@dataclass
class ScriptedCoordinator:
    """A CoordinatorEndpoint that hands out ``tasks(n)`` at the n-th pull, at once.

    Each pull also records the proxy's counts at that moment: the request has arrived and
    nothing of the reply has been sent yet.
    """

    proxy_counts: Callable[[], tuple[int, int]]
    tasks: TaskSource = lambda n: make_task(FIRST_ROUND + n, AnswerKind.COMPARE, 1, 0)
    pulls: int = 0
    marks: list[tuple[int, int]] = field(default_factory=list)

    def join(self, request: JoinRequest) -> RunSpec:
        return SPEC

    def pull_task(
        self, holder_id: str, have_version: int, have_head: str, timeout_s: float
    ) -> Task | RunFinished | None:
        self.marks.append(self.proxy_counts())
        self.pulls += 1
        return self.tasks(self.pulls - 1)

    def push_answer(self, holder_id: str, answer: Answer) -> bool:
        return True

    def leave(self, holder_id: str) -> None:
        return None


@dataclass
class FollowingHolder:
    """A HolderEndpoint that follows the log and answers without any model."""

    holder_id: str = HOLDER
    log_version: int = BASE_VERSION
    log_head: str = GENESIS

    def join_request(self) -> JoinRequest:
        return JoinRequest(HOLDER, FINGERPRINT, {"max_bits": "1000"})

    def accept_run(self, spec: RunSpec) -> None:
        return None

    def answer(self, task: Task) -> Answer:
        self.log_version, self.log_head = task.target_version, task.log_head
        return Answer(task.task_id, choice=task.round_index % (len(task.candidates) + 1))

    def finish(self, finished: RunFinished) -> None:
        return None


# -- measurements --------------------------------------------------------------------------
@dataclass
class PerCall:
    name: str
    payload: int  # serialized bytes of the Answer or Task this row is about
    request: int  # serialized bytes of the whole request message
    up: float  # client -> server bytes per call on the wire
    reply: int  # serialized bytes of the whole reply message
    down: float  # server -> client bytes per call on the wire


def bytes_per_call(
    proxy: CountingProxy, call: Callable[[int], object], n: int
) -> tuple[float, float]:
    """Mean bytes per call each way over ``n`` calls (after the caller's warm-up)."""
    time.sleep(SETTLE_S)
    up0, down0 = proxy.counts()
    for index in range(n):
        call(index)
    time.sleep(SETTLE_S)
    up1, down1 = proxy.counts()
    return (up1 - up0) / n, (down1 - down0) / n


def measure_stub_calls(args: argparse.Namespace) -> list[PerCall]:
    """PushAnswer and PullTask sent through the raw stub, as the client loop builds them."""
    coordinator = ScriptedCoordinator(lambda: (0, 0))
    server = serve(coordinator, "127.0.0.1:0", max_workers=4)
    proxy = CountingProxy(server.port)
    coordinator.proxy_counts = proxy.counts
    rows: list[PerCall] = []
    try:
        with grpc.insecure_channel(proxy.address, options=list(CHANNEL_OPTIONS)) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            join = wire.join_request_to_proto(FollowingHolder().join_request())
            credentials = wire.Credentials(HOLDER, stub.Join(join, timeout=10).session)
            for kind, lam in ((AnswerKind.COMPARE, 1), (AnswerKind.BEST_OF, 7)):
                rows.append(_push_row(stub, proxy, credentials, kind, lam, args))
            for kind, lam in ((AnswerKind.COMPARE, 1), (AnswerKind.BEST_OF, 7)):
                for n_steps in (0, 10):
                    rows.append(
                        _pull_row(stub, proxy, coordinator, credentials, (kind, lam, n_steps), args)
                    )
            rows.append(_session_row(stub, proxy, coordinator, credentials, False, args))
            rows.append(_session_row(stub, proxy, coordinator, credentials, True, args))
    finally:
        proxy.close()
        server.stop(grace_s=0)
    return rows


def _push_row(
    stub: pb_grpc.CoordinatorStub,
    proxy: CountingProxy,
    credentials: wire.Credentials,
    kind: AnswerKind,
    lam: int,
    args: argparse.Namespace,
) -> PerCall:
    def request(index: int) -> object:
        task_id = task_id_for(RUN_ID, FIRST_ROUND + index, HOLDER)
        answer = Answer(task_id, choice=1 + index % lam)
        return wire.push_answer_request_to_proto(wire.PushAnswerCall(credentials, answer))

    def push(index: int) -> object:
        return stub.PushAnswer(request(index), timeout=10.0)  # the client's rpc deadline

    for index in range(args.warmup):
        push(index)
    up, down = bytes_per_call(proxy, push, args.calls)
    message = request(0)
    assert isinstance(message, pb.PushAnswerRequest)
    label = "compare" if kind is AnswerKind.COMPARE else f"best-of-{lam}"
    return PerCall(
        f"PushAnswer, {label} answer",
        payload=message.answer.ByteSize(),
        request=message.ByteSize(),
        up=up,
        reply=pb.PushAnswerReply(accepted=True).ByteSize(),
        down=down,
    )


def _pull_row(
    stub: pb_grpc.CoordinatorStub,
    proxy: CountingProxy,
    coordinator: ScriptedCoordinator,
    credentials: wire.Credentials,
    shape: tuple[AnswerKind, int, int],
    args: argparse.Namespace,
) -> PerCall:
    kind, lam, n_steps = shape
    coordinator.tasks = lambda n: make_task(FIRST_ROUND + n, kind, lam, n_steps)
    request = wire.pull_task_request_to_proto(
        wire.PullTaskCall(credentials, BASE_VERSION, GENESIS, wait_s=20.0)
    )

    def pull(_index: int) -> object:
        return stub.PullTask(request, timeout=25.0)  # the loop's poll wait + margin

    for index in range(args.warmup):
        pull(index)
    up, down = bytes_per_call(proxy, pull, args.calls)
    reply = wire.pull_task_reply_to_proto(make_task(FIRST_ROUND, kind, lam, n_steps))
    label = "compare" if kind is AnswerKind.COMPARE else f"best-of-{lam}"
    return PerCall(
        f"PullTask -> {label} task, {n_steps} new steps",
        payload=reply.task.ByteSize(),
        request=request.ByteSize(),
        up=up,
        reply=reply.ByteSize(),
        down=down,
    )


class _Stream:
    """A Session stream through the raw stub: one message out, its reply back."""

    def __init__(self, stub: pb_grpc.CoordinatorStub):
        self._outgoing: queue.SimpleQueue[pb.SessionRequest | None] = queue.SimpleQueue()
        self._replies = stub.Session(self._messages())

    def _messages(self) -> Iterator[pb.SessionRequest]:
        while (message := self._outgoing.get()) is not None:
            yield message

    def exchange(self, message: pb.SessionRequest) -> pb.SessionReply:
        self._outgoing.put(message)
        return next(self._replies)

    def close(self) -> None:
        self._outgoing.put(None)
        for _ in self._replies:  # the server ends the stream once ours is done
            pass


def _session_row(
    stub: pb_grpc.CoordinatorStub,
    proxy: CountingProxy,
    coordinator: ScriptedCoordinator,
    credentials: wire.Credentials,
    with_pull: bool,
    args: argparse.Namespace,
) -> PerCall:
    """A compare answer alone on the stream, or the demo's round: a best-of-7 answer and the
    next pull in one message, returning a best-of-7 task with one new step."""
    lam = 7 if with_pull else 1
    coordinator.tasks = lambda n: make_task(FIRST_ROUND + n, AnswerKind.BEST_OF, 7, 1)
    pull = wire.pull_task_request_to_proto(
        wire.PullTaskCall(credentials, BASE_VERSION, GENESIS, wait_s=20.0)
    )

    def message(index: int) -> pb.SessionRequest:
        task_id = task_id_for(RUN_ID, FIRST_ROUND + index, HOLDER)
        push = wire.push_answer_request_to_proto(
            wire.PushAnswerCall(credentials, Answer(task_id, choice=1 + index % lam))
        )
        return wire.session_request(push=push, pull=pull if with_pull else None)

    stream = _Stream(stub)
    try:
        for index in range(args.warmup):
            stream.exchange(message(index))
        up, down = bytes_per_call(proxy, lambda i: stream.exchange(message(i)), args.calls)
    finally:
        stream.close()
    replies: list[tuple[str, object]] = [("PushAnswer", pb.PushAnswerReply(accepted=True))]
    if with_pull:
        task = make_task(FIRST_ROUND, AnswerKind.BEST_OF, 7, 1)
        replies.append(("PullTask", wire.pull_task_reply_to_proto(task)))
    reply = wire.session_reply(replies)  # type: ignore[arg-type]
    first = message(0)
    name = (
        "Session: best-of-7 answer + next pull -> best-of-7 task, 1 new step"
        if with_pull
        else "Session: compare answer alone"
    )
    return PerCall(
        name,
        payload=first.push.answer.ByteSize(),
        request=first.ByteSize(),
        up=up,
        reply=reply.ByteSize(),
        down=down,
    )


def measure_client_loop(rounds: int) -> tuple[float, float, int]:
    """Bytes per round of the real client loop: (client -> server, server -> client, rounds)."""

    script = demo_run(rounds)
    coordinator = ScriptedCoordinator(lambda: (0, 0), lambda n: script[min(n, rounds)])
    server = serve(coordinator, "127.0.0.1:0", max_workers=4)
    proxy = CountingProxy(server.port)
    coordinator.proxy_counts = proxy.counts
    try:
        run_holder(FollowingHolder(), proxy.address, poll_timeout_s=20.0, connect_timeout_s=10.0)
    finally:
        proxy.close()
        server.stop(grace_s=0)
    # marks[0] is taken at the first pull, marks[rounds] at the pull that ends the run:
    # between them, each round's task reply, answer request and reply, and next pull request.
    (up0, down0), (up1, down1) = coordinator.marks[0], coordinator.marks[rounds]
    return (up1 - up0) / rounds, (down1 - down0) / rounds, rounds


# -- main ----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()

    print(
        f"wire: grpcio {grpc.__version__}, loopback TCP through a counting proxy, insecure "
        f"(no TLS), {args.calls} calls per row after {args.warmup} warm-up calls"
    )
    print(
        f"  {'bytes per call':<68} {'payload':>7} {'request':>7} {'wire c->s':>9} "
        f"{'reply':>5} {'wire s->c':>9}"
    )
    rows = measure_stub_calls(args)
    for row in rows:
        print(
            f"  {row.name:<68} {row.payload:7d} {row.request:7d} {row.up:9.1f} "
            f"{row.reply:5d} {row.down:9.1f}"
        )
    print(
        "  payload: the serialized Answer or Task alone; request/reply: the whole serialized\n"
        "  message; wire: TCP bytes with HTTP/2 + gRPC framing, headers and control frames"
    )
    for prefix, how in (("PushAnswer", "PushAnswer"), ("Session: compare", "on the stream")):
        worst = max(row.up for row in rows if row.name.startswith(prefix))
        verdict = "met" if worst <= ANSWER_TARGET_BYTES else "NOT met"
        print(
            f"  per answer on the wire ({how}, client->server): {worst:.1f} B; "
            f"target (docs/architecture.md) <= {ANSWER_TARGET_BYTES} B: {verdict}"
        )
    up, down, rounds = measure_client_loop(args.rounds)
    print(
        f"real client loop (run_holder), {rounds} rounds of best-of-7 tasks with 1 new step "
        f"(the answer and the next pull in one Session message a round): client->server "
        f"{up:.1f} B/round, "
        f"server->client {down:.1f} B/round"
    )


if __name__ == "__main__":
    main()
