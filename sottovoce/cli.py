"""The ``sottovoce`` command: server, client, status, export, simulate, fingerprint, ledger.

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
    from sottovoce.common.config import RunConfig
    from sottovoce.common.transport.channel import TlsConfig

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2
HOLDER_ROWS = 20  # rows of the holders table `sottovoce status` shows


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


def check_config(config_path: Path) -> RunConfig:
    """Validate the run config before the heavy imports (torch, gRPC): a typo costs < 1 s."""
    from sottovoce.common.config import load_config

    return load_config(config_path)


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sottovoce", prog_name="sottovoce")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def main(verbose: bool) -> None:
    """sottovoce: private post-training of language models across data holders."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


@main.command()
@path_option(
    "--config",
    "config_path",
    required=True,
    help='Run config (TOML), e.g. examples/run.toml; see the README, "Config file".',
)
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
@click.option(
    "--metrics-address",
    default=None,
    help="Serve Prometheus metrics on HOST:PORT (default 127.0.0.1:9464; 'off' for none).",
)
@user_errors
def server(
    config_path: Path,
    run_dir: Path | None,
    address: str | None,
    certs: Path | None,
    cert_name: str,
    insecure: bool,
    metrics_address: str | None,
) -> None:
    """Run the coordinator: serve tasks until the run's rounds or bit budget are spent."""
    config = check_config(config_path)
    from sottovoce.common.startup import collect_less_while_serving, start_up

    # The transport first too: its errors in well under a second, before torch,
    # transformers and gRPC are imported (seconds).
    run_dir = run_dir or Path("runs") / config.run.name
    listen = address or config.server.address
    tls = _transport_security(listen, certs, cert_name, insecure)
    # gRPC and the coordinator: given the model's fingerprint ([model] fingerprint) it
    # serves without torch; otherwise the model is loaded here for it.
    with start_up():
        from sottovoce.api import open_coordinator
        from sottovoce.server.grpc_service import serve
        from sottovoce.server.metrics import DEFAULT_METRICS_ADDRESS, CoordinatorMetrics

        coordinator = open_coordinator(config_path, run_dir)
    metrics = None if metrics_address == "off" else CoordinatorMetrics(coordinator)
    if metrics is not None:
        try:
            port = metrics.serve_http(metrics_address or DEFAULT_METRICS_ADDRESS)
            host = (metrics_address or DEFAULT_METRICS_ADDRESS).rsplit(":", 1)[0]
            click.echo(f"metrics on http://{host}:{port}/metrics", err=True)
        except ConfigError as exc:
            if metrics_address is not None:
                raise  # asked for explicitly: an error; the default busy: say so, run on
            click.secho(f"WARNING: {exc}; serving without metrics", fg="yellow", err=True)
    collect_less_while_serving()
    running = serve(coordinator, listen, tls=tls, observer=metrics)
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
        # The report measures the model (torch, transformers): imported once it is needed.
        with start_up():
            from sottovoce.server.run_report import coordinator_report, measure_public_quality

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
@click.option(
    "--metrics-address",
    default=None,
    help="Serve this holder's own metrics on a loopback HOST:PORT (off unless given).",
)
@click.option(
    "--connect-timeout",
    "connect_timeout_s",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the coordinator to answer at start before giving up.",
)
@click.option(
    "--unary",
    is_flag=True,
    help="Make every exchange a unary call instead of a message on one Session stream "
    "(for a proxy on the way that does not pass bidirectional gRPC streams).",
)
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
    metrics_address: str | None,
    connect_timeout_s: float,
    unary: bool,
) -> None:
    """Run a data holder: dial out to the coordinator and answer within the policy."""
    from sottovoce.client.policy import load_policy
    from sottovoce.common.data import load_numbered_records

    # The transport, the policy and the data file first: their errors in well under a
    # second, before torch, transformers and gRPC are imported (seconds).
    tls = _transport_security(address, certs, holder_id, insecure, server_name)
    policy = load_policy(policy_path)
    records, lines = load_numbered_records(data_path, required_fields=policy.fitness.record_fields)

    from sottovoce.common.startup import start_up

    with start_up():  # the imports and the model: seconds, less without the collector
        import torch

        from sottovoce.api import open_holder
        from sottovoce.client.grpc_loop import WireTraffic, run_holder
        from sottovoce.common.storage import atomic_write_json

        if threads:
            torch.set_num_threads(threads)
        holder = open_holder(
            data_path,
            policy_path,
            holder_id=holder_id,
            model_name=model_name,
            dtype=dtype,
            status_path=status_path,
            loaded_inputs=(policy, records, lines),
        )
    click.echo(
        f"{holder_id}: lifetime ledger {holder.ledger.path} ({holder.ledger.spent_bits:.1f} of "
        f"{holder.policy.max_bits:g} bits spent; it is never reset: a new run continues it)",
        err=True,
    )
    if metrics_address is not None:  # off by default: these figures are the holder's own
        from sottovoce.client.metrics import serve_holder_metrics

        port = serve_holder_metrics(holder, metrics_address)
        click.echo(f"{holder_id}: local metrics on port {port} (this machine only)", err=True)
    traffic = WireTraffic()
    finished = run_holder(
        holder,
        address,
        tls=tls,
        traffic=traffic,
        connect_timeout_s=connect_timeout_s,
        streamed=not unary,
    )
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
    from sottovoce.common.startup import start_up
    from sottovoce.server.run_state import coordinator_dir, read_run_config

    read_run_config(coordinator_dir(run_dir))  # not a run: said before torch is imported
    with start_up():
        from sottovoce.server.export import export_run

    result = export_run(run_dir, out_dir)
    click.echo(
        f"wrote {result.out_dir}: {result.steps} steps, log head {result.log_head[:16]}, "
        f"{result.bits_spent:.1f} bits"
    )


@main.command()
@path_option(
    "--config",
    "config_path",
    required=True,
    help="Run config (TOML): examples/run.toml (BBoxER, the demo) or examples/dpzero.toml "
    "(DPZero, differentially private).",
)
@path_option(
    "--run-dir",
    default=None,
    help="New folder for the run (default: runs/<run.name>-<date>-<time>).",
)
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
    """One coordinator and N holder processes on loopback; report before/after.

    --config is a run config (examples/run.toml: BBoxER best-of-8 on the bundled
    movie-review sentiment; examples/dpzero.toml: DPZero, differentially private, at
    epsilon 6). The bundled data is split into a test split no holder sees and one training
    shard per holder; each holder is its own `sottovoce client` process on loopback. Prints
    the run directory, the exported model and next commands at the end.
    """
    check_config(config_path)
    from sottovoce.common.startup import start_up

    with start_up():
        from sottovoce.reporting import next_steps, print_report
        from sottovoce.simulate import simulate as run_simulation

    report = run_simulation(config_path, run_dir=run_dir, report_path=report_path, engine=engine)
    print_report(report)
    for line in next_steps(report):
        click.echo(line)


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
    from sottovoce.common.startup import start_up

    with start_up():
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
    from sottovoce.common.startup import start_up

    with start_up():
        from sottovoce.common.models import load_model

        loaded = load_model(model_name, dtype="float32")
    click.echo(loaded.fingerprint)


@main.command()
@path_option("--policy", "policy_path", required=True)
@path_option("--data", "data_path", required=True)
@path_option(
    "--html",
    "html_path",
    default=None,
    help="Also write the ledger as one self-contained page (for a data-protection officer).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON only.")
@user_errors
def ledger(policy_path: Path, data_path: Path, html_path: Path | None, as_json: bool) -> None:
    """Show a data set's lifetime ledger: every release, its cost, what remains, refusals."""
    from sottovoce.common.startup import start_up

    with start_up():
        from sottovoce.api import open_ledger
        from sottovoce.client.ledger_report import render_html
        from sottovoce.client.refusal_log import read_refusals, refusal_log_path
        from sottovoce.common.storage import atomic_write_text

    with open_ledger(policy_path, data_path, read_only=True) as book:
        refusals = read_refusals(refusal_log_path(book.path))
        summary = book.summary()
        summary["refusals"] = len(refusals)
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        else:
            _print_ledger(book, refusals)
        if html_path is not None:
            atomic_write_text(html_path, render_html(book, refusals))  # 0600: the holder's own
            click.echo(f"wrote {html_path}", err=True)


def _print_ledger(book: Any, refusals: list[dict[str, Any]]) -> None:
    """The ledger as tables: per run, every release, the last refusals, the totals."""
    from rich.console import Console
    from rich.table import Table

    from sottovoce.client.ledger_report import release_rows, run_rows

    console = Console(highlight=False)
    if book.inherited is not None:
        console.print(f"data set {book.dataset_id[:12]} {book.inherited.describe()}")
    runs = Table(title="Per run", title_justify="left")
    for name in ("run", "first answer", "last answer", "answers", "bits", "epsilon"):
        runs.add_column(name, justify="right" if name in ("answers", "bits", "epsilon") else "left")
    for run in run_rows(book):
        epsilon = "-" if run.epsilon is None else f"{run.epsilon:.3f}"
        runs.add_row(run.run_id, run.first, run.last, str(run.answers), f"{run.bits:.2f}", epsilon)
    console.print(runs)
    releases = Table(title="Every release", title_justify="left")
    for name in ("#", "when", "run", "task", "kind", "released", "bits", "total", "dp"):
        releases.add_column(name, justify="right" if name in ("#", "bits", "total") else "left")
    for row in release_rows(book):
        releases.add_row(
            str(row.number), row.time, row.run_id, row.task_id, row.kind, row.released,
            f"{row.bits:.3f}", f"{row.total_bits:.3f}", row.dp or "-",
        )  # fmt: skip
    console.print(releases)
    for note in refusals[-20:]:
        console.print(
            f"refused {note.get('task_id')} ({note.get('code')}): {note.get('message')}",
            markup=False,
        )
    line = f"{book.spent_bits:.2f} of {book.max_bits:g} bits spent, {book.remaining_bits:.2f} left"
    if book.privacy is not None:
        line += (
            f"; epsilon {book.spent_epsilon():.3f} of {book.privacy.max_epsilon:g} "
            f"at delta {book.privacy.delta:g}"
        )
    console.print(f"{len(book.records)} releases, {len(refusals)} refusals; {line}", markup=False)


@main.command()
@path_option("--run-dir", "run_dir", required=True, help="The coordinator's run directory.")
@click.option("--watch", is_flag=True, help="Keep the summary live until the run is over.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON once.")
@user_errors
def status(run_dir: Path, watch: bool, interval: float, as_json: bool) -> None:
    """Where a run stands (rounds, bits, holders), read from its run directory."""
    from rich.console import Console
    from rich.live import Live

    from sottovoce.server.run_summary import dumps, read_summary

    summary = read_summary(run_dir)
    if as_json:
        click.echo(dumps(summary))
        return
    console = Console(highlight=False)
    if not watch:
        console.print(_status_view(summary))
        return
    import time

    with Live(_status_view(summary), console=console, refresh_per_second=4) as live:
        while not summary.finished:
            time.sleep(max(0.1, interval))
            summary = read_summary(run_dir)
            live.update(_status_view(summary))


def _status_view(summary: Any) -> Any:
    """The summary as a rich renderable: a header, two progress bars, the holders."""
    from rich.console import Group
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table
    from rich.text import Text

    from sottovoce.server.run_summary import age

    state = f"finished: {summary.finished_reason}" if summary.finished else "running"
    eta = summary.eta_s
    facts = [f"last round {age(summary.last_round_time)}"]
    if summary.rounds_per_minute:
        facts.append(f"{summary.rounds_per_minute:.1f} rounds/min")
    if eta is not None:
        facts.append(f"about {eta / 60:.1f} min left")
    if summary.step_size is not None:
        facts.append(f"step size {summary.step_size:.4g}")
    header = Text.assemble(
        (f"run {summary.run_id}", "bold"),
        f"  {summary.algorithm} on {summary.model}  ",
        (state, "green" if not summary.finished else "cyan"),
        "\n" + " · ".join(facts),
    )
    bars = Progress(
        TextColumn("{task.description}", justify="right"),
        BarColumn(bar_width=40),
        TextColumn("{task.fields[figure]}"),
        auto_refresh=False,
    )
    bars.add_task(
        "rounds",
        total=max(summary.max_rounds, 1),
        completed=summary.rounds,
        figure=f"{summary.rounds} / {summary.max_rounds} ({summary.accepted_steps} steps accepted)",
    )
    bars.add_task(
        "bits heard",
        total=max(summary.bit_budget, 1e-9),
        completed=summary.bits_total,
        figure=f"{summary.bits_total:.1f} / {summary.bit_budget:g}",
    )
    evicted = {str(e.get("holder")) for e in summary.evictions}
    asked = set(summary.holders_last_round)
    waiting = set(summary.waiting_for)
    known = sorted({*summary.bits_per_holder, *asked, *evicted})
    # waiting first, then the most heard; a federation of thousands shows its first rows
    known.sort(key=lambda h: (h not in waiting, -summary.bits_per_holder.get(h, 0.0), h))
    holders = Table(title=f"holders ({len(known)})", title_justify="left")
    for name in ("holder", "bits heard", "last round", "evicted"):
        holders.add_column(name, justify="right" if name == "bits heard" else "left")
    for holder in known[:HOLDER_ROWS]:
        if holder in waiting:
            last = "waiting for its answer"
        else:
            last = "asked" if holder in asked else "not asked"
        bits = summary.bits_per_holder.get(holder, 0.0)
        holders.add_row(holder, f"{bits:.1f}", last, "yes" if holder in evicted else "")
    if len(known) > HOLDER_ROWS:
        holders.caption = f"and {len(known) - HOLDER_ROWS} more (sottovoce status --json lists all)"
    notes = []
    if summary.refusal_codes:
        codes = ", ".join(f"{code} {n}" for code, n in sorted(summary.refusal_codes.items()))
        notes.append(f"refusals by code: {codes}")
    if summary.evictions:
        notes.append(f"evictions: {len(summary.evictions)}")
    return Group(header, bars, holders, *notes)


@main.command()
@path_option(
    "--config",
    "config_path",
    required=True,
    help="Run config (TOML) whose [simulate] section says how to split the bundled data.",
)
@path_option("--out", required=True)
@user_errors
def federation(config_path: Path, out: Path) -> None:
    """Split the bundled data into holder folders (data.jsonl + policy.toml each)."""
    check_config(config_path)
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
