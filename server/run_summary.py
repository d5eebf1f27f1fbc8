"""A run directory's progress, read without touching it: what ``sottovoce status`` shows.

The coordinator may be running and writing the journal while this reads it, so nothing
here writes, locks or repairs: the run's files are read as they are, and a last line still
being written (no newline yet) is simply not read yet. The figures are the journal's, the
same the coordinator's metrics and report give.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sottovoce.common.config import load_config
from sottovoce.common.errors import ConfigError, LogIntegrityError
from sottovoce.common.storage import parse_json_lines
from sottovoce.server.run_state import CONFIG_COPY, JOURNAL, LOG, REPORT, RUN_META, read_meta

RECENT_ROUNDS = 20  # the rate is taken over this many last rounds


@dataclass(frozen=True)
class RunSummary:
    """Where a run stands."""

    run_dir: Path
    run_id: str
    algorithm: str
    model: str
    rounds: int
    max_rounds: int
    accepted_steps: int
    bits_total: float
    bit_budget: float
    bits_per_holder: dict[str, float]
    holders_last_round: tuple[str, ...]
    evictions: list[dict[str, Any]]
    refusal_codes: dict[str, int]
    step_size: float | None
    started: float | None
    last_round_time: float | None
    rounds_per_minute: float | None
    finished_reason: str | None
    report_written: bool
    late_answers: int = 0
    waiting_for: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the recent pace (None if unknown or over)."""
        if self.finished or not self.rounds_per_minute:
            return None
        return (self.max_rounds - self.rounds) / self.rounds_per_minute * 60.0

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "run_id": self.run_id,
            "algorithm": self.algorithm,
            "model": self.model,
            "rounds": self.rounds,
            "max_rounds": self.max_rounds,
            "accepted_steps": self.accepted_steps,
            "bits_total": self.bits_total,
            "bit_budget": self.bit_budget,
            "bits_per_holder": dict(sorted(self.bits_per_holder.items())),
            "holders_last_round": list(self.holders_last_round),
            "waiting_for": self.waiting_for,
            "evictions": self.evictions,
            "refusal_codes": self.refusal_codes,
            "late_answers": self.late_answers,
            "step_size": self.step_size,
            "rounds_per_minute": self.rounds_per_minute,
            "eta_s": self.eta_s,
            "finished_reason": self.finished_reason,
            "report_written": self.report_written,
        }


def read_summary(run_dir: Path) -> RunSummary:
    """The run in ``run_dir`` as its journal and log say now."""
    run_dir = Path(run_dir)
    meta_path = run_dir / RUN_META
    if not meta_path.exists():
        raise ConfigError(f"{run_dir}: not a run directory (no {RUN_META})")
    meta = read_meta(meta_path)
    config = load_config(run_dir / CONFIG_COPY)
    records = _complete_lines(run_dir / JOURNAL)
    steps = len(_complete_lines(run_dir / LOG))
    bits_total = 0.0
    per_holder: dict[str, float] = {}
    refusals: dict[str, int] = {}
    late = 0
    evictions: list[dict[str, Any]] = []
    round_times: list[float] = []
    rounds = 0
    step_size: float | None = None
    last_asked: tuple[str, ...] = ()
    open_answers: set[str] = set()
    last_delivered_round: dict[str, int] = {}
    finished: str | None = None
    for record in records:
        kind = record.get("type")
        if kind == "answer":
            bits = float(record.get("bits", 0.0))
            holder = str(record.get("holder"))
            bits_total += bits
            per_holder[holder] = per_holder.get(holder, 0.0) + bits
            if record.get("refusal") is not None:
                code = str(record["refusal"])
                refusals[code] = refusals.get(code, 0) + 1
            late += bool(record.get("late"))
            if int(record.get("round", -1)) >= rounds:
                open_answers.add(holder)
        elif kind == "round":
            rounds = int(record["round"]) + 1
            step_size = record.get("step_size_after")
            last_asked = tuple(str(h) for h in record.get("asked", ()))
            if isinstance(record.get("time"), int | float):
                round_times.append(float(record["time"]))
            open_answers = set()
        elif kind == "delivered":
            for holder in record.get("holders", ()):
                last_delivered_round[str(holder)] = int(record["round"])
        elif kind == "evicted":
            evictions.append(
                {k: record.get(k) for k in ("holder", "round", "missed_rounds", "time")}
            )
        elif kind == "finished":
            finished = str(record.get("reason"))
    recent = round_times[-RECENT_ROUNDS:]
    rate = None
    if len(recent) >= 2 and recent[-1] > recent[0]:
        rate = (len(recent) - 1) / (recent[-1] - recent[0]) * 60.0
    waiting = sorted(
        holder
        for holder, delivered in last_delivered_round.items()
        if delivered == rounds and holder not in open_answers
    )
    return RunSummary(
        run_dir=run_dir,
        run_id=str(meta["run_id"]),
        algorithm=config.run.algorithm,
        model=config.model.name,
        rounds=rounds,
        max_rounds=config.run.max_rounds,
        accepted_steps=steps,
        bits_total=bits_total,
        bit_budget=config.run.bit_budget,
        bits_per_holder=per_holder,
        holders_last_round=last_asked,
        evictions=evictions,
        refusal_codes=refusals,
        step_size=None if step_size is None else float(step_size),
        started=float(meta["created"]) if isinstance(meta.get("created"), int | float) else None,
        last_round_time=round_times[-1] if round_times else None,
        rounds_per_minute=rate,
        finished_reason=finished,
        report_written=(run_dir / REPORT).exists(),
        late_answers=late,
        waiting_for=[] if finished else waiting,
    )


def _complete_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file that a writer may be appending to: every line that
    has its newline (a torn or half-written last line is not read yet)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LogIntegrityError(f"{path}: cannot read: {exc.strerror}") from exc
    complete = raw[: raw.rfind(b"\n") + 1]
    return parse_json_lines(path, complete)


def age(seconds_ago: float | None, now: float | None = None) -> str:
    """How long ago a time was, in words an operator reads at a glance."""
    if seconds_ago is None:
        return "never"
    delta = max(0.0, (time.time() if now is None else now) - seconds_ago)
    if delta < 90:
        return f"{delta:.0f} s ago"
    if delta < 5400:
        return f"{delta / 60:.0f} min ago"
    return f"{delta / 3600:.1f} h ago"


def dumps(summary: RunSummary) -> str:
    return json.dumps(summary.to_json(), indent=2, sort_keys=True)
