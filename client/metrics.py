"""A data holder's own Prometheus metrics, for its own operator, on its own machine only.

Off unless the holder's operator asks (``sottovoce client --metrics-address
127.0.0.1:PORT``): the figures here (lifetime budget spent and left, answers and refusals,
forward passes) are computed on the holder's data, so by default nothing listens, and when
asked the endpoint binds a loopback address only; any other address is refused. Nothing
here is ever sent to the coordinator: the holder's messages are the protocol's, whose
every field is fixed by :mod:`sottovoce.common.transport.wire`.

Values are read from the holder when scraped (its ledger and status), so they are the
ledger's own figures.

========================================  ==========================================
``sottovoce_holder_ledger_spent_bits``     lifetime bits charged to the data set
``sottovoce_holder_ledger_remaining_bits`` lifetime bits left
``sottovoce_holder_ledger_max_bits``       the policy's ``max_bits``
``sottovoce_holder_ledger_spent_epsilon``  lifetime ε spent (DP policies only)
``sottovoce_holder_ledger_max_epsilon``    the policy's ε limit (DP policies only)
``sottovoce_holder_tasks_answered_total``  tasks answered in this process
``sottovoce_holder_tasks_refused_total``   tasks refused (pre-data, with a code)
``sottovoce_holder_tasks_defaulted_total`` tasks answered with the mechanism's default
``sottovoce_holder_forward_passes_total``  forward passes of the current run's evaluator
``sottovoce_holder_log_version``           log steps applied
========================================  ==========================================
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sottovoce.common.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from sottovoce.client.holder import DataHolder


class _HolderCollector(Collector):
    def __init__(self, holder: DataHolder):
        self._holder = holder

    def collect(self) -> Iterator[Metric]:
        holder = self._holder
        ledger, status = holder.ledger, holder.status
        yield GaugeMetricFamily(
            "sottovoce_holder_ledger_spent_bits",
            "Lifetime bits charged to this data set's ledger.",
            value=ledger.spent_bits,
        )
        yield GaugeMetricFamily(
            "sottovoce_holder_ledger_remaining_bits",
            "Lifetime bits left in this data set's ledger.",
            value=ledger.remaining_bits,
        )
        yield GaugeMetricFamily(
            "sottovoce_holder_ledger_max_bits", "The policy's max_bits.", value=ledger.max_bits
        )
        if ledger.privacy is not None:
            yield GaugeMetricFamily(
                "sottovoce_holder_ledger_spent_epsilon",
                "Lifetime epsilon spent, at the policy's delta.",
                value=ledger.spent_epsilon(),
            )
            yield GaugeMetricFamily(
                "sottovoce_holder_ledger_max_epsilon",
                "The policy's lifetime epsilon limit.",
                value=ledger.privacy.max_epsilon,
            )
        yield CounterMetricFamily(
            "sottovoce_holder_tasks_answered", "Tasks answered.", value=status.answered
        )
        yield CounterMetricFamily(
            "sottovoce_holder_tasks_refused",
            "Tasks refused before reading data.",
            value=status.refused,
        )
        yield CounterMetricFamily(
            "sottovoce_holder_tasks_defaulted",
            "Tasks answered with the mechanism's default after a failure.",
            value=status.defaulted,
        )
        yield CounterMetricFamily(
            "sottovoce_holder_forward_passes",
            "Forward passes of the current run's evaluator.",
            value=holder.forward_passes,
        )
        yield GaugeMetricFamily(
            "sottovoce_holder_log_version", "Log steps applied.", value=holder.log_version
        )


def holder_registry(holder: DataHolder) -> CollectorRegistry:
    """A registry of the holder's metrics (not the process-wide default registry)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_HolderCollector(holder))
    return registry


def serve_holder_metrics(holder: DataHolder, address: str) -> int:
    """Serve the holder's metrics on ``address`` (HOST:PORT, HOST a loopback address); the
    port bound. Any other host is refused: these figures stay on the holder's machine."""
    host, sep, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--metrics-address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9465")
    if not _is_loopback(host):
        raise ConfigError(
            f"--metrics-address {address!r}: a holder's metrics bind a loopback address only "
            "(127.0.0.1 or ::1); they are computed on its data and stay on its machine"
        )
    try:
        server, _thread = start_http_server(
            int(port_text), addr=host, registry=holder_registry(holder)
        )
    except OSError as exc:
        raise ConfigError(f"--metrics-address {address!r}: cannot listen: {exc.strerror}") from exc
    return int(server.server_port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
