"""The model is a log: base model + parametrization + an ordered, hash-chained list of steps.

A step ``(seed, coefficient)`` means ``x <- x + coefficient * z(seed)`` in the
parametrization's coordinates; an *explicit* step (what CMA's mean moves by, whose direction
is no ``z(seed)``) carries its delta vector instead: ``x <- x + delta``, one float32 add a
coordinate, for parametrizations of at most ``MAX_EXPLICIT_DIMENSION`` coordinates.

Each step's hash covers the previous hash, so a holder that has applied steps ``0..v-1``
can check that the steps a coordinator sends next extend exactly the log it already has,
and a coordinator cannot quietly rewrite history.

On disk the log is JSON lines, appended and fsync'd one step at a time. A torn last line
(a crash in the middle of a write) is detected on load and reported, never silently used.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sottovoce.common.errors import LogIntegrityError
from sottovoce.common.protocol.limits import MAX_EXPLICIT_DIMENSION, UINT64_MAX
from sottovoce.common.storage import append_json_line, read_json_lines


def as_float32(value: float) -> float:
    """Round a Python float to the nearest float32, the precision every coefficient has."""
    return float(np.float32(value))


def float32_toward_zero(value: float) -> float:
    """The float32 nearest ``value`` whose magnitude does not exceed it.

    A step size clipped to a holder's cap must stay within the cap after rounding to
    float32 (0.2 rounds *up* to 0.2000000030), or every task would be refused.
    """
    rounded = np.float32(value)
    if abs(float(rounded)) > abs(value):
        rounded = np.nextafter(rounded, np.float32(0.0))
    return float(rounded)


EXPLICIT_TAG = b"sottovoce-explicit-step"


@dataclass(frozen=True)
class Step:
    """One accepted update: ``x <- x + coefficient * z(seed)``, or ``x <- x + delta``.

    An explicit step (``delta`` set, made with :meth:`explicit`) has seed 0 and coefficient 1;
    its delta holds float32 values in the parametrization's coordinate order.
    """

    seed: int
    coefficient: float
    delta: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= UINT64_MAX:
            raise LogIntegrityError(f"step seed {self.seed} is not a uint64")
        if not np.isfinite(self.coefficient):
            raise LogIntegrityError(f"step coefficient {self.coefficient} is not finite")
        if as_float32(self.coefficient) != self.coefficient:
            raise LogIntegrityError(
                f"step coefficient {self.coefficient!r} is not exactly a float32"
            )
        if self.delta is not None:
            check_explicit_delta("explicit step", self.delta)
            if self.seed != 0 or self.coefficient != 1.0:
                raise LogIntegrityError("an explicit step has seed 0 and coefficient 1")

    @classmethod
    def explicit(cls, delta: Sequence[float]) -> Step:
        """The step ``x <- x + delta`` (values rounded to float32)."""
        return cls(seed=0, coefficient=1.0, delta=tuple(as_float32(v) for v in delta))

    @property
    def is_explicit(self) -> bool:
        return self.delta is not None

    def payload(self) -> bytes:
        """What the hash chain covers.

        A seeded step: its 12 bytes, uint64 seed and float32 coefficient, little-endian
        (unchanged since the first log). An explicit step: a tag, the uint32 length and the
        float32 values little-endian; its length differs from 12 bytes, so no explicit
        step hashes like a seeded one.
        """
        if self.delta is None:
            return struct.pack("<Qf", self.seed, self.coefficient)
        values = np.asarray(self.delta, dtype="<f4").tobytes()
        return EXPLICIT_TAG + struct.pack("<I", len(self.delta)) + values

    def to_json(self) -> dict[str, object]:
        """The step as JSON fields (the log's lines, the journal, exports)."""
        record: dict[str, object] = {"seed": self.seed, "coefficient": self.coefficient}
        if self.delta is not None:
            record["delta"] = list(self.delta)
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, object]) -> Step:
        """Inverse of :meth:`to_json`; LogIntegrityError (or KeyError/TypeError) if malformed."""
        delta = record.get("delta")
        seed, coefficient = record["seed"], record["coefficient"]
        if not isinstance(seed, int) or not isinstance(coefficient, int | float):
            raise TypeError("a step's seed is an int and its coefficient a number")
        if delta is None:
            return cls(seed=seed, coefficient=float(coefficient))
        if not isinstance(delta, list) or not all(isinstance(v, int | float) for v in delta):
            raise TypeError("an explicit step's delta is a list of numbers")
        return cls(seed=seed, coefficient=float(coefficient), delta=tuple(float(v) for v in delta))


def check_explicit_delta(what: str, delta: Sequence[float]) -> None:
    """LogIntegrityError unless ``delta`` is 1..MAX_EXPLICIT_DIMENSION finite float32s."""
    if not 1 <= len(delta) <= MAX_EXPLICIT_DIMENSION:
        raise LogIntegrityError(
            f"{what}: {len(delta)} coordinates, expected 1..{MAX_EXPLICIT_DIMENSION}"
        )
    for value in delta:
        if not (isinstance(value, float) and np.isfinite(value) and as_float32(value) == value):
            raise LogIntegrityError(f"{what}: {value!r} is not a finite float32")


def genesis_hash(base_fingerprint: str, parametrization_id: str) -> str:
    """The hash a log starts from: it binds every step to one base model and parametrization."""
    material = f"sottovoce-log-v1\n{base_fingerprint}\n{parametrization_id}".encode()
    return hashlib.sha256(material).hexdigest()


def chain_hash(previous: str, index: int, step: Step) -> str:
    """Hash of step ``index`` given the hash of everything before it."""
    digest = hashlib.sha256()
    digest.update(bytes.fromhex(previous))
    digest.update(struct.pack("<Q", index))
    digest.update(step.payload())
    return digest.hexdigest()


def extend_chain(head: str, start_index: int, steps: Iterable[Step]) -> str:
    """Head hash after appending ``steps`` at ``start_index`` to a log with head ``head``."""
    for offset, step in enumerate(steps):
        head = chain_hash(head, start_index + offset, step)
    return head


class StepLog:
    """An in-memory hash-chained log of steps, optionally backed by an append-only file."""

    def __init__(self, genesis: str, steps: Sequence[Step] = (), path: Path | None = None):
        self.genesis = genesis
        self._steps: list[Step] = []
        self._hashes: list[str] = []
        self._path = path
        for step in steps:
            self._append_in_memory(step)

    # -- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._steps)

    def __iter__(self) -> Iterator[Step]:
        return iter(self._steps)

    @property
    def version(self) -> int:
        """Number of steps in the log: the version a holder's weights are materialized at."""
        return len(self._steps)

    @property
    def head(self) -> str:
        """Hash of the whole log; the genesis hash when it is empty."""
        return self._hashes[-1] if self._hashes else self.genesis

    def hash_at(self, version: int) -> str:
        """Head hash of the first ``version`` steps."""
        if not 0 <= version <= len(self._steps):
            raise LogIntegrityError(f"log has {len(self._steps)} steps, no version {version}")
        return self._hashes[version - 1] if version else self.genesis

    def steps_since(self, version: int) -> list[Step]:
        """The steps a holder at ``version`` lacks."""
        if not 0 <= version <= len(self._steps):
            raise LogIntegrityError(f"log has {len(self._steps)} steps, no version {version}")
        return self._steps[version:]

    # -- writing -------------------------------------------------------------------------
    def append(self, step: Step) -> str:
        """Append a step (durably, if file-backed) and return the new head hash."""
        head = chain_hash(self.head, len(self._steps), step)
        if self._path is not None:
            record = {"index": len(self._steps), **step.to_json(), "hash": head}
            append_json_line(self._path, record)
        self._steps.append(step)
        self._hashes.append(head)
        return head

    def _append_in_memory(self, step: Step) -> None:
        self._hashes.append(chain_hash(self.head, len(self._steps), step))
        self._steps.append(step)

    # -- persistence ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, genesis: str) -> StepLog:
        """Load (or start) the file-backed log at ``path`` and verify its chain."""
        log = cls(genesis, path=None)
        for number, record in enumerate(read_json_lines(path)):
            try:
                step = Step.from_json(record)
                recorded_index, recorded_hash = int(record["index"]), str(record["hash"])
            except (KeyError, TypeError, ValueError) as exc:
                raise LogIntegrityError(f"{path}: line {number + 1} is not a step: {exc}") from exc
            if recorded_index != number:
                raise LogIntegrityError(f"{path}: line {number + 1} has index {recorded_index}")
            log._append_in_memory(step)
            if log.head != recorded_hash:
                raise LogIntegrityError(f"{path}: hash chain breaks at step {number}")
        log._path = path
        return log

    def to_records(self) -> list[dict[str, object]]:
        """The log as plain records (what export writes next to the weights)."""
        return [
            {"index": i, **s.to_json(), "hash": h}
            for i, (s, h) in enumerate(zip(self._steps, self._hashes, strict=True))
        ]
