"""Prometheus metrics of a running coordinator, for an operator watching a run.

What the journal holds (rounds, accepted steps, bits heard per holder and in total,
evictions, refusal codes) is read from the coordinator's state when Prometheus scrapes,
under the coordinator's lock, so a metric can never drift from the journal's figure: it
*is* that figure. What the journal does not hold is counted as it happens: how long an
answer took after its task left (a histogram), the gRPC calls the service refused, by
status, and the rate-limit refusals among them.

Epsilon per holder is computed as the run report computes it (the coordinator's view,
assuming ``privacy.examples_per_holder`` examples each; a holder's own ledger has the
authoritative figure), outside the lock and cached per answer count.

The endpoint binds ``127.0.0.1`` unless told otherwise (``sottovoce server
--metrics-address``): holder names and bit counts are for the coordinator's operator.

==========================================  =========================================
``sottovoce_rounds_total``                   rounds closed (journaled)
``sottovoce_rounds_max``                     the run's ``max_rounds``
``sottovoce_accepted_steps_total``           steps in the log
``sottovoce_bits_heard_total``               bits heard, all holders
``sottovoce_bit_budget_bits``                the run's ``bit_budget``
``sottovoce_holder_bits_heard_total``        bits heard per holder (label ``holder``)
``sottovoce_holder_epsilon``                 ε per holder as the coordinator computes it
``sottovoce_holders``                        holders by ``state``: active, evicted
``sottovoce_evictions_total``                evictions journaled
``sottovoce_holder_refusals_total``          refusals holders sent, by ``code``
                                             (:class:`~sottovoce.common.errors.RefusalCode`)
``sottovoce_run_finished``                   1 once the run is over
``sottovoce_answer_latency_seconds``         a task's delivery to its answer (histogram)
``sottovoce_rpc_refusals_total``             calls the service refused, by gRPC ``status``
``sottovoce_rate_limit_refusals_total``      of which over a per-holder limit
``sottovoce_rpc_seconds``                    time to serve a call, by ``method``
==========================================  =========================================
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sottovoce.common.accounting import PrivacyAccountant, answer_event
from sottovoce.common.errors import ConfigError, RefusalCode
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.server.run_state import AnswerRecord

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from sottovoce.server.coordinator import Coordinator

logger = logging.getLogger(__name__)

DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"  # loopback: for the operator on this machine
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30)


@dataclass(frozen=True)
class RunFigures:
    """What the coordinator's state says, copied under its lock."""

    rounds: int
    max_rounds: int
    accepted_steps: int
    bits_total: float
    bit_budget: float
    bits_per_holder: dict[str, float]
    answers_per_holder: dict[str, int]
    refusal_codes: dict[str, int]
    active: int
    evicted: int
    evictions: int
    finished: bool


def run_figures(coordinator: Coordinator) -> RunFigures:
    """The coordinator's figures now (consistent: taken under its lock)."""

    def read() -> RunFigures:
        state = coordinator.state
        evicted = {e.holder_id for e in state.evictions}
        active = coordinator.active_holders
        answers: dict[str, int] = {}
        for closed in state.rounds:  # what the run report counts for epsilon
            for holder in (*closed.values, *closed.choices):
                answers[holder] = answers.get(holder, 0) + 1
        return RunFigures(
            rounds=len(state.rounds),
            max_rounds=coordinator.config.run.max_rounds,
            accepted_steps=state.log.version,
            bits_total=state.bits_total,
            bit_budget=coordinator.config.run.bit_budget,
            bits_per_holder=dict(state.bits_per_holder),
            answers_per_holder=answers,
            refusal_codes=dict(state.refusal_codes),
            active=len(active),
            evicted=len(evicted - active),
            evictions=len(state.evictions),
            finished=state.finished_reason is not None,
        )

    return coordinator.read_locked(read)


class _RunCollector(Collector):
    """The journal's figures, read at scrape time."""

    def __init__(self, coordinator: Coordinator):
        self._coordinator = coordinator
        spec, config = coordinator.spec, coordinator.config
        candidates = 1 if spec.answer_kind is AnswerKind.DP_SCALAR else config.optimizer.candidates
        self._event = answer_event(spec.dp, spec.answer_kind, candidates, config.sampling_rate)
        self._delta = spec.dp.delta

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one collector per coordinator, kept
    def _epsilon(self, answers: int) -> float:
        assert self._event is not None
        return PrivacyAccountant([self._event] * answers).epsilon(self._delta)

    def collect(self) -> Iterator[Metric]:
        figures = run_figures(self._coordinator)
        yield _counter("sottovoce_rounds", "Rounds closed (journaled).", figures.rounds)
        yield _gauge("sottovoce_rounds_max", "The run's max_rounds.", figures.max_rounds)
        yield _counter(
            "sottovoce_accepted_steps", "Steps in the run's log.", figures.accepted_steps
        )
        yield _counter("sottovoce_bits_heard", "Bits heard, all holders.", figures.bits_total)
        yield _gauge("sottovoce_bit_budget_bits", "The run's bit_budget.", figures.bit_budget)
        per_holder = CounterMetricFamily(
            "sottovoce_holder_bits_heard", "Bits heard from each holder.", labels=["holder"]
        )
        for holder, bits in sorted(figures.bits_per_holder.items()):
            per_holder.add_metric([holder], bits)
        yield per_holder
        if self._event is not None:
            epsilon = GaugeMetricFamily(
                "sottovoce_holder_epsilon",
                "Epsilon per holder as the coordinator computes it (at the run's delta; the "
                "holder's ledger has the authoritative figure).",
                labels=["holder"],
            )
            for holder, answers in sorted(figures.answers_per_holder.items()):
                epsilon.add_metric([holder], self._epsilon(answers))
            yield epsilon
        holders = GaugeMetricFamily("sottovoce_holders", "Holders by state.", labels=["state"])
        holders.add_metric(["active"], figures.active)
        holders.add_metric(["evicted"], figures.evicted)
        yield holders
        yield _counter("sottovoce_evictions", "Evictions journaled.", figures.evictions)
        refusals = CounterMetricFamily(
            "sottovoce_holder_refusals",
            "Refusals holders sent, by reason code.",
            labels=["code"],
        )
        for code in RefusalCode:
            refusals.add_metric([code.value], figures.refusal_codes.get(code.value, 0))
        yield refusals
        yield _gauge("sottovoce_run_finished", "1 once the run is over.", int(figures.finished))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class CoordinatorMetrics:
    """A coordinator's metrics in a registry of their own; also the gRPC service's
    :class:`~sottovoce.server.grpc_service.ServiceObserver`."""

    def __init__(self, coordinator: Coordinator, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.registry.register(_RunCollector(coordinator))
        self._latency = Histogram(
            "sottovoce_answer_latency_seconds",
            "Seconds from a task's delivery to its holder's answer.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._refused = Counter(
            "sottovoce_rpc_refusals",
            "Calls the gRPC service refused, by status.",
            ["status"],
            registry=self.registry,
        )
        self._rate_limited = Counter(
            "sottovoce_rate_limit_refusals",
            "Calls refused over a per-holder limit (RESOURCE_EXHAUSTED).",
            registry=self.registry,
        )
        self._rpc = Histogram(
            "sottovoce_rpc_seconds",
            "Seconds to serve a call (a PullTask's wait included).",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        coordinator.add_answer_listener(self._answered)

    def _answered(self, record: AnswerRecord, latency_s: float | None) -> None:
        if latency_s is not None:
            self._latency.observe(max(0.0, latency_s))

    # -- ServiceObserver ---------------------------------------------------------------------
    def rejected(self, code: grpc.StatusCode) -> None:
        self._refused.labels(code.name).inc()
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._rate_limited.inc()

    def served(self, method: str, seconds: float) -> None:
        self._rpc.labels(method).observe(seconds)

    def serve_http(self, address: str) -> int:
        """Serve ``/metrics`` on ``address`` (HOST:PORT; port 0 picks one); the port bound."""
        host, port = parse_metrics_address(address)
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics: cannot listen on {address}: {exc.strerror}") from exc
        return int(server.server_port)


def parse_metrics_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port); ConfigError if it is not."""
    host, sep, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"metrics address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port_text)
