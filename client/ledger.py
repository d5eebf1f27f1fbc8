"""The privacy ledger: the lifetime budget of one data set, kept by its holder.

Budgets belong to the data set, not to a run: one append-only JSON-lines file per data
set, ``<ledger_dir>/<dataset_id>.ledger.jsonl`` (owner-only, 0600), shared by every run,
every restart and every run id that ever touches that data set. The data set id is keyed
on its records, not its file (:mod:`sottovoce.client.dataset_identity`), which also works
out what its records already cost in overlapping ledgers: the ledger's :class:`Inheritance`,
counted in every budget check but never written into this file. The protocol it enforces:

1. ``cached_answer(task_id)``: a task id answered before gets exactly the recorded answer,
   never a fresh evaluation or noise draw, and is never charged twice.
2. ``check_affordable(bits)`` before any data is touched.
3. evaluate, then ``charge(...)``: re-checks the budget, appends the record and fsyncs it.
4. only then does the answer leave the holder.

So every answer that ever left has a durable record, and a crash can lose only a record
whose answer never left (a torn last line, dropped on open and reported as ``repaired``).

Each record carries its own hash and the hash of the record before it (a chain from a
genesis bound to the data set id), so an edited line, and a reordered or deleted line
before the last, is detected on open and named. Cutting off the *last* lines cannot be
seen from inside the file: the ledger guards against accidents and careless edits, not
against the operator, who is the one it protects. An exclusive file lock held
for the ledger's lifetime stops two holder processes from spending one budget twice.

Record fields (one JSON object a line, keys sorted): ``v`` (format version), ``seq``,
``time`` (unix seconds), ``run_id``, ``task_id``, ``kind`` (answer kind), ``bits``,
``choice`` (an integer, or null for an unquantized dp-scalar), ``prev_hash``, ``hash``
(sha256 of the record's canonical JSON without ``hash``), and optionally ``value`` (the
released dp-scalar), ``dp`` (the DP event the answer was, see
:mod:`sottovoce.common.accounting`) and ``detail``.

The same records carry both budgets. Bits add up; (ε, δ) is recomputed by composing
every record's ``dp`` event with the RDP accountant, at the policy's δ. A DP answer is
charged against both: it is refused if either would be passed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import filelock
import numpy as np

from sottovoce.common.accounting import (
    ACCOUNTANT_NAME,
    DpEvent,
    Gaussian,
    PoissonGaussian,
    PrivacyAccountant,
    event_from_json,
)
from sottovoce.common.errors import (
    AccountingError,
    BudgetExhausted,
    ConfigError,
    LogIntegrityError,
    PolicyViolation,
    RefusalCode,
)
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.storage import (
    canonical_json,
    create_private,
    parse_json_lines,
    read_json_lines,
    repair_torn_tail,
)

FORMAT_VERSION = 1
BUDGET_TOLERANCE = 1e-9  # float sums of log2(lambda+1) may land a hair above an exact limit
_REQUIRED_FIELDS = frozenset(
    {"v", "seq", "time", "run_id", "task_id", "kind", "bits", "choice", "prev_hash", "hash"}
)
# Optional fields a reader understands. A field not listed here is refused on open rather
# than ignored: a ledger written by a newer version may account for something (such as
# epsilon) that this version would silently leave out of the budget.
_OPTIONAL_FIELDS = frozenset({"detail", "value", "dp"})
_DATASET_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")


@dataclass(frozen=True)
class PrivacyLimit:
    """The lifetime (ε, δ) limit of a data set, from its holder's policy.

    ``require_dp``: refuse every answer that is not differentially private (plain BBoxER
    choices, non-private DPZero), so the data set's whole release is covered by ε.
    """

    max_epsilon: float
    delta: float
    require_dp: bool = False


@dataclass(frozen=True)
class Inheritance:
    """What a data set's records already cost in other ledgers (the worst record's sum).

    ``curve`` is an RDP curve over the accountant's orders; ``sources`` names each
    overlapping ledger with the records shared and its own bits.
    """

    bits: float
    curve: np.ndarray
    sources: tuple[tuple[str, int, float], ...]

    def describe(self) -> str:
        parts = ", ".join(
            f"{ident[:12]} ({shared} records, {bits:.1f} bits)"
            for ident, shared, bits in self.sources
        )
        return f"inherits {self.bits:.2f} bits and its records' epsilon from ledgers {parts}"


@dataclass(frozen=True)
class LedgerRecord:
    """One release: an answer that left the holder, and what it cost."""

    seq: int
    time: float
    run_id: str
    task_id: str
    kind: str
    bits: float
    choice: int | None
    prev_hash: str
    hash: str
    value: float | None = None
    dp: DpEvent | None = None
    detail: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


class Ledger:
    """The append-only, fsync'd, hash-chained, locked budget file of one data set.

    Open it with :meth:`Ledger.open`; use it as a context manager or call :meth:`close`.
    Thread-safe: a check-and-charge is one critical section.
    """

    def __init__(
        self,
        path: Path,
        dataset_id: str,
        max_bits: float,
        lock: filelock.BaseFileLock | None,
        privacy: PrivacyLimit | None = None,
        inherited: Inheritance | None = None,
    ):
        """Internal: use :meth:`Ledger.open`, which takes the lock and verifies the file."""
        self.path = path
        self.dataset_id = dataset_id
        self.max_bits = max_bits
        self.privacy = privacy
        self.inherited = inherited
        self.accountant = self._fresh_accountant(())
        self.repaired = False
        self._lock = lock
        self._mutex = threading.Lock()
        self._records: list[LedgerRecord] = []
        self._by_task: dict[str, LedgerRecord] = {}
        self._head = _genesis_hash(dataset_id)
        self._spent = 0.0 if inherited is None else inherited.bits
        self._closed = False
        self.read_only = lock is None
        self._broken: str | None = None

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        ledger_dir: Path,
        dataset_id: str,
        max_bits: float,
        *,
        privacy: PrivacyLimit | None = None,
        read_only: bool = False,
        inherited: Inheritance | None = None,
    ) -> Ledger:
        """Lock, repair a torn tail, and verify the ledger of ``dataset_id`` (created if new).

        ``dataset_id`` names the data set (see :mod:`sottovoce.client.dataset_identity`,
        which also computes ``inherited``, what its records cost in other ledgers).
        ``privacy`` is the lifetime (ε, δ) limit; without it, DP answers are still
        recorded and accounted but only their bits are limited.
        ``read_only=True`` is for the operator's audit while a holder is running: no lock,
        nothing created or repaired, a torn tail (a write in progress) left out, and every
        charge refused.
        """
        if not (isinstance(dataset_id, str) and _DATASET_ID.fullmatch(dataset_id)):
            raise ConfigError(f"ledger: dataset id {dataset_id!r} is not a file-name-safe id")
        if not (isinstance(max_bits, int | float) and not math.isnan(max_bits) and max_bits > 0):
            raise ConfigError(f"ledger: max_bits must be a finite number > 0 (got {max_bits!r})")
        ledger_dir = Path(ledger_dir)
        path = ledger_dir / f"{dataset_id}.ledger.jsonl"
        if read_only:
            ledger = cls(path, dataset_id, float(max_bits), None, privacy, inherited)
            raw = path.read_bytes() if path.exists() else b""
            ledger._load(parse_json_lines(path, raw[: raw.rfind(b"\n") + 1]))
            return ledger
        try:
            ledger_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{ledger_dir}: cannot create ledger folder: {exc}") from exc
        lock = filelock.FileLock(f"{path}.lock", thread_local=False)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise ConfigError(
                f"ledger {path} is in use by another process (lock {path}.lock); "
                "one data set may be served by one holder at a time"
            ) from None
        ledger = cls(path, dataset_id, float(max_bits), lock, privacy, inherited)
        try:
            if not path.exists():
                create_private(path)
                _fsync_dir(path.parent)  # the new file's name must survive a crash too
            else:
                create_private(path)  # an older version made it world-readable
            ledger.repaired = repair_torn_tail(path)
            ledger._load(read_json_lines(path))
        except BaseException:
            lock.release()
            raise
        return ledger

    def _load(self, raws: list[dict[str, object]]) -> None:
        for number, raw in enumerate(raws):
            self._remember(self._verify(raw, number), account=False)
        # Composed once per distinct event (RDP adds up), not once per record.
        self.accountant = self._fresh_accountant(self.dp_events())

    def _fresh_accountant(self, events: list[DpEvent] | tuple[()]) -> PrivacyAccountant:
        base = None if self.inherited is None else self.inherited.curve
        return PrivacyAccountant(events, base_curve=base)

    def _verify(self, raw: dict[str, object], number: int) -> LedgerRecord:
        where = f"{self.path}: line {number + 1}"
        keys = set(raw)
        if not keys >= _REQUIRED_FIELDS:
            raise LogIntegrityError(f"{where}: missing {sorted(_REQUIRED_FIELDS - keys)}")
        if keys - _REQUIRED_FIELDS - _OPTIONAL_FIELDS:
            unknown = sorted(keys - _REQUIRED_FIELDS - _OPTIONAL_FIELDS)
            raise LogIntegrityError(f"{where}: unknown field(s) {unknown} (a newer version?)")
        if raw["v"] != FORMAT_VERSION:
            raise LogIntegrityError(f"{where}: format version {raw['v']!r}, expected 1")
        try:
            own_hash = _record_hash(raw)
        except ValueError as exc:  # NaN or infinity smuggled into the JSON
            raise LogIntegrityError(f"{where}: bad record: {exc}") from exc
        if raw["hash"] != own_hash:
            raise LogIntegrityError(f"{where}: record hash does not match (the line was edited)")
        if raw["prev_hash"] != self._head:
            raise LogIntegrityError(
                f"{where}: hash chain breaks (a line before it was removed or reordered, "
                "or the file belongs to another data set)"
            )
        try:
            record = _record_from_json(raw)
        except (TypeError, ValueError) as exc:
            raise LogIntegrityError(f"{where}: bad record: {exc}") from exc
        if record.seq != number:
            raise LogIntegrityError(f"{where}: has seq {record.seq}, expected {number}")
        if record.task_id in self._by_task:
            raise LogIntegrityError(f"{where}: task id {record.task_id!r} is charged twice")
        return record

    def _remember(self, record: LedgerRecord, *, account: bool = True) -> None:
        self._records.append(record)
        self._by_task[record.task_id] = record
        self._head = record.hash
        self._spent += record.bits
        if account and record.dp is not None:
            self.accountant.compose(record.dp)

    # -- reading ---------------------------------------------------------------------------
    @property
    def spent_bits(self) -> float:
        """Bits this data set's records have cost: its own releases and what it inherited."""
        return self._spent

    @property
    def own_bits(self) -> float:
        """Bits of this ledger's own releases only."""
        return self._spent - (0.0 if self.inherited is None else self.inherited.bits)

    @property
    def remaining_bits(self) -> float:
        """Bits left; never negative (a lowered max_bits may leave past spending above it)."""
        return max(0.0, self.max_bits - self._spent)

    @property
    def records(self) -> tuple[LedgerRecord, ...]:
        return tuple(self._records)

    def spent_epsilon(self, delta: float | None = None) -> float:
        """Lifetime ε of every DP answer at ``delta`` (default: the limit's δ); 0 if none.

        Answers without a DP event (plain BBoxER, non-private DPZero) are not in it: their
        cost is in bits only, and no ε can describe them.
        """
        if delta is None:
            if self.privacy is None:
                raise ConfigError("spent_epsilon needs a delta: this ledger has no (ε, δ) limit")
            delta = self.privacy.delta
        return self.accountant.epsilon(delta)

    def dp_events(
        self, *, run_id: str | None = None, except_run: str | None = None
    ) -> list[DpEvent]:
        """The DP events charged so far: all, only ``run_id``'s, or all but ``except_run``'s."""
        return [
            record.dp
            for record in self._records
            if record.dp is not None
            and (run_id is None or record.run_id == run_id)
            and (except_run is None or record.run_id != except_run)
        ]

    def cached_answer(self, task_id: str, run_id: str | None = None) -> LedgerRecord | None:
        """The record of what was already released for ``task_id``, or None.

        With ``run_id``, a task id recorded under another run is refused: task ids are
        unique for the data set's lifetime, and answering a new run's task with an old
        run's choice would be wrong (though it would leak nothing new).
        """
        record = self._by_task.get(task_id)
        if record is None:
            return None
        if run_id is not None and record.run_id != run_id:
            raise PolicyViolation(
                f"task id {task_id!r} was already answered for run {record.run_id!r}, "
                f"not {run_id!r}; task ids must be unique for the data set's lifetime",
                RefusalCode.MALFORMED,
            )
        return record

    # -- spending --------------------------------------------------------------------------
    def check_affordable(self, bits: float, dp: DpEvent | None = None) -> None:
        """Raise ``BudgetExhausted`` if one more answer would pass a lifetime budget.

        Bits always; with a privacy limit, also ε: the answer is refused when composing
        ``dp`` with every earlier DP answer would pass ``max_epsilon`` at the limit's δ,
        and an answer with no DP event (``dp=None``) is refused outright when the limit
        says ``require_dp``.
        """
        _check_bits(bits)
        if self._spent + bits > self.max_bits + BUDGET_TOLERANCE:
            raise BudgetExhausted(
                f"data set {self.dataset_id}: answering costs {bits:.2f} bits, "
                f"{self.remaining_bits:.2f} of {self.max_bits:g} remain"
            )
        if self.privacy is None:
            return
        if dp is None:
            if self.privacy.require_dp:
                raise BudgetExhausted(
                    f"data set {self.dataset_id}: the policy requires differentially private "
                    "answers and this answer is not one"
                )
            return
        after = self.accountant.epsilon_with(dp, self.privacy.delta)
        if after > self.privacy.max_epsilon + BUDGET_TOLERANCE:
            spent = self.accountant.epsilon(self.privacy.delta)
            raise BudgetExhausted(
                f"data set {self.dataset_id}: this answer would bring epsilon from "
                f"{spent:.4f} to {after:.4f} at delta {self.privacy.delta:g}, past max_epsilon "
                f"{self.privacy.max_epsilon:g}"
            )

    def charge(
        self,
        task_id: str,
        run_id: str,
        bits: float,
        choice: int | None,
        *,
        answer_kind: AnswerKind | str,
        value: float | None = None,
        dp: DpEvent | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record a release durably; returns only once the record is fsync'd.

        The caller sends the answer only after this returns. Raises ``BudgetExhausted``
        (file untouched) if it is not affordable, ``ValueError`` if ``task_id`` was already
        charged (ask :meth:`cached_answer` first) or an argument is malformed.
        """
        if choice is None and value is None:
            raise ValueError("an answer needs a choice or a value")
        if choice is not None and (isinstance(choice, bool) or not isinstance(choice, int)):
            raise ValueError(f"choice must be an int (got {choice!r})")
        if value is not None and not (isinstance(value, float) and math.isfinite(value)):
            raise ValueError(f"value must be a finite float (got {value!r})")
        if not (isinstance(task_id, str) and task_id and isinstance(run_id, str) and run_id):
            raise ValueError("task_id and run_id must be non-empty strings")
        kind = answer_kind.value if isinstance(answer_kind, AnswerKind) else str(answer_kind)
        with self._mutex:
            self._check_open()
            if task_id in self._by_task:
                raise ValueError(f"task id {task_id!r} is already charged; use cached_answer")
            self.check_affordable(bits, dp)
            raw: dict[str, object] = {
                "v": FORMAT_VERSION,
                "seq": len(self._records),
                "time": time.time(),
                "run_id": run_id,
                "task_id": task_id,
                "kind": kind,
                "bits": float(bits),
                "choice": choice,
                "prev_hash": self._head,
            }
            if value is not None:
                raw["value"] = value
            if dp is not None:
                raw["dp"] = dp.to_json()
            if detail:
                raw["detail"] = dict(detail)
            # Raises on a non-JSON detail, before anything is written.
            raw["hash"] = _record_hash(raw)
            line = _canonical(raw)
            self._append(line)
            # Remember what a reopen will read back, not the caller's objects.
            self._remember(_record_from_json(json.loads(line)))

    def _append(self, line: str) -> None:
        """Append one line and fsync; on failure put the file back as it was."""
        size = self.path.stat().st_size
        try:
            with open(self.path, "ab") as handle:
                handle.write(line.encode("utf-8") + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            try:
                os.truncate(self.path, size)
            except OSError:
                # A partial line may be left; appending after it would bury it mid-file.
                self._broken = f"an earlier write failed ({exc}); reopen the ledger"
            raise LogIntegrityError(
                f"{self.path}: could not write a ledger record ({exc}); nothing was charged"
            ) from exc

    def _check_open(self) -> None:
        if self.read_only:
            raise ConfigError(f"ledger {self.path} is opened read-only")
        if self._closed:
            raise ConfigError(f"ledger {self.path} is closed")
        if self._broken is not None:
            raise LogIntegrityError(f"ledger {self.path}: {self._broken}")

    # -- reporting -------------------------------------------------------------------------
    def audit_lines(self) -> list[str]:
        """One line per release, oldest first, for the operator to read."""
        lines: list[str] = []
        total = 0.0
        for record in self._records:
            total += record.bits
            released = record.choice if record.value is None else f"{record.value:.6g}"
            dp = "" if record.dp is None else f"  dp {_describe_event(record.dp)}"
            lines.append(
                f"{_iso(record.time)}  run {_safe(record.run_id)}  task {_safe(record.task_id)}  "
                f"{_safe(record.kind)} -> {released}  {record.bits:.3f} bits  "
                f"total {total:.3f} of {self.max_bits:g}{dp}"
            )
        return lines

    def summary(self) -> dict[str, object]:
        """The ledger's state as plain JSON-friendly values (for a CLI or a local report)."""
        runs = list(dict.fromkeys(record.run_id for record in self._records))
        return {
            "dataset_id": self.dataset_id,
            "ledger_file": str(self.path),
            "max_bits": self.max_bits,
            "spent_bits": self._spent,
            "remaining_bits": self.remaining_bits,
            "answers": len(self._records),
            "dp_answers": self.accountant.answers,
            "accountant": ACCOUNTANT_NAME,
            **self._privacy_summary(),
            "runs": runs,
            "first_release": _iso(self._records[0].time) if self._records else None,
            "last_release": _iso(self._records[-1].time) if self._records else None,
            "repaired_torn_tail": self.repaired,
            **self._inherited_summary(),
        }

    def _inherited_summary(self) -> dict[str, object]:
        if self.inherited is None:
            return {}
        return {
            "inherited_bits": self.inherited.bits,
            "inherited_from": [
                {"dataset_id": ident, "shared_records": shared, "their_bits": bits}
                for ident, shared, bits in self.inherited.sources
            ],
        }

    def _privacy_summary(self) -> dict[str, object]:
        if self.privacy is None:
            return {}
        return {
            "max_epsilon": self.privacy.max_epsilon,
            "delta": self.privacy.delta,
            "spent_epsilon": self.spent_epsilon(),
        }

    # -- closing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release the lock; further charges are refused. Safe to call twice."""
        with self._mutex:
            if not self._closed:
                self._closed = True
                if self._lock is not None:
                    self._lock.release()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# -- helpers -------------------------------------------------------------------------------------
def _canonical(raw: Mapping[str, object]) -> str:
    """The exact text of a record's line (without its newline); what the chain hashes."""
    return canonical_json(raw, allow_nan=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _record_hash(raw: Mapping[str, object]) -> str:
    """A record's own hash: its canonical JSON without the ``hash`` field."""
    return _sha256(_canonical({key: value for key, value in raw.items() if key != "hash"}))


def _genesis_hash(dataset_id: str) -> str:
    """Where the chain starts: binds the ledger to its data set (a renamed file won't verify)."""
    return _sha256(f"sottovoce-ledger-v1\n{dataset_id}")


def _record_from_json(raw: Mapping[str, object]) -> LedgerRecord:
    """Typed record from a JSON object; raises TypeError/ValueError on a malformed field."""
    seq, choice = raw["seq"], raw["choice"]
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise TypeError(f"seq {seq!r} is not an int")
    if choice is not None and (isinstance(choice, bool) or not isinstance(choice, int)):
        raise TypeError(f"choice {choice!r} is not an int")
    raw_value = raw.get("value")
    released = None if raw_value is None else _number("value", raw_value)
    if choice is None and released is None:
        raise ValueError("a record needs a choice or a value")
    dp_raw = raw.get("dp")
    if dp_raw is not None and not isinstance(dp_raw, dict):
        raise TypeError(f"dp {dp_raw!r} is not an object")
    try:
        dp = None if dp_raw is None else event_from_json(dp_raw)
    except AccountingError as exc:
        raise ValueError(f"dp: {exc}") from None
    bits, when = _number("bits", raw["bits"]), _number("time", raw["time"])
    _check_bits(bits)
    strings = {name: raw[name] for name in ("run_id", "task_id", "kind", "prev_hash", "hash")}
    for name, value in strings.items():
        if not isinstance(value, str):
            raise TypeError(f"{name} {value!r} is not a string")
    detail = raw.get("detail", {})
    if not isinstance(detail, dict):
        raise TypeError(f"detail {detail!r} is not an object")
    return LedgerRecord(
        seq=seq,
        time=when,
        run_id=str(raw["run_id"]),
        task_id=str(raw["task_id"]),
        kind=str(raw["kind"]),
        bits=bits,
        choice=choice,
        prev_hash=str(raw["prev_hash"]),
        hash=str(raw["hash"]),
        value=released,
        dp=dp,
        detail=MappingProxyType(dict(detail)),
    )


def _describe_event(event: DpEvent) -> str:
    if isinstance(event, PoissonGaussian):
        return f"gaussian sigma={event.noise_multiplier:.4g} q={event.sampling_rate:.4g}"
    if isinstance(event, Gaussian):
        return f"gaussian std={event.noise_std:.4g} sensitivity={event.sensitivity:.4g}"
    return f"randomized-response eps={event.epsilon:.4g} k={event.outcomes}"


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} {value!r} is not a number")
    return float(value)


def _check_bits(bits: float) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int | float) or not math.isfinite(bits):
        raise ValueError(f"bits must be a finite number (got {bits!r})")
    if bits < 0:
        raise ValueError(f"bits must be >= 0 (got {bits!r}); a charge can never refund")


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a folder; the file's own fsync still holds
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _safe(text: str) -> str:
    """An id as the operator should see it: printable, one line, whatever the coordinator sent."""
    return text if text.isprintable() and " " not in text else repr(text)
