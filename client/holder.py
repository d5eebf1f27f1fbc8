"""The data holder: answers a coordinator's questions within its own policy and budget.

Order of operations for every task, and why:

1. A task id already in the ledger gets the recorded answer again: a re-sent question
   learns nothing new and costs nothing twice (never a fresh evaluation).
2. Policy, log-chain and budget checks, before any data is touched or any forward pass
   runs, so a refused task costs nothing and reveals nothing.
3. Apply the new log steps, draw the minibatch with a secret RNG (os entropy; the
   coordinator never learns which examples), score the candidates.
4. Charge the ledger (fsync'd), and only then let the answer leave.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sottovoce.client.evaluator import CandidateEvaluator
from sottovoce.client.ledger import Ledger
from sottovoce.client.policy import HolderPolicy, check_run, check_task, policy_summary
from sottovoce.common.errors import PolicyViolation
from sottovoce.common.fitness import build_fitness
from sottovoce.common.messages import (
    Answer,
    BatchSpec,
    JoinRequest,
    RunFinished,
    RunSpec,
    Task,
    answer_bits,
)
from sottovoce.common.models import LoadedModel
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.stats import generalization_slack
from sottovoce.common.steplog import StepLog, extend_chain, genesis_hash

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
    last_incumbent_score: float | None = None
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
        self._holder_id = holder_id
        self.records = list(records)
        self.policy = policy
        self.ledger = ledger
        self._load_model = load_model
        self._compute_dtype = compute_dtype
        self._max_batch = max_batch
        self._status_path = status_path
        self._rng = secrets.SystemRandom()
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
        )
        self._write_status()

    def answer(self, task: Task) -> Answer:
        try:
            cached = self.ledger.cached_answer(task.task_id, task.run_id)
            if cached is not None:  # a re-sent question: same answer, never charged twice
                return Answer(task_id=task.task_id, choice=cached)
            bits = self._admit(task)
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
        examples = self._draw(task.batch)
        choice, stats = self.evaluator.choose(examples, task.candidates, task.answer_kind)
        self.ledger.charge(
            task.task_id, task.run_id, bits, choice, answer_kind=task.answer_kind.value
        )
        self._note_answer(bits, stats)
        return Answer(task_id=task.task_id, choice=choice)

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
            "delta": delta,
            "slack": slack,
            "test_risk_bound": train_risk + slack,
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
    def _admit(self, task: Task) -> float:
        """Every check that must pass before data is touched; returns the answer's bit cost."""
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
        bits = answer_bits(task.answer_kind, len(task.candidates))
        self.ledger.check_affordable(bits)
        return bits

    def _draw(self, batch: BatchSpec) -> list[Record]:
        """The examples to score: a secret uniform minibatch, or the whole split."""
        if batch.mode == "full":
            return self.records
        indices = self._rng.sample(range(len(self.records)), batch.batch_size)
        return [self.records[i] for i in indices]

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
        self.status.last_incumbent_score = stats.get("incumbent_mean_score")
        if self.status.last_incumbent_score is not None:
            self.status.history = [*self.status.history[-999:], self.status.last_incumbent_score]
        self._write_status()

    def _write_status(self) -> None:
        if self._status_path is None:
            return
        payload: dict[str, Any] = dict(self.status.__dict__)
        payload["time"] = time.time()
        tmp = self._status_path.with_name(self._status_path.name + ".tmp")
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(tmp, self._status_path)
