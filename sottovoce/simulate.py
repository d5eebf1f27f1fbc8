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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sottovoce.api import DTYPES, read_config
from sottovoce.client.evaluator import CandidateEvaluator, PrefixCache, suffix_start
from sottovoce.common.accounting import (
    ACCOUNTANT_NAME,
    NEIGHBOURING_RELATION,
    PrivacyAccountant,
    answer_event,
)
from sottovoce.common.config import RunConfig
from sottovoce.common.data import (
    SentimentSplits,
    records_hash,
    sentiment_records,
    shard,
    split_sentiment,
    write_jsonl,
)
from sottovoce.common.errors import ConfigError, SottovoceError
from sottovoce.common.fitness import build_fitness
from sottovoce.common.messages import DpSpec, RunSpec
from sottovoce.common.models import LoadedModel, load_model
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.quality import (
    TextWindows,
    ood_records,
    quality_section,
    text_windows,
)
from sottovoce.common.stats import accuracy_interval, generalization_slack, mcnemar_pvalue
from sottovoce.evidence.drift import DriftMeter
from sottovoce.evidence.scoring import SharedPrefixScorer
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.export import export_run
from sottovoce.server.grpc_service import serve
from sottovoce.server.run_report import coordinator_report, public_quality_section
from sottovoce.server.run_state import RoundRecord, RunState

Record = dict[str, object]
ENGINES = ("native", "flower")
HELDOUT = "heldout"


@dataclass
class Federation:
    """The files a simulated federation runs on."""

    run_dir: Path
    holder_dirs: list[Path]
    test: list[Record]
    train: list[Record]
    test_hash: str


def default_state_dir() -> Path:
    """Where simulated holders keep their lifetime ledgers (they outlive any one run)."""
    root = os.environ.get("SOTTOVOCE_HOME") or str(Path.home() / ".sottovoce")
    return Path(root) / "ledgers"


def prepare_federation(
    config: RunConfig, run_dir: Path, fingerprint: str, state_dir: Path
) -> Federation:
    """Split the data, write each holder's data file and policy."""
    splits, train = bundled_split(config)
    holder_dirs = write_holder_folders(config, train, run_dir / "holders", fingerprint, state_dir)
    test = list(splits.test if config.simulate.eval_split == "test" else splits.dev)
    return Federation(run_dir, holder_dirs, test, train, records_hash(test))


def bundled_split(config: RunConfig) -> tuple[SentimentSplits, list[Record]]:
    """The bundled sentiment splits of ``[simulate]`` and the training examples given out.

    The holders get the first ``train_size`` of the train split (all of it if 0); the rest
    of it is never given to anyone, which is where ``sottovoce evaluate`` finds non-members.
    """
    sim = config.simulate
    splits = split_sentiment(sentiment_records(), test_size=sim.test_size, dev_size=sim.dev_size)
    return splits, list(splits.train[: sim.train_size] if sim.train_size else splits.train)


def write_holder_folders(
    config: RunConfig, train: list[Record], out: Path, fingerprint: str, ledger_dir: Path
) -> list[Path]:
    """``out/holder-<i>/{data.jsonl, policy.toml}`` for each of ``simulate.holders`` shards.

    ``ledger_dir`` goes into the policies as written: absolute, or relative to each
    policy's own folder (how a holder in a container keeps its ledger next to its data).
    """
    holders = config.simulate.holders
    if len(train) < holders:
        raise ConfigError(f"simulate.train_size: {len(train)} examples for {holders} holders")
    shards = shard(train, holders)
    smallest = min(len(records) for records in shards)
    wanted = config.privacy.examples_per_holder
    if wanted is not None and wanted > smallest:
        raise ConfigError(
            f"privacy.examples_per_holder: {wanted}, but the smallest simulated holder has "
            f"{smallest} examples (set it to at most {smallest})"
        )
    holder_dirs = []
    for index, records in enumerate(shards):
        holder_dir = out / f"holder-{index}"
        holder_dir.mkdir(parents=True)
        write_jsonl(holder_dir / "data.jsonl", records)
        (holder_dir / "policy.toml").write_text(
            holder_policy_toml(config, fingerprint, ledger_dir), encoding="utf-8"
        )
        holder_dirs.append(holder_dir)
    return holder_dirs


def write_federation(config_path: Path, out: Path) -> list[Path]:
    """The bundled data split into holder folders, as `sottovoce federation` writes them.

    For a deployment on one machine or with Docker (``docker/compose.yaml``): each folder
    holds one holder's training shard and a policy allowing exactly this run, with its
    ledger in the folder's own ``ledger/``. The test split is not written.
    """
    config, _ = read_config(config_path)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; choose a new --out")
    fingerprint = config.model.fingerprint or load_model(config.model.name).fingerprint
    _, train = bundled_split(config)
    return write_holder_folders(config, train, out, fingerprint, Path("ledger"))


def holder_policy_toml(config: RunConfig, fingerprint: str, state_dir: Path) -> str:
    """A policy that allows exactly this run's setting (what a cautious holder would write)."""
    fit = config.fitness
    q = json.dumps  # TOML basic strings accept JSON string escapes
    words = ", ".join(q(w) for w in fit.label_words)
    if config.run.algorithm == "dpzero":
        max_lambda = 1
        max_scale = max(config.dpzero.smoothing, config.dpzero.max_coefficient)
    else:
        max_lambda, max_scale = config.optimizer.candidates, config.optimizer.max_step
    return f"""# Written by `sottovoce simulate` for one simulated data holder.
max_bits = {config.simulate.max_holder_policy_bits}
expected_model_fingerprint = {q(fingerprint)}
allowed_algorithms = [{q(config.run.algorithm)}]
allowed_parametrizations = [{q(config.parametrization.kind)}]
max_lambda = {max_lambda}
max_perturbation_scale = {max_scale!r}
min_batch_size = {min(16, config.evaluation.batch_size)}
allowed_batch_modes = [{q(config.evaluation.mode)}]
ledger_dir = {q(str(state_dir))}
{_privacy_policy(config)}
[fitness]
kind = {q(fit.kind)}
prompt_template = {q(fit.prompt_template)}
label_words = [{words}]
text_field = {q(fit.text_field)}
label_field = {q(fit.label_field)}
target_field = {q(fit.target_field)}
"""


def _privacy_policy(config: RunConfig) -> str:
    """The policy's (ε, δ) lines: by default exactly the ε this run needs, no more."""
    dp = config.privacy
    if config.simulate.max_holder_policy_epsilon is not None:
        epsilon = config.simulate.max_holder_policy_epsilon
    elif config.run.algorithm == "dpzero" and dp.epsilon is not None:
        epsilon = dp.epsilon * (1 + 1e-4)  # calibration's tolerance
    elif dp.randomized_response_epsilon is not None:
        event = answer_event(
            config.dp_spec(), config.answer_kind, config.optimizer.candidates, None
        )
        assert event is not None  # randomized response is on
        epsilon = PrivacyAccountant([event] * config.run.max_rounds).epsilon(dp.delta) * (1 + 1e-4)
    else:
        return ""
    return f"max_epsilon = {epsilon!r}\ndelta = {dp.delta!r}\nrequire_dp = true\n"


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


class HeldOut:
    """Held-out scoring of base and trained model, sharing the prefix computation."""

    def __init__(self, config: RunConfig, loaded: LoadedModel):
        model = loaded.model
        if DTYPES[config.model.dtype] != torch.float32:
            model.to(DTYPES[config.model.dtype])
        self.parametrization = build_parametrization(config.parametrization.to_spec())
        self.parametrization.attach(model)
        fitness = build_fitness(config.fitness.to_spec(), loaded.tokenizer)
        self.evaluator = CandidateEvaluator(model, self.parametrization, fitness)
        self.cache = PrefixCache()
        self.tokenizer = loaded.tokenizer

    def correct(self, examples: list[Record], *, reuse: bool = True) -> np.ndarray:
        _, correct = self.evaluator.score_incumbent(examples, self.cache if reuse else None)
        return correct

    def quality_meter(
        self, heldout: list[Record], ood: dict[str, list[Record]]
    ) -> tuple[DriftMeter, TextWindows]:
        """Measure the base (the model at x = 0) on the held-out split, the out-of-domain sets
        and the general text, keeping the prefix the run's model shares with it."""
        model = self.evaluator.model
        split = suffix_start(model, self.parametrization.touched_modules())
        scorer = SharedPrefixScorer(model, self.evaluator.fitness, split)
        scorer.add(HELDOUT, heldout)
        for name, records in ood.items():
            scorer.add(name, records)
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        windows = text_windows(self.tokenizer, max_positions=positions)
        meter = DriftMeter(scorer, model, prompt_sets=[HELDOUT, *ood], windows=windows)
        return meter, windows


def mean_holder_score(federation: Federation) -> float | None:
    """Mean of the holders' latest incumbent minibatch score (from their local status files)."""
    scores = []
    for holder_dir in federation.holder_dirs:
        status = read_json_object(holder_dir / "status.json")
        if status is not None and status.get("last_incumbent_score") is not None:
            scores.append(float(status["last_incumbent_score"]))
    return float(np.mean(scores)) if scores else None


def run_rounds(
    coordinator: Coordinator,
    federation: Federation,
    processes: list[subprocess.Popen[bytes]],
    console: Console,
) -> None:
    """Wait for the run to finish, showing progress; fail fast if a holder process dies."""
    config = coordinator.config
    accepted = [0]
    progress = Progress(
        TextColumn("[bold]round {task.completed:>4.0f}/{task.total:.0f}"),
        BarColumn(),
        TextColumn("{task.fields[bits]}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )
    bar = progress.add_task("rounds", total=config.run.max_rounds, bits="", info="")

    def on_round(record: RoundRecord, state: RunState) -> None:
        accepted[0] += record.step is not None
        score = mean_holder_score(federation)
        progress.update(
            bar,
            completed=record.round_index + 1,
            bits=f"bits {state.bits_total:.0f}/{config.run.bit_budget:g}",
            info=f"accepted {accepted[0]}  step {record.step_size_after:.4f}"
            + (f"  incumbent {score:.3f}" if score is not None else ""),
        )

    coordinator.add_listener(on_round)
    with progress:
        while not coordinator.wait_finished(timeout_s=2.0):
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
        from sottovoce.client.flower_app import holder_from_node_config, make_client_app
        from sottovoce.server.flower_app import DriverSettings, make_server_app, run_in_process
    except ImportError as exc:
        raise ConfigError(
            f"--engine flower needs flwr: pip install 'sottovoce[flower]' ({exc})"
        ) from None

    config = coordinator.config
    idle_s = 2 * config.server.round_timeout_s + 60.0
    server_app = make_server_app(lambda _: coordinator, DriverSettings(idle_timeout_s=idle_s))
    client_app, nodes = make_client_app(holder_from_node_config)
    run_config = {
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
    console.print(f"loading {config.model.name} ...")
    loaded = load_model(config.model.name, dtype="float32")
    run_dir.mkdir(parents=True, exist_ok=True)
    federation = prepare_federation(
        config, run_dir, loaded.fingerprint, state_dir or default_state_dir()
    )
    held_out = HeldOut(config, loaded)
    console.print(
        f"held-out split: {len(federation.test)} examples, sha256 {federation.test_hash[:16]}"
    )
    ood = ood_records()
    console.print("measuring the base model: held-out, out-of-domain, general text ...")
    meter, windows = held_out.quality_meter(federation.test, ood)
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
    coordinator_view = coordinator_report(
        config,
        state,
        coordinator.spec,
        public_quality=public_quality_section(meter.base, tuned, windows, ood),
    )
    state.write_report(coordinator_view)  # what `sottovoce server` writes, too
    if "privacy" in report:
        report["privacy"]["as_computed_by_the_coordinator"] = coordinator_view.get(
            "privacy_as_computed_by_the_coordinator"
        )
    report["exported_model"] = str(export.out_dir)
    report["wall_seconds"] = round(time.time() - started, 1)
    text = json.dumps(report, indent=2, sort_keys=True)
    (run_dir / "report.json").write_text(text, encoding="utf-8")
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(text, encoding="utf-8")
    return report


def build_report(
    config: RunConfig,
    spec: RunSpec,
    state: RunState,
    federation: Federation,
    before: np.ndarray,
    after: np.ndarray,
    train_errors: int,
) -> dict[str, Any]:
    """The final report (the fields the README documents)."""
    acc_before, lo_before, hi_before = accuracy_interval(before.tolist())
    acc_after, lo_after, hi_after = accuracy_interval(after.tolist())
    mcnemar = mcnemar_pvalue(before.tolist(), after.tolist())
    n_train = len(federation.train)
    delta = config.run.bound_delta
    slack = generalization_slack(state.bits_total, n_train, delta)
    train_risk = train_errors / n_train
    how = (
        "each comparison used the holder's whole training split"
        if config.evaluation.mode == "full"
        else "the answers were computed from secret minibatches of them"
    )
    return {
        "algorithm": config.run.algorithm,
        "parametrization": json.loads(config.parametrization.to_spec().canonical_id()),
        "model": config.model.name,
        "compute_dtype": config.model.dtype,
        "rounds": len(state.rounds),
        "accepted_steps": state.log.version,
        "finished_reason": state.finished_reason,
        "bit_budget": config.run.bit_budget,
        "bits_spent_total": state.bits_total,
        "bits_spent_per_holder": dict(sorted(state.bits_per_holder.items())),
        "heldout_split": config.simulate.eval_split,
        "heldout_examples": len(federation.test),
        "heldout_sha256": federation.test_hash,
        "heldout_metric": "accuracy",
        "heldout_metric_before": acc_before,
        "heldout_metric_before_ci95": [lo_before, hi_before],
        "heldout_metric_after": acc_after,
        "heldout_metric_after_ci95": [lo_after, hi_after],
        "mcnemar": {
            "improved": mcnemar.improved,
            "worsened": mcnemar.worsened,
            "p_value": mcnemar.p_value,
        },
        "generalization_bound": {
            "train_risk": train_risk,
            "n": n_train,
            "n_is": f"all training examples of all holders ({how}); the train risk is the "
            "final model's error on all of them, pooled from the holders' local reports. The "
            "2^bits possible outputs are fixed by the coordinator's seeds before any data is "
            "seen, so Hoeffding plus a union bound over them holds.",
            "delta": delta,
            "slack": slack,
            "test_risk_bound": train_risk + slack,
            "measured_test_risk": 1.0 - acc_after,
        },
        "run_id": state.run_id,
        "log_head": state.log.head,
        **_dp_report(config, spec.dp, state, federation),
    }


def _dp_report(
    config: RunConfig, spec: DpSpec, state: RunState, federation: Federation
) -> dict[str, Any]:
    """ε per holder from the holders' own ledgers (read as their operator), and the curve
    of the holders' local training fitness, for DP runs."""
    if config.run.algorithm != "dpzero" and config.privacy.randomized_response_epsilon is None:
        return {}
    holders: dict[str, Any] = {}
    curves = []
    for index, holder_dir in enumerate(federation.holder_dirs):
        report = read_json_object(holder_dir / "report.json") or {}
        status = read_json_object(holder_dir / "status.json") or {}
        holders[f"holder-{index}"] = {
            key: report.get(key)
            for key in (
                "dp_answers_this_run",
                "epsilon_this_run",
                "lifetime_epsilon_spent",
                "lifetime_epsilon_max",
                "epsilon_delta",
            )
        }
        curves.append(status.get("history") or [])
    length = min((len(c) for c in curves), default=0)
    curve = [float(np.mean([c[i] for c in curves])) for i in range(length)]
    return {
        "privacy": {
            "accountant": ACCOUNTANT_NAME,
            "neighbouring_relation": NEIGHBOURING_RELATION,
            "target_epsilon": spec.epsilon or None,
            "delta": config.privacy.delta,
            "noise_multiplier": spec.noise_multiplier,
            "randomized_response_epsilon": spec.randomized_response_epsilon or None,
            "sampling_rate": config.sampling_rate,
            "clip": spec.clip if config.run.algorithm == "dpzero" else None,
            "quantization_bits": spec.quantization_bits,
            "steps": len(state.rounds),
            "per_holder": holders,
        },
        "training_fitness_curve": {
            "what": "mean over holders of each holder's local score on its own answer batch "
            "(mean log-probability of the right label), one point per answered task; "
            "read from the holders' status files, never sent to the coordinator",
            "points": curve,
        },
    }


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object written by another process (a holder's report or status), or None if
    it is missing, torn or not an object: such files are read, never trusted to exist."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def pooled_train_errors(federation: Federation, log_head: str) -> int | None:
    """Training errors of the final model, summed over the holders' local reports.

    The simulation plays every holder's operator, so it may read their local reports; a
    report made on another log head (a holder that did not reach the final model) does not
    count, and then the caller scores the training data itself.
    """
    errors = 0
    for holder_dir in federation.holder_dirs:
        report = read_json_object(holder_dir / "report.json")
        if report is None or report.get("log_head") != log_head:
            return None
        errors += int(report["train_errors"])
    return errors


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
