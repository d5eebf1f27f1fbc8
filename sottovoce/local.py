"""Driving a coordinator and holders in one process, without any transport.

The same objects the gRPC transport connects, called directly and in turn: what tests,
benchmarks and parameter sweeps use when separate processes would only add noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sottovoce.client.dataset_identity import open_dataset_ledger
from sottovoce.client.holder import DataHolder
from sottovoce.common.config import RunConfig
from sottovoce.common.models import load_model
from sottovoce.common.protocol.messages import RunFinished, Task
from sottovoce.common.transport.endpoints import CoordinatorEndpoint, HolderEndpoint
from sottovoce.federation import simulated_policy

Record = dict[str, object]


def join_all(coordinator: CoordinatorEndpoint, holders: Sequence[HolderEndpoint]) -> None:
    """Join every holder (each checks the run against its policy)."""
    for holder in holders:
        holder.accept_run(coordinator.join(holder.join_request()))


def drive_locally(
    coordinator: CoordinatorEndpoint,
    holders: Sequence[HolderEndpoint],
    *,
    max_rounds: int | None = None,
) -> RunFinished | None:
    """Serve tasks to the holders in turn until the run finishes (or ``max_rounds`` pass).

    Returns the RunFinished message, or None if stopped by ``max_rounds``.
    """
    join_all(coordinator, holders)
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        answered = False
        for holder in holders:
            message = coordinator.pull_task(
                holder.holder_id, holder.log_version, holder.log_head, timeout_s=0.0
            )
            if isinstance(message, RunFinished):
                for each in holders:
                    each.finish(message)
                return message
            if isinstance(message, Task):
                coordinator.push_answer(holder.holder_id, holder.answer(message))
                answered = True
        if answered:
            rounds += 1
        else:
            # Nothing to do for anyone: only possible if too few holders joined.
            raise RuntimeError("no holder got a task; fewer holders than min_holders?")
    return None


def open_local_holders(
    config: RunConfig,
    fingerprint: str,
    shards: Sequence[Sequence[Record]],
    root: Path,
    *,
    max_lambda: int | None = None,
) -> list[DataHolder]:
    """One in-process holder per shard, each with the policy `simulate` would write.

    For tests and benchmarks that want the demo's holders without processes; ledgers go
    under ``root`` (a scratch folder), one per shard. ``max_lambda``: see
    :func:`~sottovoce.federation.simulated_policy`.
    """
    holders = []
    smallest = min(len(records) for records in shards)
    for index, records in enumerate(shards):
        policy = simulated_policy(
            config, fingerprint, root / "ledgers", min_examples=smallest, max_lambda=max_lambda
        )
        ledger = open_dataset_ledger(
            policy.ledger_dir, records, policy.max_bits, privacy=policy.privacy_limit()
        )
        holders.append(
            DataHolder(f"h{index}", records, policy, ledger, lambda: load_model(config.model.name))
        )
    return holders
