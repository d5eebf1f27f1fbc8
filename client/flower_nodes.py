"""The data holder as a Flower ``ClientApp``: the same DataHolder, policy and ledger.

This file only moves messages: it decodes a Flower message (validated by
:mod:`sottovoce.common.transport.flower_records`), hands it to the transport-agnostic
:class:`~sottovoce.client.holder.DataHolder`, and encodes what the holder says. Every
privacy decision stays inside the holder, in this process, on the holder's machine: the
run is checked against the holder's policy (``accept_run``), every task against the
policy, the log chain and the lifetime budget, and the ledger is charged (fsync'd) before
the answer leaves (``answer``). Nothing the server sends can skip those checks, and a
refused task costs nothing.

Two ways Flower runs a ClientApp, both handled:

* in one long-lived process for many nodes (simulation): one holder per node id, built on
  the node's first message and kept, with its weights at the log version it reached;
* one short-lived process per message (``flwr-clientapp`` under a SuperNode): the holder is
  built anew for each message, and brought back to its log version from the steps it had
  applied, which the ClientApp keeps in the node's ``Context`` (which stays on the holder's
  machine). Its budget needs nothing of the kind: the ledger is on the holder's disk.

A deployment names the holder's files in the SuperNode's node config::

    flower-supernode --superlink LINK:9092 --root-certificates ca.pem \\
        --auth-supernode-private-key node.key \\
        --node-config 'data="/data/holder.jsonl" policy="/data/policy.toml" holder-id="hospital-a"'

(optional keys: ``model``, ``dtype``, ``status``, ``report``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from sottovoce.client.holder import DataHolder
from sottovoce.common.errors import PolicyViolation
from sottovoce.common.protocol.messages import Answer, RunFinished, RunSpec
from sottovoce.common.storage import atomic_write_json
from sottovoce.common.transport.flower_records import (
    HolderState,
    answer_content,
    holder_state_content,
    join_reply_content,
    read_finish,
    read_join,
    read_saved_log,
    read_task,
    refusal_content,
    saved_log_record,
)

log = logging.getLogger("sottovoce.flower.client")

SAVED_LOG = "sottovoce.saved_log"  # the node Context record holding the applied steps
RESTORED_REASON = "restored from the node's context"


@dataclass
class NodeHolder:
    """A node's data holder, and where its local report goes at the end (if anywhere)."""

    holder: DataHolder
    report_path: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


HolderFactory = Callable[[Context], NodeHolder]


class HolderNodes:
    """The ClientApp's handlers: one :class:`NodeHolder` per node id, built on first use."""

    def __init__(self, factory: HolderFactory):
        self._factory = factory
        self._nodes: dict[int, NodeHolder] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        """What crosses a pickle (Ray ships the ClientApp to its actor processes): the
        factory only. Each process builds its own holders, as a new ClientApp process does."""
        return {"_factory": self._factory}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._factory = state["_factory"]  # type: ignore[assignment]
        self._nodes = {}
        self._lock = threading.Lock()

    def node(self, context: Context) -> NodeHolder:
        with self._lock:
            node = self._nodes.get(context.node_id)
            if node is None:
                node = self._factory(context)
                self._nodes[context.node_id] = node
            return node

    def forget(self, node_id: int | None = None) -> None:
        """Close and drop one node's holder (or all): what a new ClientApp process has.

        Closing releases each ledger's lock, so the data set can be served again.
        """
        with self._lock:
            for key in [node_id] if node_id is not None else list(self._nodes):
                node = self._nodes.pop(key, None)
                if node is not None:
                    node.holder.ledger.close()

    # -- handlers ------------------------------------------------------------------------
    def on_join(self, message: Message, context: Context) -> Message:
        """Check the run against the policy; declare who we are only if we take part."""
        spec = read_join(message.content)
        node = self.node(context)
        with node.lock:
            holder = node.holder
            refusal = self._enter_run(holder, spec, context)
            if refusal is not None:
                log.warning("refusing run %s: %s", spec.run_id, refusal)
                return _reply(message, refusal_content(refusal.code, _state(holder)))
            content = join_reply_content(holder.join_request(), _state(holder))
        return _reply(message, content)

    def on_task(self, message: Message, context: Context) -> Message:
        """Answer within the policy and the budget, or refuse; the holder decides which."""
        spec, task = read_task(message.content)
        node = self.node(context)
        with node.lock:
            holder = node.holder
            refusal = self._enter_run(holder, spec, context)
            if refusal is not None:
                log.warning("refusing task %s: %s", task.task_id, refusal)
                answer = Answer(task_id=task.task_id, choice=None, refusal=refusal.code)
            else:
                answer = holder.answer(task)
            _save_log(holder, context)
            content = answer_content(answer, _state(holder))
        return _reply(message, content)

    def on_finish(self, message: Message, context: Context) -> Message:
        """Bring the weights to the final model; write the local report if asked to."""
        spec, finished = read_finish(message.content)
        node = self.node(context)
        with node.lock:
            holder = node.holder
            refusal = self._enter_run(holder, spec, context)
            if refusal is not None:  # not our run: nothing to catch up with
                log.warning("not finishing run %s: %s", spec.run_id, refusal)
                return _reply(message, holder_state_content(_state(holder)))
            holder.finish(finished)
            _save_log(holder, context)
            if node.report_path is not None and holder.log_head == finished.log_head:
                atomic_write_json(node.report_path, holder.local_report(finished.bits_spent_total))
            content = holder_state_content(_state(holder))
        return _reply(message, content)

    def _enter_run(
        self, holder: DataHolder, spec: RunSpec, context: Context
    ) -> PolicyViolation | None:
        """The holder's own check of the run, then its weights back at its log version;
        the refusal if the holder will not take part (it keeps state for the same run)."""
        try:
            holder.accept_run(spec)
            _restore_log(holder, context)
        except PolicyViolation as refusal:
            return refusal
        return None


def make_client_app(
    factory: HolderFactory, *, mods: list[Mod] | None = None
) -> tuple[ClientApp, HolderNodes]:
    """A ClientApp whose nodes' holders come from ``factory`` (called once per node id).

    ``mods`` are Flower mods wrapped around every handler (logging, size limits, ...).
    """
    nodes = HolderNodes(factory)
    app = ClientApp(mods=mods)
    app.query("join")(nodes.on_join)
    app.query("task")(nodes.on_task)
    app.query("finish")(nodes.on_finish)
    return app, nodes


# -- the holder's log across ClientApp processes ---------------------------------------
def _save_log(holder: DataHolder, context: Context) -> None:
    if holder.spec is None or holder.log is None:
        return
    context.state[SAVED_LOG] = saved_log_record(
        holder.spec.run_id, tuple(holder.log), holder.log.head
    )


def _restore_log(holder: DataHolder, context: Context) -> None:
    """A holder built anew for this message catches up with the steps it had applied.

    The steps come from this node's own Context (never from the server) and go through
    the holder's own checks (hash chain, perturbation cap) as the final steps of a run do.
    """
    record = context.state.get(SAVED_LOG)
    if holder.spec is None or holder.log_version > 0 or not isinstance(record, ConfigRecord):
        return
    saved = read_saved_log(record)
    if saved.run_id != holder.spec.run_id or saved.final_version == 0:
        return
    holder.finish(
        RunFinished(
            run_id=saved.run_id,
            reason=RESTORED_REASON,
            final_version=saved.final_version,
            log_head=saved.log_head,
            bits_spent_total=0.0,
            new_steps=saved.new_steps,
        )
    )
    holder.status.finished = None  # the run goes on: finish() was only the catch-up
    if holder.log_head != saved.log_head:
        raise PolicyViolation(f"run {saved.run_id}: the node's saved log does not verify")


def _state(holder: DataHolder) -> HolderState:
    return HolderState(log_version=holder.log_version, log_head=holder.log_head)


def _reply(message: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=message)


# -- the default factory: the holder's files from the SuperNode's node config ----------
