"""The data holder: answers a coordinator's questions within its own policy and budget.

Order of operations for every task, and why:

1. A task id already in the ledger gets the recorded answer again: a re-sent question
   learns nothing new and costs nothing twice (never a fresh evaluation).
2. Every check that can refuse, before any data is touched or any forward pass runs: the
   task's shape against the policy (cheapest first, so a huge task is refused for free),
   the log chain, the steps' seeds against the run's public schedule, the model's total
   drift after the steps, and the budget. A refusal leaves as a reason code only; its words
   go to the holder's log and refusal file. It depends on the task, the policy and the
   ledger's history, never on the records, so it costs nothing.
3. Apply the new log steps, draw the minibatch with a secret RNG (os entropy; the
   coordinator never learns which examples), and let the run's answer mechanism compute
   the answer (with its noise or randomized response, from the same secure source).
   From here on nothing can be refused: if anything fails, the mechanism's fixed,
   data-independent default answer goes out instead, charged like any other, so neither
   the answer nor its failure tells the coordinator anything about the data.
4. Charge the ledger (fsync'd), bits and the DP event, and only then let the answer leave.

Tasks are answered one at a time (a lock), so concurrent calls queue rather than race.

For a DP run the holder also decides at join whether its remaining lifetime ε can afford
the whole run: it calibrates the noise its own budget needs for the run's steps at the
sampling rate its policy declares and refuses a run that offers less. The coordinator's
ε is never taken on trust; each answer is checked against the ledger again.

Everything that can be checked without a coordinator is checked when the holder is made
(model fingerprint, data fields and labels against the pinned fitness, each pinned
parametrization against the model, the declared data set size), so a misconfigured holder
fails before it dials, with a one-line error naming what is wrong.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sottovoce.client.dataset_identity import holder_key
from sottovoce.client.divergence import secret_prompts
from sottovoce.client.evaluator import CandidateEvaluator
from sottovoce.client.ledger import Ledger
from sottovoce.client.mechanisms import Mechanism, Release, build_mechanism
from sottovoce.client.policy import (
    HolderPolicy,
    check_answer_epsilon,
    check_run,
    check_steps,
    check_task,
    policy_summary,
)
from sottovoce.client.privacy_budget import check_run_affordable, declared_sampling_rate
from sottovoce.client.private_answers import SecureRandomness
from sottovoce.client.refusal_log import RefusalLog, refusal_log_path
from sottovoce.client.status import HolderStatus
from sottovoce.common.accounting import (
    ACCOUNTANT_NAME,
    DpEvent,
    PrivacyAccountant,
)
from sottovoce.common.bounds import (
    Complexity,
    accepted_rounds_bits,
    bound_report,
    fixed_rate_transcript_bits,
    generalization_slack,
)
from sottovoce.common.errors import (
    ConfigError,
    PolicyViolation,
    RefusalCode,
    SottovoceError,
)
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import LoadedModel
from sottovoce.common.parametrizations.drift import DriftTracker, PendingDrift
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.protocol.answers import (
    EXPLICIT_ALGORITHMS,
    AnswerKind,
    decode_ranking,
    encode_ranking,
    ranking_bits,
)
from sottovoce.common.protocol.limits import MAX_KL_PROMPTS
from sottovoce.common.protocol.messages import (
    Answer,
    BatchSpec,
    JoinRequest,
    RunFinished,
    RunSpec,
    Task,
)
from sottovoce.common.protocol.seeds import SeedSchedule
from sottovoce.common.resources import peak_rss_bytes
from sottovoce.common.steplog import Step, StepLog, extend_chain, genesis_hash

log = logging.getLogger("sottovoce.holder")

Record = dict[str, object]


@dataclass(frozen=True)
class _Admission:
    """What the checks of a task found: its cost, and where its steps take the log."""

    bits: float
    event: DpEvent | None
    rounds: list[int]
    drift: PendingDrift


@dataclass
class _RunState:
    """Everything the holder keeps about the run it answers."""

    spec: RunSpec
    evaluator: CandidateEvaluator
    log: StepLog
    schedule: SeedSchedule
    drift: DriftTracker
    mechanism: Mechanism
    last_step_round: int = -1
    last_round_seeds: frozenset[int] = frozenset()  # seeds logged for last_step_round
    step_rounds: list[int] = field(default_factory=list)  # the round of each log step
    broken: str | None = None  # why the weights can no longer be trusted, if they cannot


def check_offline(
    records: Sequence[Record], policy: HolderPolicy, loaded: LoadedModel, *, max_batch: int
) -> None:
    """Everything a holder can check before it dials, or makes a ledger: the data set's size
    against the policy, the model's fingerprint, every record against the pinned fitness,
    and the pinned parametrizations against the model.

    Run first, so a misconfigured holder fails at once with one line, and leaves no ledger
    behind and no coordinator round spent (see :func:`sottovoce.api.open_holder`).
    """
    if not records:
        raise ConfigError("the data set has no examples")
    if len(records) < policy.declared_examples:
        raise ConfigError(
            f"the policy declares min_examples {policy.declared_examples}, but this data "
            f"set has only {len(records)} examples"
        )
    if policy.delta is not None and policy.delta >= 1.0 / len(records):
        raise ConfigError(
            f"policy delta {policy.delta:g} must be < 1/n = {1.0 / len(records):.3g} for "
            f"this data set of {len(records)} examples"
        )
    if loaded.fingerprint != policy.expected_model_fingerprint:
        raise ConfigError(
            f"the local model's fingerprint {loaded.fingerprint[:19]}... is not the policy's "
            f"expected_model_fingerprint {policy.expected_model_fingerprint[:19]}..."
        )
    fitness = build_fitness(policy.fitness, loaded.tokenizer)
    fitness.prepare(records, max_batch=max_batch)  # DataError names the record
    for index, pinned in enumerate(policy.parametrizations):
        try:
            parametrization = build_parametrization(pinned)
            parametrization.attach(loaded.model)
            parametrization.detach()
        except SottovoceError as exc:
            raise ConfigError(f"policy parametrizations[{index}]: {exc}") from None


class DataHolder:
    """Implements :class:`~sottovoce.common.transport.endpoints.HolderEndpoint` for one data set."""

    def __init__(
        self,
        holder_id: str,
        records: Sequence[Record],
        policy: HolderPolicy,
        ledger: Ledger,
        load_model: Callable[[], LoadedModel],
        *,
        compute_dtype: torch.dtype = torch.float32,
        max_batch: int = 32,
        status_path: Path | None = None,
        checked_offline: bool = False,
    ):
        """``checked_offline``: the caller already ran :func:`check_offline` on these records,
        this policy and the model ``load_model`` returns first (as ``open_holder`` does,
        before it makes the ledger), so it is not run twice."""
        self._holder_id = holder_id
        self.records = list(records)
        self.policy = policy
        self.ledger = ledger
        self._load_model = load_model
        self._compute_dtype = compute_dtype
        self._max_batch = max_batch
        self._status_path = status_path
        self._rng = SecureRandomness()
        self._answering = threading.Lock()
        self._refusals = RefusalLog(None if ledger.read_only else refusal_log_path(ledger.path))
        # The key that picks the divergence prompts: the ledger folder's (the same set in
        # every run), or, for a ledger made without one, a secret of this process.
        self._prompt_key = holder_key(ledger.path.parent, create=False) or secrets.token_bytes(32)
        self.loaded = self._fresh_model()
        if not checked_offline:
            check_offline(self.records, policy, self.loaded, max_batch=max_batch)
        self.run: _RunState | None = None
        self.status = HolderStatus(lifetime_bits_max=policy.max_bits)

    # -- identity --------------------------------------------------------------------------
    @property
    def holder_id(self) -> str:
        return self._holder_id

    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint

    @property
    def spec(self) -> RunSpec | None:
        return None if self.run is None else self.run.spec

    @property
    def evaluator(self) -> CandidateEvaluator | None:
        return None if self.run is None else self.run.evaluator

    @property
    def log(self) -> StepLog | None:
        return None if self.run is None else self.run.log

    @property
    def log_version(self) -> int:
        return 0 if self.run is None else self.run.log.version

    @property
    def log_head(self) -> str:
        if self.run is None:
            return "0" * 64
        return self.run.log.head

    @property
    def forward_passes(self) -> int:
        return 0 if self.run is None else self.run.evaluator.forward_passes

    def join_request(self) -> JoinRequest:
        return JoinRequest(
            holder_id=self._holder_id,
            model_fingerprint=self.fingerprint,
            policy_summary=policy_summary(self.policy),
        )

    # -- runs ------------------------------------------------------------------------------
    def accept_run(self, spec: RunSpec) -> None:
        """Check the run against the policy and prepare to answer it (rejoin keeps state).

        Raises :class:`PolicyViolation` for a run the policy refuses. Nothing here reads the
        data, so whether a run is accepted depends on the policy and the ledger only.
        """
        check_run(self.policy, spec, self.fingerprint)
        check_run_affordable(spec, self.ledger, self.policy.declared_examples)
        expected = genesis_hash(self.fingerprint, spec.parametrization.canonical_id())
        if spec.log_genesis != expected:
            raise PolicyViolation(
                f"run {spec.run_id}: log genesis {spec.log_genesis[:12]} does not match this "
                f"holder's model and parametrization ({expected[:12]})",
                RefusalCode.MALFORMED,
            )
        if self.run is not None and self.run.spec == spec and self.run.broken is None:
            return  # the coordinator restarted: same run, keep the materialized weights
        if self.run is not None:  # a different run: start again from the base weights
            self.run.evaluator.parametrization.detach()
            self.loaded = self._fresh_model()
        parametrization = build_parametrization(spec.parametrization)
        parametrization.attach(self.loaded.model)
        if spec.algorithm in EXPLICIT_ALGORITHMS and not parametrization.explicit_coordinates:
            parametrization.detach()
            raise PolicyViolation(
                f"run {spec.run_id}: {spec.algorithm!r} needs explicit coordinates; "
                f"{spec.parametrization.kind} has {parametrization.dimension}"
            )
        fitness = build_fitness(spec.fitness, self.loaded.tokenizer)
        self.run = _RunState(
            spec=spec,
            evaluator=CandidateEvaluator(
                self.loaded.model,
                parametrization,
                fitness,
                max_batch=self._max_batch,
                # a full-split run scores the same batches every round: their prefixes once
                cache_prefixes=spec.batch.mode == "full",
            ),
            log=StepLog(spec.log_genesis),
            schedule=SeedSchedule(spec.direction_seed, self.policy.max_lambda),
            drift=DriftTracker(
                parametrization.direction_blocks(), add=parametrization.add_direction_
            ),
            mechanism=build_mechanism(spec, self._rng, self._record_key(spec)),
        )
        self._take_divergence_reference(self.run)
        self.status = HolderStatus(
            run_id=spec.run_id,
            lifetime_bits_spent=self.ledger.spent_bits,
            lifetime_bits_max=self.policy.max_bits,
            lifetime_epsilon_max=self.policy.max_epsilon,
        )
        self._note_epsilon()
        self._write_status()

    def _record_key(self, spec: RunSpec) -> bytes | None:
        """The holder's secret key, for mechanisms that need it (chunk votes): the one this
        data set's ledger id is keyed with, so a holder keeps a single secret."""
        if spec.mechanism != "chunk-vote":
            return None
        key = holder_key(self.ledger.path.parent, create=not self.ledger.read_only)
        if key is None:
            raise ConfigError(f"{self.ledger.path.parent}: no holder key for chunk votes")
        return key

    def _take_divergence_reference(self, run: _RunState) -> None:
        """The base's next-token distributions on the secret prompts, while it is the base.

        This reads the data, but acceptance does not depend on it: if it fails, a fitness
        with a divergence penalty has no reference and every answer is the default one.
        """
        fitness = run.spec.fitness
        size = fitness.kl_prompts if fitness.penalizes_divergence else MAX_KL_PROMPTS
        try:
            run.evaluator.take_divergence_reference(
                secret_prompts(self.records, self._prompt_key, size)
            )
        except Exception as exc:
            log.error("the divergence reference could not be taken (%r)", exc)

    def answer(self, task: Task) -> Answer:
        """The answer to one task, or a refusal code; never raises (see the module doc)."""
        with self._answering:
            return self._answer(task)

    def _answer(self, task: Task) -> Answer:
        try:
            cached = self.ledger.cached_answer(task.task_id, task.run_id)
            if cached is not None:  # a re-sent question: same answer, never charged twice
                return self._cached(task, cached.choice, cached.value, cached.kind)
            run = self._current_run()
            admission = self._admit(run, task)
            self._apply(run, task.new_steps, admission)
        except PolicyViolation as refusal:
            code = refusal.code if isinstance(refusal.code, RefusalCode) else RefusalCode.POLICY
            return self._refuse(task, code, str(refusal))
        except Exception as exc:
            log.exception("task %s: unexpected failure before reading data", task.task_id)
            return self._refuse(task, RefusalCode.INTERNAL, f"unexpected failure: {exc!r}")
        release = self._release(run, task)
        choice, detail = release.choice, None
        if release.ranking is not None:  # the ledger keeps a ranking as its index
            choice = encode_ranking(release.ranking, len(task.candidates), run.spec.rank_depth)
            detail = {"ranking": list(release.ranking)}
        try:
            self.ledger.charge(
                task.task_id,
                task.run_id,
                admission.bits,
                choice,
                answer_kind=task.answer_kind.value,
                value=release.value,
                dp=admission.event,
                detail=detail,
            )
        except Exception as exc:
            log.exception("task %s: the ledger could not be charged", task.task_id)
            return self._refuse(task, RefusalCode.INTERNAL, f"ledger not charged: {exc!r}")
        self._note_answer(admission.bits, release.stats)
        return Answer(
            task_id=task.task_id,
            choice=release.choice,
            value=release.value,
            ranking=release.ranking,
        )

    def _cached(self, task: Task, choice: int | None, value: float | None, kind: str) -> Answer:
        """The recorded answer of a re-sent task, as it left the first time."""
        if kind == AnswerKind.RANKING.value and choice is not None:
            depth = self.run.spec.rank_depth if self.run is not None else 0
            ranking = decode_ranking(choice, len(task.candidates), depth)
            return Answer(task_id=task.task_id, choice=None, ranking=ranking)
        return Answer(task_id=task.task_id, choice=choice, value=value)

    def _release(self, run: _RunState, task: Task) -> Release:
        """The mechanism's answer on the data; its default answer if anything fails."""
        started = time.perf_counter()
        try:
            examples = self._draw(task.batch)
            release = run.mechanism.release(run.evaluator, examples, task)
        except Exception as exc:
            log.error(
                "task %s: answering failed (%r); sending the default answer", task.task_id, exc
            )
            self.status.defaulted += 1
            release = run.mechanism.default(task)
        self.status.compute_seconds += time.perf_counter() - started
        return release

    def _refuse(self, task: Task, code: RefusalCode, message: str) -> Answer:
        self._refusals.note(task.run_id, task.task_id, code, message)
        self.status.refused += 1
        self.status.last_refusal = f"{code.value}: {message}"
        self._write_status()
        return Answer(task_id=task.task_id, choice=None, refusal=code)

    def finish(self, finished: RunFinished) -> None:
        """Bring the weights to the run's final model (checked like any log steps)."""
        self.status.finished = finished.reason
        run = self.run
        if run is not None and finished.run_id == run.spec.run_id:
            try:
                self._catch_up(run, finished)
            except PolicyViolation as refusal:
                log.warning("not applying the final steps: %s", refusal)
                self.status.last_refusal = str(refusal)
        self._write_status()

    def local_report(self, bits_spent_total: float, delta: float = 0.05) -> dict[str, Any]:
        """This holder's own numbers on its own data; written locally, never sent.

        The generalization bound holds for this holder's distribution too: its n examples
        and the run's total bits (every answer of every holder shaped the output).
        """
        run = self._current_run()
        _, correct = run.evaluator.score_incumbent(self.records)
        train_risk = 1.0 - float(correct.mean())
        slack = generalization_slack(bits_spent_total, len(self.records), delta)
        bound = bound_report(
            self._own_complexity(run, bits_spent_total),
            train_risk,
            len(self.records),
            delta,
            extra_assumptions=(
                "this holder's own n and distribution; the transcript is counted from its "
                "own log (which rounds took a step), padded to the run's max_rounds",
            ),
        )
        return {
            "run_id": run.spec.run_id,
            "holder_id": self._holder_id,
            "log_version": self.log_version,
            "log_head": self.log_head,
            "n": len(self.records),
            "train_errors": int((~correct).sum()),
            "train_risk": train_risk,
            "run_bits_total": bits_spent_total,
            "bits_this_run": self.status.bits_this_run,
            "lifetime_bits_spent": self.ledger.spent_bits,
            "lifetime_bits_max": self.policy.max_bits,
            **self._privacy_report(run.spec),
            "drift_linf": run.drift.drift.linf,
            "drift_l2": run.drift.drift.l2,
            "drift_exact": run.drift.drift.exact,
            **self._divergence_report(run),
            "delta": delta,
            "slack": slack,
            "test_risk_bound": train_risk + slack,
            "transcript_bound": bound,
            "cost": self.cost_report(),
        }

    def _divergence_report(self, run: _RunState) -> dict[str, Any]:
        """KL(base || this model) on the holder's secret prompts: its own reading of how far
        the run moved the model's next-token distributions (issue 11's measure)."""
        reference = run.evaluator.divergence
        if reference is None:
            return {"kl_to_base_nats": None}
        return {
            "kl_to_base_nats": run.evaluator.divergence_now(),
            "kl_prompts": reference.prompts,
            "kl_definition": "mean KL(base || tuned) of the full next-token distribution at "
            "the last position of this holder's secret prompts (keyed subset of its records)",
            "kl_weight": run.spec.fitness.kl_weight,
        }

    def _own_complexity(self, run: _RunState, bits_heard: float) -> Complexity:
        """The transcript's cost as this holder can count it, trusting nobody: the rounds
        its own log's steps came from (the public schedule says which), padded with
        "none" to the run's max_rounds; DPZero, 32 bits (a float32 step) a round."""
        rounds = run.spec.max_rounds
        if run.spec.answer_kind is AnswerKind.DP_SCALAR:
            bits = fixed_rate_transcript_bits(rounds, 32.0)
            code = "fixed rate, 32 bits a round"
        elif run.spec.answer_kind is AnswerKind.RANKING:
            per_round = ranking_bits(self.policy.max_lambda, run.spec.rank_depth)
            bits = fixed_rate_transcript_bits(rounds, per_round)
            code = f"fixed rate, log2(lambda!/(lambda-mu)!) = {per_round:.3g} bits a round"
        else:
            taken = set(run.step_rounds)
            accepted = [r in taken for r in range(max(rounds, len(taken)))]
            bits = accepted_rounds_bits(accepted, self.policy.max_lambda)
            code = "accepted rounds (Elias delta + KT), log2(max_lambda) bits per step"
        return Complexity(bits, 0.0, bits_heard, rounds, code)

    def cost_report(self) -> dict[str, Any]:
        """What answering this run cost the holder: compute time, forward passes, memory."""
        return {
            "answers": self.status.answered,
            "compute_seconds": round(self.status.compute_seconds, 3),
            "forward_passes": self.forward_passes,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def _privacy_report(self, spec: RunSpec) -> dict[str, Any]:
        """ε of this run's and of all DP answers, at the policy's delta (or the run's)."""
        delta = self.policy.delta or spec.dp.delta
        this_run = self.ledger.dp_events(run_id=spec.run_id)
        if not self.ledger.accountant.answers or not delta:
            return {"dp_answers_this_run": len(this_run)}
        return {
            "dp_answers_this_run": len(this_run),
            "epsilon_this_run": PrivacyAccountant(this_run).epsilon(delta),
            "lifetime_epsilon_spent": self.ledger.spent_epsilon(delta),
            "lifetime_epsilon_max": self.policy.max_epsilon,
            "epsilon_delta": delta,
            "accountant": ACCOUNTANT_NAME,
        }

    def _catch_up(self, run: _RunState, finished: RunFinished) -> None:
        if finished.base_version != run.log.version:
            raise PolicyViolation(
                f"final steps start at version {finished.base_version}, "
                f"this holder is at {run.log.version}"
            )
        if len(finished.new_steps) > self.policy.max_new_steps_per_task:
            raise PolicyViolation(
                f"the run's end carries {len(finished.new_steps)} new steps; policy allows "
                f"max_new_steps_per_task {self.policy.max_new_steps_per_task}"
            )
        if finished.final_version > self.policy.max_steps_per_run:
            raise PolicyViolation(
                f"the run's end has {finished.final_version} steps; policy allows "
                f"max_steps_per_run {self.policy.max_steps_per_run}"
            )
        if extend_chain(run.log.head, run.log.version, finished.new_steps) != finished.log_head:
            raise PolicyViolation("the final steps do not hash to the announced log head")
        rounds, drift = check_steps(
            self.policy,
            finished.new_steps,
            run.schedule,
            last_round=run.last_step_round,
            before_round=run.spec.max_rounds,
            drift=run.drift,
            name="the run's final steps",
            algorithm=run.spec.algorithm,
            last_round_seeds=run.last_round_seeds,
        )
        self._apply(run, finished.new_steps, _Admission(0.0, None, rounds, drift))
        self.status.log_version = run.log.version

    # -- checks ----------------------------------------------------------------------------
    def _current_run(self) -> _RunState:
        if self.run is None:
            raise PolicyViolation("no run accepted yet", RefusalCode.NOT_READY)
        return self.run

    def _admit(self, run: _RunState, task: Task) -> _Admission:
        """Every check that must pass before data is touched; returns the answer's costs."""
        if run.broken is not None:
            raise PolicyViolation(
                f"this run's weights are unusable: {run.broken}", RefusalCode.INTERNAL
            )
        check_task(self.policy, run.spec, task, run.schedule)
        if task.base_version != run.log.version:
            raise PolicyViolation(
                f"task {task.task_id} builds on log version {task.base_version}, "
                f"this holder is at version {run.log.version}",
                RefusalCode.STALE,
            )
        if extend_chain(run.log.head, run.log.version, task.new_steps) != task.log_head:
            raise PolicyViolation(
                f"task {task.task_id}: the steps sent do not hash to the announced log head",
                RefusalCode.MALFORMED,
            )
        rounds, drift = check_steps(
            self.policy,
            task.new_steps,
            run.schedule,
            last_round=run.last_step_round,
            before_round=task.round_index,
            drift=run.drift,
            name=f"task {task.task_id}",
            algorithm=run.spec.algorithm,
            last_round_seeds=run.last_round_seeds,
        )
        bits = run.spec.answer_bits(len(task.candidates))
        event = run.mechanism.event(len(task.candidates), self._declared_rate(task.batch))
        check_answer_epsilon(self.policy, event, f"task {task.task_id}")
        self.ledger.check_affordable(bits, event)
        return _Admission(bits, event, rounds, drift)

    def _apply(self, run: _RunState, steps: Sequence[Step], admission: _Admission) -> None:
        """Move the weights along checked steps (no data is read); a failure halfway leaves
        weights no log version describes, so the run refuses every task until it is rejoined."""
        if not steps:
            return
        try:
            run.evaluator.apply_steps(steps)
        except Exception as exc:
            run.broken = f"applying log steps failed: {exc!r}"
            raise
        for step in steps:
            run.log.append(step)
        run.drift.commit(admission.drift)
        run.step_rounds.extend(admission.rounds)
        last = admission.rounds[-1]
        seeds = {s.seed for s, r in zip(steps, admission.rounds, strict=True) if r == last}
        if last == run.last_step_round:
            seeds |= run.last_round_seeds
        run.last_step_round = last
        run.last_round_seeds = frozenset(seeds)

    def _declared_rate(self, batch: BatchSpec) -> float:
        return declared_sampling_rate(batch, self.policy.declared_examples)

    def _draw(self, batch: BatchSpec) -> list[Record]:
        """The examples to score, drawn with the holder's secure randomness.

        ``minibatch``: a uniform fixed-size sample; ``poisson``: every example
        independently at this holder's own rate, expected batch / n (the sample size is
        random and never leaves); ``full``: the whole split.
        """
        if batch.mode == "full":
            return self.records
        if batch.mode == "poisson":
            rate = min(1.0, batch.batch_size / len(self.records))
            return [self.records[i] for i in self._rng.poisson_subsample(len(self.records), rate)]
        return [self.records[i] for i in self._rng.sample(len(self.records), batch.batch_size)]

    # -- local state -----------------------------------------------------------------------
    def _fresh_model(self) -> LoadedModel:
        loaded = self._load_model()
        if self._compute_dtype != torch.float32:
            module: torch.nn.Module = loaded.model  # PreTrainedModel.to's wrapper confuses mypy
            module.to(self._compute_dtype)
        return loaded

    def _note_answer(self, bits: float, stats: dict[str, float]) -> None:
        self.status.answered += 1
        self.status.log_version = self.log_version
        self.status.bits_this_run += bits
        self.status.lifetime_bits_spent = self.ledger.spent_bits
        self._note_epsilon()
        self.status.last_incumbent_score = stats.get("incumbent_mean_score")
        if self.status.last_incumbent_score is not None:
            self.status.history = [*self.status.history[-999:], self.status.last_incumbent_score]
        self._write_status()

    def _note_epsilon(self) -> None:
        if self.ledger.privacy is not None:
            self.status.lifetime_epsilon_spent = self.ledger.spent_epsilon()

    def _write_status(self) -> None:
        self.status.write(self._status_path)
