"""The step log: hash chain, persistence, torn writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from sottovoce.common.errors import LogIntegrityError
from sottovoce.common.steplog import (
    Step,
    StepLog,
    as_float32,
    chain_hash,
    extend_chain,
    genesis_hash,
)
from sottovoce.common.storage import read_json_lines, repair_torn_tail

GENESIS = genesis_hash("sha256:" + "0" * 64, "{}")


def steps(n: int) -> list[Step]:
    return [Step(seed=2**64 - 1 - i, coefficient=as_float32(0.01 * (i + 1))) for i in range(n)]


def test_step_is_twelve_bytes_and_validated() -> None:
    assert len(Step(seed=5, coefficient=0.5).payload()) == 12
    with pytest.raises(LogIntegrityError, match="uint64"):
        Step(seed=-1, coefficient=0.5)
    with pytest.raises(LogIntegrityError, match="float32"):
        Step(seed=1, coefficient=0.1)  # 0.1 is not a float32 value
    with pytest.raises(LogIntegrityError, match="finite"):
        Step(seed=1, coefficient=float("nan"))


def test_chain_depends_on_every_step_and_order() -> None:
    a, b = steps(2)
    head_ab = extend_chain(GENESIS, 0, [a, b])
    assert head_ab == chain_hash(chain_hash(GENESIS, 0, a), 1, b)
    assert head_ab != extend_chain(GENESIS, 0, [b, a])
    assert head_ab != extend_chain(genesis_hash("sha256:" + "1" * 64, "{}"), 0, [a, b])


def test_file_log_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = StepLog.open(path, GENESIS)
    for step in steps(5):
        log.append(step)
    reopened = StepLog.open(path, GENESIS)
    assert list(reopened) == steps(5)
    assert reopened.head == log.head
    assert reopened.hash_at(2) == extend_chain(GENESIS, 0, steps(2))
    assert reopened.steps_since(3) == steps(5)[3:]


def test_tampered_log_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = StepLog.open(path, GENESIS)
    for step in steps(3):
        log.append(step)
    text = path.read_text().replace('"seed":18446744073709551614', '"seed":7')
    path.write_text(text)
    with pytest.raises(LogIntegrityError, match="hash chain breaks at step 1"):
        StepLog.open(path, GENESIS)


def test_torn_tail_is_reported_then_repaired(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = StepLog.open(path, GENESIS)
    for step in steps(2):
        log.append(step)
    with open(path, "a") as handle:
        handle.write('{"index": 2, "seed": 1')
    with pytest.raises(LogIntegrityError, match="torn"):
        read_json_lines(path)
    assert repair_torn_tail(path)
    assert list(StepLog.open(path, GENESIS)) == steps(2)
    assert not repair_torn_tail(path)
