"""A simulated federation's files: the bundled data split into holders, each with a policy.

``sottovoce simulate`` and ``sottovoce federation`` (for Docker or a local deployment)
both write ``holder-<i>/{data.jsonl, policy.toml}`` folders: one training shard each and a
policy allowing exactly the run's setting, as a cautious holder would write it. The test
split is never written to a holder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sottovoce.api import read_config
from sottovoce.client.policy import HolderPolicy, policy_toml
from sottovoce.common.accounting import PrivacyAccountant, answer_epsilon, answer_event
from sottovoce.common.config import RunConfig
from sottovoce.common.data import (
    Record,
    SentimentSplits,
    records_hash,
    sentiment_records,
    shard,
    split_sentiment,
    write_jsonl,
)
from sottovoce.common.errors import ConfigError
from sottovoce.common.models import load_model
from sottovoce.common.protocol.answers import ANSWER_MECHANISMS, DIVERGENCE_PENALTY_MECHANISMS


@dataclass
class Federation:
    """The files a simulated federation runs on."""

    run_dir: Path
    holder_dirs: list[Path]
    test: list[Record]
    train: list[Record]
    test_hash: str


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
        policy = holder_policy_toml(config, fingerprint, ledger_dir, min_examples=smallest)
        (holder_dir / "policy.toml").write_text(policy, encoding="utf-8")
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


def holder_policy_toml(
    config: RunConfig, fingerprint: str, state_dir: Path, *, min_examples: int
) -> str:
    """A policy that allows exactly this run's setting (what a cautious holder would write)."""
    policy = simulated_policy(config, fingerprint, state_dir, min_examples=min_examples)
    return policy_toml(
        policy, header="A simulated data holder's policy: exactly one run's setting."
    )


def simulated_policy(
    config: RunConfig,
    fingerprint: str,
    state_dir: Path,
    *,
    min_examples: int,
    max_lambda: int | None = None,
) -> HolderPolicy:
    """The policy of a simulated holder with ``min_examples`` or more records.

    ``max_lambda``: the seed lanes a round may use, if more than its candidates (a study
    strategy that picks its candidates among more directions).
    """
    if config.run.algorithm == "dpzero":
        lanes = 1
        max_scale = max(config.dpzero.smoothing, config.dpzero.max_coefficient)
    else:
        lanes, max_scale = config.optimizer.candidates, config.optimizer.max_step
    max_lambda = max(lanes, max_lambda or 0)
    epsilon = _policy_epsilon(config)
    # A chunk-vote run pins its own mechanism (and never carries a divergence penalty: the
    # run config refuses that pair).
    chunk_votes = {
        "answer_mechanisms": (
            tuple(sorted(DIVERGENCE_PENALTY_MECHANISMS))
            if config.fitness.penalizes_divergence
            else ANSWER_MECHANISMS
        ),
        **_chunk_vote_pins(config, epsilon),
    }
    # es-mu-lambda logs one step for each of a round's selected seeds
    steps = config.run.max_rounds * (max_lambda if config.run.algorithm == "es-mu-lambda" else 1)
    return HolderPolicy(
        max_bits=config.simulate.max_holder_policy_bits,
        expected_model_fingerprint=fingerprint,
        allowed_algorithms=(config.run.algorithm,),
        parametrizations=(config.parametrization,),
        max_lambda=max_lambda,
        max_perturbation_scale=float(max_scale),
        max_drift_linf=config.simulate.max_holder_drift_linf,
        max_drift_l2=config.simulate.max_holder_drift_l2,
        max_rounds_per_run=config.run.max_rounds,
        max_steps_per_run=steps,
        max_new_steps_per_task=steps,
        fitness=config.fitness,
        ledger_dir=state_dir,
        min_batch_size=min(16, config.evaluation.batch_size),
        min_examples=min_examples,
        allowed_batch_modes=(config.evaluation.mode,),
        max_epsilon=epsilon,
        delta=None if epsilon is None else config.privacy.delta,
        require_dp=epsilon is not None,
        **chunk_votes,
    )


def _chunk_vote_pins(config: RunConfig, epsilon: float | None) -> dict[str, Any]:
    """For a chunk-vote run, what its holders pin: the mechanism itself, at least the run's
    number of chunks, and no single answer dearer than one of the run's own."""
    dp = config.dp_spec()
    if config.run.algorithm == "dpzero" or dp.chunks == 0:
        return {}
    pins: dict[str, Any] = {"answer_mechanisms": ("chunk-vote",), "min_chunks": dp.chunks}
    event = answer_event(dp, config.answer_kind, config.optimizer.candidates, None)
    if event is not None and epsilon is not None:
        pins["max_answer_epsilon"] = answer_epsilon(event, config.privacy.delta) * (1 + 1e-6)
    return pins


def _policy_epsilon(config: RunConfig) -> float | None:
    """The policy's lifetime ε: by default exactly what this run needs, no more."""
    dp = config.privacy
    if config.simulate.max_holder_policy_epsilon is not None:
        return config.simulate.max_holder_policy_epsilon
    if config.run.algorithm == "dpzero" and dp.epsilon is not None:
        return dp.epsilon * (1 + 1e-4)  # calibration's tolerance
    if dp.randomized_response_epsilon is not None or (
        dp.chunks is not None and (dp.epsilon is not None or dp.vote_noise is not None)
    ):
        event = answer_event(
            config.dp_spec(), config.answer_kind, config.optimizer.candidates, None
        )
        assert event is not None  # randomized response or noisy chunk votes are on
        return PrivacyAccountant([event] * config.run.max_rounds).epsilon(dp.delta) * (1 + 1e-4)
    return None
