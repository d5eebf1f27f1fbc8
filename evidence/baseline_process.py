"""The backprop baseline trained in a process of its own, so its cost is measured like a holder's.

A holder's cost is its own process: model, caches, answering. To put the baseline's cost
next to it honestly, the baseline is trained the same way: a fresh process loads the model,
runs the frozen prefix on the pooled training data and the selection set, trains, and
reports its wall time, forward passes and peak resident memory. The trained weights come
back to the evaluation through a file, so the model that is attacked is the one measured.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sottovoce.common.data import Record
from sottovoce.common.errors import SottovoceError
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import load_model
from sottovoce.common.protocol.messages import FitnessSpec
from sottovoce.common.resources import peak_rss_bytes
from sottovoce.common.startup import call_started_up, start_up
from sottovoce.evidence.baseline import BaselineConfig, TrainingResult, train, trainable_copy
from sottovoce.evidence.scoring import SharedPrefixScorer

RESULT = "result.json"
WEIGHTS = "weights.pt"


class BaselineProcessError(SottovoceError):
    """The baseline's own process failed or returned weights that do not fit the model."""


@dataclass(frozen=True)
class BaselineJob:
    """Everything the baseline's process needs (picklable: it crosses a spawn)."""

    model_name: str
    fitness: FitnessSpec
    members: list[Record]
    selection: list[Record]
    config: BaselineConfig
    target_accuracy: float | None
    max_batch: int
    threads: int
    cache_dir: Path | None = None


def train_in_own_process(
    job: BaselineJob, base: nn.Module
) -> tuple[TrainingResult, dict[str, Any]]:
    """Train the baseline in a fresh process; return it (on ``base``'s copy) and its cost."""
    with tempfile.TemporaryDirectory(prefix="sottovoce-baseline-") as folder:
        out = Path(folder)
        call = pickle.dumps((job, out))  # unpickled in the process, without the collector
        process = multiprocessing.get_context("spawn").Process(
            target=call_started_up, args=(f"{__name__}:{_main.__name__}", call)
        )
        process.start()
        process.join()
        if process.exitcode != 0 or not (out / RESULT).exists():
            raise BaselineProcessError(
                f"the backprop baseline's process failed (exit code {process.exitcode})"
            )
        report = json.loads((out / RESULT).read_text(encoding="utf-8"))
        weights = torch.load(out / WEIGHTS, weights_only=True)
    model = trainable_copy(base, job.config)
    missing = set(report["trainable_names"]) - set(weights)
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if missing or unexpected:
        raise BaselineProcessError(
            f"the baseline's weights do not fit the model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected)"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    result = TrainingResult(
        model=model,
        epochs_run=report["epochs_run"],
        steps=report["steps"],
        wall_seconds=report["training_seconds"],
        trainable_parameters=report["trainable_parameters"],
        trainable_names=report["trainable_names"],
        selection_accuracy=report["selection_accuracy"],
        reached_target=report["reached_target"],
    )
    return result, report["cost"]


def _main(job: BaselineJob, out: Path) -> None:
    """The baseline's process: load, prefix, train, write result and weights."""
    started = time.perf_counter()
    torch.set_num_threads(job.threads)
    with start_up():  # this process's own: its start-up is not walked again, nor at exit
        loaded = load_model(job.model_name, dtype="float32", cache_dir=job.cache_dir)
    loaded_s = time.perf_counter() - started
    fitness = build_fitness(job.fitness, loaded.tokenizer)
    split = job.config.first_trained_block(loaded.model)
    scorer = SharedPrefixScorer(loaded.model, fitness, split, max_batch=job.max_batch)
    scorer.add("members", job.members)
    scorer.add("selection", job.selection)
    result = train(
        loaded.model,
        scorer,
        "members",
        job.config,
        selection_set="selection",
        target_accuracy=job.target_accuracy,
        in_place=True,  # this process needs the base model for nothing else
    )
    state = result.model.state_dict()
    torch.save({name: state[name] for name in result.trainable_names}, out / WEIGHTS)
    total_s = time.perf_counter() - started
    report = {
        "epochs_run": result.epochs_run,
        "steps": result.steps,
        "training_seconds": result.wall_seconds,
        "trainable_parameters": result.trainable_parameters,
        "trainable_names": result.trainable_names,
        "selection_accuracy": result.selection_accuracy,
        "reached_target": result.reached_target,
        "cost": {
            "wall_seconds": round(total_s, 1),
            "model_load_seconds": round(loaded_s, 1),
            "compute_seconds": round(total_s - loaded_s, 1),
            "forward_passes": scorer.forward_passes,
            "training_steps": result.steps,
            "peak_rss_bytes": peak_rss_bytes(),
            "threads": job.threads,
            "config": asdict(job.config),
        },
    }
    (out / RESULT).write_text(json.dumps(report), encoding="utf-8")
