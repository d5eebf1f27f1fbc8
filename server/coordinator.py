"""The coordinator: runs rounds of questions to data holders, transport-agnostic.

A round asks every active holder the same question (the optimizer's candidates around
the incumbent) and closes when all of them answered, or at its deadline if a quorum did.
BBoxER: the weighted plurality of their choices goes to the optimizer, and an accepted
candidate becomes a step in the log. DPZero: their scalars are aggregated (mean or a
robust rule) and the optimizer turns the estimate into a step. Every answer and every
round is journaled before it has any effect (see :mod:`sottovoce.server.run_state`), and
the run stops before a round whose answers could push the bits heard past the run's
budget.

The coordinator is the budget's second line of defence: each holder enforces its own
lifetime budget whatever the coordinator does.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sottovoce.common.config import RunConfig
from sottovoce.common.errors import LogIntegrityError, PolicyViolation
from sottovoce.common.messages import (
    Answer,
    AnswerKind,
    Candidate,
    JoinRequest,
    RunFinished,
    RunSpec,
    Task,
)
from sottovoce.common.quantization import dequantize
from sottovoce.server.aggregation import aggregate_scalars
from sottovoce.server.optimizers import ComparisonES, DPZero, StepSizeRule
from sottovoce.server.run_state import AnswerRecord, RoundRecord, RunState
from sottovoce.server.votes import weighted_plurality, winner_index

RoundListener = Callable[[RoundRecord, RunState], None]


def task_id_for(run_id: str, round_index: int, holder_id: str) -> str:
    """Deterministic, so a restarted coordinator re-asks a round under the same task ids."""
    holder_tag = hashlib.sha256(holder_id.encode()).hexdigest()[:8]
    return f"{run_id}:r{round_index}:{holder_tag}"


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

    def answered(self, holder_id: str) -> bool:
        return holder_id in self.choices or holder_id in self.values or holder_id in self.refusals

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
    """Implements :class:`~sottovoce.common.endpoints.CoordinatorEndpoint`."""

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
        self._issued: dict[str, tuple[int, str]] = {}  # task id -> (round, holder)
        self._round: OpenRound | None = None
        self._listeners: list[RoundListener] = []
        self.optimizer = _build_optimizer(config, state)
        self.spec = RunSpec(
            run_id=state.run_id,
            algorithm=config.run.algorithm,
            model_fingerprint=model_fingerprint,
            parametrization=config.parametrization.to_spec(),
            fitness=config.fitness.to_spec(),
            batch=config.evaluation.to_spec(),
            answer_kind=config.answer_kind,
            bit_budget=config.run.bit_budget,
            max_rounds=config.run.max_rounds,
            log_genesis=state.genesis,
            dp=config.dp_spec(),
            direction_seed=config.run.seed,
        )

    # -- observers -------------------------------------------------------------------------
    def add_listener(self, listener: RoundListener) -> None:
        """Call ``listener`` after every closed round (progress bars, tests)."""
        self._listeners.append(listener)

    @property
    def finished(self) -> bool:
        return self.state.finished_reason is not None

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
                    return False
                self._cond.wait(remaining)
            return True

    # -- CoordinatorEndpoint ---------------------------------------------------------------
    def join(self, request: JoinRequest) -> RunSpec:
        allowed = self.config.server.allowed_holders
        if allowed and request.holder_id not in allowed:
            raise PolicyViolation(
                f"holder {request.holder_id!r} is not in this run's server.allowed_holders"
            )
        if request.model_fingerprint != self.model_fingerprint:
            raise PolicyViolation(
                f"holder {request.holder_id!r} has model {request.model_fingerprint}, "
                f"this run needs {self.model_fingerprint}"
            )
        with self._cond:
            self._active.add(request.holder_id)
            self._cond.notify_all()
        return self.spec

    def leave(self, holder_id: str) -> None:
        with self._cond:
            self._active.discard(holder_id)
            self._maybe_close_locked()
            self._cond.notify_all()

    def pull_task(
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
            if holder_id not in self._active:
                raise PolicyViolation(f"holder {holder_id!r} has not joined this run")
            while True:
                self._tick_locked()
                if self.finished:
                    return self._finished_message(have_version)
                current = self._round
                if current and holder_id in current.task_ids and not current.answered(holder_id):
                    return self._task_for(current, holder_id, have_version)
                remaining = end - self._clock()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 0.5))

    def push_answer(self, holder_id: str, answer: Answer) -> bool:
        with self._cond:
            issued = self._issued.get(answer.task_id) or self._asked_before_restart(
                holder_id, answer.task_id
            )
            if issued is None or issued[1] != holder_id:
                raise PolicyViolation(
                    f"task {answer.task_id!r} was not given to holder {holder_id!r}"
                )
            round_index = issued[0]
            current = self._round
            # An answer to the round a restart is about to re-open: keep it for that round.
            early = current is None and round_index == self.state.next_round
            late = not early and (current is None or current.index != round_index)
            if answer.task_id in self.state.answered_task_ids:
                return False  # a re-sent answer changes nothing and costs nothing twice
            n_candidates = self._candidates_of(round_index)
            value = self._check_answer(answer, n_candidates)
            bits = 0.0 if answer.refused else self.spec.answer_bits(n_candidates)
            record = AnswerRecord(
                round_index=round_index,
                holder_id=holder_id,
                task_id=answer.task_id,
                choice=answer.choice,
                refusal=answer.refusal,
                bits=bits,
                late=late,
                value=value,
            )
            self.state.record_answer(record)
            if early:
                self.state.open_round_answers.append(record)
                return True
            if late or current is None:
                return False
            current.record(record)
            self._maybe_close_locked()
            self._cond.notify_all()
            return True

    def _asked_before_restart(self, holder_id: str, task_id: str) -> tuple[int, str] | None:
        """The round of a task a crashed predecessor gave this holder, if it is the one
        this coordinator will re-open (task ids are deterministic, so it is recognisable):
        its answer arrives before enough holders have rejoined to open the round."""
        index = self.state.next_round
        if self._round is None and task_id == task_id_for(self.state.run_id, index, holder_id):
            return index, holder_id
        return None

    # -- rounds ----------------------------------------------------------------------------
    def tick(self) -> None:
        """Close an overdue round and open the next one; transports call this periodically."""
        with self._cond:
            self._tick_locked()

    def _tick_locked(self) -> None:
        if self.finished:
            return
        if self._round is not None and self._clock() >= self._round.deadline:
            self._close_locked("deadline")
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
        candidates = self.optimizer.ask(index)
        round_cost = self.spec.answer_bits(len(candidates)) * len(self._active)
        if self.state.bits_total + round_cost > self.config.run.bit_budget + 1e-9:
            self._finish_locked(
                f"bit budget spent ({self.state.bits_total:.1f} of {self.config.run.bit_budget:g}"
                f" bits; a round costs {round_cost:.2f})"
            )
            return
        holders = sorted(self._active)
        opened = OpenRound(
            index=index,
            candidates=candidates,
            task_ids={h: task_id_for(self.state.run_id, index, h) for h in holders},
            deadline=self._clock() + self.config.server.round_timeout_s,
        )
        for answer in self.state.open_round_answers:  # answers journaled before a restart
            if answer.round_index == index and answer.holder_id in opened.task_ids:
                opened.record(answer)
        for holder, task_id in opened.task_ids.items():
            self._issued[task_id] = (index, holder)
        self._round = opened
        self._cond.notify_all()

    def _maybe_close_locked(self) -> None:
        current = self._round
        if current is None:
            return
        waiting = [h for h in current.task_ids if h in self._active and not current.answered(h)]
        if not waiting:
            self._close_locked("all answered")

    def _close_locked(self, reason: str) -> None:
        current = self._round
        assert current is not None
        self._round = None
        quorum_met = current.heard >= self.config.server.quorum
        winner: int | None = None
        estimate: float | None = None
        step = None
        weights = self.config.server.holder_weights
        if quorum_met and isinstance(self.optimizer, DPZero):
            estimate = aggregate_scalars(
                current.values,
                self.config.dpzero.aggregate,
                weights=weights,
                trim_fraction=self.config.dpzero.trim_fraction,
            )
            step = self.optimizer.tell(current.candidates[0], estimate)
        elif quorum_met:
            assert isinstance(self.optimizer, ComparisonES)
            winner = winner_index(weighted_plurality(current.choices, weights))
            step = self.optimizer.tell(current.candidates, winner)
        record = RoundRecord(
            round_index=current.index,
            candidates=current.candidates,
            choices=dict(current.choices),
            refusals=dict(current.refusals),
            winner=winner,
            step=step,
            step_size_after=self.optimizer.step,
            bits=self.spec.answer_bits(len(current.candidates)) * current.heard,
            closed_by=reason if quorum_met else f"{reason}; no quorum",
            values=dict(current.values),
            estimate=estimate,
        )
        self.state.record_round(record)
        for listener in self._listeners:
            listener(record, self.state)
        self._cond.notify_all()

    def _finish_locked(self, reason: str) -> None:
        self.state.record_finished(reason)
        self._cond.notify_all()

    def stop(self, reason: str = "stopped by the operator") -> None:
        with self._cond:
            if not self.finished:
                self._finish_locked(reason)

    # -- helpers ---------------------------------------------------------------------------
    def _task_for(self, current: OpenRound, holder_id: str, have_version: int) -> Task:
        return Task(
            task_id=current.task_ids[holder_id],
            run_id=self.state.run_id,
            round_index=current.index,
            base_version=have_version,
            new_steps=tuple(self.state.log.steps_since(have_version)),
            log_head=self.state.log.head,
            candidates=current.candidates,
            answer_kind=self.spec.answer_kind,
            batch=self.spec.batch,
            deadline_unix=current.deadline,
        )

    def _finished_message(self, have_version: int) -> RunFinished:
        return RunFinished(
            run_id=self.state.run_id,
            reason=self.state.finished_reason or "",
            final_version=self.state.log.version,
            log_head=self.state.log.head,
            bits_spent_total=self.state.bits_total,
            base_version=have_version,
            new_steps=tuple(self.state.log.steps_since(have_version)),
        )

    def _candidates_of(self, round_index: int) -> int:
        if self._round is not None and self._round.index == round_index:
            return len(self._round.candidates)
        for closed in reversed(self.state.rounds):
            if closed.round_index == round_index:
                return len(closed.candidates)
        return len(self.optimizer.ask(round_index))

    def _check_answer(self, answer: Answer, n_candidates: int) -> float | None:
        """Reject an answer of the wrong shape or out of range; return a dp-scalar's value."""
        if answer.refused:
            return None
        kind, dp = self.spec.answer_kind, self.spec.dp
        where = f"answer to {answer.task_id!r}"
        if kind is AnswerKind.DP_SCALAR and dp.quantization_bits == 0:
            if answer.value is None or not math.isfinite(answer.value):
                raise PolicyViolation(f"{where}: a dp-scalar answer needs a finite value")
            return answer.value
        if answer.value is not None:
            raise PolicyViolation(f"{where}: this run's answers are choices, not values")
        if kind is AnswerKind.DP_SCALAR:
            limit = 2**dp.quantization_bits - 1
        else:
            limit = 1 if kind is AnswerKind.COMPARE else n_candidates
        if answer.choice is None or not 0 <= answer.choice <= limit:
            raise PolicyViolation(f"{where}: choice {answer.choice} is out of range 0..{limit}")
        if kind is AnswerKind.DP_SCALAR:
            return dequantize(answer.choice, dp.quantization_bits, dp.quantization_range)
        return None


def _build_optimizer(config: RunConfig, state: RunState) -> ComparisonES | DPZero:
    if config.run.algorithm == "dpzero":
        return DPZero(
            run_seed=config.run.seed,
            smoothing=config.dpzero.smoothing,
            learning_rate=config.dpzero.learning_rate,
            max_coefficient=config.dpzero.max_coefficient,
        )
    opt = config.optimizer
    return ComparisonES(
        run_seed=config.run.seed,
        candidates=opt.candidates,
        mirrored=opt.mirrored,
        step_rule=StepSizeRule(
            step=state.step_size if state.step_size is not None else opt.initial_step,
            min_step=opt.min_step,
            max_step=opt.max_step,
        ),
    )
