"""The coordinator under load: many holders long-polling over real gRPC + mutual TLS.

Target (issue 17, docs/architecture.md): 10,000 connected holders on one coordinator, with
coordinator CPU per answer at 10,000 holders at most 1.5x that at 10, and at most 0.5 ms at
1,000. This bench runs the real ``Coordinator`` (run state, group-committed journal, the
(1+1)-ES) behind the real ``serve()`` (``grpc.aio``) with mutual TLS and the service limits
a run config gives it, in its own process, so its CPU and memory are its alone.

Certificates come from :mod:`sottovoce.common.transport.certs` (what ``sottovoce certs`` runs) in a
temporary folder: a CA, a coordinator certificate for 127.0.0.1, and one client
certificate per simulated holder, whose common name is the holder id. Each holder has its
own TLS channel (its own TCP connection and handshake).

The holders run in separate load-generator processes (``--generators``; by default one per
2,500 holders, at least one), each an asyncio loop of holders. They speak the protocol the
real client loop (``client/grpc_loop.py``) speaks, through the generated stubs and the same
``common/transport/wire.py`` encoders and decoders: Join; then PullTask long-polls (wait
``--poll-s``, deadline wait + 5 s, as the loop's); each task's new steps are checked
against its log head; a compare answer goes back by PushAnswer; RunFinished, then Leave.
Transient statuses are retried with the loop's backoff, NOT_FOUND rejoins. The fitness is a
stand-in: a holder's choice is one bit of sha256(holder id, candidate seed), computed at
once, so every round is pure coordinator and transport work.

Per holder count, after ``--warmup`` rounds (round 0 waits for every holder to join):

- rounds/s and answers/s over the measured rounds, and round latency p50/p99: the time
  between one round's close and the next's (open, fan-out of tasks, every answer, journal,
  close), on the coordinator's clock; every round waits for all holders (quorum = N);
- coordinator CPU: its process CPU seconds (all threads) per answer (ms), and per wall
  second (1.00 = one core busy), the share of it spent in the kernel; journal fsyncs per
  round (group commit: answers / fsync);
- coordinator memory: RSS when serving with no holder yet, RSS once every holder has
  joined and waits in its long-poll with no round open yet (per idle holder: the
  difference / N), and the peak RSS (the kernel's high-water mark);
- the load generators' CPU seconds per wall second (all their processes together), and
  the transient statuses the holders retried (RESOURCE_EXHAUSTED would be the limits);
- the machine's load average when the point started and ended (other jobs share the cores);
- before and after the points, grpc.aio's own floor: the server CPU of two null calls over
  mutual TLS (a PullTask and a PushAnswer before any of the service's code), so the CPU per
  answer can be read against what the transport alone costs on this machine now.

The number of measured rounds per point is ``--answers`` / N, within [``--min-rounds``,
``--rounds``], so a point costs about the same whatever N.

Usage::

    python bench/bench_load.py [--holders 10 100 1000 10000] [--rounds 30] [--answers 40000]
                               [--warmup 2] [--poll-s 20] [--generators G]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import gc
import hashlib
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import grpc

from sottovoce.client.grpc_loop import (
    LEAVE_TIMEOUT_S,
    POLL_DEADLINE_MARGIN_S,
    TRANSIENT_CODES,
    RetryPolicy,
)
from sottovoce.common.config import RunConfig, parse_config
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.proto import sottovoce_pb2_grpc as pb_grpc
from sottovoce.common.protocol.messages import Answer, JoinRequest, RunFinished, Task
from sottovoce.common.steplog import extend_chain
from sottovoce.common.transport import wire
from sottovoce.common.transport.certs import init_ca, issue, tls_config
from sottovoce.common.transport.channel import CHANNEL_OPTIONS
from sottovoce.common.transport.wire import Credentials, PullTaskCall, PushAnswerCall

FINGERPRINT = "sha256:" + "5a" * 32  # the coordinator needs a fingerprint, not a model
# Join and PushAnswer deadlines, and how long a call is retried: more patient than
# run_holder's defaults (10 s, 60 s), since at 10,000 holders on two shared cores a round's
# 10,000 answers queue behind one another and 10,000 TLS handshakes come at once.
RPC_TIMEOUT_S = 60.0
RAMP_S_PER_HOLDER = 0.002  # holders of a generator start this far apart (a join storm spread)
READY_TIMEOUT_S = 120.0  # the coordinator process imports torch before it listens
RETRY = RetryPolicy(total_s=600.0)
Reply = TypeVar("Reply")
DEFAULT_COLLECTOR = gc.get_threshold()  # CPython's, for --default-collector


# -- the coordinator process -------------------------------------------------------------
def bench_config(holders: int, rounds: int) -> RunConfig:
    """A (1+1)-ES run where every round waits for all ``holders`` answers."""
    server: dict[str, Any] = {
        "address": "127.0.0.1:0",
        "min_holders": holders,
        "quorum": holders,
        "round_timeout_s": 600.0,
        "max_missed_rounds": 1000,
    }
    data = {
        "run": {"name": "load", "max_rounds": rounds, "bit_budget": float(holders * rounds + 1)},
        "parametrization": {"kind": "scale", "patterns": ["model.norm.weight"]},
        "server": server,
    }
    return parse_config(data, "bench_load")


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sample:
    """The coordinator process at one instant (CPU and context switches of all threads)."""

    wall: float
    user: float
    system: float
    switches: int
    rss: int
    threads: int

    @classmethod
    def now(cls) -> Sample:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            wall=time.monotonic(),
            user=usage.ru_utime,
            system=usage.ru_stime,
            switches=usage.ru_nvcsw + usage.ru_nivcsw,
            rss=rss_bytes(),
            threads=threading.active_count(),
        )

    @property
    def cpu(self) -> float:
        return self.user + self.system


def raise_file_limit() -> None:
    """Every holder is a socket: take the hard limit on open files."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def coordinator_main(args: argparse.Namespace) -> None:
    """Serve one run to ``args.holders`` holders; print READY <port>, then RESULT <json>.
    Set up as ``sottovoce server`` sets itself up (start-up without the collector, then
    the serving collector's threshold)."""
    from sottovoce.common.startup import collect_less_while_serving, start_up

    raise_file_limit()
    with start_up():
        from sottovoce.server.coordinator import Coordinator
        from sottovoce.server.grpc_service import serve
        from sottovoce.server.limits import ServiceLimits
        from sottovoce.server.run_state import RunState

        config = bench_config(args.holders, args.total_rounds)
        state = RunState.open(Path(args.run_dir), config, "# bench_load\n", FINGERPRINT)
        coordinator = Coordinator(config, state, FINGERPRINT)
    if args.default_collector:
        gc.set_threshold(*DEFAULT_COLLECTOR)
    else:
        collect_less_while_serving()
    closes: list[Sample] = []
    fsyncs: list[int] = []

    def closed(_record: object, _state: object) -> None:
        closes.append(Sample.now())
        fsyncs.append(state.journal.fsyncs)

    coordinator.add_listener(closed)
    limits = ServiceLimits.from_config(config.server)
    tls = tls_config(Path(args.certs), "coordinator")
    idle: dict[str, Any] = {}
    stop_watching = threading.Event()

    def watch_joins() -> None:
        """The RSS once every holder has joined and waits, before round 0 opens."""
        while not stop_watching.wait(0.02):
            if len(coordinator.active_holders) >= args.holders:
                idle.update(Sample.now().__dict__)
                return

    with serve(coordinator, "127.0.0.1:0", tls=tls, limits=limits) as server:
        ready = Sample.now()
        watcher = threading.Thread(target=watch_joins, daemon=True)
        watcher.start()
        print(f"READY {server.port}", flush=True)
        finished = coordinator.wait_finished(args.timeout_s)
        coordinator.wait_holders_left(timeout_s=60.0)
        stop_watching.set()
    result = {
        "finished": finished,
        "ready": ready.__dict__,
        "idle": idle,
        "closes": [sample.__dict__ for sample in closes],
        "fsyncs": fsyncs,
        "closed_by": dict(Counter(r.closed_by for r in state.rounds)),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print("RESULT " + json.dumps(result), flush=True)


# -- the simulated holders ---------------------------------------------------------------
@dataclass
class Tally:
    """What the holders saw, all of them together."""

    retried: Counter[str] = field(default_factory=Counter)
    failed_leaves: Counter[str] = field(default_factory=Counter)
    rejoins: int = 0
    answers: int = 0
    finished: int = 0


class SimulatedHolder:
    """One holder: its own TLS channel, session and log head; answers at once.

    ``streamed``: PullTask and PushAnswer go as messages on one Session stream, as the real
    loop sends them; else as unary calls (the protocol before Session, for comparison).
    """

    def __init__(
        self,
        holder_id: str,
        channel: grpc.aio.Channel,
        poll_s: float,
        tally: Tally,
        *,
        streamed: bool = True,
    ):
        self.holder_id = holder_id
        self._channel = channel
        self._stub = pb_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        self._poll_s = poll_s
        self._tally = tally
        self._streamed = streamed
        self._stream: Any = None
        self._credentials: Credentials | None = None
        self.version = 0
        self.head = ""

    async def run(self) -> None:
        await self._join()
        reply = await self._call(self._pull, rejoin=True)
        while True:
            result = wire.pull_task_reply_from_proto(reply)
            if isinstance(result, RunFinished):
                self._follow(result.base_version, result.new_steps, result.log_head)
                self._tally.finished += 1
                break
            if isinstance(result, Task):
                self._follow(result.base_version, result.new_steps, result.log_head)
                answer = self._answer(result)
                reply = await self._call(
                    functools.partial(self._answer_then_pull, answer), rejoin=True
                )
            else:
                reply = await self._call(self._pull, rejoin=True)
        await self._leave()

    async def _join(self) -> None:
        request = wire.join_request_to_proto(
            JoinRequest(self.holder_id, FINGERPRINT, {"max_bits": "1000000"})
        )
        reply = await self._call(lambda: self._stub.Join(request, timeout=RPC_TIMEOUT_S))
        spec, session = wire.join_reply_from_proto(reply)
        self._credentials = Credentials(self.holder_id, session)
        if not self.head:
            self.head = spec.log_genesis

    def _pull_request(self) -> pb.PullTaskRequest:
        assert self._credentials is not None
        call = PullTaskCall(self._credentials, self.version, self.head, self._poll_s)
        return wire.pull_task_request_to_proto(call)

    async def _pull(self) -> pb.PullTaskReply:
        request = self._pull_request()
        timeout_s = self._poll_s + POLL_DEADLINE_MARGIN_S
        if self._streamed:
            _, pulled = await self._exchange(wire.session_request(pull=request), timeout_s)
            assert pulled is not None
            return pulled
        reply: pb.PullTaskReply = await self._stub.PullTask(request, timeout=timeout_s)
        return reply

    async def _answer_then_pull(self, answer: Answer) -> pb.PullTaskReply:
        """The answer, then the wait for the next task: one Session message (as the real
        loop sends them), or two unary calls."""
        assert self._credentials is not None
        push = wire.push_answer_request_to_proto(PushAnswerCall(self._credentials, answer))
        if not self._streamed:
            await self._stub.PushAnswer(push, timeout=RPC_TIMEOUT_S)
            return await self._pull()
        message = wire.session_request(push=push, pull=self._pull_request())
        _, pulled = await self._exchange(message, self._poll_s + POLL_DEADLINE_MARGIN_S)
        assert pulled is not None
        return pulled

    async def _exchange(
        self, message: pb.SessionRequest, timeout_s: float
    ) -> tuple[pb.PushAnswerReply | None, pb.PullTaskReply | None]:
        """One request and its reply on the Session stream (opened at need, dropped on an
        error, whose status then reaches :meth:`_call` as a call's would)."""
        if self._stream is None:
            self._stream = self._stub.Session()
        stream = self._stream
        try:
            await stream.write(message)
            reply = await asyncio.wait_for(stream.read(), timeout_s)
        except BaseException:
            self._stream = None
            stream.cancel()
            raise
        if reply is grpc.aio.EOF:
            self._stream = None
            raise RuntimeError(f"{self.holder_id}: the coordinator ended the Session stream")
        assert isinstance(reply, pb.SessionReply)
        return wire.session_replies(reply, message)

    async def _leave(self) -> None:
        """Best effort, as the real loop's: a failed Leave is counted, not raised."""
        assert self._credentials is not None
        if self._stream is not None:
            await self._stream.done_writing()
            self._stream = None
        request = wire.leave_request_to_proto(self._credentials)
        try:
            await self._stub.Leave(request, timeout=LEAVE_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            self._tally.failed_leaves[error.code().name] += 1

    def _follow(self, base_version: int, new_steps: Sequence[Any], log_head: str) -> None:
        """Apply the shipped steps to the log head, as a real holder checks them."""
        if base_version != self.version:
            return  # a re-sent task: its steps are already applied
        if extend_chain(self.head, base_version, new_steps) != log_head:
            raise RuntimeError(f"{self.holder_id}: task's steps do not reach its log head")
        self.version, self.head = base_version + len(new_steps), log_head

    def _answer(self, task: Task) -> Answer:
        """The stand-in fitness: one bit of sha256(holder id, candidate seed)."""
        digest = hashlib.sha256(f"{self.holder_id}:{task.candidates[0].seed}".encode()).digest()
        self._tally.answers += 1
        return Answer(task.task_id, choice=digest[0] & 1)

    async def _call(
        self, attempt: Callable[[], Awaitable[Reply]], *, rejoin: bool = False
    ) -> Reply:
        """The real loop's retry rules: back off on transient statuses, rejoin on NOT_FOUND."""
        give_up_at = time.monotonic() + RETRY.total_s
        backoff_s = RETRY.initial_backoff_s
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if rejoin and code is grpc.StatusCode.NOT_FOUND:
                    self._tally.rejoins += 1
                    await self._join()
                    continue
                if code not in TRANSIENT_CODES or time.monotonic() + backoff_s > give_up_at:
                    raise
                self._tally.retried[code.name] += 1
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * RETRY.multiplier, RETRY.max_backoff_s)


def holder_channel(certs: Path, holder_id: str, address: str) -> grpc.aio.Channel:
    """A holder's own mutual-TLS channel (its certificate, the federation's CA)."""
    cert, key, ca = tls_config(certs, holder_id).read()
    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    # One connection per holder, never a subchannel shared between holders in this process.
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    return grpc.aio.secure_channel(address, credentials, options=options)


async def run_holders(
    certs: Path, address: str, holder_ids: Sequence[str], poll_s: float, *, streamed: bool
) -> tuple[Tally, float, float]:
    """Run every holder to the end of the run; (tally, process CPU s, wall s)."""
    tally = Tally()
    channels = [holder_channel(certs, h, address) for h in holder_ids]
    started, cpu = time.monotonic(), time.process_time()
    try:
        holders = [
            SimulatedHolder(h, c, poll_s, tally, streamed=streamed)
            for h, c in zip(holder_ids, channels, strict=True)
        ]
        await asyncio.gather(
            *(_later(i * RAMP_S_PER_HOLDER, holder.run()) for i, holder in enumerate(holders))
        )
    finally:
        await asyncio.gather(*(channel.close(None) for channel in channels))
    return tally, time.process_time() - cpu, time.monotonic() - started


async def _later(delay_s: float, work: Awaitable[None]) -> None:
    await asyncio.sleep(delay_s)
    await work


def generator_main(args: argparse.Namespace) -> None:
    """One load-generator process: holders ``--first`` .. ``--first + --count - 1``."""
    raise_file_limit()
    ids = [holder_name(i) for i in range(args.first, args.first + args.count)]
    try:
        streamed = args.transport == "session"
        tally, cpu, wall = asyncio.run(
            run_holders(args.certs, args.address, ids, args.poll_s, streamed=streamed)
        )
    except grpc.aio.AioRpcError as error:
        print(f"FAILED {error.code().name}: {error.details()}", flush=True)
        return
    result = {
        "cpu": cpu,
        "wall": wall,
        "answers": tally.answers,
        "finished": tally.finished,
        "rejoins": tally.rejoins,
        "retried": dict(tally.retried),
        "failed_leaves": dict(tally.failed_leaves),
    }
    print("RESULT " + json.dumps(result), flush=True)


# -- grpc.aio's own floor: two null exchanges over mutual TLS -------------------------------
FLOOR_SERVICE = "bench.Null"


def null_server_main(args: argparse.Namespace) -> None:
    """A grpc.aio server over mutual TLS whose methods answer at once (a unary call, and a
    stream that answers each message); prints its CPU seconds each time a line arrives on
    stdin (before and after the load)."""
    raise_file_limit()

    async def serve_null() -> None:
        server = grpc.aio.server(options=list(CHANNEL_OPTIONS))

        async def call(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            context.auth_context()  # as the service does, once a call
            return request[:64]

        async def stream(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            context.auth_context()  # once a stream: the service keeps the name for the call
            async for request in requests:
                yield request[:64]

        handlers = {
            "Call": grpc.unary_unary_rpc_method_handler(call),  # type: ignore[arg-type]
            "Stream": grpc.stream_stream_rpc_method_handler(stream),  # type: ignore[arg-type]
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(FLOOR_SERVICE, handlers),)
        )
        cert, key, ca = tls_config(Path(args.certs), "coordinator").read()
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        print(f"READY {port}", flush=True)
        loop = asyncio.get_running_loop()
        for _ in range(2):
            await loop.run_in_executor(None, sys.stdin.readline)
            print(f"CPU {Sample.now().cpu}", flush=True)
        await server.stop(0)

    asyncio.run(serve_null())


def null_client_main(args: argparse.Namespace) -> None:
    """``--count`` holders' channels, each making ``--calls`` null exchanges in turn: unary
    calls, or (``--transport session``) messages on one stream each."""
    raise_file_limit()
    payload = b"x" * 90  # about a PushAnswer request

    async def load() -> None:
        ids = [holder_name(i) for i in range(args.count)]
        channels = [holder_channel(args.certs, h, args.address) for h in ids]
        if args.transport == "session":
            streams = [c.stream_stream(f"/{FLOOR_SERVICE}/Stream")() for c in channels]

            async def exchange(stream: Any) -> None:
                await stream.write(payload)
                await stream.read()

            exchanges = [functools.partial(exchange, stream) for stream in streams]
        else:
            calls = [c.unary_unary(f"/{FLOOR_SERVICE}/Call") for c in channels]
            exchanges = [functools.partial(call, payload, timeout=30) for call in calls]
        await asyncio.gather(*(once() for once in exchanges))  # handshakes
        print("WARM", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        async def repeat(once: Callable[[], Awaitable[Any]]) -> None:
            for _ in range(args.calls):
                await once()

        await asyncio.gather(*(repeat(once) for once in exchanges))
        print("DONE", flush=True)
        if args.transport == "session":
            await asyncio.gather(*(stream.done_writing() for stream in streams))
        await asyncio.gather(*(channel.close(None) for channel in channels))

    asyncio.run(load())


def measure_floor(
    args: argparse.Namespace, transport: str, holders: int = 100, calls: int = 100
) -> float:
    """CPU ms of a grpc.aio server for two null exchanges over mutual TLS (what an answer's
    pull and push cost before any of the service's own code) on ``transport``."""
    server = subprocess.Popen(
        script_command("null-server", f"--certs={args.certs}"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stdin is not None and server.stdout is not None
    try:
        port = int(read_tagged(server.stdout, "READY", READY_TIMEOUT_S))
        client = subprocess.Popen(
            script_command(
                "null-client", f"--certs={args.certs}", f"--address=127.0.0.1:{port}",
                f"--count={holders}", f"--calls={calls}", f"--transport={transport}",
            ),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert client.stdin is not None and client.stdout is not None
        for line in client.stdout:
            if line.startswith("WARM"):
                break
        server.stdin.write("\n")
        server.stdin.flush()
        before = float(read_tagged(server.stdout, "CPU", 60))
        client.stdin.write("\n")
        client.stdin.flush()
        for line in client.stdout:
            if line.startswith("DONE"):
                break
        server.stdin.write("\n")
        server.stdin.flush()
        after = float(read_tagged(server.stdout, "CPU", 60))
        client.wait(timeout=60)
    finally:
        server.kill()
        server.wait()
    return (after - before) / (holders * calls) * 2 * 1e3


def measure_floors(args: argparse.Namespace) -> dict[str, float]:
    """The floor of every transport measured, by transport name."""
    return {transport: measure_floor(args, transport) for transport in args.transports}


# -- one point of the curve --------------------------------------------------------------
@dataclass
class Point:
    """The figures for one holder count."""

    holders: int
    rounds: int
    rounds_per_s: float
    answers_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_answer: float
    coordinator_cpu: float
    system_share: float
    answers_per_fsync: float
    ready_rss_mib: float
    idle_kib_per_holder: float
    peak_rss_mib: float
    peak_threads: int
    generators: int
    generator_cpu: float
    retried: Counter[str]
    failed_leaves: Counter[str]
    closed_by: dict[str, int]
    load_before: float
    load_after: float
    transport: str = "session"


def script_command(role: str, *options: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), f"--role={role}", *options]


def start_coordinator(
    args: argparse.Namespace, holders: int, rounds: int, run_dir: Path
) -> subprocess.Popen[str]:
    command = script_command(
        "coordinator",
        f"--holders={holders}",
        f"--total-rounds={args.warmup + rounds}",
        f"--certs={args.certs}",
        f"--run-dir={run_dir}",
        f"--timeout-s={args.timeout_s}",
        *(["--default-collector"] if args.default_collector else []),
    )
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def start_generators(
    args: argparse.Namespace, holders: int, address: str, transport: str
) -> list[subprocess.Popen[str]]:
    count = args.generators or max(1, -(-holders // 2500))
    count = min(count, holders)
    bounds = [holders * i // count for i in range(count + 1)]
    return [
        subprocess.Popen(
            script_command(
                "generator",
                f"--first={first}",
                f"--count={last - first}",
                f"--address={address}",
                f"--certs={args.certs}",
                f"--poll-s={args.poll_s}",
                f"--transport={transport}",
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        for first, last in itertools.pairwise(bounds)
    ]


def read_tagged(stream: IO[str], tag: str, timeout_s: float) -> str:
    """The rest of the first line starting with ``tag`` (FAILED ... raises)."""
    deadline = time.monotonic() + timeout_s
    for line in stream:
        if line.startswith(tag + " "):
            return line[len(tag) + 1 :].strip()
        if line.startswith("FAILED "):
            raise RuntimeError(line.strip())
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"a bench process never printed {tag}")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def rounds_for(args: argparse.Namespace, holders: int) -> int:
    return max(args.min_rounds, min(args.rounds, args.answers // holders))


def measure(args: argparse.Namespace, holders: int, transport: str) -> Point | str:
    """Run one coordinator process against ``holders`` holders in generator processes,
    whose holders speak ``transport`` ("session": the Session stream; "unary": calls).

    A holder's call that fails for good (its retries spent) ends the point: every process
    is stopped and the failure comes back as one line.
    """
    rounds = rounds_for(args, holders)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-load-run-") as run_dir:
        process = start_coordinator(args, holders, rounds, Path(run_dir) / "run")
        assert process.stdout is not None
        generators: list[subprocess.Popen[str]] = []
        try:
            port = int(read_tagged(process.stdout, "READY", READY_TIMEOUT_S))
            generators = start_generators(args, holders, f"127.0.0.1:{port}", transport)
            loads = []
            for generator in generators:
                assert generator.stdout is not None
                loads.append(json.loads(read_tagged(generator.stdout, "RESULT", args.timeout_s)))
            result = json.loads(read_tagged(process.stdout, "RESULT", args.timeout_s))
        except RuntimeError as error:
            return str(error)
        finally:
            for child in (process, *generators):
                if child.poll() is None and child is not process:
                    child.kill()
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
            for child in generators:
                child.wait(timeout=60)
    point = summarize(args, holders, result, loads, load_before, os.getloadavg()[0])
    return dataclasses.replace(point, transport=transport)


def summarize(
    args: argparse.Namespace,
    holders: int,
    result: dict[str, Any],
    loads: list[dict[str, Any]],
    load_before: float,
    load_after: float,
) -> Point:
    closes = [Sample(**sample) for sample in result["closes"]]
    measured = closes[args.warmup - 1 :]  # from the close of the last warm-up round
    if len(measured) < 2 or not result["finished"]:
        raise RuntimeError(f"{holders} holders: the run did not finish ({len(closes)} rounds)")
    first, last = measured[0], measured[-1]
    wall = last.wall - first.wall
    latencies = [(b.wall - a.wall) * 1e3 for a, b in itertools.pairwise(measured)]
    rounds = len(latencies)
    answers = rounds * holders
    fsyncs = result["fsyncs"][-1] - result["fsyncs"][args.warmup - 1]
    mib = 1024.0 * 1024.0
    idle = result["idle"] or result["ready"]
    retried: Counter[str] = Counter()
    failed_leaves: Counter[str] = Counter()
    for load in loads:
        retried.update(load["retried"])
        failed_leaves.update(load["failed_leaves"])
    return Point(
        holders=holders,
        rounds=rounds,
        rounds_per_s=rounds / wall,
        answers_per_s=answers / wall,
        p50_ms=statistics.median(latencies),
        p99_ms=percentile(latencies, 99),
        cpu_ms_per_answer=(last.cpu - first.cpu) / answers * 1e3,
        coordinator_cpu=(last.cpu - first.cpu) / wall,
        system_share=(last.system - first.system) / max(last.cpu - first.cpu, 1e-9),
        answers_per_fsync=answers / max(fsyncs, 1),
        ready_rss_mib=result["ready"]["rss"] / mib,
        idle_kib_per_holder=(idle["rss"] - result["ready"]["rss"]) / 1024.0 / holders,
        peak_rss_mib=max(result["peak_rss"], *(s.rss for s in closes)) / mib,
        peak_threads=max(s.threads for s in closes),
        generators=len(loads),
        generator_cpu=sum(load["cpu"] for load in loads) / max(load["wall"] for load in loads),
        retried=retried,
        failed_leaves=failed_leaves,
        closed_by=result["closed_by"],
        load_before=load_before,
        load_after=load_after,
    )


# -- the whole bench ---------------------------------------------------------------------
def holder_name(index: int) -> str:
    return f"holder-{index:05d}"


def make_certificates(folder: Path, holders: int) -> float:
    """CA, coordinator and one certificate per holder, by the project's own code; seconds."""
    started = time.monotonic()
    init_ca(folder)
    issue(folder, "coordinator", server_hosts=("127.0.0.1",))
    for index in range(holders):
        issue(folder, holder_name(index))
    return time.monotonic() - started


def print_point(point: Point) -> None:
    retried = ", ".join(f"{k} {v}" for k, v in sorted(point.retried.items())) or "none"
    print(
        f"  {point.holders:>7d} {point.transport:>7} {point.rounds:>6d} {point.rounds_per_s:>8.2f} "
        f"{point.answers_per_s:>9.0f} {point.p50_ms:>8.1f} {point.p99_ms:>8.1f} "
        f"{point.cpu_ms_per_answer:>7.3f} {point.coordinator_cpu:>5.2f} "
        f"{point.system_share:>4.0%} {point.answers_per_fsync:>6.1f} "
        f"{point.ready_rss_mib:>6.1f} {point.idle_kib_per_holder:>7.1f} "
        f"{point.peak_rss_mib:>7.1f} {point.peak_threads:>4d} "
        f"{point.generators:>3d} {point.generator_cpu:>5.2f} "
        f"{point.load_before:>5.1f}/{point.load_after:<5.1f} {retried}"
    )
    if set(point.closed_by) != {"all answered"}:
        print(f"          rounds closed by: {point.closed_by}")
    if point.failed_leaves:
        print(f"          Leave failed (best effort): {dict(point.failed_leaves)}")


def print_header(args: argparse.Namespace, cert_s: float, max_holders: int) -> None:
    print(
        f"bench_load: real Coordinator + serve() (grpc.aio) over mutual TLS on 127.0.0.1, "
        f"{os.cpu_count()} CPUs, grpcio {grpc.__version__}, Python {sys.version.split()[0]}"
    )
    print(
        f"  (1+1)-ES compare tasks, quorum = all holders, journal group-committed, collector "
        f"{'CPython default' if args.default_collector else 'as sottovoce server sets it'}; "
        f"holders in "
        f"separate asyncio processes, one TLS channel and certificate each ({max_holders} "
        f"certificates made in {cert_s:.1f} s), long-poll {args.poll_s:g} s, instant answers; "
        f"{args.answers} answers a point ({args.min_rounds}..{args.rounds} rounds) after "
        f"{args.warmup} warm-up"
    )
    print(
        f"  {'holders':>7} {'calls':>7} {'rounds':>6} {'rounds/s':>8} {'answers/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'ms/ans':>7} {'cpu':>5} {'sys':>4} {'a/sync':>6} "
        f"{'rss0':>6} {'KiB/idl':>7} {'rss^':>7} {'thr':>4} {'gen':>3} {'g-cpu':>5} "
        f"{'load':>11} retried"
    )


def main_bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-load-certs-") as certs:
        args.certs = Path(certs)
        cert_s = make_certificates(args.certs, max(*args.holders, 100))  # 100: the floor
        print_header(args, cert_s, max(args.holders))
        points: list[Point] = []
        floors = measure_floors(args) if args.floor else {}
        for transport, floor_ms in floors.items():
            print(
                f"  grpc.aio floor ({transport}): {floor_ms:.3f} ms of server CPU for two null "
                f"exchanges over mutual TLS (100 channels x 100; load {os.getloadavg()[0]:.1f})"
            )
        for holders in args.holders:
            for transport in args.transports:  # side by side, so the ratio is of one moment
                point = measure(args, holders, transport)
                if isinstance(point, str):
                    print(f"  {holders:>7d} {transport:>7} FAILED: {point}")
                    continue
                print_point(point)
                points.append(point)
        if floors:
            again = measure_floors(args)
            for transport, floor_ms in again.items():
                print(f"  grpc.aio floor ({transport}) again after the points: {floor_ms:.3f} ms")
                floors[transport] = (floors[transport] + floor_ms) / 2
    print_legend()
    if points:
        print_ratios(points, floors)


def print_legend() -> None:
    print(
        "  ms/ans: coordinator process CPU ms per answer; cpu: its CPU s / wall s (1.00 = one "
        "core); sys: its share in the kernel;\n  a/sync: answers per journal fsync (group "
        "commit); rss0: its RSS (MiB) serving, no holder yet; KiB/idl: RSS added per\n  "
        "connected, joined, waiting holder; rss^: its peak RSS (MiB); thr: its most threads; "
        "gen: load-generator processes;\n  g-cpu: their CPU s / wall s, together; load: the "
        "machine's 1-minute load average before/after the point;\n  retried: transient "
        "statuses the holders retried (RESOURCE_EXHAUSTED would be the service's limits)"
    )


def print_ratios(points: Sequence[Point], floors: Mapping[str, float]) -> None:
    for point in points:
        floor_ms = floors.get(point.transport)
        if floor_ms:
            print(
                f"  {point.holders} holders, {point.transport}: CPU per answer "
                f"{point.cpu_ms_per_answer:.3f} ms = {point.cpu_ms_per_answer / floor_ms:.2f}x "
                f"grpc.aio's floor ({floor_ms:.3f} ms)"
            )
    for transport in dict.fromkeys(point.transport for point in points):
        same = [point for point in points if point.transport == transport]
        base = same[0]
        for point in same[1:]:
            print(
                f"  {transport}, {point.holders} vs {base.holders} holders: rounds/s x"
                f"{point.rounds_per_s / base.rounds_per_s:.3f}, answers/s x"
                f"{point.answers_per_s / base.answers_per_s:.2f}, coordinator CPU per answer x"
                f"{point.cpu_ms_per_answer / base.cpu_ms_per_answer:.2f}"
            )
    by_key = {(point.holders, point.transport): point for point in points}
    for (holders, transport), point in by_key.items():
        unary = by_key.get((holders, "unary"))
        if transport == "session" and unary is not None:
            print(
                f"  {holders} holders, session vs unary: coordinator CPU per answer x"
                f"{point.cpu_ms_per_answer / unary.cpu_ms_per_answer:.2f}, answers/s x"
                f"{point.answers_per_s / unary.answers_per_s:.2f}"
            )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--holders", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=30, help="most measured rounds a point")
    parser.add_argument("--min-rounds", type=int, default=5, help="fewest measured rounds")
    parser.add_argument("--answers", type=int, default=40000, help="answers a point aims at")
    parser.add_argument("--warmup", type=int, default=2, help="rounds before measuring (>= 1)")
    parser.add_argument("--poll-s", type=float, default=20.0, help="holders' long-poll wait")
    parser.add_argument(
        "--generators", type=int, default=0, help="load-generator processes (0: one per 2,500)"
    )
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per point")
    parser.add_argument(
        "--no-floor", dest="floor", action="store_false", help="skip the null-RPC floor"
    )
    parser.add_argument(
        "--transports",
        nargs="+",
        choices=["session", "unary"],
        default=["session"],
        help="how the holders call: the Session stream (the real loop's way), unary calls, "
        "or both, measured side by side at each holder count",
    )
    parser.add_argument(
        "--default-collector",
        action="store_true",
        help="serve with CPython's default collector thresholds, not sottovoce server's",
    )
    parser.add_argument("--calls", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--transport", default="session", help=argparse.SUPPRESS)
    # The coordinator and generator processes (started by the bench itself).
    parser.add_argument(
        "--role",
        choices=["bench", "coordinator", "generator", "null-server", "null-client"],
        default="bench",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--total-rounds", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.min_rounds < 2:
        parser.error("need --warmup >= 1 and --min-rounds >= 2")
    if args.role == "coordinator":
        args.holders = args.holders[0]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role == "coordinator":
        coordinator_main(args)
    elif args.role == "generator":
        generator_main(args)
    elif args.role == "null-server":
        null_server_main(args)
    elif args.role == "null-client":
        null_client_main(args)
    else:
        main_bench(args)


if __name__ == "__main__":
    main()
