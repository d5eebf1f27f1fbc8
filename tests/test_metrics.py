"""Watching a run: the coordinator's Prometheus metrics equal the journal's figures, and a
holder's own metrics are off by default and never bind anything but loopback."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from helpers import toml_text, write_policy, write_records
from prometheus_client.parser import text_string_to_metric_families

from sottovoce.api import open_holder
from sottovoce.cli import main
from sottovoce.client.metrics import holder_registry, serve_holder_metrics
from sottovoce.common.config import RunConfig, parse_config
from sottovoce.common.errors import ConfigError, RefusalCode
from sottovoce.common.protocol.messages import Answer, JoinRequest, Task
from sottovoce.common.storage import read_json_lines
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.grpc_service import SERVICE_NAME, serve
from sottovoce.server.metrics import CoordinatorMetrics
from sottovoce.server.run_report import coordinator_report
from sottovoce.server.run_state import JOURNAL, RunState

FINGERPRINT = "sha256:" + "3c" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dp_data() -> dict[str, Any]:
    """(1+λ) with randomized response, so the coordinator computes an epsilon per holder."""
    return (
        {
            "run": {"name": "watched", "algorithm": "bboxer-1+lambda", "max_rounds": 6,
                    "bit_budget": 200.0},
            "optimizer": {"candidates": 3},
            "parametrization": {"kind": "scale"},
            "privacy": {"randomized_response_epsilon": 1.0, "delta": 1e-5},
            "server": {"min_holders": 3, "quorum": 2, "round_timeout_s": 10.0,
                       "max_missed_rounds": 2, "rate_limit_per_s": 0.01, "rate_limit_burst": 5},
        }
    )  # fmt: skip


def dp_config() -> RunConfig:
    return parse_config(dp_data(), "test")


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` as {sample name: {labels: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode("utf-8")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def short_run(tmp_path: Path) -> tuple[Coordinator, CoordinatorMetrics, Clock]:
    """Three holders: a and b answer every round (b refuses one), 'quiet' never answers and
    is evicted after two rounds; the run ends at max_rounds."""
    clock = Clock()
    config = dp_config()
    state = RunState.open(tmp_path / "run", config, toml_text(dp_data()), FINGERPRINT)
    coordinator = Coordinator(config, state, FINGERPRINT, clock=clock)
    metrics = CoordinatorMetrics(coordinator)
    for holder in ("a", "b", "quiet"):
        coordinator.join(JoinRequest(holder_id=holder, model_fingerprint=FINGERPRINT))
    for index in range(config.run.max_rounds):
        for holder in ("a", "b"):
            log = state.log
            task = coordinator.pull_task(holder, log.version, log.head, timeout_s=0)
            assert isinstance(task, Task), task
            clock.now += 0.25  # the answer takes a quarter of a second
            if holder == "b" and index == 1:
                answer = Answer(task.task_id, None, refusal=RefusalCode.POLICY.value)
            else:
                answer = Answer(task.task_id, choice=(index + len(holder)) % 4)
            assert coordinator.push_answer(holder, answer)
        if state.next_round == index:  # waiting for 'quiet': its deadline closes the round
            clock.now += 11
            coordinator.tick()
    coordinator.tick()
    assert coordinator.finished
    return coordinator, metrics, clock


def test_metrics_after_a_short_run_equal_the_journal(tmp_path: Path) -> None:
    coordinator, metrics, _ = short_run(tmp_path)
    port = metrics.serve_http("127.0.0.1:0")
    got = scrape(port)
    journal = read_json_lines(coordinator.state.run_dir / JOURNAL)
    answers = [r for r in journal if r["type"] == "answer"]
    rounds = [r for r in journal if r["type"] == "round"]

    assert got["sottovoce_rounds_total"][()] == len(rounds) == 6
    assert got["sottovoce_accepted_steps_total"][()] == sum(1 for r in rounds if r["step"])
    assert got["sottovoce_bits_heard_total"][()] == pytest.approx(sum(a["bits"] for a in answers))
    per_holder: dict[str, float] = {}
    for record in answers:
        per_holder[record["holder"]] = per_holder.get(record["holder"], 0.0) + record["bits"]
    assert {dict(k)["holder"]: v for k, v in got["sottovoce_holder_bits_heard_total"].items()} == (
        pytest.approx(per_holder)
    )
    refusals = {dict(k)["code"]: v for k, v in got["sottovoce_holder_refusals_total"].items()}
    assert set(refusals) == {code.value for code in RefusalCode}
    assert refusals["policy"] == sum(1 for a in answers if a["refusal"] == "policy") == 1
    evictions = [r for r in journal if r["type"] == "evicted"]
    assert got["sottovoce_evictions_total"][()] == len(evictions) == 1
    holders = {dict(k)["state"]: v for k, v in got["sottovoce_holders"].items()}
    assert holders == {"active": 2, "evicted": 1}
    assert got["sottovoce_run_finished"][()] == 1
    assert got["sottovoce_rounds_max"][()] == 6
    assert got["sottovoce_bit_budget_bits"][()] == 200.0

    # epsilon: exactly the run report's (the coordinator's computation)
    report = coordinator_report(coordinator.config, coordinator.state, coordinator.spec)
    expected = report["privacy_as_computed_by_the_coordinator"]["epsilon_per_holder"]
    epsilon = {dict(k)["holder"]: v for k, v in got["sottovoce_holder_epsilon"].items()}
    assert epsilon == pytest.approx(expected) and set(epsilon) == {"a", "b"}

    # every answer's latency: 0.25 s after its task left (the clock is the coordinator's)
    on_time = [a for a in answers if a["holder"] in ("a", "b")]
    assert got["sottovoce_answer_latency_seconds_count"][()] == len(on_time)
    assert got["sottovoce_answer_latency_seconds_sum"][()] == pytest.approx(0.25 * len(on_time))


def test_refused_and_rate_limited_calls_are_counted_by_status(tmp_path: Path) -> None:
    coordinator, metrics, _ = short_run(tmp_path)
    with serve(coordinator, "127.0.0.1:0", observer=metrics) as running:
        with grpc.insecure_channel(running.address) as channel:
            join = channel.unary_unary(f"/{SERVICE_NAME}/Join")
            pull = channel.unary_unary(f"/{SERVICE_NAME}/PullTask")
            with pytest.raises(grpc.RpcError) as bad:
                join(b"\xff\xff not a message", timeout=5)
            assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            codes = []
            for _ in range(40):  # refused calls take tokens until the caller is out of them
                with pytest.raises(grpc.RpcError) as refused:
                    pull(b"\x0a\x01a", timeout=5)
                codes.append(refused.value.code())
        port = metrics.serve_http("127.0.0.1:0")
        got = scrape(port)
    counted = {dict(k)["status"]: v for k, v in got["sottovoce_rpc_refusals_total"].items()}
    limited = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert limited > 0
    assert counted["INVALID_ARGUMENT"] == 1 + codes.count(grpc.StatusCode.INVALID_ARGUMENT)
    rate_limited = got["sottovoce_rate_limit_refusals_total"][()]
    assert rate_limited == limited == counted["RESOURCE_EXHAUSTED"]


def test_status_reads_the_run_dir_like_the_journal(tmp_path: Path) -> None:
    coordinator, _, _ = short_run(tmp_path)
    run_dir = coordinator.state.run_dir
    result = CliRunner().invoke(main, ["status", "--run-dir", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["rounds"] == 6 and summary["max_rounds"] == 6
    assert summary["bits_total"] == pytest.approx(coordinator.state.bits_total)
    assert summary["bits_per_holder"] == pytest.approx(coordinator.state.bits_per_holder)
    assert summary["accepted_steps"] == coordinator.state.log.version
    assert summary["refusal_codes"] == {"policy": 1}
    assert [e["holder"] for e in summary["evictions"]] == ["quiet"]
    assert summary["finished_reason"] == coordinator.state.finished_reason
    shown = CliRunner().invoke(main, ["status", "--run-dir", str(run_dir)], terminal_width=120)
    assert shown.exit_code == 0, shown.output
    assert "rounds" in shown.output and "6 / 6" in shown.output
    assert "bits heard" in shown.output and "finished" in shown.output
    assert "━" in shown.output  # the progress bars


# -- a holder's own metrics ------------------------------------------------------------------
def holder(tmp_path: Path) -> Any:
    data = write_records(tmp_path / "data.jsonl", 24)
    policy = write_policy(tmp_path / "policy.toml", tmp_path / "ledger")
    return open_holder(data, policy, holder_id="h", model_name="tiny-llama")


def test_a_holders_metrics_are_off_by_default_and_loopback_only(tmp_path: Path) -> None:
    client = main.commands["client"]
    (option,) = [p for p in client.params if p.name == "metrics_address"]
    assert option.default is None  # nothing listens unless the holder's operator asks
    data_holder = holder(tmp_path)
    for address in ("0.0.0.0:0", "192.168.1.5:9465", "[::]:0", "holder.example.org:9465"):
        with pytest.raises(ConfigError, match="loopback address only"):
            serve_holder_metrics(data_holder, address)
    port = serve_holder_metrics(data_holder, "127.0.0.1:0")
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # it listens where it was told
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode("utf-8")
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["sottovoce_holder_ledger_spent_bits"] == data_holder.ledger.spent_bits
    assert values["sottovoce_holder_ledger_remaining_bits"] == data_holder.ledger.remaining_bits
    assert values["sottovoce_holder_tasks_answered_total"] == 0
    assert values["sottovoce_holder_forward_passes_total"] == 0


def test_a_holders_metrics_are_its_own_registry_not_the_process_default(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY, generate_latest

    data_holder = holder(tmp_path)
    registry = holder_registry(data_holder)
    assert b"sottovoce_holder_ledger_spent_bits" in generate_latest(registry)
    assert b"sottovoce_holder" not in generate_latest(REGISTRY)
