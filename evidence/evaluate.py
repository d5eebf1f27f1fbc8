"""``sottovoce evaluate``: utility, membership inference, the bound and cost for runs.

One or more runs on the same data (say BBoxER and DPZero) are measured side by side with a
backprop baseline trained on the same members to the same utility, and with the base model
as the control that never saw the data. What each figure means is in the report itself
(:mod:`sottovoce.evidence.report`); how the example sets are formed is in
:mod:`sottovoce.evidence.datasets`.

This runs with the operator's access to the training data: a tool for the data holders and
auditors, never something the coordinator can run on their data.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sottovoce.client.evaluator import suffix_start
from sottovoce.common.bounds import Complexity, bound_report, generalization_slack
from sottovoce.common.config import RunConfig
from sottovoce.common.data import Record, canonical_line, load_records
from sottovoce.common.errors import ConfigError, DataError
from sottovoce.common.fitness import ExampleScores, build_fitness
from sottovoce.common.models import LoadedModel, load_model
from sottovoce.common.quality import TextWindows, quality_section, text_windows
from sottovoce.common.stats import accuracy_interval, mcnemar_pvalue
from sottovoce.common.storage import read_json_object
from sottovoce.evidence.baseline import BaselineConfig, TrainingResult, train
from sottovoce.evidence.baseline_process import BaselineJob, train_in_own_process
from sottovoce.evidence.datasets import (
    DEFAULT_OOD_CAP,
    DEFAULT_SELECTION,
    EvaluationData,
    bundled_sentiment_data,
    carve,
    read_members,
    read_ood,
)
from sottovoce.evidence.drift import DriftMeter
from sottovoce.evidence.membership import (
    AttackResult,
    evaluate_attack,
    loss_threshold_scores,
    offline_lira_scores,
)
from sottovoce.evidence.scoring import SharedPrefixScorer, changed_tensors
from sottovoce.server.export import LOG_FILE, read_run_log, replay
from sottovoce.server.run_state import REPORT, coordinator_dir, read_run_config

BASE = "base model (never saw the data)"
BASELINE = "backprop baseline"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class EvaluateOptions:
    """What to evaluate against; the defaults suit a run of the bundled sentiment demo."""

    members: tuple[Path, ...] = ()
    checkpoint: Path | None = None
    nonmembers: Path | None = None
    heldout: Path | None = None
    ood: tuple[str, ...] = ("amazon",)
    reference_models: int = 4
    baseline: BaselineConfig | None = field(default_factory=BaselineConfig)
    selection_size: int = DEFAULT_SELECTION
    ood_cap: int = DEFAULT_OOD_CAP
    resamples: int = 1000
    seed: int = 0
    max_batch: int = 32
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.reference_models == 1 or self.reference_models < 0:
            raise ConfigError("--reference-models: 0 (no LiRA) or at least 2")
        if (self.nonmembers is None) != (self.heldout is None):
            raise ConfigError("--nonmembers and --heldout go together")
        if self.reference_models and self.baseline is None:
            raise ConfigError("LiRA's reference models are trained like the baseline: keep it")


@dataclass
class RunUnderTest:
    """One run's folder: its config, log, bits, report and holders' reports."""

    name: str
    folder: Path
    state_dir: Path
    config: RunConfig
    report: dict[str, Any] | None
    holder_reports: list[dict[str, Any]]
    member_files: list[Path]


def open_run(folder: Path) -> RunUnderTest:
    """Read what an evaluation needs from a run folder (simulate's, or the server's)."""
    if not folder.is_dir():
        raise ConfigError(f"--run {folder}: not a folder")
    state_dir = coordinator_dir(folder)
    config, meta = read_run_config(state_dir)
    holders = sorted((folder / "holders").glob("holder-*"))
    return RunUnderTest(
        name=f"{config.run.algorithm} ({meta['run_id']})",
        folder=folder,
        state_dir=state_dir,
        config=config,
        report=read_json_object(folder / "report.json"),
        holder_reports=[r for h in holders if (r := read_json_object(h / "report.json"))],
        member_files=[h / "data.jsonl" for h in holders if (h / "data.jsonl").exists()],
    )


def evaluate(
    folders: Sequence[Path], options: EvaluateOptions, progress: Progress = print
) -> dict[str, Any]:
    """Measure the runs in ``folders`` (same data and model) and return the report."""
    started = time.perf_counter()
    runs = [open_run(folder) for folder in folders]
    if not runs:
        raise ConfigError("give at least one --run")
    if options.checkpoint is not None and len(runs) != 1:
        raise ConfigError("--checkpoint: give exactly one --run (the run it was exported from)")
    config = _common_config(runs)
    fitness_spec = config.fitness
    members = read_members(options.members or runs[0].member_files, fitness_spec)
    _check_same_members(runs, members, options)
    data = evaluation_data(config, members, options)
    progress(f"loading {config.model.name} ...")
    loaded = load_model(config.model.name, dtype="float32", cache_dir=options.cache_dir)
    fitness = build_fitness(fitness_spec, loaded.tokenizer)
    run_models, run_bits = {}, {}
    for run in runs:
        run_models[run.name], run_bits[run.name] = run_model(loaded, run, options.checkpoint)
    scorer = SharedPrefixScorer(
        loaded.model,
        fitness,
        _split(loaded.model, run_models, options),
        max_batch=options.max_batch,
    )
    progress(f"running the shared prefix (first changed block: {scorer.split}) on every set ...")
    sets = _named_sets(data)
    for name, records in sets.items():
        progress(f"  {name}: {len(records)} examples")
        scorer.add(name, records)
    names = list(sets)
    progress("measuring the base on the general text and the prompts' next-token distributions ...")
    meter, windows = _drift_meter(scorer, loaded, data)
    scores = {BASE: _score_all(scorer, loaded.model, names)}
    for name, model in run_models.items():
        scores[name] = _score_all(scorer, model, names)
    baseline: TrainingResult | None = None
    baseline_cost: dict[str, Any] | None = None
    if options.baseline is not None:
        target = max(scores[name]["selection"].accuracy() for name in run_models)
        progress(f"training the backprop baseline to selection accuracy {target:.3f} ...")
        job = BaselineJob(
            model_name=config.model.name,
            fitness=fitness_spec,
            members=data.members,
            selection=data.selection,
            config=options.baseline,
            target_accuracy=target,
            max_batch=options.max_batch,
            threads=torch.get_num_threads(),
            cache_dir=options.cache_dir,
        )
        baseline, baseline_cost = train_in_own_process(job, loaded.model)
        scores[BASELINE] = _score_all(scorer, baseline.model, names)
    quality = {
        name: _quality(meter, model, windows, data)
        for name, model in [
            *run_models.items(),
            *([(BASELINE, baseline.model)] if baseline else []),
        ]
    }
    references = _reference_scores(loaded.model, scorer, options, baseline, progress)
    progress("attacking ...")
    attacks = {
        name: _attacks(model_scores, references, options) for name, model_scores in scores.items()
    }
    report = {
        "what": "sottovoce evaluate: utility, membership inference, the bound and cost",
        "runs": [str(run.folder) for run in runs],
        "model": config.model.name,
        "base_fingerprint": loaded.fingerprint,
        "fitness": json.loads(json.dumps(fitness_spec.__dict__, default=list)),
        "data": data.summary(),
        "utility": _utility(scores, data),
        "quality": quality,
        "membership_inference": {
            "members": len(data.members),
            "nonmembers": len(data.nonmembers),
            "reference_models": options.reference_models,
            "how": _attack_method(options),
            "results": {name: [a.to_json() for a in result] for name, result in attacks.items()},
        },
        "bound": {
            run.name: _bound(run, run_bits[run.name], scores[run.name], data) for run in runs
        },
        "baseline": _baseline_report(options.baseline, baseline),
        "cost": _cost(runs, baseline_cost, loaded),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    report["_curves"] = {
        name: {a.attack: (a.fpr, a.tpr) for a in result} for name, result in attacks.items()
    }
    return report


def evaluation_data(
    config: RunConfig, members: list[Record], options: EvaluateOptions
) -> EvaluationData:
    """The example sets: carved from the bundled data, or from the auditor's files."""
    fitness = config.fitness
    if options.nonmembers is None or options.heldout is None:
        return bundled_sentiment_data(
            config,
            members,
            ood=options.ood,
            selection_size=options.selection_size,
            ood_cap=options.ood_cap,
            seed=options.seed,
        )
    fields = fitness.record_fields
    return carve(
        members,
        load_records(options.nonmembers, fields),
        load_records(options.heldout, fields),
        heldout_name=options.heldout.stem,
        ood=read_ood(options.ood, fitness, options.ood_cap, options.seed),
        selection_size=options.selection_size,
        seed=options.seed,
        source=f"non-members from {options.nonmembers}, held-out {options.heldout}",
    )


def run_model(
    loaded: LoadedModel, run: RunUnderTest, checkpoint: Path | None = None
) -> tuple[nn.Module, float]:
    """The run's trained model and the bits it cost.

    The model is base + the run's verified log, replayed; or, with ``checkpoint``, the
    weights of an exported checkpoint of that run (checked to carry the run's log head).
    """
    log, bits = read_run_log(run.state_dir, run.config, loaded.fingerprint)
    model = copy.deepcopy(loaded.model)
    if checkpoint is None:
        model.load_state_dict(replay(loaded, run.config, log))
    else:
        model.load_state_dict(exported_weights(checkpoint, loaded.fingerprint, log.head))
    return model, bits


def exported_weights(checkpoint: Path, fingerprint: str, log_head: str) -> dict[str, Any]:
    """The weights of a ``sottovoce export`` folder, after checking it is of this run."""
    card = read_json_object(checkpoint / LOG_FILE)
    if card is None:
        raise ConfigError(f"--checkpoint {checkpoint}: no {LOG_FILE} (not a sottovoce export)")
    if card.get("base_fingerprint") != fingerprint or card.get("log_head") != log_head:
        raise ConfigError(
            f"--checkpoint {checkpoint}: exported from base {card.get('base_fingerprint')} at "
            f"log head {str(card.get('log_head'))[:12]}, not this run's ({log_head[:12]})"
        )
    # The project's loader: a Hugging Face folder, tied weights restored by transformers.
    return load_model(str(checkpoint)).model.state_dict()


# -- scoring ---------------------------------------------------------------------------------
def _drift_meter(
    scorer: SharedPrefixScorer, loaded: LoadedModel, data: EvaluationData
) -> tuple[DriftMeter, TextWindows]:
    """The base's side of the quality measures, on the held-out and out-of-domain sets."""
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    windows = text_windows(loaded.tokenizer, max_positions=positions)
    prompt_sets = ["heldout", *[f"ood:{name}" for name in data.ood]]
    return DriftMeter(scorer, loaded.model, prompt_sets=prompt_sets, windows=windows), windows


def _quality(
    meter: DriftMeter, model: nn.Module, windows: TextWindows, data: EvaluationData
) -> dict[str, Any]:
    """Is ``model`` still a language model: perplexity ratio, out-of-domain accuracy, KL."""
    sets = {"heldout": data.heldout, **{f"ood:{n}": r for n, r in data.ood.items()}}
    roles = {"heldout": f"in-domain held-out ({data.heldout_name})"}
    roles |= {f"ood:{name}": "out-of-domain" for name in data.ood}
    return quality_section(
        meter.base, meter.measure(model), windows=windows, sets=sets, roles=roles
    )


def _named_sets(data: EvaluationData) -> dict[str, list[Record]]:
    return {
        "members": data.members,
        "nonmembers": data.nonmembers,
        "selection": data.selection,
        "heldout": data.heldout,
        "pool": data.reference_pool,
        **{f"ood:{name}": records for name, records in data.ood.items()},
    }


def _score_all(
    scorer: SharedPrefixScorer, model: nn.Module, names: Sequence[str]
) -> dict[str, ExampleScores]:
    return {name: scorer.score(model, name) for name in names if name != "pool"}


def _split(
    base: nn.Module, run_models: dict[str, nn.Module], options: EvaluateOptions
) -> int | None:
    """The first block any evaluated model changes; None if one changes the embeddings."""
    splits = [suffix_start(base, changed_tensors(base, model)) for model in run_models.values()]
    if options.baseline is not None:
        splits.append(options.baseline.first_trained_block(base))
    known = [split for split in splits if split is not None]
    return None if len(known) < len(splits) else min(known)


def _reference_scores(
    base: nn.Module,
    scorer: SharedPrefixScorer,
    options: EvaluateOptions,
    baseline: TrainingResult | None,
    progress: Progress,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """LiRA's reference models: each trained on a random half of the pool's batches."""
    if not options.reference_models or options.baseline is None or baseline is None:
        return []
    rng = np.random.default_rng(options.seed)
    n_batches = scorer.n_batches("pool")
    scores = []
    for k in range(options.reference_models):
        progress(f"reference model {k + 1}/{options.reference_models} ...")
        half = rng.permutation(n_batches)[: max(1, n_batches // 2)]
        scorer.add_subset(f"reference-{k}", "pool", half.tolist())
        config = dataclasses.replace(options.baseline, seed=options.baseline.seed + k + 1)
        model = train(base, scorer, f"reference-{k}", config, epochs=baseline.epochs_run).model
        scores.append(
            (scorer.score(model, "members").score, scorer.score(model, "nonmembers").score)
        )
        del model
    return scores


def _attacks(
    scores: dict[str, ExampleScores],
    references: list[tuple[np.ndarray, np.ndarray]],
    options: EvaluateOptions,
) -> list[AttackResult]:
    members, nonmembers = scores["members"].score, scores["nonmembers"].score
    results = [
        evaluate_attack(
            "loss-threshold",
            loss_threshold_scores(members),
            loss_threshold_scores(nonmembers),
            resamples=options.resamples,
            seed=options.seed,
        )
    ]
    if references:
        results.append(
            evaluate_attack(
                "offline-LiRA",
                offline_lira_scores(members, [m for m, _ in references]),
                offline_lira_scores(nonmembers, [n for _, n in references]),
                resamples=options.resamples,
                seed=options.seed,
            )
        )
    return results


def _attack_method(options: EvaluateOptions) -> str:
    lira = (
        f" Offline LiRA: {options.reference_models} reference models, each trained like the "
        "backprop baseline (same epochs) on a random half of the reference pool, which holds "
        "neither members nor non-members; global variance. For the runs this is a "
        "reference learner other than the target's own (the standard offline-LiRA caveat); "
        "it calibrates per-example difficulty, which is what LiRA adds to the loss attack."
        if options.reference_models
        else " LiRA was not run (--reference-models 0)."
    )
    return (
        "Members: every training example of every holder. Non-members: as many examples from "
        "the same distribution that no holder had. Loss threshold: score = the right label's "
        "log-probability." + lira + " Intervals: percentile bootstrap, members and non-members "
        "resampled independently. TPR at an FPR alpha is given only with at least 1/alpha "
        "non-members. Cost: a holder's figures are those of its own process (its local "
        "report); the baseline's are those of a fresh process that loads the model, runs the "
        "frozen blocks once on the pooled members and the selection set, and trains."
    )


# -- utility, bound, cost ----------------------------------------------------------------------
def _utility(scores: dict[str, dict[str, ExampleScores]], data: EvaluationData) -> dict[str, Any]:
    shown = ["heldout", *[f"ood:{name}" for name in data.ood], "members"]
    table: dict[str, Any] = {}
    for model_name, by_set in scores.items():
        row: dict[str, Any] = {}
        for set_name in shown:
            correct = by_set[set_name].correct.tolist()
            accuracy, low, high = accuracy_interval(correct)
            entry: dict[str, Any] = {"accuracy": accuracy, "ci95": [low, high], "n": len(correct)}
            if model_name != BASE:
                test = mcnemar_pvalue(scores[BASE][set_name].correct.tolist(), correct)
                entry["mcnemar_vs_base"] = {
                    "improved": test.improved,
                    "worsened": test.worsened,
                    "p_value": test.p_value,
                }
            row[_set_label(set_name, data)] = entry
        table[model_name] = row
    return table


def _set_label(name: str, data: EvaluationData) -> str:
    if name == "heldout":
        return f"{data.heldout_name} (in-domain)"
    if name.startswith("ood:"):
        return f"{name[4:]} (out-of-domain)"
    return "members (train)"


def _complexity(run: RunUnderTest, bits: float) -> Complexity | None:
    """The run's transcript cost, from the coordinator's own report (None for a run made
    before the coordinator wrote it: then only the old bound is given)."""
    coordinator = read_json_object(run.state_dir / REPORT) or {}
    raw = coordinator.get("generalization_complexity")
    if not isinstance(raw, dict):
        return None
    return Complexity(
        transcript_bits=float(raw["transcript_bits"]),
        grid_bits=float(raw.get("grid_bits", 0.0)),
        heard_bits=bits,
        rounds=int(raw["rounds"]),
        code=str(raw.get("code", "")),
    )


def _bound(
    run: RunUnderTest, bits: float, scores: dict[str, ExampleScores], data: EvaluationData
) -> dict[str, Any]:
    """The bits bound from the bits spent, next to the measured train-test gap."""
    n = len(data.members)
    delta = run.config.run.bound_delta
    train_risk = 1.0 - scores["members"].accuracy()
    test_risk = 1.0 - scores["heldout"].accuracy()
    slack = generalization_slack(bits, n, delta)
    bound: dict[str, Any] = {
        "bits_spent": bits,
        "n": n,
        "delta": delta,
        "train_risk": train_risk,
        "slack": slack,
        "test_risk_bound": train_risk + slack,
        "measured_test_risk": test_risk,
        "measured_gap": test_risk - train_risk,
    }
    complexity = _complexity(run, bits)
    if complexity is not None:
        bound["transcript"] = bound_report(
            complexity,
            train_risk,
            n,
            delta,
            measured_test_risk=test_risk,
            extra_assumptions=("n: the members (the holders' training files), pooled",),
        )
    privacy = (run.report or {}).get("privacy")
    if privacy:
        per_holder = privacy.get("per_holder", {})
        bound["dp"] = {
            "target_epsilon": privacy.get("as_computed_by_the_coordinator", {}).get(
                "target_epsilon"
            ),
            "delta": privacy.get("delta"),
            "noise_multiplier": privacy.get("noise_multiplier"),
            "epsilon_this_run_max_over_holders": max(
                (h.get("epsilon_this_run") or 0.0 for h in per_holder.values()), default=None
            ),
            "accountant": privacy.get("accountant"),
        }
    return bound


def _baseline_report(
    config: BaselineConfig | None, result: TrainingResult | None
) -> dict[str, Any] | None:
    if config is None or result is None:
        return None
    return {
        "config": dict(config.__dict__),
        "epochs_run": result.epochs_run,
        "steps": result.steps,
        "selection_accuracy_by_epoch": result.selection_accuracy,
        "reached_target_utility": result.reached_target,
        "trainable_parameters": result.trainable_parameters,
    }


def _cost(
    runs: Sequence[RunUnderTest], baseline: dict[str, Any] | None, loaded: LoadedModel
) -> dict[str, Any]:
    """Wall time, compute, forward passes, memory and bytes on the wire: runs and baseline.

    A holder's figures are its own process's (from its local report); the baseline's are
    those of the process that trained it (:mod:`~sottovoce.evidence.baseline_process`).
    """
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    cost: dict[str, Any] = {"model_parameter_bytes": model_bytes, "runs": {}}
    for run in runs:
        holders = [r.get("cost", {}) for r in run.holder_reports]
        cost["runs"][run.name] = {
            "wall_seconds": (run.report or {}).get("wall_seconds"),
            "holders": len(holders),
            "threads_per_holder": run.config.simulate.threads_per_holder,
            "holder_compute_seconds_max": _max(holders, "compute_seconds"),
            "holder_forward_passes_max": _max(holders, "forward_passes"),
            "holder_peak_rss_bytes_max": _max(holders, "peak_rss_bytes"),
            "wire_bytes_total": sum(
                int(h.get("bytes_sent", 0)) + int(h.get("bytes_received", 0)) for h in holders
            )
            or None,
            "answers_per_holder": _max(holders, "answers"),
        }
    if baseline is not None:
        cost["baseline"] = baseline
    return cost


def _max(rows: Sequence[dict[str, Any]], key: str) -> Any:
    values = [row[key] for row in rows if row.get(key) is not None]
    return max(values) if values else None


# -- checks ------------------------------------------------------------------------------------
def _common_config(runs: Sequence[RunUnderTest]) -> RunConfig:
    first = runs[0].config
    for run in runs[1:]:
        if run.config.model.name != first.model.name:
            raise ConfigError(
                f"--run {run.folder}: model {run.config.model.name}, not {first.model.name}"
            )
        if run.config.fitness != first.fitness:
            raise ConfigError(f"--run {run.folder}: a different fitness than {runs[0].folder}")
    return first


def _check_same_members(
    runs: Sequence[RunUnderTest], members: list[Record], options: EvaluateOptions
) -> None:
    if options.members:
        return
    expected = sorted(canonical_line(r) for r in members)
    for run in runs[1:]:
        theirs = read_members(run.member_files, run.config.fitness)
        if sorted(canonical_line(r) for r in theirs) != expected:
            raise DataError(f"--run {run.folder}: its holders had other data than {runs[0].folder}")
