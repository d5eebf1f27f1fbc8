"""The coordinator: runs rounds of questions to data holders, transport-agnostic.

A round asks every active holder the same question (the strategy's candidates around
the incumbent) and closes when all of them answered, or at its deadline if a quorum did.
BBoxER: the weighted plurality of their choices goes to the strategy, and an accepted
candidate becomes a step in the log. DPZero: their scalars are aggregated (mean or a
robust rule) and the strategy turns the estimate into a step. Every answer and every
round is journaled before it has any effect (see :mod:`sottovoce.server.run_state`).

Who is heard, and how much:

* **Only the task a holder was handed last counts.** A task is journaled as delivered
  before it leaves; an answer to any other task id (one the holder could compute, since
  task ids are deterministic, but never pulled) or one pushed after the run is over is
  refused and changes nothing. The journal's delivery records let a restarted coordinator
  keep an answer to a task its crashed predecessor handed out.
* **The bits heard never exceed ``run.bit_budget``.** A round opens only if the answers
  it asks for fit beside the bits already heard and the bits *reserved* for answers still
  due; each task issued reserves its answer's bits until the answer comes, the holder
  moves on to a newer task, leaves or is evicted, or (if it was never handed out) its
  round closes. An answer without a reservation (after a restart, say) is counted only if
  its bits still fit; otherwise it is dropped unread.
* **Holders that go quiet are dropped.** A holder asked in ``server.max_missed_rounds``
  rounds in a row that closed without its answer is evicted (journaled): rounds stop
  waiting for it and the quorum counts the others. It may join again; its count is
  cleared only by an answer in time, so a holder that comes back and misses again is
  dropped after one more round.

The coordinator is the budget's second line of defence: each holder enforces its own
lifetime budget whatever the coordinator does.

Two ways to drive it. Threads (the Flower driver, in-process runs): ``pull_task`` blocks on
the condition variable, and every call returns only once what it journaled is on disk.
An event loop (the asyncio gRPC service): ``poll_task`` never blocks, ``watch`` registers a
waiting holder and a callback that is called (with the lock held, so it must only hand
the news to its loop) when something it waits for happens: its task is ready, the run
ended, it was evicted. The other calls take ``durable=False`` and the caller waits for
``on_durable`` before its reply leaves. Wake-ups are per holder, so an answer wakes no one
and a round's opening wakes each waiting holder once: the work per answer does not grow
with the number of holders.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from sottovoce.common.config import RunConfig
from sottovoce.common.errors import LogIntegrityError, NotJoined, RequestRefused
from sottovoce.common.protocol.answers import (
    AnswerKind,
    check_ranking,
    choice_outcomes,
    encode_ranking,
)
from sottovoce.common.protocol.limits import MAX_DELTA_FLOATS, MAX_NEW_STEPS, MAX_REASON_LENGTH
from sottovoce.common.protocol.messages import (
    Answer,
    Candidate,
    JoinRequest,
    RunFinished,
    RunSpec,
    Task,
)
from sottovoce.common.quantization import dequantize
from sottovoce.common.steplog import Step
from sottovoce.server.run_state import AnswerRecord, Eviction, RoundRecord, RunState
from sottovoce.server.strategies import RoundAnswers, Strategy, build_strategy

logger = logging.getLogger(__name__)

RoundListener = Callable[[RoundRecord, RunState], None]
EvictionListener = Callable[[str], None]
AnswerListener = Callable[[AnswerRecord, float | None], None]
Wake = Callable[[], None]
T = TypeVar("T")
BUDGET_SLACK = 1e-9  # float sums of log2(λ+1) bits; never enough to hear one more answer


def task_id_for(run_id: str, round_index: int, holder_id: str) -> str:
    """Deterministic, so a restarted coordinator re-asks a round under the same task ids."""
    return f"{run_id}:r{round_index}:{_holder_tag(holder_id)}"


@functools.lru_cache(maxsize=1 << 16)
def _holder_tag(holder_id: str) -> str:
    """A holder's part of its task ids (computed a few times per answer: kept)."""
    return hashlib.sha256(holder_id.encode()).hexdigest()[:8]


@dataclass
class OpenRound:
    """The round in flight: its question and the answers heard so far."""

    index: int
    candidates: tuple[Candidate, ...]
    task_ids: dict[str, str]
    deadline: float
    choices: dict[str, int] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)

    _order: list[str] = field(default_factory=list)  # task_ids' holders, in order
    _cursor: int = 0  # every holder before it in _order has answered

    def answered(self, holder_id: str) -> bool:
        return holder_id in self.choices or holder_id in self.values or holder_id in self.refusals

    def unanswered(self) -> Iterator[str]:
        """The holders still without an answer, in order. Answered ones at the front are
        skipped for good, so checking after every answer whether the round can close costs
        O(1) amortized instead of a pass over every holder (O(N^2) a round)."""
        if len(self._order) != len(self.task_ids):
            self._order, self._cursor = list(self.task_ids), 0
        order = self._order
        while self._cursor < len(order) and self.answered(order[self._cursor]):
            self._cursor += 1
        # By index, not islice: islice would step over the answered front on every call.
        return (order[i] for i in range(self._cursor, len(order)) if not self.answered(order[i]))

    @property
    def heard(self) -> int:
        """Answers that count towards the quorum (refusals do not)."""
        return len(self.choices) + len(self.values)

    def record(self, answer: AnswerRecord) -> None:
        if answer.refusal is not None:
            self.refusals[answer.holder_id] = answer.refusal
        elif answer.value is not None:
            self.values[answer.holder_id] = answer.value
        elif answer.choice is not None:
            self.choices[answer.holder_id] = answer.choice


class Coordinator:
    """Implements :class:`~sottovoce.common.transport.endpoints.CoordinatorEndpoint`."""

    def __init__(
        self,
        config: RunConfig,
        state: RunState,
        model_fingerprint: str,
        *,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.state = state
        self.model_fingerprint = model_fingerprint
        self._clock = clock
        self._cond = threading.Condition()
        self._active: set[str] = set()
        self._known: set[str] = set()  # every holder that joined (it may read the run's end)
        self._polling: Counter[str] = Counter()  # holders with a PullTask waiting right now
        self._reserved: dict[str, float] = {}  # task id -> bits held for its answer
        self._round: OpenRound | None = None
        self._listeners: list[RoundListener] = []
        self._eviction_listeners: list[EvictionListener] = []
        self._answer_listeners: list[AnswerListener] = []
        self._waiters: dict[str, list[Wake]] = {}  # holder -> wake-ups of its waiting polls
        self._delivered_at: dict[str, float] = {}  # task id -> when it left (answer latency)
        self.strategy: Strategy = build_strategy(config, state.step_size)
        self.strategy.resume(
            [
                (
                    closed.round_index,
                    RoundAnswers(closed.candidates, closed.choices, closed.values)
                    if closed.told
                    else None,
                )
                for closed in state.rounds
            ]
        )
        self.spec = RunSpec(
            run_id=state.run_id,
            algorithm=config.run.algorithm,
            model_fingerprint=model_fingerprint,
            parametrization=config.parametrization,
            fitness=config.fitness,
            batch=config.evaluation,
            answer_kind=config.answer_kind,
            bit_budget=config.run.bit_budget,
            max_rounds=config.run.max_rounds,
            log_genesis=state.genesis,
            dp=config.dp_spec(),
            direction_seed=config.run.seed,
            rank_depth=config.optimizer.rank_depth
            if config.answer_kind is AnswerKind.RANKING
            else 0,
        )

    # -- observers -------------------------------------------------------------------------
    def add_listener(self, listener: RoundListener) -> None:
        """Call ``listener`` after every closed round (progress bars, tests)."""
        self._listeners.append(listener)

    def add_eviction_listener(self, listener: EvictionListener) -> None:
        """Call ``listener(holder_id)`` when a holder is evicted (a transport drops its
        session then). Called with the coordinator's lock held: it must not call back."""
        self._eviction_listeners.append(listener)

    def add_answer_listener(self, listener: AnswerListener) -> None:
        """Call ``listener(record, seconds since its task left or None)`` for every answer
        journaled (metrics). Called with the lock held: it must not call back."""
        self._answer_listeners.append(listener)

    def read_locked(self, read: Callable[[], T]) -> T:
        """``read()`` under the coordinator's lock: a consistent view of its state (metrics,
        status). ``read`` must be quick and must not call back into the coordinator."""
        with self._cond:
            return read()

    @property
    def finished(self) -> bool:
        return self.state.finished_reason is not None

    @property
    def active_holders(self) -> frozenset[str]:
        """The holders rounds are issued to now (joined, not left, not evicted)."""
        with self._cond:
            return frozenset(self._active)

    @property
    def reserved_bits(self) -> float:
        """Bits held for answers still due; ``state.bits_total`` plus this never exceeds
        ``run.bit_budget``."""
        with self._cond:
            return math.fsum(self._reserved.values())

    def wait_holders_left(self, timeout_s: float) -> bool:
        """After the run, give holders time to collect RunFinished and leave."""
        end = self._clock() + timeout_s
        with self._cond:
            while self._active:
                remaining = end - self._clock()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.5))
            return True

    def wait_finished(self, timeout_s: float | None = None) -> bool:
        """Block until the run is over; return whether it is."""
        end = None if timeout_s is None else self._clock() + timeout_s
        with self._cond:
            while not self.finished:
                self._tick_locked()
                remaining = 1.0 if end is None else min(1.0, end - self._clock())
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        self.state.sync()  # a round its ticks closed, or the end, is on disk when it returns
        return self.finished

    # -- CoordinatorEndpoint ---------------------------------------------------------------
    def join(self, request: JoinRequest, *, durable: bool = True) -> RunSpec:
        allowed = self.config.server.allowed_holders
        if allowed and request.holder_id not in allowed:
            raise RequestRefused(
                f"holder {request.holder_id!r} is not in this run's server.allowed_holders"
            )
        if request.model_fingerprint != self.model_fingerprint:
            raise RequestRefused(
                f"holder {request.holder_id!r} has model {request.model_fingerprint}, "
                f"this run needs {self.model_fingerprint}"
            )
        with self._cond:
            self._active.add(request.holder_id)
            self._known.add(request.holder_id)
            current = self._round
            holder_id = request.holder_id
            if current and holder_id in current.task_ids and not current.answered(holder_id):
                # back within the round it left: its answer is waited for if it still fits
                self._reserve_locked(current.task_ids[holder_id], current)
            self._cond.notify_all()
        # No round opens here: the first one opens at the first poll (or tick) after enough
        # holders joined, so holders joining at the same moment are all asked.
        self._durable(durable)
        return self.spec

    def leave(self, holder_id: str, *, durable: bool = True) -> None:
        with self._cond:
            self._active.discard(holder_id)
            self._release_holder_locked(holder_id)
            self._maybe_close_locked()
            self._tick_locked()
            self._cond.notify_all()
        self._durable(durable)

    def pull_task(
        self, holder_id: str, have_version: int, have_head: str, timeout_s: float
    ) -> Task | RunFinished | None:
        """Block up to ``timeout_s`` for the holder's task; durable before it returns."""
        result = self._pull(holder_id, have_version, have_head, timeout_s)
        self.state.sync()  # the delivery is on disk before the task leaves
        return result

    def poll_task(
        self, holder_id: str, have_version: int, have_head: str
    ) -> Task | RunFinished | None:
        """``pull_task`` without waiting, for an event loop: the task, the end, or None.

        A task it returns may rest on records not yet durable: wait for ``on_durable``
        before it leaves.
        """
        return self._pull(holder_id, have_version, have_head, 0.0)

    def watch(self, holder_id: str, wake: Wake) -> Callable[[], None]:
        """Count the holder as waiting in PullTask (a round's opening hands it its task in
        the round's one delivery record) and call ``wake`` when its task is ready, the run
        ends or it is evicted; returns the function that stops watching. ``wake`` is called
        with the lock held and must only schedule work (``loop.call_soon_threadsafe``)."""
        with self._cond:
            self._polling[holder_id] += 1
            self._waiters.setdefault(holder_id, []).append(wake)

        def unwatch() -> None:
            with self._cond:
                wakes = self._waiters.get(holder_id, [])
                if wake in wakes:
                    wakes.remove(wake)
                    if not wakes:
                        del self._waiters[holder_id]
                    self._polling[holder_id] -= 1
                    if not self._polling[holder_id]:
                        del self._polling[holder_id]

        return unwatch

    def on_durable(self, callback: Wake) -> None:
        """Call ``callback`` once everything journaled so far is on disk (now, if it is;
        else from the journal's flusher thread)."""
        self.state.journal.when_durable(self.state.journal.written, callback)

    def _durable(self, wait: bool) -> None:
        if wait:
            self.state.sync()

    def _wake_locked(self, holders: Iterable[str] | None = None) -> None:
        """Wake the waiting polls of ``holders``, or of everyone."""
        if holders is None:
            targets = list(self._waiters)
        else:
            targets = [h for h in holders if h in self._waiters]
        for holder in targets:
            for wake in list(self._waiters.get(holder, ())):
                wake()

    def _pull(
        self, holder_id: str, have_version: int, have_head: str, timeout_s: float
    ) -> Task | RunFinished | None:
        log = self.state.log
        if have_version > log.version or log.hash_at(have_version) != have_head:
            raise LogIntegrityError(
                f"holder {holder_id!r} is at log version {have_version} with head "
                f"{have_head[:12]}, which is not this run's log"
            )
        end = self._clock() + max(0.0, timeout_s)
        with self._cond:
            if self.finished and holder_id in self._known:
                return self._finished_message(holder_id, have_version)
            self._require_member(holder_id)
            self._polling[holder_id] += 1
            try:
                return self._wait_for_task_locked(holder_id, have_version, end)
            finally:
                self._polling[holder_id] -= 1
                if not self._polling[holder_id]:
                    del self._polling[holder_id]

    def push_answer(self, holder_id: str, answer: Answer, *, durable: bool = True) -> bool:
        """Journal and count an answer; durable before it returns unless ``durable=False``
        (then the caller waits for ``on_durable`` before saying it was accepted)."""
        with self._cond:
            accepted = self._push_locked(holder_id, answer)
        self._durable(durable)
        return accepted

    def _push_locked(self, holder_id: str, answer: Answer) -> bool:
        if self.finished:
            raise RequestRefused(
                f"run {self.state.run_id} is over ({self.state.finished_reason}): the "
                f"answer to {answer.task_id!r} is not taken"
            )
        round_index = self.state.last_delivered.get(holder_id)
        if round_index is None or answer.task_id != self._task_id(round_index, holder_id):
            raise RequestRefused(
                f"task {answer.task_id!r} was not given to holder {holder_id!r} (only "
                "an answer to the task it pulled last counts)"
            )
        if answer.task_id in self.state.answered_task_ids:
            return False  # a re-sent answer changes nothing and costs nothing twice
        current = self._round
        on_time = current is not None and current.index == round_index
        # An answer to the round a restart is about to re-open: keep it for that round.
        early = current is None and round_index == self.state.next_round
        n_candidates = self._candidates_of(round_index)
        value = self._check_answer(answer, n_candidates)
        choice = answer.choice
        if answer.ranking is not None:  # journaled as its index among the rankings
            choice = encode_ranking(answer.ranking, n_candidates, self.spec.rank_depth)
        bits = 0.0 if answer.refused else self.spec.answer_bits(n_candidates)
        if not self._fits_locked(answer.task_id, bits):
            logger.warning(
                "answer of holder %s to %s dropped unread: its %.3g bits do not fit the "
                "run's bit budget",
                holder_id,
                answer.task_id,
                bits,
            )
            return False
        record = AnswerRecord(
            round_index=round_index,
            holder_id=holder_id,
            task_id=answer.task_id,
            choice=choice,
            refusal=answer.refusal,
            bits=bits,
            late=not (on_time or early),
            value=value,
        )
        self.state.record_answer(record)
        self._reserved.pop(answer.task_id, None)
        sent = self._delivered_at.pop(answer.task_id, None)
        for listener in self._answer_listeners:
            listener(record, None if sent is None else self._clock() - sent)
        if early:
            self.state.open_round_answers.append(record)
            return True
        if current is None or not on_time:
            return False
        current.record(record)
        self._maybe_close_locked()
        if self._round is None:
            self._tick_locked()  # the next round opens now, not at the next tick
        self._cond.notify_all()
        return True

    # -- rounds ----------------------------------------------------------------------------
    def tick(self, *, durable: bool = True) -> None:
        """Close an overdue round and open the next one; transports call this periodically."""
        with self._cond:
            self._tick_locked()
        self._durable(durable)

    def _tick_locked(self) -> None:
        if self.finished:
            return
        if self._round is not None and self._clock() >= self._round.deadline:
            self._close_locked("deadline")
        if self._round is None:
            self._maybe_open_locked()
            if self._round is not None:
                # Every answer may be in before it opened (journaled before a restart, or
                # sent to the new coordinator before enough holders were back): then no
                # answer can arrive to close it, so it closes now and the next one opens,
                # rather than every holder idling until its deadline.
                self._maybe_close_locked()
                if self._round is None:
                    self._maybe_open_locked()

    def _maybe_open_locked(self) -> None:
        needed = (
            self.config.server.min_holders
            if self.state.next_round == 0
            else (self.config.server.quorum)
        )
        if len(self._active) < needed:
            return
        if self.state.next_round >= self.config.run.max_rounds:
            self._finish_locked(f"max_rounds ({self.config.run.max_rounds}) reached")
            return
        index = self.state.next_round
        candidates = self.strategy.ask(index)
        holders = sorted(self._active)
        early = [a for a in self.state.open_round_answers if a.round_index == index]
        owed = [h for h in holders if h not in {a.holder_id for a in early}]
        bits = self.spec.answer_bits(len(candidates))
        round_cost = bits * len(owed)
        reserved = math.fsum(self._reserved.values())
        budget = self.config.run.bit_budget
        if self.state.bits_total + reserved + round_cost > budget + BUDGET_SLACK:
            held = f", {reserved:.1f} held for answers still due" if reserved else ""
            self._finish_locked(
                f"bit budget spent ({self.state.bits_total:.1f} of {budget:g} bits{held}; "
                f"a round costs {round_cost:.2f})"
            )
            return
        opened = OpenRound(
            index=index,
            candidates=candidates,
            task_ids={h: self._task_id(index, h) for h in holders},
            deadline=self._clock() + self.config.server.round_timeout_s,
        )
        for answer in early:  # answers journaled before a restart, or before it re-opened
            opened.record(answer)
        for holder in owed:
            self._reserved[opened.task_ids[holder]] = bits
        self._round = opened
        # The holders already waiting in PullTask get the task at once: one journal record.
        waiting = [h for h in owed if self._polling[h]]
        self._deliver_locked(index, waiting)
        self._wake_locked(waiting)
        self._cond.notify_all()

    def _maybe_close_locked(self) -> None:
        current = self._round
        if current is None:
            return
        index, reserved, delivered = current.index, self._reserved, self.state.last_delivered
        waiting = any(
            holder in self._active
            # a task that never left and has no bits held for it will not be answered
            and (current.task_ids[holder] in reserved or delivered.get(holder) == index)
            for holder in current.unanswered()
        )
        if not waiting:
            self._close_locked("all answered")

    def _close_locked(self, reason: str) -> None:
        current = self._round
        assert current is not None
        self._round = None
        if self._abandoned_unseen(current):
            # Every holder it was issued to left before it was handed out (a holder that
            # refuses the run at join leaves at once): nobody saw it, so it is withdrawn,
            # not spent. Nothing of it was journaled; its index opens again, with the same
            # candidates (``ask`` is a function of the index), when holders are back.
            for task_id in current.task_ids.values():
                self._reserved.pop(task_id, None)
            logger.info("round %d withdrawn: its holders left before pulling it", current.index)
            return
        quorum_met = current.heard >= self.config.server.quorum
        outcome = None
        if quorum_met:
            outcome = self.strategy.tell(
                RoundAnswers(current.candidates, dict(current.choices), dict(current.values))
            )
        record = RoundRecord(
            round_index=current.index,
            candidates=current.candidates,
            choices=dict(current.choices),
            refusals=dict(current.refusals),
            winner=None if outcome is None else outcome.winner,
            steps=() if outcome is None else outcome.steps,
            step_size_after=self.strategy.step_size,
            bits=self.spec.answer_bits(len(current.candidates)) * current.heard,
            closed_by=reason if quorum_met else f"{reason}; no quorum",
            values=dict(current.values),
            estimate=None if outcome is None else outcome.estimate,
            asked=tuple(sorted(current.task_ids)),
            ranking=None if outcome is None else outcome.ranking,
            told=outcome is not None,
        )
        self.state.record_round(record)
        for holder, task_id in current.task_ids.items():
            if self.state.last_delivered.get(holder) != current.index:
                self._reserved.pop(task_id, None)  # never handed out: no answer can come
        self._evict_silent_locked(current)
        for listener in self._listeners:
            listener(record, self.state)
        self._cond.notify_all()

    def _evict_silent_locked(self, closed: OpenRound) -> None:
        """Drop the holders this round was the ``max_missed_rounds``-th in a row to miss."""
        limit = self.config.server.max_missed_rounds
        for holder in sorted(closed.task_ids):
            missed = self.state.missed_rounds.get(holder, 0)
            if holder not in self._active or missed < limit:
                continue
            self.state.record_eviction(Eviction(holder, closed.index, missed, time.time()))
            self._active.discard(holder)
            self._release_holder_locked(holder)
            logger.warning(
                "holder %s evicted: it missed %d rounds in a row (server.max_missed_rounds "
                "= %d); it may join again",
                holder,
                missed,
                limit,
            )
            for listener in self._eviction_listeners:
                listener(holder)
            self._wake_locked([holder])  # its waiting poll ends with NotJoined

    def _finish_locked(self, reason: str) -> None:
        self.state.record_finished(reason)
        self._reserved.clear()  # no answer is taken any more
        self._wake_locked()
        self._cond.notify_all()

    def stop(self, reason: str = "stopped by the operator", *, durable: bool = True) -> None:
        with self._cond:
            if not self.finished:
                self._finish_locked(reason)
        self._durable(durable)

    # -- tasks and their bits --------------------------------------------------------------
    def _wait_for_task_locked(
        self, holder_id: str, have_version: int, end: float
    ) -> Task | RunFinished | None:
        while True:
            self._tick_locked()
            if self.finished:
                return self._finished_message(holder_id, have_version)
            self._require_member(holder_id)  # evicted while it waited
            current = self._round
            if (
                current
                and holder_id in current.task_ids
                and not current.answered(holder_id)
                and self._reserve_locked(current.task_ids[holder_id], current)
            ):
                task = self._task_for(current, holder_id, have_version)
                if self.state.last_delivered.get(holder_id) != current.index:
                    self._deliver_locked(current.index, [holder_id])
                return task
            remaining = end - self._clock()
            if remaining <= 0:
                return None
            self._cond.wait(min(remaining, 0.5))

    def _deliver_locked(self, round_index: int, holders: list[str]) -> None:
        """Journal that ``holders`` get this round's task; a holder's older task, still
        unanswered, is abandoned (it pulled a newer one), and so are its reserved bits."""
        now = self._clock()
        for holder in holders:
            previous = self.state.last_delivered.get(holder)
            if previous is not None and previous != round_index:
                self._reserved.pop(self._task_id(previous, holder), None)
                self._delivered_at.pop(self._task_id(previous, holder), None)
            self._delivered_at[self._task_id(round_index, holder)] = now
        self.state.record_delivered(round_index, holders)

    def _reserve_locked(self, task_id: str, current: OpenRound) -> bool:
        """Whether ``task_id``'s answer has bits held for it, holding them now if they fit
        (a holder that left and came back within the round had its reservation released)."""
        if task_id in self._reserved:
            return True
        bits = self.spec.answer_bits(len(current.candidates))
        if not self._fits_locked(task_id, bits):
            return False
        self._reserved[task_id] = bits
        return True

    def _fits_locked(self, task_id: str, bits: float) -> bool:
        """Whether hearing ``bits`` for ``task_id`` keeps the bits heard within the budget:
        always for an answer whose bits were reserved, else if they fit beside every
        reservation (the hard cap is checked either way)."""
        budget = self.config.run.bit_budget + BUDGET_SLACK
        if self.state.bits_total + bits > budget:
            return False
        if task_id in self._reserved:
            return True
        return self.state.bits_total + math.fsum(self._reserved.values()) + bits <= budget

    def _abandoned_unseen(self, current: OpenRound) -> bool:
        """No answer, no refusal, and every holder asked has left without being handed it."""
        return (
            not current.heard
            and not current.refusals
            and all(
                holder not in self._active
                and self.state.last_delivered.get(holder) != current.index
                for holder in current.task_ids
            )
        )

    def _release_holder_locked(self, holder_id: str) -> None:
        """A holder that left or was evicted holds no bits: its answer may still come (after
        it joins again) and then counts only if it fits."""
        delivered = self.state.last_delivered.get(holder_id)
        if delivered is not None:
            self._reserved.pop(self._task_id(delivered, holder_id), None)
        current = self._round
        if current is not None and holder_id in current.task_ids:
            self._reserved.pop(current.task_ids[holder_id], None)
            # bits freed: a waiting holder whose reservation did not fit may fit now
            self._wake_locked(
                h for h, task in current.task_ids.items() if task not in self._reserved
            )

    def _require_member(self, holder_id: str) -> None:
        if holder_id not in self._active:
            raise NotJoined(
                f"holder {holder_id!r} is not in this run (never joined, left, or evicted "
                "for missing rounds): call Join"
            )

    # -- helpers ---------------------------------------------------------------------------
    def _task_id(self, round_index: int, holder_id: str) -> str:
        return task_id_for(self.state.run_id, round_index, holder_id)

    def _steps_since(self, holder_id: str, have_version: int) -> tuple[Step, ...]:
        behind = self.state.log.version - have_version
        if behind > MAX_NEW_STEPS:
            raise LogIntegrityError(
                f"holder {holder_id!r} is {behind} steps behind (log version {have_version}); "
                f"a message carries at most {MAX_NEW_STEPS}: start it from a newer checkpoint"
            )
        steps = tuple(self.state.log.steps_since(have_version))
        floats = sum(len(step.delta or ()) for step in steps)
        if floats > MAX_DELTA_FLOATS:
            raise LogIntegrityError(
                f"holder {holder_id!r} is {behind} explicit steps behind ({floats} delta floats); "
                f"a message carries at most {MAX_DELTA_FLOATS}: start it from a newer checkpoint"
            )
        return steps

    def _task_for(self, current: OpenRound, holder_id: str, have_version: int) -> Task:
        return Task(
            task_id=current.task_ids[holder_id],
            run_id=self.state.run_id,
            round_index=current.index,
            base_version=have_version,
            new_steps=self._steps_since(holder_id, have_version),
            log_head=self.state.log.head,
            candidates=current.candidates,
            answer_kind=self.spec.answer_kind,
            batch=self.spec.batch,
            deadline_unix=current.deadline,
        )

    def _finished_message(self, holder_id: str, have_version: int) -> RunFinished:
        return RunFinished(
            run_id=self.state.run_id,
            reason=_one_line(self.state.finished_reason or "", MAX_REASON_LENGTH),
            final_version=self.state.log.version,
            log_head=self.state.log.head,
            bits_spent_total=self.state.bits_total,
            base_version=have_version,
            new_steps=self._steps_since(holder_id, have_version),
        )

    def _candidates_of(self, round_index: int) -> int:
        if self._round is not None and self._round.index == round_index:
            return len(self._round.candidates)
        for closed in reversed(self.state.rounds):
            if closed.round_index == round_index:
                return len(closed.candidates)
        return len(self.strategy.ask(round_index))

    def _check_answer(self, answer: Answer, n_candidates: int) -> float | None:
        """Reject an answer of the wrong shape or out of range; return a dp-scalar's value."""
        if answer.refused:
            return None
        kind, dp = self.spec.answer_kind, self.spec.dp
        where = f"answer to {answer.task_id!r}"
        if kind is AnswerKind.DP_SCALAR and dp.quantization_bits == 0:
            if answer.value is None or not math.isfinite(answer.value):
                raise RequestRefused(f"{where}: a dp-scalar answer needs a finite value")
            return answer.value
        if kind is AnswerKind.RANKING:
            if answer.ranking is None:
                raise RequestRefused(f"{where}: this run's answers are rankings")
            try:
                check_ranking(answer.ranking, n_candidates, self.spec.rank_depth)
            except ValueError as exc:
                raise RequestRefused(f"{where}: {exc}") from None
            return None
        if answer.ranking is not None:
            raise RequestRefused(f"{where}: this run's answers are not rankings")
        if answer.value is not None:
            raise RequestRefused(f"{where}: this run's answers are choices, not values")
        limit = choice_outcomes(kind, n_candidates, dp.quantization_bits) - 1
        if answer.choice is None or not 0 <= answer.choice <= limit:
            raise RequestRefused(f"{where}: choice {answer.choice} is out of range 0..{limit}")
        if kind is AnswerKind.DP_SCALAR:
            return dequantize(answer.choice, dp.quantization_bits, dp.quantization_range)
        return None


def _one_line(text: str, limit: int) -> str:
    """``text`` as one printable line of at most ``limit`` characters (a stop reason may
    quote an exception; the wire carries one bounded line)."""
    line = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."
