"""Crash and resume with real processes: kill -9 the coordinator mid-run and restart it.

The coordinator is a `sottovoce server` OS process (loopback, --insecure); two holders run
in threads of this test with their real ledgers and keep retrying while it is down. After
the restart the run must finish with every round journaled exactly once, the log equal to
the journal's accepted steps, every holder on the final log head, and no answer charged
twice in any ledger.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from helpers import TINY, tiny_fingerprint, write_policy, write_records, write_run_config

from sottovoce.api import open_holder
from sottovoce.client.grpc_loop import RetryPolicy, run_holder
from sottovoce.client.holder import DataHolder
from sottovoce.client.ledger import Ledger
from sottovoce.common.protocol.messages import RunFinished
from sottovoce.common.steplog import StepLog
from sottovoce.common.storage import read_json_lines

ROUNDS = 24


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(config: Path, run_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "sottovoce.cli", "server", "--config", str(config),
        "--run-dir", str(run_dir), "--address", f"127.0.0.1:{port}", "--insecure",
    ]  # fmt: skip
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def journaled_rounds(run_dir: Path) -> list[int]:
    path = run_dir / "journal.jsonl"
    if not path.exists():
        return []
    return [r["round"] for r in read_json_lines(path) if r.get("type") == "round"]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.time() + timeout_s
    while time.time() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_coordinator_mid_run_and_resume(tmp_path: Path) -> None:
    config = write_run_config(
        tmp_path / "run.toml",
        run={"max_rounds": ROUNDS, "bit_budget": 1000.0},
        # The fingerprint given, as a deployment gives it: the server serves within a second
        # or two of its start (and of its restart), before it imports torch for the report.
        model={"name": TINY, "dtype": "float32", "fingerprint": tiny_fingerprint()},
        evaluation={"mode": "minibatch", "batch_size": 16},
        server={"min_holders": 2, "quorum": 2, "round_timeout_s": 30.0},
    )
    run_dir, port, log = tmp_path / "run", free_port(), tmp_path / "server.log"
    holders: list[DataHolder] = []
    for index in range(2):
        folder = tmp_path / f"holder-{index}"
        folder.mkdir()
        data = write_records(folder / "data.jsonl", 24, seed=index)
        policy = write_policy(folder / "policy.toml", folder / "ledger")
        holders.append(
            open_holder(data, policy, holder_id=f"holder-{index}", model_name="tiny-llama")
        )
    results: dict[str, RunFinished | BaseException] = {}

    def take_part(holder: DataHolder) -> None:
        try:
            results[holder.holder_id] = run_holder(
                holder,
                f"127.0.0.1:{port}",
                poll_timeout_s=0.5,
                connect_timeout_s=60.0,
                retry=RetryPolicy(total_s=60.0, max_backoff_s=0.5),
            )
        except BaseException as exc:  # handed to the assertions below
            results[holder.holder_id] = exc

    server = start_server(config, run_dir, port, log)
    threads = [threading.Thread(target=take_part, args=(h,), daemon=True) for h in holders]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(journaled_rounds(run_dir)) >= 6, 90.0, "six rounds")
        os.kill(server.pid, signal.SIGKILL)  # no chance to flush or say goodbye
        server.wait(timeout=10)
        at_crash = journaled_rounds(run_dir)
        assert len(at_crash) < ROUNDS
        server = start_server(config, run_dir, port, log)  # same run dir: resume
        for thread in threads:
            thread.join(120.0)
        assert not any(thread.is_alive() for thread in threads), log.read_text()
        server.wait(timeout=90)
    finally:
        if server.poll() is None:
            server.kill()

    for holder in holders:
        outcome = results[holder.holder_id]
        assert isinstance(outcome, RunFinished), (outcome, log.read_text()[-2000:])
        assert outcome.reason == f"max_rounds ({ROUNDS}) reached"
    rounds = journaled_rounds(run_dir)
    assert rounds == list(range(ROUNDS))  # no round lost, none closed twice
    journal = read_json_lines(run_dir / "journal.jsonl")
    accepted = [tuple(r["step"]) for r in journal if r["type"] == "round" and r["step"]]
    genesis = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["genesis"]
    log = StepLog.open(run_dir / "log.jsonl", genesis)  # verifies the hash chain
    assert [(s.seed, s.coefficient) for s in log] == accepted  # none lost or applied twice
    for holder in holders:
        assert (holder.log_version, holder.log_head) == (log.version, log.head)
        task_ids = [r.task_id for r in holder.ledger.records]
        assert len(task_ids) == len(set(task_ids))  # a re-asked task was never charged twice
        heard = {
            r["task_id"]
            for r in journal
            if r["type"] == "answer" and r["holder"] == holder.holder_id and r["refusal"] is None
        }
        assert heard <= set(task_ids)  # the coordinator heard only what was charged


def start_holder(folder: Path, holder_id: str, port: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "sottovoce.cli", "client", "--server", f"127.0.0.1:{port}",
        "--data", str(folder / "data.jsonl"), "--policy", str(folder / "policy.toml"),
        "--holder-id", holder_id, "--model", "tiny-llama", "--insecure",
        "--report", str(folder / "report.json"),
    ]  # fmt: skip
    with open(folder / "holder.log", "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def test_kill_9_a_holder_mid_run_and_restart_it(tmp_path: Path) -> None:
    from sottovoce.api import open_coordinator
    from sottovoce.server.grpc_service import serve

    config = write_run_config(
        tmp_path / "run.toml",
        run={"max_rounds": ROUNDS, "bit_budget": 1000.0},
        # Never evicted while it is down: the rounds keep waiting for it, so it comes back
        # before the run is over (eviction and rejoining: test_hostile_holders.py).
        server={"min_holders": 2, "quorum": 1, "round_timeout_s": 1.5, "max_missed_rounds": ROUNDS},
    )
    coordinator = open_coordinator(config, tmp_path / "run", model_fingerprint=tiny_fingerprint())
    running = serve(coordinator, "127.0.0.1:0")
    folders = []
    for index in range(2):
        folder = tmp_path / f"holder-{index}"
        folder.mkdir()
        write_records(folder / "data.jsonl", 24, seed=index)
        write_policy(folder / "policy.toml", Path("ledger"))
        folders.append(folder)
    processes = [start_holder(f, f"holder-{i}", running.port) for i, f in enumerate(folders)]
    try:
        wait_for(lambda: len(coordinator.state.rounds) >= 5, 90.0, "five rounds")
        os.kill(processes[1].pid, signal.SIGKILL)  # mid-run, maybe mid-task
        processes[1].wait(timeout=10)
        wait_for(lambda: len(coordinator.state.rounds) >= 8, 60.0, "rounds on a quorum of one")
        processes[1] = start_holder(folders[1], "holder-1", running.port)  # same ledger
        for process in processes:
            assert process.wait(timeout=120) == 0, (folders[1] / "holder.log").read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        running.stop(grace_s=0)

    state = coordinator.state
    assert [r.round_index for r in state.rounds] == list(range(ROUNDS))
    answered_by_1 = [r for r in state.rounds if "holder-1" in r.choices]
    assert any(r.round_index >= 8 for r in answered_by_1)  # it came back and took part
    (ledger_file,) = (folders[1] / "ledger").glob("*.ledger.jsonl")
    dataset = ledger_file.name.removesuffix(".ledger.jsonl")
    with Ledger.open(ledger_file.parent, dataset, 1000.0, read_only=True) as ledger:
        task_ids = [record.task_id for record in ledger.records]  # the hash chain verifies
    assert len(task_ids) == len(set(task_ids))  # its ledger survived the kill intact
    rounds_charged = {int(task_id.split(":r")[1].split(":")[0]) for task_id in task_ids}
    assert min(rounds_charged) < 5 and max(rounds_charged) >= 8  # before and after the kill
    heard = {
        r["task_id"]
        for r in read_json_lines(state.run_dir / "journal.jsonl")
        if r["type"] == "answer" and r["holder"] == "holder-1" and r["refusal"] is None
    }
    assert heard <= set(task_ids)  # the coordinator heard nothing the ledger lacks
    report = json.loads((folders[1] / "report.json").read_text(encoding="utf-8"))
    assert report["log_head"] == state.log.head  # caught up to the final model
