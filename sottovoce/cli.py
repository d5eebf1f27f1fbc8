"""The ``sottovoce`` command: server, client, export, simulate, fingerprint, ledger.

Every user error ends as one line on stderr (``error: <file/field/message>: <problem>``)
and a non-zero exit; tracebacks are for bugs only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sottovoce.common.dtypes import DTYPE_NAMES
from sottovoce.common.errors import ConfigError, SottovoceError

if TYPE_CHECKING:
    from sottovoce.client.holder import DataHolder
    from sottovoce.common.transport.channel import TlsConfig

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2


def path_option(*names: str, **settings: Any) -> Callable[[F], F]:
    """``click.option`` for a path argument: a :class:`~pathlib.Path`, ``None`` if not given."""
    return click.option(*names, type=click.Path(path_type=Path), **settings)


def user_errors(func: F) -> F:
    """Turn our own exceptions into one line and exit code 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SottovoceError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _insecure_warning() -> None:
    click.secho(
        "WARNING: --insecure: no TLS. Only for loopback; anyone on the path can read and "
        "forge messages.",
        fg="yellow",
        err=True,
    )


def _transport_security(
    address: str, certs: Path | None, name: str, insecure: bool, server_name: str | None = None
) -> TlsConfig | None:
    """Mutual TLS from a certificate folder, or (loopback only, loudly) none at all."""
    from sottovoce.common.transport.certs import tls_config

    if certs is not None and insecure:
        raise ConfigError("--certs and --insecure: choose one")
    if certs is not None:
        return tls_config(certs, name, server_name=server_name)
    if not insecure:
        raise ConfigError(
            "--certs DIR is required (mutual TLS; make one with `sottovoce certs init` and "
            "`sottovoce certs issue`), or --insecure on a loopback address for local tests"
        )
    host = address.rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"--insecure: only on loopback (got {address!r}); use --certs")
    _insecure_warning()
    return None


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def main(verbose: bool) -> None:
    """sottovoce: private post-training of language models across data holders."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


@main.command()
@path_option("--config", "config_path", required=True)
@path_option(
    "--run-dir", default=None, help="Run directory (created, or resumed if it holds this run)."
)
@click.option("--address", default=None, help="Listen address; default from the config.")
@path_option(
    "--certs",
    default=None,
    help="Certificate folder (ca.pem, coordinator.pem, coordinator.key): mutual TLS.",
)
@click.option("--cert-name", default="coordinator", show_default=True)
@click.option("--insecure", is_flag=True, help="Plain TCP (loopback only).")
@user_errors
def server(
    config_path: Path,
    run_dir: Path | None,
    address: str | None,
    certs: Path | None,
    cert_name: str,
    insecure: bool,
) -> None:
    """Run the coordinator: serve tasks until the run's rounds or bit budget are spent."""
    from sottovoce.api import open_coordinator, read_config
    from sottovoce.server.grpc_service import serve
    from sottovoce.server.run_report import coordinator_report, measure_public_quality

    config, _ = read_config(config_path)
    run_dir = run_dir or Path("runs") / config.run.name
    listen = address or config.server.address
    tls = _transport_security(listen, certs, cert_name, insecure)
    coordinator = open_coordinator(config_path, run_dir)
    running = serve(coordinator, listen, tls=tls)
    click.echo(
        f"coordinator {coordinator.state.run_id} listening on port {running.port}; "
        f"run dir {run_dir}",
        err=True,
    )
    coordinator.add_listener(
        lambda record, state: click.echo(
            f"round {record.round_index}: "
            + (f"estimate {record.estimate:.4g} " if record.estimate is not None else "")
            + f"choices {record.choices} "
            f"{'accepted' if record.step else 'kept'}; bits {state.bits_total:.1f}",
            err=True,
        )
    )
    try:
        coordinator.wait_finished()
        state = coordinator.state
        path = state.write_report(coordinator_report(config, state, coordinator.spec))
        click.echo(f"run finished: {state.finished_reason}; report {path}", err=True)
        # Keep serving until every holder has collected the final steps and left; then
        # measure the model on the public sets (it loads the base model and replays the log).
        coordinator.wait_holders_left(timeout_s=60.0)
        quality = measure_public_quality(config, state)
        state.write_report(
            coordinator_report(config, state, coordinator.spec, public_quality=quality)
        )
    finally:
        running.stop(grace_s=5.0)


@main.command()
@click.option("--server", "address", required=True, help="Coordinator HOST:PORT.")
@path_option("--data", "data_path", required=True)
@path_option("--policy", "policy_path", required=True)
@click.option(
    "--holder-id", required=True, help="This holder's name (from its certificate under TLS)."
)
@click.option("--model", "model_name", default="smollm2-135m-instruct", show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_NAMES),
    default="float32",
    show_default=True,
    help="Compute dtype (the fingerprint is always of float32).",
)
@click.option("--threads", type=int, default=None, help="torch threads for this process.")
@path_option(
    "--status", "status_path", default=None, help="Write this holder's local status (JSON) here."
)
@path_option(
    "--report",
    "report_path",
    default=None,
    help="At the end, write this holder's local report (JSON; it stays here).",
)
@path_option(
    "--certs",
    default=None,
    help="Certificate folder (ca.pem, HOLDER-ID.pem, HOLDER-ID.key): mutual TLS.",
)
@click.option(
    "--server-name",
    default=None,
    help="Name to check the coordinator's certificate against (default: the --server host).",
)
@click.option("--insecure", is_flag=True, help="Plain TCP (loopback only).")
@user_errors
def client(
    address: str,
    data_path: Path,
    policy_path: Path,
    holder_id: str,
    model_name: str,
    dtype: str,
    threads: int | None,
    status_path: Path | None,
    report_path: Path | None,
    certs: Path | None,
    server_name: str | None,
    insecure: bool,
) -> None:
    """Run a data holder: dial out to the coordinator and answer within the policy."""
    import torch

    from sottovoce.api import open_holder
    from sottovoce.client.grpc_loop import WireTraffic, run_holder
    from sottovoce.common.storage import atomic_write_json

    if threads:
        torch.set_num_threads(threads)
    tls = _transport_security(address, certs, holder_id, insecure, server_name)
    holder = open_holder(
        data_path,
        policy_path,
        holder_id=holder_id,
        model_name=model_name,
        dtype=dtype,
        status_path=status_path,
    )
    traffic = WireTraffic()
    finished = run_holder(holder, address, tls=tls, traffic=traffic)
    if report_path is not None and holder.spec is not None:
        report = holder.local_report(finished.bits_spent_total)
        report["cost"].update(dataclasses.asdict(traffic))
        atomic_write_json(report_path, report)  # 0600: figures computed on the holder's data
    click.echo(
        f"{holder_id}: run {finished.run_id} finished ({finished.reason}); answered "
        f"{holder.status.answered}, refused {holder.status.refused}; lifetime bits "
        f"{holder.ledger.spent_bits:.1f} of {holder.policy.max_bits:g}" + _epsilon_line(holder),
        err=True,
    )


def _epsilon_line(holder: DataHolder) -> str:
    limit = holder.ledger.privacy
    if limit is None:
        return ""
    return (
        f"; lifetime epsilon {holder.ledger.spent_epsilon():.3f} of {limit.max_epsilon:g} "
        f"at delta {limit.delta:g}"
    )


@main.command()
@path_option("--run", "run_dir", required=True)
@path_option("--out", "out_dir", required=True)
@user_errors
def export(run_dir: Path, out_dir: Path) -> None:
    """Replay a run's log on the base model and write a Hugging Face checkpoint."""
    from sottovoce.server.export import export_run

    result = export_run(run_dir, out_dir)
    click.echo(
        f"wrote {result.out_dir}: {result.steps} steps, log head {result.log_head[:16]}, "
        f"{result.bits_spent:.1f} bits"
    )


@main.command()
@path_option("--config", "config_path", required=True)
@path_option("--run-dir", default=None)
@path_option(
    "--report", "report_path", default=None, help="Also write the final report (JSON) here."
)
@click.option(
    "--engine",
    type=click.Choice(["native", "flower"]),
    default="native",
    show_default=True,
    help="native: gRPC, one process per holder; flower: Flower ServerApp/ClientApps.",
)
@user_errors
def simulate(
    config_path: Path, run_dir: Path | None, report_path: Path | None, engine: str
) -> None:
    """One coordinator and N holder processes on loopback; report before/after."""
    from sottovoce.reporting import print_report
    from sottovoce.simulate import simulate as run_simulation

    report = run_simulation(config_path, run_dir=run_dir, report_path=report_path, engine=engine)
    print_report(report)


@main.command()
@path_option(
    "--run",
    "run_dirs",
    multiple=True,
    required=True,
    help="A run folder (simulate's or the server's); repeat to compare runs on the same data.",
)
@path_option(
    "--out",
    "out_dir",
    required=True,
    help="New folder for report.json, report.md, report.html and roc.png.",
)
@path_option(
    "--checkpoint",
    help="Evaluate this `sottovoce export` folder of the (one) run instead of its log.",
)
@path_option(
    "--members",
    multiple=True,
    help="Training data files (default: the run's holders/*/data.jsonl).",
)
@path_option(
    "--nonmembers", help="Unused examples of the same distribution (default: the bundled split's)."
)
@path_option("--heldout", help="The in-domain test set (default: the run's test split).")
@click.option(
    "--ood",
    multiple=True,
    default=("amazon",),
    show_default=True,
    help="Out-of-domain sets: a bundled name (amazon) or a file; repeatable.",
)
@click.option("--ood-cap", default=1000, show_default=True, help="At most this many per OOD set.")
@click.option("--reference-models", default=4, show_default=True, help="LiRA's (0: no LiRA).")
@click.option(
    "--baseline",
    "baseline_method",
    type=click.Choice(["lora", "full", "none"]),
    default="lora",
    show_default=True,
    help="The backprop baseline's method.",
)
@click.option(
    "--baseline-blocks",
    default=2,
    show_default=True,
    help="Decoder blocks the baseline trains, counted from the top (0: all).",
)
@click.option("--baseline-epochs", default=3, show_default=True, help="At most this many.")
@click.option("--baseline-lr", default=1e-3, show_default=True)
@click.option("--resamples", default=1000, show_default=True, help="Bootstrap resamples.")
@click.option("--seed", default=0, show_default=True, help="Carving, bootstrap, baseline order.")
@click.option("--threads", type=int, help="torch threads (default: torch's choice).")
@user_errors
def evaluate(
    run_dirs: tuple[Path, ...],
    out_dir: Path,
    checkpoint: Path | None,
    members: tuple[Path, ...],
    nonmembers: Path | None,
    heldout: Path | None,
    ood: tuple[str, ...],
    ood_cap: int,
    reference_models: int,
    baseline_method: str,
    baseline_blocks: int,
    baseline_epochs: int,
    baseline_lr: float,
    resamples: int,
    seed: int,
    threads: int | None,
) -> None:
    """Utility, membership inference, the bound and cost of runs, next to a backprop baseline.

    Needs the training data: run it where the data is (a holder, an auditor), never at the
    coordinator.
    """
    import torch

    from sottovoce.evidence.baseline import BaselineConfig
    from sottovoce.evidence.evaluate import EvaluateOptions
    from sottovoce.evidence.evaluate import evaluate as run_evaluation
    from sottovoce.evidence.report import write_report

    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir}: exists and is not empty; choose a new folder")
    if threads:
        torch.set_num_threads(threads)
    baseline = None
    if baseline_method != "none":
        baseline = BaselineConfig(
            method=baseline_method,
            last_k_blocks=baseline_blocks,
            epochs=baseline_epochs,
            learning_rate=baseline_lr,
            seed=seed,
        )
    options = EvaluateOptions(
        members=members,
        checkpoint=checkpoint,
        nonmembers=nonmembers,
        heldout=heldout,
        ood=ood,
        ood_cap=ood_cap,
        reference_models=reference_models if baseline is not None else 0,
        baseline=baseline,
        resamples=resamples,
        seed=seed,
    )
    report = run_evaluation(
        list(run_dirs), options, progress=lambda line: click.echo(line, err=True)
    )
    written = write_report(out_dir, report)
    click.echo(f"wrote {', '.join(str(path) for path in written)}", err=True)


@main.command()
@click.option("--model", "model_name", default="smollm2-135m-instruct", show_default=True)
@user_errors
def fingerprint(model_name: str) -> None:
    """Print a model's fingerprint (for a policy's expected_model_fingerprint)."""
    from sottovoce.common.models import load_model

    click.echo(load_model(model_name, dtype="float32").fingerprint)


@main.command()
@path_option("--policy", "policy_path", required=True)
@path_option("--data", "data_path", required=True)
@user_errors
def ledger(policy_path: Path, data_path: Path) -> None:
    """Show a data set's lifetime ledger: every release, its cost, what remains, refusals."""
    from sottovoce.api import open_ledger
    from sottovoce.client.refusal_log import read_refusals, refusal_log_path

    with open_ledger(policy_path, data_path, read_only=True) as book:
        if book.inherited is not None:
            click.echo(f"data set {book.dataset_id[:12]} {book.inherited.describe()}")
        for line in book.audit_lines():
            click.echo(line)
        refusals = read_refusals(refusal_log_path(book.path))
        for note in refusals[-20:]:
            click.echo(f"refused {note.get('task_id')} ({note.get('code')}): {note.get('message')}")
        summary = book.summary()
        summary["refusals"] = len(refusals)
        click.echo(json.dumps(summary, indent=2))


@main.command()
@path_option("--config", "config_path", required=True)
@path_option("--out", required=True)
@user_errors
def federation(config_path: Path, out: Path) -> None:
    """Split the bundled data into holder folders (data.jsonl + policy.toml each)."""
    from sottovoce.federation import write_federation

    for folder in write_federation(config_path, out):
        click.echo(f"wrote {folder}/data.jsonl and {folder}/policy.toml")


@main.group()
def certs() -> None:
    """Make the certificates of a federation's mutual TLS (a private CA)."""


@certs.command("init")
@path_option("--dir", "folder", required=True)
@user_errors
def certs_init(folder: Path) -> None:
    """Create the federation's CA (ca.pem, ca.key) in a new folder."""
    from sottovoce.common.transport.certs import init_ca

    issued = init_ca(folder)
    click.echo(f"wrote {issued.cert_path} and {issued.key_path} (keep the key offline)")


@certs.command("issue")
@path_option("--dir", "folder", required=True)
@click.option("--name", required=True, help="Holder id, or the coordinator's name.")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Coordinator only: a DNS name or IP address holders dial (repeatable).",
)
@click.option("--days", type=int, default=365, show_default=True)
@user_errors
def certs_issue(folder: Path, name: str, hosts: tuple[str, ...], days: int) -> None:
    """Sign a coordinator certificate (with --host) or a holder certificate (without)."""
    from sottovoce.common.transport.certs import issue

    issued = issue(folder, name, server_hosts=hosts, days=days)
    kind = f"coordinator certificate for {', '.join(hosts)}" if hosts else "holder certificate"
    click.echo(f"wrote {kind}: {issued.cert_path}, {issued.key_path}")


if __name__ == "__main__":
    main()
