"""``sottovoce simulate`` as users run it: a whole federation in a subprocess, its report,
its ledgers, its printed next commands run as printed, and its exported model."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from cli_launch import launch
from helpers import differing_tensors, replay_with_parametrization, write_run_config
from transformers import AutoModelForCausalLM

from sottovoce.common.bounds import kl_transcript_bound
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.steplog import StepLog
from sottovoce.common.storage import read_json_lines

REPORT_FIELDS = {
    "algorithm",
    "rounds",
    "bits_spent_total",
    "bits_spent_per_holder",
    "bit_budget",
    "generalization_bound",
    "heldout_metric_before",
    "heldout_metric_after",
    "wall_seconds",
}


def simulate_config(folder: Path) -> Path:
    """Two holders, four rounds of one bit each, on the tiny model and bundled data (and
    100 of the out-of-domain reviews, not 1000: two thirds of the quality figures' passes)."""
    return write_run_config(
        folder / "run.toml",
        run={"name": "cli-sim", "max_rounds": 4, "bit_budget": 100.0},
        simulate={"holders": 2, "test_size": 60, "dev_size": 20, "train_size": 60, "ood_cap": 100},
        server={"min_holders": 2, "quorum": 1},
    )


def test_simulate_runs_a_federation_end_to_end(tmp_path: Path) -> None:
    folder = tmp_path / "simulate"
    folder.mkdir()
    config, report_path = simulate_config(folder), folder / "reports" / "report.json"
    argv = ["simulate", "--config", str(config), "--run-dir", str(folder / "run")]
    argv += ["--report", str(report_path)]  # in a folder that does not exist yet
    run = launch(argv, folder, tmp_path)
    try:
        code, stdout, stderr = run.wait()
    finally:
        run.kill()
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert set(report) >= REPORT_FIELDS
    assert report["algorithm"] == "bboxer-1+1" and report["rounds"] == 4
    assert report["bit_budget"] == 100.0
    assert report["bits_spent_per_holder"] == {"holder-0": 4.0, "holder-1": 4.0}
    assert report["bits_spent_total"] == sum(report["bits_spent_per_holder"].values()) == 8.0
    assert report["heldout_examples"] == 60
    assert report["quality"]["sets"]["amazon"]["examples"] == 100  # simulate.ood_cap
    for key in ("heldout_metric_before", "heldout_metric_after"):
        assert 0.0 <= report[key] <= 1.0
        assert report[key] * 60 == pytest.approx(round(report[key] * 60))  # k of 60 right
    bound = report["generalization_bound"]
    assert bound["n"] == 60 and bound["slack"] > 0
    assert bound["test_risk_bound"] == pytest.approx(bound["train_risk"] + bound["slack"])
    # The transcript bound beside the old one: the coordinator's data-free term, this run's
    # train risk, Maurer's kl inverted; and the assumptions, one line each.
    coordinator = json.loads((folder / "run" / "coordinator" / "report.json").read_text())
    complexity = coordinator["generalization_complexity"]
    assert bound["transcript_bits"] == complexity["transcript_bits"] > 0
    assert bound["heard_bits"] == 8.0 and complexity["rounds"] == 4
    assert bound["transcript_bound"] == pytest.approx(
        kl_transcript_bound(bound["train_risk"], bound["transcript_bits"], 60, bound["delta"])
    )
    assert bound["old_bound"] == pytest.approx(bound["test_risk_bound"])
    assert len(bound["assumptions"]) >= 4 and all("\n" not in a for a in bound["assumptions"])
    assert report["wall_seconds"] > 0
    # What the holders computed, from their own reports, is in the report and on stderr.
    costs = report["holder_cost"]
    assert sorted(costs) == ["holder-0", "holder-1"]
    assert all(cost["forward_passes"] > 0 for cost in costs.values())
    assert "forward passes each" in stderr
    assert "accuracy before" in stdout + stderr
    # Not on a terminal: plain progress lines, not a live bar's escape codes.
    assert "round 4/4  bits 8/100" in stderr and "\x1b[" not in stderr
    # The base's measurement says how far it got (here it is short: only its closing line).
    assert re.search(r"measuring the base model .*: [1-9]\d* forward passes, done in", stderr)
    after_phase = stderr.split("forward passes, done in", 1)[1]
    assert "measuring the base model" not in after_phase  # the tuned model's is not counted in it

    # The holders' own ledgers agree with the coordinator. Simulated holders of the
    # bundled data keep them in the run, nothing in the home folder.
    ledgers = sorted((folder / "run" / "holders").glob("holder-*/ledger/*.ledger.jsonl"))
    assert [len(read_json_lines(path)) for path in ledgers] == [4, 4]
    assert not (tmp_path / "home").exists()
    for holder in ("holder-0", "holder-1"):
        log_text = (folder / "run" / "holders" / holder / "holder.log").read_text()
        assert (
            f"{holder}: lifetime ledger {folder / 'run' / 'holders' / holder / 'ledger'}"
            in log_text
        )

    # It ends by saying where everything went and what to try next, runnable as printed.
    assert f"run directory: {folder / 'run'}" in stdout
    assert f"exported model: {folder / 'run' / 'model'}" in stdout
    export_line = next(line for line in stdout.splitlines() if " export --run " in line)
    env = dict(os.environ, SOTTOVOCE_CACHE=str(tmp_path / "cache"))
    again = subprocess.run(export_line, shell=True, cwd=folder, env=env, capture_output=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (folder / "run" / "model-again" / "model.safetensors").exists()

    # The exported model loads and is the run's log replayed on the base model.
    coordinator_dir = run.folder / "run" / "coordinator"
    meta = json.loads((coordinator_dir / "run.json").read_text(encoding="utf-8"))
    log = StepLog.open(coordinator_dir / "log.jsonl", meta["genesis"])
    assert report["log_head"] == log.head
    model = AutoModelForCausalLM.from_pretrained(run.folder / "run" / "model")
    expected = replay_with_parametrization(ParametrizationSpec(kind="scale"), list(log))
    assert differing_tensors(expected, model.state_dict()) == []
    assert report["parametrization"]["kind"] == "scale"
