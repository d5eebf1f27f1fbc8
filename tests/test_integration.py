"""The spine end to end: a coordinator and data holders over real gRPC on loopback.

Holders run in threads of this process (each with its own model copy and ledger); the
transport, the coordinator, the holders' policies and ledgers, the run directory and the
export are all the real ones.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    base_plus_steps,
    differing_tensors,
    replay_with_parametrization,
    tiny_fingerprint,
    write_policy,
    write_records,
    write_run_config,
)
from transformers import AutoModelForCausalLM

from sottovoce.api import open_coordinator, open_holder
from sottovoce.client.grpc_loop import run_holder
from sottovoce.client.holder import DataHolder
from sottovoce.client.refusal_log import read_refusals, refusal_log_path
from sottovoce.common.errors import ConfigError, PolicyViolation, TransportError
from sottovoce.common.protocol.messages import RunFinished
from sottovoce.common.steplog import StepLog
from sottovoce.common.storage import read_json_lines
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.export import LOG_FILE, export_run
from sottovoce.server.grpc_service import serve

RUN_TIMEOUT_S = 60.0
PATTERNS = ["model.norm.weight", "model.layers.1.mlp.*"]


def make_holder(
    root: Path, name: str, *, seed: int, model: str = "tiny-llama", **policy: Any
) -> DataHolder:
    """A holder with its own data file (24 records), policy and ledger under ``root/name``."""
    folder = root / name
    folder.mkdir(parents=True)
    data = write_records(folder / "data.jsonl", 24, seed=seed)
    policy_path = write_policy(folder / "policy.toml", folder / "ledger", **policy)
    return open_holder(data, policy_path, holder_id=name, model_name=model)


@dataclass
class Outcome:
    finished: RunFinished | None = None
    error: BaseException | None = None


def run_federation(coordinator: Coordinator, holders: list[DataHolder]) -> dict[str, Outcome]:
    """Serve the coordinator on a free loopback port; run every holder in a thread until done."""
    outcomes = {holder.holder_id: Outcome() for holder in holders}
    stop = threading.Event()

    def take_part(holder: DataHolder) -> None:
        outcome = outcomes[holder.holder_id]
        try:
            outcome.finished = run_holder(
                holder, address, poll_timeout_s=1.0, connect_timeout_s=5.0, stop=stop
            )
        except BaseException as exc:  # handed to the test to assert on
            outcome.error = exc

    with serve(coordinator, "127.0.0.1:0") as server:
        address = server.address
        threads = [threading.Thread(target=take_part, args=(h,), daemon=True) for h in holders]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join(RUN_TIMEOUT_S)
            assert not any(thread.is_alive() for thread in threads), "a holder hung"
        finally:
            stop.set()
    return outcomes


def accepted_steps_in_journal(run_dir: Path) -> list[tuple[int, float]]:
    return [
        (record["step"][0], record["step"][1])
        for record in read_json_lines(run_dir / "journal.jsonl")
        if record["type"] == "round" and record["step"] is not None
    ]


# -- a whole run -----------------------------------------------------------------------------
def test_two_holders_ten_rounds_over_grpc(tmp_path: Path) -> None:
    config = write_run_config(
        tmp_path / "run.toml",
        run={"max_rounds": 10, "seed": 7},
        parametrization={"kind": "select", "patterns": PATTERNS},
        optimizer={"initial_step": 0.02, "min_step": 0.001, "max_step": 0.1},
        evaluation={"mode": "full"},  # no secret minibatch: the same run every time
    )
    run_dir = tmp_path / "run"
    coordinator = open_coordinator(config, run_dir, model_fingerprint=tiny_fingerprint())
    holders = [make_holder(tmp_path, f"holder-{i}", seed=i) for i in range(2)]

    outcomes = run_federation(coordinator, holders)

    for holder in holders:
        outcome = outcomes[holder.holder_id]
        assert outcome.error is None, outcome.error
        assert outcome.finished is not None
        assert outcome.finished.reason == "max_rounds (10) reached"
    state = coordinator.state
    assert len(state.rounds) == 10 and state.finished_reason == "max_rounds (10) reached"

    # (a) the log on disk verifies and holds exactly the journal's accepted steps.
    log = StepLog.open(run_dir / "log.jsonl", state.genesis)
    steps = list(log)
    assert [(s.seed, s.coefficient) for s in steps] == accepted_steps_in_journal(run_dir)
    assert steps == [r.step for r in state.rounds if r.step is not None]
    assert log.head == state.log.head and 1 <= log.version < 10  # some kept, some accepted

    # (b) one ledger record per answered task, as many bits as the coordinator heard.
    assert state.bits_per_holder == {"holder-0": 10.0, "holder-1": 10.0}
    for holder in holders:
        records = holder.ledger.records
        assert len(records) == holder.status.answered == 10
        assert {r.run_id for r in records} == {state.run_id}
        assert sum(r.bits for r in records) == state.bits_per_holder[holder.holder_id]
        journal_choices = [
            r["choice"]
            for r in read_json_lines(run_dir / "journal.jsonl")
            if r["type"] == "answer" and r["holder"] == holder.holder_id
        ]
        assert [r.choice for r in records] == journal_choices

    # (d) each holder's weights sit on the coordinator's log at the version it reached.
    for holder in holders:
        assert holder.log_version >= log.version - 1  # the last round's step is never shipped
        assert holder.log_head == log.hash_at(holder.log_version)

    # (c) the export loads as a normal checkpoint and is base + log, bit for bit.
    out = tmp_path / "export"
    result = export_run(run_dir, out)
    assert (result.steps, result.log_head, result.bits_spent) == (log.version, log.head, 20.0)
    assert LOG_FILE in {p.name for p in out.iterdir()}
    exported = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    weights = exported.state_dict()
    spec = coordinator.spec.parametrization
    assert differing_tensors(replay_with_parametrization(spec, steps), weights) == []
    assert differing_tensors(base_plus_steps(steps, PATTERNS), weights) == []
    base = base_plus_steps([])
    moved = [name for name in base if not torch.equal(base[name], weights[name])]
    assert moved == [
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
    ]


# -- refusals at join ------------------------------------------------------------------------
def test_holders_that_cannot_join_are_refused_clearly(tmp_path: Path) -> None:
    config = write_run_config(tmp_path / "run.toml")
    coordinator = open_coordinator(config, tmp_path / "run", model_fingerprint=tiny_fingerprint())
    # A holder whose own model is not the one its policy pins fails before it dials.
    with pytest.raises(ConfigError, match="is not the policy's expected_model_fingerprint"):
        make_holder(
            tmp_path, "pinned-elsewhere", seed=0, expected_model_fingerprint="sha256:" + "11" * 32
        )
    refusing = make_holder(tmp_path, "refusing", seed=2, allowed_algorithms=["dpzero"])
    other_model = make_holder(
        tmp_path,
        "other-model",
        seed=1,
        model="tiny-llama:1",
        expected_model_fingerprint=tiny_fingerprint("tiny-llama:1"),
    )

    outcomes = run_federation(coordinator, [refusing, other_model])

    refused_by_policy = outcomes["refusing"].error
    assert isinstance(refused_by_policy, PolicyViolation)
    assert "run wants algorithm 'bboxer-1+1'; policy allows ['dpzero']" in str(refused_by_policy)
    refused_by_run = outcomes["other-model"].error
    assert isinstance(refused_by_run, TransportError)
    message = str(refused_by_run)
    assert message.startswith("Join failed with FAILED_PRECONDITION: holder 'other-model'")
    assert f"this run needs {tiny_fingerprint()}" in message
    for holder in (refusing, other_model):
        assert holder.ledger.records == () and holder.forward_passes == 0
    assert coordinator.state.bits_total == 0 and coordinator.state.rounds == []
    assert not (tmp_path / "run" / "journal.jsonl").exists()


# -- a holder runs out of budget; the quorum carries on --------------------------------------
def test_over_budget_holder_refuses_and_the_run_completes_on_quorum(tmp_path: Path) -> None:
    config = write_run_config(
        tmp_path / "run.toml",
        run={"max_rounds": 6},
        server={"min_holders": 2, "quorum": 1},
    )
    run_dir = tmp_path / "run"
    coordinator = open_coordinator(config, run_dir, model_fingerprint=tiny_fingerprint())
    generous = make_holder(tmp_path, "generous", seed=0)
    thrifty = make_holder(tmp_path, "thrifty", seed=1, max_bits=3.0)
    thrifty_ledger = thrifty.ledger.path

    outcomes = run_federation(coordinator, [generous, thrifty])

    assert all(o.error is None for o in outcomes.values()), outcomes
    state = coordinator.state
    assert state.finished_reason == "max_rounds (6) reached" and len(state.rounds) == 6
    assert [sorted(r.refusals) for r in state.rounds] == [[]] * 3 + [["thrifty"]] * 3
    assert all(r.closed_by == "all answered" for r in state.rounds)  # never "no quorum"
    for late in state.rounds[3:]:  # the one remaining voice decides alone
        assert list(late.choices) == ["generous"]
        assert (late.step is not None) == (late.choices["generous"] == 1)
    # The coordinator hears a reason code, never the holder's words or budget figures.
    assert all(r.refusals["thrifty"] == "over-budget" for r in state.rounds[3:])
    notes = read_refusals(refusal_log_path(thrifty_ledger))
    assert len(notes) == 3 and all("0.00 of 3 remain" in n["message"] for n in notes)
    assert state.bits_per_holder == {"generous": 6.0, "thrifty": 3.0}
    assert (thrifty.status.answered, thrifty.status.refused) == (3, 3)
    assert len(thrifty_ledger.read_bytes().splitlines()) == 3
    assert [r.bits for r in thrifty.ledger.records] == [1.0, 1.0, 1.0]
    assert len(generous.ledger.records) == 6
