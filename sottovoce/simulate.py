"""A whole federation on one machine: one coordinator and N data holders as OS processes.

``sottovoce simulate --config run.toml`` splits the bundled data set into a fixed test
split, a dev split and training shards (one per holder), writes each holder a data file
and a policy, serves the coordinator over real gRPC on loopback, starts every holder as
its own process (``sottovoce client ...``, exactly what a real deployment runs), and
finally reports held-out accuracy before and after with confidence intervals, a paired
McNemar test, the bits spent and the generalization bound, and whether the model is still a
language model: perplexity ratio on the bundled general text, out-of-domain accuracy and
the KL to the base on the held-out prompts (:mod:`sottovoce.common.quality`).

The simulation plays the operator of every party, so it may read the holders' data for
the report (the held-out test split is never seen by any holder, and nothing here is
tuned on it). In a real deployment each holder computes its own numbers locally.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sottovoce.api import read_config
from sottovoce.common.config import RunConfig
from sottovoce.common.errors import ConfigError, SottovoceError
from sottovoce.common.models import load_model
from sottovoce.common.quality import OOD_CAP, ood_records, quality_section
from sottovoce.federation import Federation, prepare_federation
from sottovoce.heldout import HELDOUT, HeldOut
from sottovoce.progress import counted_phase
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.export import export_run
from sottovoce.server.grpc_service import serve
from sottovoce.server.run_report import coordinator_report, public_quality_section
from sottovoce.server.run_state import RoundRecord, RunState
from sottovoce.simulation_report import (
    build_report,
    holder_costs,
    mean_holder_score,
    pooled_train_errors,
)

ENGINES = ("native", "flower")
RUN_LEDGER_DIR = "ledger"  # each simulated holder's, relative to its own folder


def _ledger_location(run_dir: Path, ledger_dir: Path) -> str:
    if ledger_dir.is_absolute():
        return str(ledger_dir)
    return str(run_dir / "holders" / "holder-*" / ledger_dir)


def start_holders(
    config: RunConfig, federation: Federation, address: str
) -> list[subprocess.Popen[bytes]]:
    """One OS process per holder, each with its own model copy and pinned torch threads."""
    threads = str(config.simulate.threads_per_holder)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    processes = []
    for index, holder_dir in enumerate(federation.holder_dirs):
        command = [
            sys.executable, "-m", "sottovoce.cli", "client",
            "--server", address,
            "--data", str(holder_dir / "data.jsonl"),
            "--policy", str(holder_dir / "policy.toml"),
            "--holder-id", f"holder-{index}",
            "--model", config.model.name,
            "--dtype", config.model.dtype,
            "--threads", threads,
            "--status", str(holder_dir / "status.json"),
            "--report", str(holder_dir / "report.json"),
            "--insecure",
        ]  # fmt: skip
        log_file = open(holder_dir / "holder.log", "wb")  # noqa: SIM115 (lives with the process)
        processes.append(
            subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        )
    return processes


def run_rounds(
    coordinator: Coordinator,
    federation: Federation,
    processes: list[subprocess.Popen[bytes]],
    console: Console,
) -> None:
    """Wait for the run to finish, showing progress; fail fast if a holder process dies."""
    config = coordinator.config
    accepted = [0]
    # Not a terminal (a log file, CI): no live bar, a plain line every 10 s and at the end.
    plain = not console.is_terminal
    started = time.monotonic()
    last_line = [started]
    progress = Progress(
        TextColumn("[bold]round {task.completed:>4.0f}/{task.total:.0f}"),
        BarColumn(bar_width=16),
        TimeElapsedColumn(),  # before the texts, so a narrow terminal cuts those instead
        TextColumn("{task.fields[bits]}"),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=plain,
    )
    bar = progress.add_task("rounds", total=config.run.max_rounds, bits="", info="")

    def plain_line(text: Callable[[], str], *, force: bool = False) -> None:
        """In a log: ``text()`` and the elapsed time, at most every 10 s unless ``force``."""
        now = time.monotonic()
        if plain and (force or now - last_line[0] >= 10.0):
            last_line[0] = now
            console.print(f"{text()}  ({now - started:.0f} s)", soft_wrap=True)

    def on_round(record: RoundRecord, state: RunState) -> None:
        accepted[0] += record.step is not None
        score = mean_holder_score(federation)
        bits = f"bits {state.bits_total:.0f}/{config.run.bit_budget:g}"
        info = f"accepted {accepted[0]}  step {record.step_size_after:.4f}" + (
            f"  incumbent {score:.3f}" if score is not None else ""
        )
        progress.update(bar, completed=record.round_index + 1, bits=bits, info=info)
        plain_line(
            lambda: f"round {record.round_index + 1}/{config.run.max_rounds}  {bits}  {info}",
            force=record.round_index + 1 >= config.run.max_rounds,
        )

    def waiting() -> str:
        done = len(coordinator.state.rounds)
        return (
            f"round {done}/{config.run.max_rounds}  waiting for round {done + 1}: "
            f"{len(coordinator.active_holders)} of {len(federation.holder_dirs)} holders joined"
        )

    coordinator.add_listener(on_round)
    console.print(
        f"waiting for {len(federation.holder_dirs)} holders: each loads the model and scores "
        "its data once before round 1 (holders/holder-*/holder.log)"
    )
    with progress:
        while not coordinator.wait_finished(timeout_s=2.0):
            plain_line(waiting)  # no round closed for 10 s: say so
            for index, process in enumerate(processes):
                if process.poll() not in (None, 0):
                    tail = _tail(federation.holder_dirs[index] / "holder.log")
                    coordinator.stop(f"holder-{index} exited")
                    raise SottovoceError(
                        f"holder-{index} exited with code {process.returncode}: {tail}"
                    )
    console.print(f"run finished: {coordinator.state.finished_reason}")


def run_rounds_flower(coordinator: Coordinator, federation: Federation, console: Console) -> None:
    """The same run through Flower: ServerApp and ClientApps on Flower's runtime, in threads.

    Each holder is built from its folder as a SuperNode's ClientApp would build it
    (``holder_from_node_config``), so its policy, ledger, status and report are the same.
    """
    try:
        from sottovoce.client.flower_nodes import make_client_app
        from sottovoce.flower_apps import holder_from_node_config
        from sottovoce.flower_runtime import run_in_process
        from sottovoce.server.flower_driver import DriverSettings, make_server_app
    except ImportError as exc:
        raise ConfigError(
            f"--engine flower needs flwr: pip install 'sottovoce[flower]' ({exc})"
        ) from None

    config = coordinator.config
    idle_s = 2 * config.server.round_timeout_s + 60.0
    server_app = make_server_app(lambda _: coordinator, DriverSettings(idle_timeout_s=idle_s))
    client_app, nodes = make_client_app(holder_from_node_config)
    run_config: dict[str, bool | float | int | str] = {
        "holders-dir": str(federation.run_dir / "holders"),
        "model": config.model.name,
        "dtype": config.model.dtype,
    }
    failure: list[BaseException] = []

    def engine() -> None:
        try:
            run_in_process(
                server_app, client_app, len(federation.holder_dirs),
                run_config=run_config, workers=len(federation.holder_dirs),
            )  # fmt: skip
        except BaseException as exc:  # raised again below, once the progress display is done
            failure.append(exc)
            coordinator.stop(f"the Flower runtime failed: {exc}")
        finally:
            nodes.forget()  # release the holders' ledgers, as their processes would at exit

    thread = threading.Thread(target=engine, name="flower-runtime", daemon=True)
    thread.start()
    run_rounds(coordinator, federation, [], console)
    thread.join()
    if failure:
        raise SottovoceError(f"the Flower runtime failed: {failure[0]}") from failure[0]


def simulate(
    config_path: Path,
    *,
    run_dir: Path | None = None,
    report_path: Path | None = None,
    state_dir: Path | None = None,
    console: Console | None = None,
    engine: str = "native",
) -> dict[str, Any]:
    """Run a local federation end to end and return (and write) the report.

    ``engine``: "native" (our gRPC, one OS process per holder) or "flower" (a Flower
    ServerApp and one ClientApp node per holder, in Flower's runtime in this process).
    """
    if engine not in ENGINES:
        raise ConfigError(f"--engine: must be one of {', '.join(ENGINES)} (got {engine!r})")
    started = time.time()
    console = console or Console(stderr=True)
    config, config_text = read_config(config_path)
    run_dir = run_dir or Path("runs") / f"{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: exists and is not empty; choose a new --run-dir")
    torch.set_num_threads(config.simulate.eval_threads)
    console.print(f"run directory: {run_dir}")
    console.print(f"loading {config.model.name} ...")
    loaded = load_model(config.model.name, dtype="float32")
    run_dir.mkdir(parents=True, exist_ok=True)
    # The bundled data is public and split anew by every run: its holders are not a real
    # data set's lifetime, so their ledgers live in the run (holders/holder-<i>/ledger/).
    # A real data set's holder (`sottovoce client`) keeps the ledger its policy names.
    ledger_dir = state_dir or Path(RUN_LEDGER_DIR)
    federation = prepare_federation(config, run_dir, loaded.fingerprint, ledger_dir)
    console.print(
        f"holders' ledgers: {_ledger_location(run_dir, ledger_dir)} (this run's bundled data only)"
    )
    held_out = HeldOut(config, loaded)
    console.print(
        f"held-out split: {len(federation.test)} examples, sha256 {federation.test_hash[:16]}"
    )
    ood = ood_records(cap=config.simulate.ood_cap or OOD_CAP)
    label = "measuring the base model (held-out, out-of-domain, general text)"
    with counted_phase(console, label, "forward passes") as advance:
        meter, windows = held_out.quality_meter(federation.test, ood, on_forward=advance)
    before = meter.base.correct[HELDOUT]
    console.print(f"accuracy before: {before.mean():.4f}")

    state = RunState.open(run_dir / "coordinator", config, config_text, loaded.fingerprint)
    coordinator = Coordinator(config, state, loaded.fingerprint)
    if engine == "flower":
        run_rounds_flower(coordinator, federation, console)
    else:
        server = serve(coordinator, "127.0.0.1:0")
        processes = start_holders(config, federation, f"127.0.0.1:{server.port}")
        try:
            run_rounds(coordinator, federation, processes, console)
            _wait_processes(processes, timeout_s=60.0)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.terminate()
            server.stop()

    held_out.evaluator.apply_steps(list(state.log))
    tuned = meter.measure(held_out.evaluator.model)
    after = tuned.correct[HELDOUT]
    train_errors = pooled_train_errors(federation, state.log.head)
    if train_errors is None:  # a holder wrote no report: score the training data here
        train_errors = int((~held_out.correct(federation.train, reuse=False)).sum())
    coordinator_view = coordinator_report(
        config,
        state,
        coordinator.spec,
        public_quality=public_quality_section(meter.base, tuned, windows, ood),
    )
    state.write_report(coordinator_view)  # what `sottovoce server` writes, too; the model card
    # quotes its perplexity ratio
    export = export_run(run_dir / "coordinator", run_dir / "model")
    report = build_report(config, coordinator.spec, state, federation, before, after, train_errors)
    sets = {HELDOUT: federation.test, **ood}
    roles = {HELDOUT: f"in-domain held-out ({config.simulate.eval_split} split)"}
    report["quality"] = quality_section(
        meter.base,
        tuned,
        windows=windows,
        sets=sets,
        roles={**roles, **dict.fromkeys(ood, "out-of-domain")},
    )
    if "privacy" in report:
        report["privacy"]["as_computed_by_the_coordinator"] = coordinator_view.get(
            "privacy_as_computed_by_the_coordinator"
        )
    report["holder_cost"] = holder_costs(federation)
    _print_holder_cost(console, report["holder_cost"], config.evaluation.batch_size)
    report["run_dir"] = str(run_dir)
    report["exported_model"] = str(export.out_dir)
    report["wall_seconds"] = round(time.time() - started, 1)
    text = json.dumps(report, indent=2, sort_keys=True)
    (run_dir / "report.json").write_text(text, encoding="utf-8")
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(text, encoding="utf-8")
    return report


def _print_holder_cost(console: Console, costs: dict[str, dict[str, float]], batch: int) -> None:
    """One line: what the holders computed (each scores its records once per model state;
    a forward pass is a sub-batch of up to ``batch`` examples)."""
    if not costs:
        return
    passes = sorted(int(cost.get("forward_passes", 0)) for cost in costs.values())
    seconds = sum(float(cost.get("compute_seconds", 0.0)) for cost in costs.values())
    console.print(
        f"holders: {passes[0]}..{passes[-1]} forward passes each (sub-batches of up to "
        f"{batch} examples), {seconds:.0f} s of compute in all"
    )


def _wait_processes(processes: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    end = time.time() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            process.terminate()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
