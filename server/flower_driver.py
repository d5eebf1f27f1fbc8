"""The coordinator over Flower: the same Coordinator, driven over a ServerApp's Grid.

The rounds, the strategy, the votes, the journal and the run's bit budget all stay in
the transport-agnostic :class:`~sottovoce.server.coordinator.Coordinator`; this file only
turns its tasks into Flower messages and the holders' replies back into answers, exactly
as the gRPC service does with RPCs:

* a new node is invited (``query.join`` with the run spec); its reply is the holder's
  join request, which goes to ``Coordinator.join``, or the holder's refusal. The node id
  is bound to the holder id it declared, and no other node may take that holder id;
* every node with nothing in flight gets ``Coordinator.pull_task`` for the log version its
  holder last said it has, as a ``query.task`` message; its reply goes to
  ``Coordinator.push_answer``. Rounds open and close in the coordinator (quorum, deadline),
  never here; a message outlives its round's deadline, so that a late answer is journaled
  as late (its bits counted) as a native holder's is, not lost in transit;
* at the end each holder gets its ``RunFinished`` (``query.finish``) with the steps it
  lacks, so it can reach the final model and write its local report.

A node whose ClientApp fails is treated as a holder that left (``Coordinator.leave``),
and invited again a little later, as a native holder that restarts would join again; a
node whose holder the coordinator evicted for missing rounds is invited again the same
way. A reply is taken only as the answer to the task its message carried: the
coordinator refuses answers to tasks a holder was not handed, and answers after the end.

The ServerApp objects and their factories are the app layer's
(:mod:`sottovoce.flower_apps`); Flower's simulation runtime in threads is
:mod:`sottovoce.flower_runtime`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from sottovoce.common.errors import (
    LogIntegrityError,
    NotJoined,
    RequestRefused,
    SottovoceError,
)
from sottovoce.common.protocol.messages import RunFinished, Task
from sottovoce.common.transport.flower_records import (
    FINISH,
    JOIN,
    TASK,
    HolderState,
    finish_content,
    join_content,
    read_answer,
    read_holder_state,
    read_join_reply,
    task_content,
)
from sottovoce.common.transport.wire import WireError
from sottovoce.server.coordinator import Coordinator

log = logging.getLogger("sottovoce.flower.server")

CoordinatorFactory = Callable[[Context], Coordinator]
_EXPIRED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


@dataclass(frozen=True)
class DriverSettings:
    """How the ServerApp polls and waits; none of it changes what the run computes."""

    poll_interval_s: float = 0.02  # between pulls of replies when nothing happened
    discover_every_s: float = 1.0  # between looks for newly connected nodes
    join_ttl_s: float = 600.0  # a ClientApp may load its model before it replies
    finish_timeout_s: float = 60.0  # wait for answers in flight, then for the final replies
    rejoin_after_s: float = 10.0  # a node whose ClientApp failed is invited again after this
    late_answer_s: float = 3600.0  # a task outlives its round by this: a late answer still
    # reaches the coordinator's journal (and counts its bits), as a native holder's does
    idle_timeout_s: float | None = None  # stop the run if no holder replies for this long


@dataclass
class FlowerRunSummary:
    """How a run went on the Flower side: which node was which holder, who refused."""

    finished_reason: str | None
    holders: dict[int, str]  # node id -> holder id
    refused: dict[int, str]  # node id -> reason
    final_states: dict[str, HolderState]  # holder id -> state after its final message


@dataclass
class _Node:
    node_id: int
    holder_id: str | None = None  # bound at the first successful join
    joined: bool = False
    state: HolderState | None = None
    refused: str | None = None
    invite_after: float = 0.0
    failed_task: str | None = None


@dataclass
class _InFlight:
    node_id: int
    kind: str
    expires_at: float
    task_id: str | None = None


@dataclass
class FlowerDriver:
    """Moves one run's tasks and answers between a Coordinator and Flower nodes."""

    coordinator: Coordinator
    grid: Grid
    settings: DriverSettings = field(default_factory=DriverSettings)
    _nodes: dict[int, _Node] = field(default_factory=dict)
    _in_flight: dict[str, _InFlight] = field(default_factory=dict)
    _final_states: dict[str, HolderState] = field(default_factory=dict)
    _discover_at: float = 0.0

    def run(self) -> FlowerRunSummary:
        """Drive rounds until the coordinator's run is over; then send the final messages."""
        last_reply = time.monotonic()
        while not self.coordinator.finished:
            self.coordinator.tick()
            sent = self._invite_new_nodes() + self._send_tasks()
            received = self._collect()
            now = time.monotonic()
            if received:
                last_reply = now
            elif self._idle_too_long(now - last_reply):
                break
            if not sent and not received:
                time.sleep(self.settings.poll_interval_s)
        self._finish()
        return FlowerRunSummary(
            finished_reason=self.coordinator.state.finished_reason,
            holders={n.node_id: n.holder_id for n in self._nodes.values() if n.holder_id},
            refused={n.node_id: n.refused for n in self._nodes.values() if n.refused},
            final_states=dict(self._final_states),
        )

    # -- joining -------------------------------------------------------------------------
    def _invite_new_nodes(self) -> int:
        now = time.monotonic()
        if now >= self._discover_at:  # a SuperLink call: not on every poll
            for node_id in self.grid.get_node_ids():
                self._nodes.setdefault(node_id, _Node(node_id))
            self._discover_at = now + self.settings.discover_every_s
        sent = 0
        for node_id, node in sorted(self._nodes.items()):
            if node.joined or node.refused or self._busy(node_id) or now < node.invite_after:
                continue
            content = join_content(self.coordinator.spec)
            sent += self._push(node_id, JOIN, content, "join", self.settings.join_ttl_s)
        return sent

    def _on_join_reply(self, node: _Node, reply: Message) -> None:
        if reply.has_error():
            self._node_failed(node, f"its ClientApp failed to join: {reply.error.reason}")
            return
        try:
            joined = read_join_reply(reply.content)
        except WireError as exc:
            self._node_failed(node, f"bad join reply: {exc}")
            return
        if joined.refusal is not None or joined.request is None:
            node.refused = f"the holder refused the run: {joined.refusal}"
            log.warning("node %d: %s", node.node_id, node.refused)
            return
        holder_id = joined.request.holder_id
        owner = self._node_of(holder_id)
        if owner is not None and owner.node_id != node.node_id:
            node.refused = f"holder id {holder_id!r} is already node {owner.node_id}'s"
            log.warning("node %d: %s", node.node_id, node.refused)
            return
        try:
            self.coordinator.join(joined.request)
        except RequestRefused as refusal:
            node.refused = str(refusal)
            log.warning("node %d not admitted: %s", node.node_id, refusal)
            return
        node.holder_id, node.joined, node.state = holder_id, True, joined.state
        log.info("node %d joined as holder %s", node.node_id, holder_id)

    # -- tasks ---------------------------------------------------------------------------
    def _send_tasks(self) -> int:
        sent = 0
        for node in self._nodes.values():
            if not node.joined or self._busy(node.node_id):
                continue
            message = self._pull(node)
            if not isinstance(message, Task) or message.task_id == node.failed_task:
                continue
            ttl = max(1.0, message.deadline_unix - time.time()) + self.settings.late_answer_s
            content = task_content(self.coordinator.spec, message)
            group = f"round-{message.round_index}"
            sent += self._push(node.node_id, TASK, content, group, ttl, message.task_id)
        return sent

    def _pull(self, node: _Node) -> Task | RunFinished | None:
        assert node.holder_id is not None and node.state is not None
        try:
            return self.coordinator.pull_task(
                node.holder_id, node.state.log_version, node.state.log_head, timeout_s=0.0
            )
        except NotJoined as exc:  # evicted for missing rounds: it may join again
            node.joined = False
            node.invite_after = time.monotonic() + self.settings.rejoin_after_s
            log.warning("node %d: %s", node.node_id, exc)
            return None
        except (LogIntegrityError, RequestRefused) as exc:
            self.coordinator.leave(node.holder_id)
            node.joined, node.refused = False, str(exc)
            log.warning("node %d dropped: %s", node.node_id, exc)
            return None

    def _on_task_reply(self, node: _Node, sent: _InFlight, reply: Message) -> None:
        holder_id = node.holder_id
        assert holder_id is not None
        if reply.has_error() and reply.error.code in _EXPIRED:
            log.warning("node %d: task %s expired unanswered", node.node_id, sent.task_id)
            return
        if reply.has_error():
            node.failed_task = sent.task_id
            self._node_failed(node, f"its ClientApp failed on a task: {reply.error.reason}")
            return
        try:
            answer, state = read_answer(reply.content)
        except WireError as exc:
            node.failed_task = sent.task_id
            self._node_failed(node, f"bad answer: {exc}")
            return
        node.state = state
        if answer.task_id != sent.task_id:
            log.warning(
                "node %d: answer to %s in the reply to task %s: not taken",
                node.node_id,
                answer.task_id,
                sent.task_id,
            )
            return
        try:
            self.coordinator.push_answer(holder_id, answer)
        except SottovoceError as exc:
            log.warning("node %d: answer not taken: %s", node.node_id, exc)

    def _node_failed(self, node: _Node, why: str) -> None:
        """Like a native holder whose process died: it leaves, and may join again later."""
        log.warning("node %d: %s", node.node_id, why)
        if node.joined and node.holder_id is not None:
            self.coordinator.leave(node.holder_id)
        node.joined = False
        node.invite_after = time.monotonic() + self.settings.rejoin_after_s

    # -- the end -------------------------------------------------------------------------
    def _finish(self) -> None:
        """Take the answers still in flight, then tell every holder the run is over."""
        self._wait_in_flight(self.settings.finish_timeout_s)
        for node in self._nodes.values():
            if not node.joined:
                continue
            message = self._pull(node)
            if isinstance(message, RunFinished):
                content = finish_content(self.coordinator.spec, message)
                ttl = self.settings.finish_timeout_s
                self._push(node.node_id, FINISH, content, "finish", ttl)
        self._wait_in_flight(self.settings.finish_timeout_s)
        for node in self._nodes.values():  # as native holders leave once they have the end
            if node.joined and node.holder_id is not None:
                self.coordinator.leave(node.holder_id)
                node.joined = False

    def _on_finish_reply(self, node: _Node, reply: Message) -> None:
        if reply.has_error() or node.holder_id is None:
            log.warning("node %d did not take the end of the run", node.node_id)
            return
        try:
            self._final_states[node.holder_id] = read_holder_state(reply.content)
        except WireError as exc:
            log.warning("node %d: bad final reply: %s", node.node_id, exc)

    def _wait_in_flight(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < end:
            if not self._collect():
                time.sleep(self.settings.poll_interval_s)

    def _idle_too_long(self, idle_s: float) -> bool:
        limit = self.settings.idle_timeout_s
        if limit is None or idle_s < limit:
            return False
        self.coordinator.stop(f"no holder replied for {limit:g} s")
        return True

    # -- messages ------------------------------------------------------------------------
    def _push(
        self,
        node_id: int,
        kind: str,
        content: RecordDict,
        group: str,
        ttl_s: float,
        task_id: str | None = None,
    ) -> int:
        message = Message(content, node_id, kind, ttl=ttl_s, group_id=group)
        ids = list(self.grid.push_messages([message]))
        if not ids:
            log.warning("node %d: could not queue a %s message", node_id, kind)
            return 0
        expires = time.monotonic() + ttl_s + 5.0
        self._in_flight[ids[0]] = _InFlight(node_id, kind, expires, task_id)
        return 1

    def _collect(self) -> int:
        """Handle every reply that has arrived; forget messages whose time is up."""
        if not self._in_flight:
            return 0
        replies = list(self.grid.pull_messages(list(self._in_flight)))
        for reply in replies:
            sent = self._in_flight.pop(reply.metadata.reply_to_message_id, None)
            if sent is None:
                continue
            node = self._nodes[sent.node_id]
            if sent.kind == JOIN:
                self._on_join_reply(node, reply)
            elif sent.kind == TASK:
                self._on_task_reply(node, sent, reply)
            else:
                self._on_finish_reply(node, reply)
        now = time.monotonic()
        for message_id, sent in list(self._in_flight.items()):
            if now > sent.expires_at:
                del self._in_flight[message_id]
                log.warning("node %d: no reply to a %s message", sent.node_id, sent.kind)
        return len(replies)

    def _busy(self, node_id: int) -> bool:
        return any(sent.node_id == node_id for sent in self._in_flight.values())

    def _node_of(self, holder_id: str) -> _Node | None:
        return next((n for n in self._nodes.values() if n.holder_id == holder_id), None)


# -- the ServerApp ------------------------------------------------------------------------
def make_server_app(
    coordinator_for: CoordinatorFactory,
    settings: DriverSettings | None = None,
    on_finished: Callable[[Coordinator, FlowerRunSummary], None] | None = None,
) -> ServerApp:
    """A ServerApp that runs the coordinator ``coordinator_for(context)`` returns."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        coordinator = coordinator_for(context)
        summary = FlowerDriver(coordinator, grid, settings or DriverSettings()).run()
        log.info("run %s over: %s", coordinator.state.run_id, summary.finished_reason)
        if on_finished is not None:
            on_finished(coordinator, summary)

    return server_app
