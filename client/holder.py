"""The data holder: answers a coordinator's questions within its own policy and budget.

Order of operations for every task, and why:

1. A task id already in the ledger gets the recorded answer again: a re-sent question
   learns nothing new and costs nothing twice (never a fresh evaluation).
2. Policy, log-chain and budget checks, before any data is touched or any forward pass
   runs, so a refused task costs nothing and reveals nothing.
3. Apply the new log steps, draw the minibatch with a secret RNG (os entropy; the
   coordinator never learns which examples), score the candidates; for a DP answer add
   the noise (or randomized response) from the same secure source.
4. Charge the ledger (fsync'd), bits and the DP event, and only then let the answer leave.

For a DP run the holder also decides at join whether its remaining lifetime ε can afford
the whole run: it calibrates the noise its own budget needs for the run's steps at its
own sampling rate and refuses a run that offers less. The coordinator's ε is never taken
on trust; each answer is checked against the ledger again before it is computed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sottovoce.client.evaluator import CandidateEvaluator
from sottovoce.client.ledger import Ledger
from sottovoce.client.policy import HolderPolicy, check_run, check_task, policy_summary
from sottovoce.client.private_answers import (
    SecureRandomness,
    noisy_mean,
    quantize,
    randomized_response,
)
from sottovoce.common.accounting import (
    ACCOUNTANT_NAME,
    AccountingError,
    DpEvent,
    PoissonGaussian,
    PrivacyAccountant,
    RandomizedResponse,
    answer_event,
    calibrate_noise_multiplier,
)
from sottovoce.common.errors import ConfigError, PolicyViolation
from sottovoce.common.fitness import build_fitness
from sottovoce.common.messages import (
    Answer,
    AnswerKind,
    BatchSpec,
    JoinRequest,
    RunFinished,
    RunSpec,
    Task,
)
from sottovoce.common.models import LoadedModel
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.resources import peak_rss_bytes
from sottovoce.common.stats import generalization_slack
from sottovoce.common.steplog import StepLog, as_float32, extend_chain, genesis_hash
from sottovoce.common.wire import MAX_ABS_SCALE

log = logging.getLogger("sottovoce.holder")

Record = dict[str, object]


@dataclass
class HolderStatus:
    """What the holder shows its own operator (never sent to the coordinator)."""

    run_id: str = ""
    answered: int = 0
    refused: int = 0
    log_version: int = 0
    bits_this_run: float = 0.0
    lifetime_bits_spent: float = 0.0
    lifetime_bits_max: float = 0.0
    lifetime_epsilon_spent: float | None = None
    lifetime_epsilon_max: float | None = None
    last_incumbent_score: float | None = None
    compute_seconds: float = 0.0
    last_refusal: str | None = None
    finished: str | None = None
    history: list[float] = field(default_factory=list)


class DataHolder:
    """Implements :class:`~sottovoce.common.endpoints.HolderEndpoint` for one data set."""

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
    ):
        if not records:
            raise PolicyViolation(f"holder {holder_id!r} has no examples")
        if policy.delta is not None and policy.delta >= 1.0 / len(records):
            raise ConfigError(
                f"policy delta {policy.delta:g} must be < 1/n = {1.0 / len(records):.3g} for "
                f"this data set of {len(records)} examples"
            )
        self._holder_id = holder_id
        self.records = list(records)
        self.policy = policy
        self.ledger = ledger
        self._load_model = load_model
        self._compute_dtype = compute_dtype
        self._max_batch = max_batch
        self._status_path = status_path
        self._rng = SecureRandomness()
        self.loaded = self._fresh_model()
        self.spec: RunSpec | None = None
        self.evaluator: CandidateEvaluator | None = None
        self.log: StepLog | None = None
        self.status = HolderStatus(lifetime_bits_max=policy.max_bits)

    # -- identity --------------------------------------------------------------------------
    @property
    def holder_id(self) -> str:
        return self._holder_id

    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint

    @property
    def log_version(self) -> int:
        return 0 if self.log is None else self.log.version

    @property
    def log_head(self) -> str:
        if self.log is None:
            return "0" * 64
        return self.log.head

    @property
    def forward_passes(self) -> int:
        return 0 if self.evaluator is None else self.evaluator.forward_passes

    def join_request(self) -> JoinRequest:
        return JoinRequest(
            holder_id=self._holder_id,
            model_fingerprint=self.fingerprint,
            policy_summary=policy_summary(self.policy),
        )

    # -- runs ------------------------------------------------------------------------------
    def accept_run(self, spec: RunSpec) -> None:
        """Check the run against the policy and prepare to answer it (rejoin keeps state)."""
        check_run(self.policy, spec, self.fingerprint)
        self._check_run_privacy(spec)
        expected = genesis_hash(self.fingerprint, spec.parametrization.canonical_id())
        if spec.log_genesis != expected:
            raise PolicyViolation(
                f"run {spec.run_id}: log genesis {spec.log_genesis[:12]} does not match this "
                f"holder's model and parametrization ({expected[:12]})"
            )
        if self.spec is not None and self.spec == spec:
            return  # the coordinator restarted: same run, keep the materialized weights
        if self.evaluator is not None:  # a different run: start again from the base weights
            self.evaluator.parametrization.detach()
            self.loaded = self._fresh_model()
        parametrization = build_parametrization(spec.parametrization)
        parametrization.attach(self.loaded.model)
        fitness = build_fitness(spec.fitness, self.loaded.tokenizer)
        fitness.prepare(self.records[:1], max_batch=1)  # fails now, by field, if data lacks it
        self.evaluator = CandidateEvaluator(
            self.loaded.model, parametrization, fitness, max_batch=self._max_batch
        )
        self.log = StepLog(spec.log_genesis)
        self.spec = spec
        self.status = HolderStatus(
            run_id=spec.run_id,
            lifetime_bits_spent=self.ledger.spent_bits,
            lifetime_bits_max=self.policy.max_bits,
            lifetime_epsilon_max=self.policy.max_epsilon,
        )
        self._note_epsilon()
        self._write_status()

    def answer(self, task: Task) -> Answer:
        try:
            cached = self.ledger.cached_answer(task.task_id, task.run_id)
            if cached is not None:  # a re-sent question: same answer, never charged twice
                return Answer(task_id=task.task_id, choice=cached.choice, value=cached.value)
            bits, event = self._admit(task)
        except PolicyViolation as refusal:
            log.warning("refused task %s: %s", task.task_id, refusal)
            self.status.refused += 1
            self.status.last_refusal = str(refusal)
            self._write_status()
            return Answer(task_id=task.task_id, choice=None, refusal=str(refusal))
        assert self.evaluator is not None and self.log is not None
        self.evaluator.apply_steps(task.new_steps)
        for step in task.new_steps:
            self.log.append(step)
        started = time.perf_counter()
        examples = self._draw(task.batch)
        value: float | None = None
        if task.answer_kind is AnswerKind.DP_SCALAR:
            choice, value, stats = self._dp_scalar(examples, task)
        else:
            choice, stats = self.evaluator.choose(examples, task.candidates, task.answer_kind)
            if isinstance(event, RandomizedResponse):
                choice = randomized_response(choice, event, self._rng)
        self.status.compute_seconds += time.perf_counter() - started
        self.ledger.charge(
            task.task_id,
            task.run_id,
            bits,
            choice,
            answer_kind=task.answer_kind.value,
            value=value,
            dp=event,
        )
        self._note_answer(bits, stats)
        return Answer(task_id=task.task_id, choice=choice, value=value)

    def _dp_scalar(
        self, examples: Sequence[Record], task: Task
    ) -> tuple[int | None, float | None, dict[str, float]]:
        """DPZero's answer: (level, None) when quantized, else (None, float32 value)."""
        assert self.evaluator is not None and self.spec is not None
        dp = self.spec.dp
        differences, mean_score = self.evaluator.finite_differences(examples, task.candidates[0])
        value = noisy_mean(
            differences,
            clip=dp.clip,
            expected_batch=task.batch.batch_size,
            noise_multiplier=dp.noise_multiplier,
            rng=self._rng,
        )
        stats = {} if mean_score is None else {"incumbent_mean_score": mean_score}
        if dp.quantization_bits:
            level = quantize(value, dp.quantization_bits, dp.quantization_range, self._rng)
            return level, None, stats
        # What the wire carries; clamping a DP value is post-processing, free in ε.
        clamped = max(-MAX_ABS_SCALE, min(MAX_ABS_SCALE, value))
        return None, as_float32(clamped), stats

    def finish(self, finished: RunFinished) -> None:
        """Bring the weights to the run's final model (checked like any log steps)."""
        self.status.finished = finished.reason
        if self.spec is not None and finished.run_id == self.spec.run_id:
            try:
                self._catch_up(finished)
            except PolicyViolation as refusal:
                log.warning("not applying the final steps: %s", refusal)
                self.status.last_refusal = str(refusal)
        self._write_status()

    def local_report(self, bits_spent_total: float, delta: float = 0.05) -> dict[str, Any]:
        """This holder's own numbers on its own data; written locally, never sent.

        The generalization bound holds for this holder's distribution too: its n examples
        and the run's total bits (every answer of every holder shaped the output).
        """
        if self.evaluator is None or self.spec is None:
            raise PolicyViolation("no run accepted yet")
        _, correct = self.evaluator.score_incumbent(self.records)
        train_risk = 1.0 - float(correct.mean())
        slack = generalization_slack(bits_spent_total, len(self.records), delta)
        return {
            "run_id": self.spec.run_id,
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
            **self._privacy_report(),
            "delta": delta,
            "slack": slack,
            "test_risk_bound": train_risk + slack,
            "cost": self.cost_report(),
        }

    def cost_report(self) -> dict[str, Any]:
        """What answering this run cost the holder: compute time, forward passes, memory."""
        return {
            "answers": self.status.answered,
            "compute_seconds": round(self.status.compute_seconds, 3),
            "forward_passes": self.forward_passes,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def _privacy_report(self) -> dict[str, Any]:
        """ε of this run's and of all DP answers, at the policy's delta (or the run's)."""
        assert self.spec is not None
        delta = self.policy.delta or self.spec.dp.delta
        this_run = self.ledger.dp_events(run_id=self.spec.run_id)
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

    def _catch_up(self, finished: RunFinished) -> None:
        assert self.evaluator is not None and self.log is not None
        if finished.base_version != self.log.version:
            raise PolicyViolation(
                f"final steps start at version {finished.base_version}, "
                f"this holder is at {self.log.version}"
            )
        cap = self.policy.max_perturbation_scale
        if any(abs(step.coefficient) > cap for step in finished.new_steps):
            raise PolicyViolation(
                f"a final step's coefficient exceeds max_perturbation_scale {cap}"
            )
        if extend_chain(self.log.head, self.log.version, finished.new_steps) != finished.log_head:
            raise PolicyViolation("the final steps do not hash to the announced log head")
        self.evaluator.apply_steps(finished.new_steps)
        for step in finished.new_steps:
            self.log.append(step)
        self.status.log_version = self.log.version

    # -- checks ----------------------------------------------------------------------------
    def _admit(self, task: Task) -> tuple[float, DpEvent | None]:
        """Every check that must pass before data is touched; returns the answer's costs."""
        if self.spec is None or self.log is None:
            raise PolicyViolation("no run accepted yet")
        check_task(self.policy, self.spec, task, len(self.records))
        if task.base_version != self.log.version:
            raise PolicyViolation(
                f"task {task.task_id} builds on log version {task.base_version}, "
                f"this holder is at version {self.log.version}"
            )
        if extend_chain(self.log.head, self.log.version, task.new_steps) != task.log_head:
            raise PolicyViolation(
                f"task {task.task_id}: the steps sent do not hash to the announced log head"
            )
        bits = self.spec.answer_bits(len(task.candidates))
        event = self._dp_event(self.spec, len(task.candidates))
        self.ledger.check_affordable(bits, event)
        return bits, event

    def _dp_event(self, spec: RunSpec, n_candidates: int) -> DpEvent | None:
        """What one answer of this run is, in DP terms, at this holder's own sampling rate."""
        rate = self._sampling_rate(spec.batch)
        return answer_event(spec.dp, spec.answer_kind, n_candidates, rate)

    def _sampling_rate(self, batch: BatchSpec) -> float:
        """This holder's own Poisson rate: expected batch / its own number of examples."""
        return min(1.0, batch.batch_size / len(self.records))

    def _check_run_privacy(self, spec: RunSpec) -> None:
        """Refuse a DP run whose noise this data set's remaining ε cannot afford in full.

        The holder calibrates, with its own accountant, its own δ, its own sampling rate
        and everything its ledger spent on other runs, the noise the run's ``max_rounds``
        steps would need, and refuses an offer below it: the coordinator cannot lower the
        noise. Each answer is checked against the whole ledger again before it is computed.
        """
        limit = self.ledger.privacy
        event = self._dp_event(spec, 1)
        if limit is None or event is None:
            return  # a policy's require_dp refuses non-DP runs in check_run already
        # This run's own earlier answers (a restart, a rejoin) are part of its max_rounds
        # steps, not spending before it: count every other run's answers as prior.
        prior = self.ledger.dp_events(except_run=spec.run_id)
        if isinstance(event, PoissonGaussian):
            try:
                needed = calibrate_noise_multiplier(
                    limit.max_epsilon, limit.delta, spec.max_rounds, event.sampling_rate, prior
                )
            except AccountingError as exc:
                raise PolicyViolation(
                    f"run {spec.run_id}: this data set cannot afford {spec.max_rounds} DP "
                    f"answers at any noise: {exc}"
                ) from None
            if event.noise_multiplier < needed * (1 - 1e-6):
                spent = PrivacyAccountant(prior).epsilon(limit.delta)
                raise PolicyViolation(
                    f"run {spec.run_id}: noise_multiplier {event.noise_multiplier:.4g} is below "
                    f"the {needed:.4g} this data set needs for {spec.max_rounds} steps at its "
                    f"sampling rate {event.sampling_rate:.4g} (max_epsilon {limit.max_epsilon:g}"
                    f" at delta {limit.delta:g}, {spent:.3g} spent by earlier runs)"
                )
            return
        if spec.answer_kind is AnswerKind.BEST_OF:
            return  # the number of candidates is per task; each answer is checked then
        total = PrivacyAccountant(prior).epsilon_with(event, limit.delta, spec.max_rounds)
        if total > limit.max_epsilon:
            raise PolicyViolation(
                f"run {spec.run_id}: {spec.max_rounds} randomized-response answers at epsilon "
                f"{event.epsilon:g} would bring this data set to epsilon {total:.3g} > "
                f"max_epsilon {limit.max_epsilon:g}"
            )

    def _draw(self, batch: BatchSpec) -> list[Record]:
        """The examples to score, drawn with the holder's secure randomness.

        ``minibatch``: a uniform fixed-size sample; ``poisson``: every example
        independently at this holder's rate (the sample size is random and never leaves);
        ``full``: the whole split.
        """
        if batch.mode == "full":
            return self.records
        if batch.mode == "poisson":
            rate = self._sampling_rate(batch)
            return [self.records[i] for i in self._rng.poisson_subsample(len(self.records), rate)]
        return [self.records[i] for i in self._rng.sample(len(self.records), batch.batch_size)]

    # -- local state -----------------------------------------------------------------------
    def _fresh_model(self) -> LoadedModel:
        loaded = self._load_model()
        if self._compute_dtype != torch.float32:
            loaded.model.to(self._compute_dtype)
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
        if self._status_path is None:
            return
        payload: dict[str, Any] = dict(self.status.__dict__)
        payload["time"] = time.time()
        tmp = self._status_path.with_name(self._status_path.name + ".tmp")
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(tmp, self._status_path)
