"""Builders shared by the end-to-end tests: tiny data, policies, run configs, run specs, tasks.

Everything runs on the tiny model built in code (``tiny-llama``, byte-level tokenizer), so
the label words are single bytes ("0", "1") and every prompt is a handful of tokens.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os
import random
import string
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch

from sottovoce.client.policy import HolderPolicy
from sottovoce.common.data import write_jsonl
from sottovoce.common.directions import add_scaled_direction_
from sottovoce.common.models import load_model
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.messages import (
    Answer,
    BatchSpec,
    Candidate,
    FitnessSpec,
    JoinRequest,
    RunFinished,
    RunSpec,
    Task,
)
from sottovoce.common.protocol.seeds import candidate_seed
from sottovoce.common.steplog import Step, as_float32, extend_chain, genesis_hash
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.run_state import RoundRecord

TINY = "tiny-llama"
TEMPLATE = "{text} ="
LABEL_WORDS = ("0", "1")
FITNESS = FitnessSpec(prompt_template=TEMPLATE, label_words=LABEL_WORDS)
FAR_FUTURE = 4_000_000_000.0  # a task deadline that never passes during a test
DIRECTION_SEED = 7  # the run seed of run_config_data, hence its runs' direction_seed
# The parametrizations the tests' policies pin (each in full): what their runs ask for.
PINNED = (
    ParametrizationSpec(kind="scale"),
    ParametrizationSpec(kind="full"),
    ParametrizationSpec(kind="select", patterns=("*norm*",)),
    ParametrizationSpec(kind="select", patterns=("model.norm.weight", "model.layers.1.mlp.*")),
)

Record = dict[str, object]


@functools.cache
def tiny_fingerprint(name: str = TINY) -> str:
    """The fingerprint of the tiny model (what a holder's policy pins)."""
    return load_model(name).fingerprint


def tiny_records(count: int, seed: int = 0) -> list[Record]:
    """``count`` short records ``{"text", "label"}``; distinct seeds give distinct data sets."""
    rng = random.Random(seed)
    records: list[Record] = []
    for _ in range(count):
        text = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 10)))
        records.append({"text": text, "label": rng.randint(0, 1)})
    return records


def write_records(path: Path, count: int, seed: int = 0) -> Path:
    write_jsonl(path, tiny_records(count, seed))
    return path


# -- TOML ----------------------------------------------------------------------------------
def toml_text(data: Mapping[str, Any]) -> str:
    """A TOML document for ``data`` (None values left out, paths as strings)."""
    return tomli_w.dumps(_tomlable(data))


def _tomlable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _tomlable(v) for k, v in value.items() if v is not None}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_tomlable(v) for v in value]
    return value


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied, one level of tables deep."""
    out = {key: dict(v) if isinstance(v, Mapping) else v for key, v in base.items()}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


# -- holder policies -----------------------------------------------------------------------
def policy_data(ledger_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A policy (as TOML data) that allows what the tests' runs ask for."""
    base: dict[str, Any] = {
        "max_bits": 1000.0,
        "expected_model_fingerprint": tiny_fingerprint(),
        "allowed_algorithms": ["bboxer-1+1", "bboxer-1+lambda"],
        "parametrizations": [dataclasses.asdict(spec) for spec in PINNED],
        "max_lambda": 4,
        "max_perturbation_scale": 0.5,
        "max_drift_linf": 10.0,
        "min_examples": 16,
        "min_batch_size": 16,
        "allowed_batch_modes": ["minibatch", "full"],
        "ledger_dir": str(ledger_dir),
        "fitness": {
            "kind": "classification",
            "prompt_template": TEMPLATE,
            "label_words": list(LABEL_WORDS),
        },
    }
    return merged(base, overrides)


def write_policy(path: Path, ledger_dir: Path, **overrides: Any) -> Path:
    path.write_text(toml_text(policy_data(ledger_dir, **overrides)), encoding="utf-8")
    return path


def make_policy(ledger_dir: Path, **overrides: Any) -> HolderPolicy:
    """The same policy as :func:`policy_data`, as the holder's object."""
    data = policy_data(ledger_dir, **overrides)
    data["fitness"] = FitnessSpec(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in data["fitness"].items()}
    )
    for key in ("allowed_algorithms", "allowed_batch_modes", "answer_mechanisms"):
        if key in data:
            data[key] = tuple(data[key])
    data["parametrizations"] = tuple(
        ParametrizationSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})
        for p in data["parametrizations"]
    )
    data["ledger_dir"] = Path(data["ledger_dir"])
    return HolderPolicy(**data)


# -- run configs ---------------------------------------------------------------------------
def run_config_data(**overrides: Any) -> dict[str, Any]:
    """A small run on the tiny model (as TOML data)."""
    base: dict[str, Any] = {
        "run": {"name": "tiny", "seed": 7, "max_rounds": 10, "bit_budget": 1000.0},
        "model": {"name": TINY, "dtype": "float32"},
        "parametrization": {"kind": "scale"},
        "optimizer": {"initial_step": 0.05, "min_step": 0.001, "max_step": 0.2},
        "evaluation": {"mode": "minibatch", "batch_size": 16},
        "fitness": {"prompt_template": TEMPLATE, "label_words": list(LABEL_WORDS)},
        "server": {"min_holders": 2, "quorum": 2, "round_timeout_s": 60.0},
        # One thread: make test runs a worker per core, and two threads a worker on a
        # two-core machine cost ~1.6x the CPU for the same work (OpenMP threads spinning).
        "simulate": {"eval_threads": 1},
    }
    return merged(base, overrides)


def write_run_config(path: Path, **overrides: Any) -> Path:
    path.write_text(toml_text(run_config_data(**overrides)), encoding="utf-8")
    return path


# -- protocol messages ---------------------------------------------------------------------
def run_spec(
    *,
    run_id: str = "run-a",
    algorithm: str = "bboxer-1+1",
    fingerprint: str | None = None,
    parametrization: ParametrizationSpec | None = None,
    fitness: FitnessSpec = FITNESS,
    batch: BatchSpec | None = None,
) -> RunSpec:
    """A run spec on the tiny model whose genesis matches it (what a coordinator sends)."""
    fingerprint = fingerprint or tiny_fingerprint()
    parametrization = parametrization or ParametrizationSpec(kind="scale")
    return RunSpec(
        run_id=run_id,
        algorithm=algorithm,
        model_fingerprint=fingerprint,
        parametrization=parametrization,
        fitness=fitness,
        batch=batch or BatchSpec(mode="minibatch", batch_size=16),
        answer_kind=AnswerKind.COMPARE if algorithm == "bboxer-1+1" else AnswerKind.BEST_OF,
        bit_budget=1000.0,
        max_rounds=100,
        log_genesis=genesis_hash(fingerprint, parametrization.canonical_id()),
        direction_seed=DIRECTION_SEED,
    )


def scheduled_seed(spec: RunSpec, round_index: int, lane: int = 0) -> int:
    """The seed the run's public schedule gives candidate ``lane`` of ``round_index``."""
    return candidate_seed(spec.direction_seed, round_index, lane)


def scheduled_candidates(
    spec: RunSpec, round_index: int, scales: Sequence[float] = (0.05,)
) -> tuple[Candidate, ...]:
    """Candidates on the schedule: lane i of ``round_index`` at ``scales[i]``."""
    return tuple(
        Candidate(seed=scheduled_seed(spec, round_index, lane), scale=as_float32(scale))
        for lane, scale in enumerate(scales)
    )


def scheduled_steps(
    spec: RunSpec, count: int, *, first_round: int = 0, coefficient: float = 0.05
) -> list[Step]:
    """``count`` accepted steps, one per round from ``first_round``, each lane 0's seed."""
    return [
        Step(seed=scheduled_seed(spec, first_round + i), coefficient=coefficient)
        for i in range(count)
    ]


def make_task(
    spec: RunSpec,
    task_id: str,
    *,
    history: Sequence[Step] = (),
    base_version: int | None = None,
    new_steps: Sequence[Step] = (),
    log_head: str | None = None,
    candidates: Sequence[Candidate] | None = None,
    run_id: str | None = None,
    round_index: int | None = None,
) -> Task:
    """A task of ``spec``'s run for a holder that has applied ``history``.

    ``log_head`` defaults to the true head after ``history + new_steps``, ``base_version``
    to ``len(history)``; pass either to build a task that lies about them. ``round_index``
    defaults to the round after the steps (one step a round, as :func:`scheduled_steps`
    makes them), ``candidates`` to lane 0 of that round at scale 0.05.
    """
    base = len(history) if base_version is None else base_version
    if round_index is None:
        round_index = len(history[:base]) + len(new_steps)
    if candidates is None:
        candidates = scheduled_candidates(spec, round_index)
    if log_head is None:
        log_head = extend_chain(extend_chain(spec.log_genesis, 0, history[:base]), base, new_steps)
    return Task(
        task_id=task_id,
        run_id=spec.run_id if run_id is None else run_id,
        round_index=round_index,
        base_version=base,
        new_steps=tuple(new_steps),
        log_head=log_head,
        candidates=tuple(candidates),
        answer_kind=spec.answer_kind,
        batch=spec.batch,
        deadline_unix=FAR_FUTURE,
    )


# -- replaying a log independently -----------------------------------------------------------
def base_plus_steps(steps: Sequence[Step], patterns: Sequence[str] = ()) -> dict[str, Any]:
    """Base weights + Σ c·z(seed), written out from the definition of ``select``/``full``.

    The selected tensors are the model's parameters in sorted-name order, each tied tensor
    once under its first name, kept if a name matches a pattern (all of them without
    patterns); tensor ``i`` of that list moves by ``c * z(seed, i)``, step after step.
    """
    model = load_model(TINY).model
    named = sorted(model.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for name, param in named:
        aliases.setdefault(id(param), []).append(name)
    unique = list({id(param): param for _, param in named}.values())  # first-seen order
    selected = [
        param
        for param in unique
        if not patterns
        or any(fnmatch.fnmatchcase(n, p) for n in aliases[id(param)] for p in patterns)
    ]
    for step in steps:
        for index, param in enumerate(selected):
            add_scaled_direction_(param.data, step.seed, index, step.coefficient)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def replay_with_parametrization(spec: ParametrizationSpec, steps: Sequence[Step]) -> dict[str, Any]:
    """Base weights, the parametrization attached, the steps applied, folded into a state dict."""
    parametrization = build_parametrization(spec)
    parametrization.attach(load_model(TINY).model)
    for step in steps:
        parametrization.apply_step(step)
    return parametrization.export_state_dict()


def differing_tensors(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Names whose tensors are not bit-for-bit equal (or missing); empty if all match."""
    assert set(expected) <= set(actual), sorted(set(expected) - set(actual))
    return [name for name in expected if not torch.equal(expected[name], actual[name])]


def accepted_round(index: int, step: Step) -> RoundRecord:
    """A round that accepted ``step``, as the coordinator journals it before logging it."""
    return RoundRecord(
        round_index=index,
        candidates=(Candidate(seed=step.seed, scale=step.coefficient),),
        choices={"holder-0": 1},
        refusals={},
        winner=0,
        steps=(step,),
        step_size_after=abs(step.coefficient),
        bits=1.0,
        closed_by="all answered",
    )


# -- the gRPC service's tests ------------------------------------------------------------


@dataclass
class Spy:
    """The coordinator, with a record of which calls reached it."""

    inner: Coordinator
    calls: list[str] = field(default_factory=list)

    def join(self, request: JoinRequest) -> RunSpec:
        self.calls.append("join")
        return self.inner.join(request)

    def pull_task(
        self, holder_id: str, have_version: int, have_head: str, timeout_s: float
    ) -> Task | RunFinished | None:
        self.calls.append("pull")
        return self.inner.pull_task(holder_id, have_version, have_head, timeout_s)

    def push_answer(self, holder_id: str, answer: Answer) -> bool:
        self.calls.append("push")
        return self.inner.push_answer(holder_id, answer)

    def leave(self, holder_id: str) -> None:
        self.calls.append("leave")
        self.inner.leave(holder_id)


@dataclass
class InstantHolder:
    """A holder endpoint for transport tests: answers at once (a bit of its candidate's
    seed and its name) and follows the log; keeps every answer it gave."""

    holder_id: str
    fingerprint: str
    log_version: int = 0
    log_head: str = ""
    answers: list[Answer] = field(default_factory=list)

    def join_request(self) -> JoinRequest:
        return JoinRequest(self.holder_id, self.fingerprint)

    def accept_run(self, spec: RunSpec) -> None:
        self.log_head = self.log_head or spec.log_genesis

    def answer(self, task: Task) -> Answer:
        if task.base_version == self.log_version:
            self.log_head = extend_chain(self.log_head, self.log_version, task.new_steps)
            self.log_version = task.target_version
        answer = Answer(task.task_id, choice=(task.candidates[0].seed + len(self.holder_id)) % 2)
        self.answers.append(answer)
        return answer

    def finish(self, finished: RunFinished) -> None:
        pass


class HeldFsyncs:
    """The journal's fsyncs held until :meth:`release`, with the times they then ran: a
    test checks that no reply left before its record was on disk."""

    def __init__(self) -> None:
        self.synced: list[float] = []
        self._gate = threading.Event()
        self._real_fsync = os.fsync

    def hold(self, monkeypatch: Any) -> None:
        monkeypatch.setattr("sottovoce.server.journal.os.fsync", self._held)

    def release(self) -> float:
        """Let the fsyncs run; the moment they were let go."""
        released = time.monotonic()
        self._gate.set()
        return released

    def _held(self, fd: int) -> None:
        self._gate.wait(10)
        self._real_fsync(fd)
        self.synced.append(time.monotonic())
