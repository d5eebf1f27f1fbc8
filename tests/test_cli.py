"""The ``sottovoce`` command as users run it: ``python -m sottovoce.cli ...`` in a subprocess.

Bad input must end with one line on stderr (``error: ...`` naming the file or field), exit
code 2, no traceback and nothing half-written (``simulate`` end to end:
tests/test_cli_simulate.py).

Every command starts a fresh interpreter that imports torch and transformers (about 5 s of
CPU each), so the bad-input commands are launched together by one module fixture and each
test waits for its own: the start-ups and the unreachable client's 10 s connect timeout
overlap.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_launch import Launched, files_under, launch
from helpers import (
    TINY,
    tiny_records,
    write_policy,
    write_records,
    write_run_config,
)

from sottovoce.common.data import write_jsonl

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1


# -- the commands ------------------------------------------------------------------------------
def holder_inputs(folder: Path) -> tuple[Path, Path]:
    """A good data file and policy (its ledger in ``folder/ledger``)."""
    data = write_records(folder / "data.jsonl", 24)
    return data, write_policy(folder / "policy.toml", Path("ledger"))


def client_argv(data: Path, policy: Path) -> list[str]:
    return [
        "client", "--server", UNREACHABLE, "--data", str(data), "--policy", str(policy),
        "--holder-id", "h", "--model", TINY, "--insecure", "--connect-timeout", "2",
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
    ),  # checked against the model's tokenizer before the ledger is made: no file at all
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
    """No torch, transformers, gRPC, scipy or dp-accounting for --help, a run config's check
    or a holder's policy check (seconds each to import): they answer in well under a second."""
    heavy = "{'torch', 'transformers', 'grpc', 'scipy', 'dp_accounting'}"
    for module in ("sottovoce.cli", "sottovoce.common.config", "sottovoce.client.policy"):
        probe = f"import sys, {module}; print(sorted({heavy} & set(sys.modules)))"
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]", module


# -- a whole federation through the CLI --------------------------------------------------------
