"""The privacy ledger: a data set's lifetime budget survives restarts, runs and crashes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sottovoce.client import ledger as ledger_module
from sottovoce.client.ledger import Ledger
from sottovoce.common.errors import (
    BudgetExhausted,
    ConfigError,
    LogIntegrityError,
    PolicyViolation,
)
from sottovoce.common.protocol.answers import AnswerKind

DATASET = "3fa9" * 16  # a sha256 in hex, as the caller computes it
COMPARE = AnswerKind.COMPARE


def ledger_file(folder: Path, dataset: str = DATASET) -> Path:
    return folder / f"{dataset}.ledger.jsonl"


def charge_compare(ledger: Ledger, task_id: str, run_id: str = "run-1", choice: int = 1) -> None:
    ledger.charge(task_id, run_id, 1.0, choice, answer_kind=COMPARE)


def test_new_ledger_is_empty_and_created(tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "ledger"
    with Ledger.open(folder, DATASET, max_bits=10) as ledger:
        assert ledger.spent_bits == 0.0
        assert ledger.remaining_bits == 10.0
        assert ledger.records == ()
        assert ledger.repaired is False
        assert ledger.path == ledger_file(folder)
        assert ledger.path.read_bytes() == b""


def test_charges_persist_across_restarts(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=10) as ledger:
        charge_compare(ledger, "t-1", choice=1)
        ledger.charge("t-2", "run-1", math.log2(4), 3, answer_kind=AnswerKind.BEST_OF)
        assert ledger.spent_bits == 3.0
    # A new instance, as after a restart of the holder process.
    with Ledger.open(tmp_path, DATASET, max_bits=10) as reopened:
        assert reopened.spent_bits == 3.0
        assert reopened.remaining_bits == 7.0
        assert [(r.task_id, r.kind, r.bits, r.choice) for r in reopened.records] == [
            ("t-1", "compare", 1.0, 1),
            ("t-2", "best-of", 2.0, 3),
        ]
        assert [r.seq for r in reopened.records] == [0, 1]
        assert reopened.records[1].prev_hash == reopened.records[0].hash


def test_every_charge_is_on_disk_before_charge_returns(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=10) as ledger:
        charge_compare(ledger, "t-1", choice=0)
        lines = ledger.path.read_bytes().splitlines()
        assert len(lines) == 1
        record = json.loads(lines[0])
        assert record["task_id"] == "t-1" and record["bits"] == 1.0 and record["choice"] == 0
        assert record["run_id"] == "run-1" and record["kind"] == "compare"
        assert abs(record["time"] - time.time()) < 60


def test_a_new_run_id_does_not_reset_the_budget(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=3) as ledger:
        charge_compare(ledger, "a-1", run_id="run-a")
        charge_compare(ledger, "a-2", run_id="run-a")
    with Ledger.open(tmp_path, DATASET, max_bits=3) as ledger:
        charge_compare(ledger, "b-1", run_id="run-b")
        assert ledger.spent_bits == 3.0
        with pytest.raises(BudgetExhausted):
            charge_compare(ledger, "b-2", run_id="run-b")
        assert ledger.summary()["runs"] == ["run-a", "run-b"]


def test_the_answer_that_would_cross_the_budget_is_refused(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=3) as ledger:
        for number in range(3):  # exactly reaching max_bits is allowed
            ledger.check_affordable(1.0)
            charge_compare(ledger, f"t-{number}")
        assert ledger.spent_bits == 3.0
        assert ledger.remaining_bits == 0.0
        ledger.check_affordable(0.0)
        with pytest.raises(BudgetExhausted, match=r"answering costs 1\.00 bits, 0\.00 of 3 remain"):
            ledger.check_affordable(1.0)
        with pytest.raises(BudgetExhausted):
            charge_compare(ledger, "t-3")
        assert ledger.spent_bits == 3.0


def test_float_sums_reaching_the_limit_exactly_are_allowed(tmp_path: Path) -> None:
    cost = math.log2(7)  # best-of with 6 candidates
    total = 0.0
    for _ in range(7):
        total += cost
    assert total > 7 * cost  # the running sum lands a hair above the product
    with Ledger.open(tmp_path, DATASET, max_bits=7 * cost) as ledger:
        for number in range(7):
            ledger.charge(f"t-{number}", "run-1", cost, 0, answer_kind=AnswerKind.BEST_OF)
        assert ledger.spent_bits == pytest.approx(7 * cost)
        with pytest.raises(BudgetExhausted):
            ledger.check_affordable(1e-6)


def test_refusal_message_and_unchanged_file(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=2000) as ledger:
        ledger.charge("big", "run-1", 1999.5, 0, answer_kind="quantized")
        before = ledger.path.read_bytes()
        with pytest.raises(BudgetExhausted) as caught:
            charge_compare(ledger, "t-next")
        assert str(caught.value) == (
            f"data set {DATASET}: answering costs 1.00 bits, 0.50 of 2000 remain"
        )
        assert isinstance(caught.value, PolicyViolation)
        assert ledger.path.read_bytes() == before
        assert ledger.spent_bits == 1999.5
        assert ledger.cached_answer("t-next") is None


def test_a_resent_task_gets_the_cached_answer_and_is_not_charged_twice(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=10) as ledger:
        ledger.charge("t-1", "run-1", 2.0, 3, answer_kind=AnswerKind.BEST_OF)
        assert ledger.cached_answer("t-1").choice == 3  # type: ignore[union-attr]
        assert ledger.cached_answer("t-1", run_id="run-1").choice == 3
        assert ledger.cached_answer("t-2") is None
        before = ledger.path.read_bytes()
        with pytest.raises(ValueError, match="already charged"):
            ledger.charge("t-1", "run-1", 2.0, 1, answer_kind=AnswerKind.BEST_OF)
        assert ledger.path.read_bytes() == before
        assert ledger.spent_bits == 2.0
    with Ledger.open(tmp_path, DATASET, max_bits=10) as reopened:
        assert reopened.cached_answer("t-1").choice == 3  # also after a restart
        with pytest.raises(PolicyViolation, match="already answered for run 'run-1'"):
            reopened.cached_answer("t-1", run_id="run-2")


def test_a_torn_last_line_is_dropped_and_reported(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=10) as ledger:
        charge_compare(ledger, "t-1")
        charge_compare(ledger, "t-2")
        whole = ledger.path.read_bytes()
    torn = whole + b'{"bits":1.0,"choice":1,"kind":"comp'
    ledger_file(tmp_path).write_bytes(torn)
    with Ledger.open(tmp_path, DATASET, max_bits=10) as ledger:
        assert ledger.repaired is True
        assert ledger.summary()["repaired_torn_tail"] is True
        assert ledger.spent_bits == 2.0
        assert ledger.path.read_bytes() == whole
        charge_compare(ledger, "t-3")
    with Ledger.open(tmp_path, DATASET, max_bits=10) as ledger:
        assert ledger.repaired is False
        assert [r.task_id for r in ledger.records] == ["t-1", "t-2", "t-3"]


def _three_records(folder: Path) -> list[bytes]:
    with Ledger.open(folder, DATASET, max_bits=10) as ledger:
        for number in range(3):
            charge_compare(ledger, f"t-{number}")
        return ledger.path.read_bytes().splitlines(keepends=True)


def test_an_edited_line_is_detected_and_named(tmp_path: Path) -> None:
    lines = _three_records(tmp_path)
    lines[1] = lines[1].replace(b'"bits":1.0', b'"bits":0.0')
    ledger_file(tmp_path).write_bytes(b"".join(lines))
    with pytest.raises(LogIntegrityError, match=r"\.ledger\.jsonl: line 2: record hash"):
        Ledger.open(tmp_path, DATASET, max_bits=10)


def test_an_edited_last_line_is_detected(tmp_path: Path) -> None:
    lines = _three_records(tmp_path)
    lines[2] = lines[2].replace(b'"choice":1', b'"choice":0')
    ledger_file(tmp_path).write_bytes(b"".join(lines))
    with pytest.raises(LogIntegrityError, match="line 3: record hash"):
        Ledger.open(tmp_path, DATASET, max_bits=10)


def test_a_deleted_line_is_detected(tmp_path: Path) -> None:
    lines = _three_records(tmp_path)
    ledger_file(tmp_path).write_bytes(lines[0] + lines[2])
    with pytest.raises(LogIntegrityError, match="line 2: hash chain breaks"):
        Ledger.open(tmp_path, DATASET, max_bits=10)


def test_garbage_line_is_detected(tmp_path: Path) -> None:
    lines = _three_records(tmp_path)
    ledger_file(tmp_path).write_bytes(lines[0] + b"not json\n" + lines[1])
    with pytest.raises(LogIntegrityError, match="line 2 is not JSON"):
        Ledger.open(tmp_path, DATASET, max_bits=10)


def test_a_ledger_copied_to_another_data_set_does_not_verify(tmp_path: Path) -> None:
    _three_records(tmp_path)
    other = "77" * 32
    ledger_file(tmp_path, other).write_bytes(ledger_file(tmp_path).read_bytes())
    with pytest.raises(LogIntegrityError, match="line 1: hash chain breaks"):
        Ledger.open(tmp_path, other, max_bits=10)


def test_a_failed_lock_or_verification_releases_nothing_twice(tmp_path: Path) -> None:
    lines = _three_records(tmp_path)
    ledger_file(tmp_path).write_bytes(lines[1])
    with pytest.raises(LogIntegrityError):
        Ledger.open(tmp_path, DATASET, max_bits=10)
    ledger_file(tmp_path).write_bytes(b"".join(lines))
    with Ledger.open(tmp_path, DATASET, max_bits=10) as ledger:  # the lock was released
        assert ledger.spent_bits == 3.0


def test_unknown_fields_from_a_newer_version_are_refused(tmp_path: Path) -> None:
    """An epsilon this version does not account for must not be silently ignored."""
    record: dict[str, object] = {
        "v": 1,
        "seq": 0,
        "time": 1.0,
        "run_id": "run-1",
        "task_id": "t-1",
        "kind": "dp-scalar",
        "bits": 0.0,
        "choice": 0,
        "prev_hash": ledger_module._genesis_hash(DATASET),
        "epsilon": 0.1,
    }
    record["hash"] = ledger_module._record_hash(record)
    ledger_file(tmp_path).write_text(ledger_module._canonical(record) + "\n")
    with pytest.raises(LogIntegrityError, match=r"unknown field\(s\) \['epsilon'\]"):
        Ledger.open(tmp_path, DATASET, max_bits=10)


def test_a_second_open_is_refused_while_the_first_is_open(tmp_path: Path) -> None:
    first = Ledger.open(tmp_path, DATASET, max_bits=10)
    try:
        with pytest.raises(ConfigError, match="is in use by another process"):
            Ledger.open(tmp_path, DATASET, max_bits=10)
        # Another data set in the same folder is independent.
        with Ledger.open(tmp_path, "88" * 32, max_bits=10) as other:
            charge_compare(other, "t-1")
    finally:
        first.close()
    with Ledger.open(tmp_path, DATASET, max_bits=10) as again:
        assert again.spent_bits == 0.0


def test_a_ledger_locked_by_another_process_is_refused(tmp_path: Path) -> None:
    lock_path = f"{ledger_file(tmp_path)}.lock"
    holder = (
        "import sys, filelock\n"
        f"lock = filelock.FileLock({lock_path!r}); lock.acquire()\n"
        "print('locked', flush=True); sys.stdin.read()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match="is in use by another process"):
            Ledger.open(tmp_path, DATASET, max_bits=10)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=10)
    with Ledger.open(tmp_path, DATASET, max_bits=10):
        pass


def test_read_only_audit_while_a_holder_runs(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=10) as live:
        charge_compare(live, "t-1")
        charge_compare(live, "t-2", choice=0)
        with ledger_file(tmp_path).open("ab") as handle:
            handle.write(b'{"bits":1.0,"ch')  # a write in progress, as seen from outside
        snapshot = ledger_file(tmp_path).read_bytes()
        reader = Ledger.open(tmp_path, DATASET, max_bits=10, read_only=True)
        assert reader.read_only and not reader.repaired
        assert reader.spent_bits == 2.0
        assert [r.choice for r in reader.records] == [1, 0]
        assert len(reader.audit_lines()) == 2
        assert ledger_file(tmp_path).read_bytes() == snapshot  # nothing repaired or created
        with pytest.raises(ConfigError, match="opened read-only"):
            charge_compare(reader, "t-3")
        reader.close()


def test_read_only_open_of_a_missing_ledger_creates_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "none"
    with Ledger.open(folder, DATASET, max_bits=10, read_only=True) as reader:
        assert reader.records == () and reader.remaining_bits == 10.0
    assert not folder.exists()


def test_a_closed_ledger_refuses_to_charge(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path, DATASET, max_bits=10)
    ledger.close()
    ledger.close()  # twice is fine
    with pytest.raises(ConfigError, match="is closed"):
        charge_compare(ledger, "t-1")


def test_a_failed_write_leaves_the_file_and_budget_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=10) as ledger:
        charge_compare(ledger, "t-1")
        before = ledger.path.read_bytes()

        def broken_fsync(descriptor: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ledger_module.os, "fsync", broken_fsync)
        with pytest.raises(LogIntegrityError, match="could not write a ledger record"):
            charge_compare(ledger, "t-2")
        monkeypatch.undo()
        assert ledger.path.read_bytes() == before
        assert ledger.spent_bits == 1.0
        assert ledger.cached_answer("t-2") is None
        charge_compare(ledger, "t-2")  # the ledger is still usable
    with Ledger.open(tmp_path, DATASET, max_bits=10) as reopened:
        assert reopened.spent_bits == 2.0


@pytest.mark.parametrize("bits", [-1.0, math.nan, math.inf])
def test_malformed_costs_are_rejected(tmp_path: Path, bits: float) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=10) as ledger:
        with pytest.raises(ValueError, match="bits must be"):
            ledger.charge("t-1", "run-1", bits, 0, answer_kind=COMPARE)
        assert ledger.path.read_bytes() == b""


def test_bad_open_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a file-name-safe id"):
        Ledger.open(tmp_path, "../escape", max_bits=10)
    with pytest.raises(ConfigError, match="max_bits must be a finite number > 0"):
        Ledger.open(tmp_path, DATASET, max_bits=0)


def test_detail_round_trips_and_records_are_read_only(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=10) as ledger:
        ledger.charge(
            "t-1", "run-1", 1.0, 1, answer_kind=COMPARE, detail={"n_examples": 32, "lr": (1, 2)}
        )
        live = ledger.records[0].detail
    with Ledger.open(tmp_path, DATASET, max_bits=10) as reopened:
        record = reopened.records[0]
        assert dict(record.detail) == {"n_examples": 32, "lr": [1, 2]} == dict(live)
        with pytest.raises(TypeError):
            record.detail["n_examples"] = 1  # type: ignore[index]
        assert isinstance(reopened.records, tuple)


def test_audit_lines_and_summary(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=20) as ledger:
        charge_compare(ledger, "t-1", run_id="run-a", choice=1)
        ledger.charge("t-2", "run-b", math.log2(3), 2, answer_kind=AnswerKind.BEST_OF)
        lines = ledger.audit_lines()
        summary = ledger.summary()
    assert len(lines) == 2
    assert "run run-a  task t-1  compare -> 1  1.000 bits  total 1.000 of 20" in lines[0]
    assert "run run-b  task t-2  best-of -> 2  1.585 bits  total 2.585 of 20" in lines[1]
    assert lines[0][:4].isdigit() and lines[0][19] == "Z"  # an ISO time stamp first
    assert summary["dataset_id"] == DATASET
    assert summary["answers"] == 2
    assert summary["spent_bits"] == pytest.approx(1 + math.log2(3))
    assert summary["remaining_bits"] == pytest.approx(19 - math.log2(3))
    assert summary["runs"] == ["run-a", "run-b"]
    assert summary["max_bits"] == 20.0
    json.dumps(summary)  # CLI-friendly: plain JSON values


def test_audit_lines_quote_ids_that_could_forge_a_line(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, DATASET, max_bits=20) as ledger:
        charge_compare(ledger, "t-1\n2099-01-01 run x", run_id="run-1")
        (line,) = ledger.audit_lines()
    assert "\n" not in line
    assert "task 't-1\\n2099-01-01 run x'" in line
