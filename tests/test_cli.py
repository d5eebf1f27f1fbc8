"""The ``sottovoce`` command as users run it: ``python -m sottovoce.cli ...`` in a subprocess.

Bad input must end with one line on stderr (``error: ...`` naming the file or field), exit
code 2, no traceback and nothing half-written; ``simulate`` must run a whole federation.

Every command starts a fresh interpreter that imports torch and transformers (about 5 s of
CPU each), so the bad-input commands are launched together by one module fixture and each
test waits for its own: the start-ups and the unreachable client's 10 s connect timeout
overlap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    TINY,
    differing_tensors,
    replay_with_parametrization,
    tiny_records,
    write_policy,
    write_records,
    write_run_config,
)
from transformers import AutoModelForCausalLM

from sottovoce.common.bounds import kl_transcript_bound
from sottovoce.common.data import write_jsonl
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.steplog import StepLog
from sottovoce.common.storage import read_json_lines

WAIT_S = 240.0
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1


# -- the commands ------------------------------------------------------------------------------
def holder_inputs(folder: Path) -> tuple[Path, Path]:
    """A good data file and policy (its ledger in ``folder/ledger``)."""
    data = write_records(folder / "data.jsonl", 24)
    return data, write_policy(folder / "policy.toml", Path("ledger"))


def client_argv(data: Path, policy: Path) -> list[str]:
    return [
        "client", "--server", UNREACHABLE, "--data", str(data), "--policy", str(policy),
        "--holder-id", "h", "--model", TINY, "--insecure",
    ]  # fmt: skip


def server_argv(folder: Path, config: Path) -> list[str]:
    return ["server", "--config", str(config), "--run-dir", str(folder / "run")]


def missing_config(folder: Path) -> list[str]:
    return server_argv(folder, folder / "absent.toml")


def malformed_toml(folder: Path) -> list[str]:
    config = folder / "run.toml"
    config.write_text('[run]\nname = "x"\nmax_rounds = \n', encoding="utf-8")
    return server_argv(folder, config)


def unknown_key(folder: Path) -> list[str]:
    return server_argv(folder, write_run_config(folder / "run.toml", run={"max_round": 5}))


def quorum_above_min_holders(folder: Path) -> list[str]:
    config = write_run_config(folder / "run.toml", server={"quorum": 5, "min_holders": 2})
    return ["simulate", "--config", str(config), "--run-dir", str(folder / "run")]


def label_out_of_range(folder: Path) -> list[str]:
    _, policy = holder_inputs(folder)
    records = tiny_records(24)
    records[4] = {**records[4], "label": 7}
    data = folder / "holder.jsonl"
    write_jsonl(data, records)
    return client_argv(data, policy)


def wrong_type(folder: Path) -> list[str]:
    return server_argv(folder, write_run_config(folder / "run.toml", run={"max_rounds": "x"}))


def missing_policy(folder: Path) -> list[str]:
    data, _ = holder_inputs(folder)
    return client_argv(data, folder / "absent-policy.toml")


def malformed_policy(folder: Path) -> list[str]:
    data, _ = holder_inputs(folder)
    policy = write_policy(folder / "policy.toml", Path("ledger"), max_bits="lots")
    return client_argv(data, policy)


def record_without_text(folder: Path) -> list[str]:
    _, policy = holder_inputs(folder)
    records = tiny_records(3)
    records[1] = {"label": 1}
    data = folder / "holder.jsonl"
    write_jsonl(data, records)
    return client_argv(data, policy)


def unreachable_server(folder: Path) -> list[str]:
    return client_argv(*holder_inputs(folder))


def unknown_model(folder: Path) -> list[str]:
    argv = client_argv(*holder_inputs(folder))
    argv[argv.index(TINY)] = "no-such-model"
    return argv


def no_transport_security(folder: Path) -> list[str]:
    argv = client_argv(*holder_inputs(folder))
    argv.remove("--insecure")
    return argv


def insecure_off_loopback(folder: Path) -> list[str]:
    config = write_run_config(folder / "run.toml")
    return [*server_argv(folder, config), "--address", "10.1.2.3:50051", "--insecure"]


def certs_without_a_ca(folder: Path) -> list[str]:
    return ["certs", "issue", "--dir", str(folder / "nocerts"), "--name", "h"]


def export_of_non_run(folder: Path) -> list[str]:
    (folder / "notarun").mkdir()
    (folder / "notarun" / "notes.txt").write_text("hello", encoding="utf-8")
    return ["export", "--run", str(folder / "notarun"), "--out", str(folder / "out")]


@dataclass(frozen=True)
class BadInput:
    build: Callable[[Path], list[str]]
    expected: tuple[str, ...]  # fragments of the one error line
    opens_ledger: bool = False  # gets as far as opening (creating) an empty ledger


BAD_INPUTS: dict[str, BadInput] = {
    "missing config": BadInput(missing_config, ("absent.toml: file not found",)),
    "malformed toml": BadInput(malformed_toml, ("run.toml: not valid TOML",)),
    "unknown key": BadInput(
        unknown_key, ("run.toml: run.max_round: unknown key; did you mean 'run.max_rounds'?",)
    ),
    "quorum above min_holders": BadInput(
        quorum_above_min_holders, ("run.toml: (top level): server.quorum cannot exceed",)
    ),
    "label out of range": BadInput(
        label_out_of_range,
        ("holder.jsonl line 5: field 'label' must be an integer index",),
        opens_ledger=True,  # the data is checked against the model's tokenizer, after it
    ),
    "wrong type": BadInput(wrong_type, ("run.toml: run.max_rounds: ", "(got 'x')")),
    "missing policy": BadInput(missing_policy, ("absent-policy.toml: policy file not found",)),
    "malformed policy": BadInput(
        malformed_policy, ("policy.toml: max_bits: must be a number (got 'lots')",)
    ),
    "record without text": BadInput(
        record_without_text, ("holder.jsonl line 2: missing field 'text'",)
    ),
    "unreachable server": BadInput(
        unreachable_server, (f"cannot reach coordinator at {UNREACHABLE}",), opens_ledger=True
    ),
    "unknown model": BadInput(unknown_model, ("unknown model 'no-such-model'",)),
    "no transport security": BadInput(
        no_transport_security, ("--certs DIR is required (mutual TLS",)
    ),
    "insecure off loopback": BadInput(
        insecure_off_loopback, ("--insecure: only on loopback (got '10.1.2.3:50051')",)
    ),
    "certs without a CA": BadInput(certs_without_a_ca, ("nocerts: no CA here",)),
    "export of a non-run": BadInput(
        export_of_non_run, ("notarun: not a run directory (no run.json)",)
    ),
}


def simulate_config(folder: Path) -> Path:
    """Two holders, four rounds of one bit each, on the tiny model and bundled data."""
    return write_run_config(
        folder / "run.toml",
        run={"name": "cli-sim", "max_rounds": 4, "bit_budget": 100.0},
        simulate={"holders": 2, "test_size": 60, "dev_size": 20, "train_size": 60},
        server={"min_holders": 2, "quorum": 1},
    )


# -- launching commands ------------------------------------------------------------------------
@dataclass
class Launched:
    """A running ``python -m sottovoce.cli`` and what to judge it by."""

    process: subprocess.Popen[bytes]
    folder: Path
    files_before: set[Path]
    stdout: Path
    stderr: Path

    def wait(self) -> tuple[int, str, str]:
        code = self.process.wait(timeout=WAIT_S)
        return (
            code,
            self.stdout.read_text(encoding="utf-8", errors="replace"),
            self.stderr.read_text(encoding="utf-8", errors="replace"),
        )

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def files_under(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


def launch(argv: list[str], folder: Path, home: Path) -> Launched:
    """Start the command in ``folder``; its output goes to files beside it, not into it."""
    env = dict(
        os.environ,
        SOTTOVOCE_CACHE=str(home / "cache"),
        OMP_NUM_THREADS="1",
    )
    stdout, stderr = folder.with_name(folder.name + ".out"), folder.with_name(folder.name + ".err")
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "sottovoce.cli", *argv],
            stdout=out,
            stderr=err,
            env=env,
            cwd=folder,
        )
    return Launched(process, folder, files_under(folder), stdout, stderr)


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Launched]]:
    """Every bad-input command, all started at once (see the module docstring)."""
    root = tmp_path_factory.mktemp("cli")
    runs: dict[str, Launched] = {}
    try:
        for number, (name, case) in enumerate(BAD_INPUTS.items()):
            folder = root / f"case-{number}"
            folder.mkdir()
            runs[name] = launch(case.build(folder), folder, root)
        yield runs
    finally:
        for run in runs.values():
            run.kill()


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_exit_2(
    bad_input_runs: dict[str, Launched], name: str
) -> None:
    run = bad_input_runs[name]
    code, _, stderr = run.wait()
    # --insecure says so loudly before anything else, a client names its ledger once it has
    # opened it; the error itself is one line, and short (no config dumped into it).
    lines = [
        line
        for line in stderr.splitlines()
        if not line.startswith(("WARNING: --insecure", "h: lifetime ledger "))
    ]
    assert len(lines) == 1, stderr
    assert len(lines[0]) < 300, lines[0]
    assert lines[0].startswith("error: "), stderr
    for fragment in BAD_INPUTS[name].expected:
        assert fragment in lines[0]
    assert "Traceback" not in stderr
    assert code == 2
    assert_nothing_half_written(run, opens_ledger=BAD_INPUTS[name].opens_ledger)


def assert_nothing_half_written(run: Launched, *, opens_ledger: bool) -> None:
    """No new file, except (when it got that far) an empty ledger, its lock, the data set's
    record index and the holder's key."""
    new = files_under(run.folder) - run.files_before
    if not opens_ledger:
        assert new == set()
        return
    ledgers = [run.folder / p for p in new if p.name.endswith(".ledger.jsonl")]
    assert len(ledgers) == 1 and ledgers[0].read_bytes() == b""
    allowed = {Path("ledger"), ledgers[0].relative_to(run.folder)}
    allowed.add(Path(f"{ledgers[0].relative_to(run.folder)}.lock"))
    allowed.add(ledgers[0].relative_to(run.folder).with_name("holder.key"))
    dataset = ledgers[0].name.removesuffix(".ledger.jsonl")
    allowed.add(ledgers[0].relative_to(run.folder).with_name(f"{dataset}.records"))
    assert new <= allowed


def test_version_short_help_and_simulate_help() -> None:
    from click.testing import CliRunner

    from sottovoce.cli import main

    runner = CliRunner()
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("sottovoce, version ")
    short = runner.invoke(main, ["-h"])
    assert short.exit_code == 0 and "simulate" in short.output
    simulate_help = runner.invoke(main, ["simulate", "-h"])
    assert simulate_help.exit_code == 0
    assert "examples/dpzero.toml" in simulate_help.output and "DPZero" in simulate_help.output


def test_help_and_config_checks_import_nothing_heavy() -> None:
    """No torch, transformers, gRPC or scipy for --help or a config check (seconds each to
    import): both answer in well under a second."""
    heavy = "{'torch', 'transformers', 'grpc', 'scipy'}"
    for module in ("sottovoce.cli", "sottovoce.common.config"):
        probe = f"import sys, {module}; print(sorted({heavy} & set(sys.modules)))"
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]", module


# -- a whole federation through the CLI --------------------------------------------------------
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
    assert "accuracy before" in stdout + stderr
    # Not on a terminal: plain progress lines, not a live bar's escape codes.
    assert "round 4/4  bits 8/100" in stderr and "\x1b[" not in stderr

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
