"""The coordinator's durable state: a run directory that a restart resumes exactly.

Layout of a run directory::

    run.toml       the config the run was started with (verbatim)
    run.json       run id, config and model fingerprints, log genesis
    journal.jsonl  every answer as it arrives, every closed round, which holder was handed
                   which round's task, and every eviction (append-only, fsync'd)
    log.jsonl      the accepted steps, hash-chained (append-only, fsync'd)
    report.json    written when the run finishes

The journal is written before the log: a round's record (with its accepted step) is
fsync'd first, then the step is appended to the log. A crash between the two leaves the
journal one step ahead, and :meth:`RunState.open` completes the log from it, so no step
is lost or applied twice. Answers are journaled as they arrive, so the bits of a round
that was interrupted still count.

A task's delivery is journaled before the task leaves (``delivered``: one record for all
the holders a round's opening hands its task to, one per later PullTask), so a restarted
coordinator still knows which task each holder holds: an answer counts only for the task
its holder was handed last. Each round record names the holders it was asked of
(``asked``), from which the consecutive rounds each holder missed are rebuilt; evictions
are journaled as they happen (``evicted``), for the report.

Journal records are group-committed (:mod:`sottovoce.server.journal`): ``record_*`` write
the line and update the state at once, and the coordinator makes the journal durable
(:meth:`RunState.sync`, or :attr:`RunState.journal`'s ``when_durable``) before anything
that depends on a record leaves it. A closed round is the exception: its record is
fsync'd before its step reaches the log, so the log is never ahead of the journal on disk.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sottovoce.common.config import RunConfig, load_config
from sottovoce.common.errors import ConfigError, LogIntegrityError
from sottovoce.common.protocol.messages import Candidate
from sottovoce.common.steplog import Step, StepLog, genesis_hash
from sottovoce.common.storage import (
    SHARED,
    atomic_write_text,
    read_json_lines,
    repair_torn_tail,
)
from sottovoce.server.journal import Journal

RUN_META = "run.json"
JOURNAL = "journal.jsonl"
LOG = "log.jsonl"
CONFIG_COPY = "run.toml"
REPORT = "report.json"


@dataclass
class RoundRecord:
    """A closed round as journaled."""

    round_index: int
    candidates: tuple[Candidate, ...]
    choices: dict[str, int]
    refusals: dict[str, str]
    winner: int | None
    steps: tuple[Step, ...]
    step_size_after: float
    bits: float
    closed_by: str
    values: dict[str, float] = field(default_factory=dict)
    estimate: float | None = None
    asked: tuple[str, ...] = ()  # the holders the round was issued to (sorted)
    ranking: tuple[int, ...] | None = None  # rank runs: the aggregated ranking
    told: bool = True  # whether the strategy was told the answers (a quorum was met)

    @property
    def step(self) -> Step | None:
        """The round's first step, or None (every strategy but es-mu-lambda takes at most one)."""
        return self.steps[0] if self.steps else None

    @property
    def answered(self) -> set[str]:
        """Holders whose answer (or refusal) came in before the round closed."""
        return {*self.choices, *self.values, *self.refusals}

    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.values or self.estimate is not None:
            extra = {"values": self.values, "estimate": self.estimate}
        if self.ranking is not None:
            extra["ranking"] = list(self.ranking)
        if len(self.steps) > 1:
            extra["steps"] = [_step_json(step) for step in self.steps]
        if not self.told:
            extra["told"] = False
        return {
            **extra,
            "type": "round",
            "asked": list(self.asked),
            "round": self.round_index,
            "candidates": [_candidate_json(c) for c in self.candidates],
            "choices": self.choices,
            "refusals": self.refusals,
            "winner": self.winner,
            "step": None if self.step is None else _step_json(self.step),
            "step_size_after": self.step_size_after,
            "bits": self.bits,
            "closed_by": self.closed_by,
            "time": time.time(),
        }


@dataclass
class AnswerRecord:
    """One holder's answer as it arrived (journaled before it is used)."""

    round_index: int
    holder_id: str
    task_id: str
    choice: int | None
    refusal: str | None
    bits: float
    late: bool
    value: float | None = None  # a dp-scalar (dequantized when the answer was a level)

    def to_json(self) -> dict[str, Any]:
        extra = {} if self.value is None else {"value": self.value}
        return {
            **extra,
            "type": "answer",
            "round": self.round_index,
            "holder": self.holder_id,
            "task_id": self.task_id,
            "choice": self.choice,
            "refusal": self.refusal,
            "bits": self.bits,
            "late": self.late,
            "time": time.time(),
        }


@dataclass(frozen=True)
class Eviction:
    """A holder dropped from the run after missing ``missed_rounds`` rounds in a row."""

    holder_id: str
    round_index: int  # the round whose close evicted it
    missed_rounds: int
    time: float

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "evicted",
            "holder": self.holder_id,
            "round": self.round_index,
            "missed_rounds": self.missed_rounds,
            "time": self.time,
        }


@dataclass
class RunState:
    """Everything a coordinator must not forget, rebuilt from disk on open."""

    run_dir: Path
    run_id: str
    genesis: str
    log: StepLog
    next_round: int = 0
    step_size: float | None = None
    bits_total: float = 0.0
    bits_per_holder: dict[str, float] = field(default_factory=dict)
    refusal_codes: dict[str, int] = field(default_factory=dict)  # code -> refusals journaled
    rounds: list[RoundRecord] = field(default_factory=list)
    open_round_answers: list[AnswerRecord] = field(default_factory=list)
    answered_task_ids: set[str] = field(default_factory=set)
    # holder -> the round whose task it was handed last (its answer is the one that counts)
    last_delivered: dict[str, int] = field(default_factory=dict)
    # holder -> rounds in a row it was asked in and closed without its answer
    missed_rounds: dict[str, int] = field(default_factory=dict)
    evictions: list[Eviction] = field(default_factory=list)
    finished_reason: str | None = None
    repaired: list[str] = field(default_factory=list)
    journal: Journal = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.journal = Journal(self.run_dir / JOURNAL)

    # -- creating and resuming ---------------------------------------------------------
    @classmethod
    def open(
        cls, run_dir: Path, config: RunConfig, config_text: str, model_fingerprint: str
    ) -> RunState:
        """Create a new run directory, or resume the one that is there.

        Resuming needs the same config and model; otherwise the user gets one line saying
        so and nothing in the directory is touched.
        """
        genesis = genesis_hash(model_fingerprint, config.parametrization.canonical_id())
        meta_path = run_dir / RUN_META
        if meta_path.exists():
            meta = read_meta(meta_path)
            if meta.get("config_fingerprint") != config.fingerprint():
                raise ConfigError(
                    f"{run_dir}: holds a run with a different config; use a new --run-dir"
                )
            if meta.get("genesis") != genesis:
                raise ConfigError(f"{run_dir}: holds a run on a different model/parametrization")
            return cls._resume(run_dir, str(meta["run_id"]), genesis)
        return cls._create(run_dir, config, config_text, model_fingerprint, genesis)

    @classmethod
    def _create(
        cls,
        run_dir: Path,
        config: RunConfig,
        config_text: str,
        model_fingerprint: str,
        genesis: str,
    ) -> RunState:
        run_dir.mkdir(parents=True, exist_ok=True)
        if any(run_dir.iterdir()):
            raise ConfigError(f"{run_dir}: not empty and not a run directory; use a new --run-dir")
        # A random nonce makes every run's task ids unique, so a holder's ledger cache of
        # an older run can never answer a new run's question.
        run_id = f"{config.run.name}-{secrets.token_hex(4)}"
        (run_dir / CONFIG_COPY).write_text(config_text, encoding="utf-8")
        meta = {
            "run_id": run_id,
            "config_fingerprint": config.fingerprint(),
            "model_fingerprint": model_fingerprint,
            "genesis": genesis,
            "created": time.time(),
        }
        atomic_write_text(
            run_dir / RUN_META, json.dumps(meta, indent=2, sort_keys=True), mode=SHARED
        )
        log = StepLog.open(run_dir / LOG, genesis)
        return cls(run_dir=run_dir, run_id=run_id, genesis=genesis, log=log)

    @classmethod
    def _resume(cls, run_dir: Path, run_id: str, genesis: str) -> RunState:
        repaired = [name for name in (JOURNAL, LOG) if repair_torn_tail(run_dir / name)]
        log = StepLog.open(run_dir / LOG, genesis)
        state = cls(run_dir=run_dir, run_id=run_id, genesis=genesis, log=log, repaired=repaired)
        state._replay_journal(read_json_lines(run_dir / JOURNAL))
        return state

    def _replay_journal(self, records: list[dict[str, Any]]) -> None:
        accepted: list[Step] = []
        pending: list[AnswerRecord] = []
        for record in records:
            kind = record.get("type")
            if kind == "answer":
                answer = _answer_from_json(record)
                self._count_answer(answer)
                self.answered_task_ids.add(answer.task_id)
                if answer.round_index >= self.next_round:
                    pending.append(answer)
            elif kind == "round":
                closed = _round_from_json(record)
                self.rounds.append(closed)
                self.next_round = closed.round_index + 1
                self.step_size = closed.step_size_after
                self._count_misses(closed)
                accepted.extend(closed.steps)
                pending = [a for a in pending if a.round_index > closed.round_index]
            elif kind == "delivered":
                round_index, holders = _delivered_from_json(record)
                self.last_delivered.update(dict.fromkeys(holders, round_index))
            elif kind == "evicted":
                self.evictions.append(_eviction_from_json(record))
            elif kind == "finished":
                self.finished_reason = str(record.get("reason"))
        self.open_round_answers = pending
        self._reconcile_log(accepted)

    def _reconcile_log(self, accepted: list[Step]) -> None:
        """Complete the log from the journal after a crash between the two writes."""
        logged = list(self.log)
        if logged != accepted[: len(logged)]:
            raise LogIntegrityError(
                f"{self.run_dir}: log.jsonl disagrees with the steps in journal.jsonl"
            )
        for step in accepted[len(logged) :]:
            self.log.append(step)
            self.repaired.append(f"log step {self.log.version - 1} restored from journal")

    # -- recording -----------------------------------------------------------------------
    def sync(self) -> None:
        """Block until every record journaled so far is on disk (one fsync for them all)."""
        self.journal.sync()

    def close(self) -> None:
        """Make the journal durable and close it (the state is not used afterwards)."""
        self.journal.close()

    def record_answer(self, answer: AnswerRecord) -> None:
        """Journal an arriving answer (durable at the next sync) and count its bits."""
        self.journal.append(answer.to_json())
        self._count_answer(answer)
        self.answered_task_ids.add(answer.task_id)

    def record_round(self, closed: RoundRecord) -> None:
        """Journal a closed round, then append its steps to the log (in that order)."""
        seq = self.journal.append(closed.to_json())
        if closed.steps:
            self.journal.sync(seq)  # on disk before the log: never a log ahead of it
        for step in closed.steps:
            self.log.append(step)
        self.rounds.append(closed)
        self.next_round = closed.round_index + 1
        self.step_size = closed.step_size_after
        self.open_round_answers = []
        self._count_misses(closed)

    def record_delivered(self, round_index: int, holders: list[str]) -> None:
        """Journal that ``holders`` are handed round ``round_index``'s task (durable before
        it leaves): after a restart, their answers to it are still recognised as theirs."""
        if not holders:
            return
        record = {"type": "delivered", "round": round_index, "holders": sorted(holders)}
        self.journal.append({**record, "time": time.time()})
        self.last_delivered.update(dict.fromkeys(holders, round_index))

    def record_eviction(self, eviction: Eviction) -> None:
        self.journal.append(eviction.to_json())
        self.evictions.append(eviction)

    def _count_misses(self, closed: RoundRecord) -> None:
        """An answer in time clears a holder's count; a round asked of it without one adds one.

        The same on a live close and on replay, so a restart counts exactly as before.
        """
        answered = closed.answered
        for holder in answered:
            self.missed_rounds.pop(holder, None)
        for holder in closed.asked:
            if holder not in answered:
                self.missed_rounds[holder] = self.missed_rounds.get(holder, 0) + 1

    def record_finished(self, reason: str) -> None:
        self.journal.append({"type": "finished", "reason": reason})
        self.finished_reason = reason

    def write_report(self, report: dict[str, Any]) -> Path:
        path = self.run_dir / REPORT
        atomic_write_text(path, json.dumps(report, indent=2, sort_keys=True), mode=SHARED)
        return path

    def _count_answer(self, answer: AnswerRecord) -> None:
        """The same on a live answer and on replay, so the figures survive a restart."""
        self.bits_total += answer.bits
        holder = answer.holder_id
        self.bits_per_holder[holder] = self.bits_per_holder.get(holder, 0.0) + answer.bits
        if answer.refusal is not None:
            self.refusal_codes[answer.refusal] = self.refusal_codes.get(answer.refusal, 0) + 1


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LogIntegrityError(f"{path}: unreadable run metadata: {exc}") from None
    if not isinstance(meta, dict) or "run_id" not in meta:
        raise LogIntegrityError(f"{path}: not a sottovoce run (no run_id)")
    return meta


def coordinator_dir(run_dir: Path) -> Path:
    """The coordinator's state folder: ``run_dir`` itself, or ``run_dir/coordinator``.

    ``sottovoce server --run-dir`` writes the state into the folder it is given;
    ``sottovoce simulate`` puts it under ``coordinator/`` next to the holders' folders.
    """
    if not (run_dir / RUN_META).exists() and (run_dir / "coordinator" / RUN_META).exists():
        return run_dir / "coordinator"
    return run_dir


def read_run_config(run_dir: Path) -> tuple[RunConfig, dict[str, Any]]:
    """The run's config (the copy the coordinator kept) and its metadata.

    Light (no torch): ``sottovoce export`` checks its --run with it before the heavy imports.
    """
    meta_path = run_dir / RUN_META
    if not meta_path.exists():
        raise ConfigError(
            f"{run_dir}: not a run directory (no {RUN_META}); give the folder "
            "`sottovoce simulate` printed or `sottovoce server --run-dir`'s"
        )
    return load_config(run_dir / CONFIG_COPY), read_meta(meta_path)


def _answer_from_json(record: dict[str, Any]) -> AnswerRecord:
    try:
        return AnswerRecord(
            round_index=int(record["round"]),
            holder_id=str(record["holder"]),
            task_id=str(record["task_id"]),
            choice=None if record["choice"] is None else int(record["choice"]),
            refusal=record.get("refusal"),
            bits=float(record["bits"]),
            late=bool(record["late"]),
            value=None if record.get("value") is None else float(record["value"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LogIntegrityError(f"journal: bad answer record {record}: {exc}") from None


def journal_steps(run_dir: Path) -> list[Step]:
    """The steps the journal in ``run_dir`` accepted, in order (what the log must hold)."""
    rounds = [
        _round_from_json(r) for r in read_json_lines(run_dir / JOURNAL) if r.get("type") == "round"
    ]
    return [step for closed in rounds for step in closed.steps]


def _step_json(step: Step) -> list[Any]:
    """A step in the journal: ``[seed, coefficient]``, an explicit one with its delta too."""
    if step.delta is None:
        return [step.seed, step.coefficient]
    return [step.seed, step.coefficient, list(step.delta)]


def _step_from_json(raw: list[Any]) -> Step:
    delta = None if len(raw) < 3 else tuple(float(v) for v in raw[2])
    return Step(seed=int(raw[0]), coefficient=float(raw[1]), delta=delta)


def _candidate_json(candidate: Candidate) -> list[Any]:
    if candidate.delta is None:
        return [candidate.seed, candidate.scale]
    return [candidate.seed, candidate.scale, list(candidate.delta)]


def _candidate_from_json(raw: list[Any]) -> Candidate:
    delta = None if len(raw) < 3 else tuple(float(v) for v in raw[2])
    return Candidate(seed=int(raw[0]), scale=float(raw[1]), delta=delta)


def _round_from_json(record: dict[str, Any]) -> RoundRecord:
    try:
        step = record["step"]
        if "steps" in record:
            steps = tuple(_step_from_json(raw) for raw in record["steps"])
        else:
            steps = () if step is None else (_step_from_json(step),)
        closed_by = str(record.get("closed_by", ""))
        ranking = record.get("ranking")
        return RoundRecord(
            round_index=int(record["round"]),
            candidates=tuple(_candidate_from_json(raw) for raw in record["candidates"]),
            choices={str(k): int(v) for k, v in record["choices"].items()},
            refusals={str(k): str(v) for k, v in record.get("refusals", {}).items()},
            winner=None if record["winner"] is None else int(record["winner"]),
            steps=steps,
            step_size_after=float(record["step_size_after"]),
            bits=float(record["bits"]),
            closed_by=closed_by,
            values={str(k): float(v) for k, v in record.get("values", {}).items()},
            estimate=None if record.get("estimate") is None else float(record["estimate"]),
            asked=tuple(str(h) for h in record.get("asked", ())),  # older journals: none
            ranking=None if ranking is None else tuple(int(i) for i in ranking),
            told=bool(record.get("told", not closed_by.endswith("no quorum"))),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LogIntegrityError(f"journal: bad round record: {exc}") from None


def _delivered_from_json(record: dict[str, Any]) -> tuple[int, list[str]]:
    try:
        return int(record["round"]), [str(h) for h in record["holders"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise LogIntegrityError(f"journal: bad delivered record {record}: {exc}") from None


def _eviction_from_json(record: dict[str, Any]) -> Eviction:
    try:
        return Eviction(
            holder_id=str(record["holder"]),
            round_index=int(record["round"]),
            missed_rounds=int(record["missed_rounds"]),
            time=float(record["time"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LogIntegrityError(f"journal: bad evicted record {record}: {exc}") from None
